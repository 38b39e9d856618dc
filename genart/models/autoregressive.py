"""Autoregressive image models over palette tokens (ImageGPT, Chen et al. 2020; PixelRNN, van den Oord et al. 2016).

    genart palette --data data/synth16 --colors 16
    genart train workflows/configs/autoregressive_transformer.yaml --set data.path=data/synth16
Every pixel is the index of its nearest palette colour; the image is a raster-order sequence of those tokens and
the model predicts each from the ones before it (and an optional class token). Two backbones, one embedding and
one weight-tied output head: `transformer` (decoder-only, causal SDPA, learned 2-D positions, pre-norm) and `lstm`.
Loaded: `.sample(seeds)`, `.complete(images, seeds)` (top rows given, the rest sampled), `.interpolate(a, b, steps)`.
"""

from __future__ import annotations

import math
from typing import Iterable, Literal, Sequence

import torch
from PIL import Image
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from genart import storage
from genart.config import Section
from genart.data.palette import MAX_COLORS, MIN_COLORS, from_tokens, grid_palette, palette_path, read_palette, to_tokens
from genart.errors import UserError
from genart.models.family import GenerativeLoaded, check_size, device_of, meta_from_state
from genart.models.sampling import (check_guidance, check_images01, default_label, latents, make_grid, resize,
                                    stop_point, trained_for_guidance)
from genart.models.training import Precision, check_conditional, eval_mode, finite, labels_of, unwrap

SIZES = (8, 16, 24, 32, 48, 64)
GRID = "grid"  # model.palette: an even RGB lattice instead of a fitted palette


def completion_rows(rows: int | None, image_size: int) -> int:
    """The one rule for the top rows a completion keeps (default: half): 0..image_size, else a UserError.
    `Loaded.complete` applies it, and the Serve ingress before it calls a replica (a 422 there)."""
    rows = image_size // 2 if rows is None else int(rows)
    if not 0 <= rows <= image_size:
        raise UserError(f"rows {rows}: must be between 0 and the image size {image_size}")
    return rows


class AutoregressiveConfig(Section):
    family: Literal["autoregressive"] = "autoregressive"  # model family tag
    backbone: Literal["transformer", "lstm"] = "transformer"  # sequence model over the token grid
    colors: int = Field(16, ge=MIN_COLORS, le=MAX_COLORS)  # palette size K = vocabulary size
    # palette file from `genart palette`; null = <data.path>/palette-<colors>.json (filled in by `genart train`;
    # a model built outside training without one uses "grid"); "grid" = an even RGB lattice, no fitting
    palette: str | None = None
    embed_dim: int = Field(64, ge=8)  # token / position embedding width (= transformer width = LSTM hidden size)
    num_layers: int = Field(2, ge=1)  # transformer blocks or LSTM layers
    num_heads: int = Field(4, ge=1)  # attention heads (transformer); embed_dim must divide by it
    mlp_ratio: int = Field(4, ge=1)  # transformer MLP width / embed_dim
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout on attention, MLP and LSTM outputs while training
    conditional: bool = False  # a class token starts the sequence (needs a labelled dataset)
    # Classifier-free guidance (Ho & Salimans 2022; Parti and LlamaGen for token models): training starts this share
    # of the sequences with a "no class" token, so one net models p(x | class) and p(x); sampling then takes
    # logits = uncond + guidance * (cond - uncond), which draws pictures more typical of their class. guidance 1 = off;
    # above 1 needs a model trained with label_dropout > 0.
    label_dropout: float = Field(0.0, ge=0, lt=1)
    guidance: float = Field(1.0, ge=0)
    lr: float = Field(1e-3, gt=0)  # AdamW learning rate (after warm-up)
    warmup_steps: int = Field(100, ge=0)  # linear learning-rate warm-up from 0
    weight_decay: float = Field(0.01, ge=0)  # AdamW weight decay (matrices only, not embeddings or norms)
    temperature: float = Field(1.0, gt=0)  # sampling temperature (x truncation at sample time; 0 truncation = argmax)
    top_k: int = Field(0, ge=0)  # sample from the k likeliest tokens only; 0 = all
    grid_size: int = Field(16, ge=2)  # samples in the grid at each checkpoint (plus a row of completions)
    renamed = {"num_samples": "grid_size"}  # the old name of grid_size still loads
    resume_free = ("palette",)  # the resolved palette file's path; the palette itself is in the weights

    @model_validator(mode="after")
    def _guidance_trained_for(self) -> "AutoregressiveConfig":
        check_trained_for_guidance(self.guidance, self.conditional, self.label_dropout)
        return self

    def resolve_paths(self, data_path: str) -> "AutoregressiveConfig":
        """Training fills in the dataset's palette file, so the resolved config.yaml names the one it used; a palette
        file given relative to where genart started is made absolute (Ray Train workers run in another folder)."""
        if self.palette == "grid":
            return self
        palette = palette_path(data_path, self.colors) if self.palette is None else storage.absolute(self.palette)
        return self.model_copy(update={"palette": palette})


def check_trained_for_guidance(guidance: float, conditional: bool, label_dropout: float) -> None:
    """Guidance mixes the class's logits with the "no class" ones: a config asking for it must train for it (checked
    when the config loads, not at the first checkpoint grid)."""
    if guidance != 1 and not trained_for_guidance(conditional, label_dropout):
        raise ValueError(f"guidance {guidance:g} needs conditional: true and label_dropout > 0 (e.g. 0.1); "
                         "guidance 1 turns it off")


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)); (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg: AutoregressiveConfig):
        super().__init__()
        d = cfg.embed_dim
        self.heads, self.dropout = cfg.num_heads, cfg.dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(), nn.Linear(cfg.mlp_ratio * d, d), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        b, t, d = x.shape
        query, key, value = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(d, -1))
        past = cache is not None and "key" in cache
        if past:  # one new position attends to every cached one: no mask needed
            if t != 1:
                raise ValueError("a cached step takes one position at a time")
            key, value = torch.cat([cache["key"], key], 2), torch.cat([cache["value"], value], 2)  # (B, h, T', hd)
        if cache is not None:
            cache["key"], cache["value"] = key, value
        attn = F.scaled_dot_product_attention(query, key, value, is_causal=not past and t > 1,
                                              dropout_p=self.dropout if self.training else 0.0)  # (B, h, t, hd)
        x = x + F.dropout(self.proj(attn.transpose(1, 2).reshape(b, t, d)), self.dropout, self.training)
        return x + self.mlp(self.ln2(x))


class TokenModel(nn.Module):
    """forward(tokens (B, T), labels (B,) | None) -> logits (B, T, K): position t sees the start token and tokens < t.
    step(previous (B,) | None, t, labels, state) -> (logits (B, K), state): the same, one position at a time, with a
    key/value cache (transformer) or the LSTM's (h, c)."""

    def __init__(self, cfg: AutoregressiveConfig, image_size: int, num_labels: int):
        super().__init__()
        d = cfg.embed_dim
        self.size, self.backbone = image_size, cfg.backbone
        # (K, 3) in [0, 1], saved with the weights; the lattice until training fills in its palette or a checkpoint loads
        self.register_buffer("palette", grid_palette(cfg.colors))
        self.token = nn.Embedding(cfg.colors, d)
        # the class tokens (plus a "no class" one, the last, when trained for guidance), or one start token
        self.null_label = num_labels if trained_for_guidance(cfg.conditional, cfg.label_dropout) else None
        self.start = nn.Embedding(num_labels + (self.null_label is not None) if cfg.conditional else 1, d)
        self.row, self.col = nn.Parameter(torch.zeros(image_size, d)), nn.Parameter(torch.zeros(image_size, d))
        if cfg.backbone == "transformer":
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        else:
            self.lstm = nn.LSTM(d, d, cfg.num_layers, batch_first=True, dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
            self.out_dropout = cfg.dropout  # on the last layer's outputs (torch's LSTM drops between layers only)
        self.norm = nn.LayerNorm(d)
        for p in (self.token.weight, self.start.weight, self.row, self.col):
            nn.init.normal_(p, std=0.02)
        for block in getattr(self, "blocks", []):  # GPT-2: residual projections scaled down with depth
            nn.init.normal_(block.proj.weight, std=0.02 / math.sqrt(2 * cfg.num_layers))

    def positions(self, start: int, length: int) -> torch.Tensor:
        """(length, D): learned row + column embeddings of raster positions start .. start+length-1."""
        index = torch.arange(start, start + length, device=self.row.device)
        return self.row[index // self.size] + self.col[index % self.size]

    def _start(self, labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        index = labels if labels is not None else torch.zeros(batch, dtype=torch.long, device=self.row.device)
        return self.start(index)[:, None]  # (B, 1, D)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h) @ self.token.weight.T  # weight-tied output: (..., D) -> (..., K)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        b, t = tokens.shape
        x = torch.cat([self._start(labels, b), self.token(tokens[:, : t - 1])], 1) + self.positions(0, t)  # (B, T, D)
        if self.backbone == "transformer":
            for block in self.blocks:
                x = block(x)
        else:
            x = F.dropout(self.lstm(x)[0], self.out_dropout, self.training)
        return self._head(x)

    def step(self, previous: torch.Tensor | None, t: int, labels: torch.Tensor | None, state, batch: int):
        x = (self._start(labels, batch) if previous is None else self.token(previous)[:, None]) + self.positions(t, 1)  # (B, 1, D)
        if self.backbone == "transformer":
            state = state or [{} for _ in self.blocks]
            for block, cache in zip(self.blocks, state):
                x = block(x, cache)
        else:
            x, state = self.lstm(x, state)
        return self._head(x[:, 0]), state


def pick(logits: torch.Tensor, uniform: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """(B, K) logits + one uniform number per row -> (B,) tokens by inverse-CDF sampling: the noise, not a global
    RNG, decides, so an image depends only on its seed. temperature 0 = the likeliest token."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.double() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = logits.softmax(-1).cumsum(-1)  # (B, K)
    return torch.searchsorted(cdf, (uniform.double() * cdf[:, -1]).unsqueeze(-1)).squeeze(-1).clamp(max=logits.shape[-1] - 1)


def drop_labels(net: TokenModel, labels: torch.Tensor | None, rate: float) -> torch.Tensor | None:
    """While training for guidance: each label becomes the "no class" token with probability `rate`."""
    null = unwrap(net).null_label
    if labels is None or null is None or rate <= 0:
        return labels
    return labels.masked_fill(torch.rand(labels.shape, device=labels.device) < rate, null)


@torch.no_grad()
def sample_tokens(net: TokenModel, uniforms: torch.Tensor, labels: torch.Tensor | None, temperature: float, top_k: int,
                  prefix: torch.Tensor | None = None, cache: bool = True, guidance: float = 1.0) -> torch.Tensor:
    """uniforms (N, L) in [0, 1) -> tokens (N, L). The first prefix.shape[1] tokens are given (completion).
    guidance != 1 runs each sequence twice, with its class and with the "no class" token, and samples from
    uncond + guidance * (cond - uncond). cache=False re-runs the whole prefix for every position: the slow
    reference the cache must agree with."""
    n, length = uniforms.shape
    tokens = torch.zeros(n, length, dtype=torch.long, device=uniforms.device)
    given = 0 if prefix is None else prefix.shape[1]
    guided = labels is not None and guidance != 1
    if guided:
        if net.null_label is None:
            raise UserError(f"guidance {guidance:g} needs a model trained with model.label_dropout > 0; this one was not "
                            "(use guidance 1)")
        labels = torch.cat([labels, torch.full_like(labels, net.null_label)])
    copies = 2 if guided else 1
    state = None
    for t in range(length):
        stop_point()  # a cancelled Serve request stops here, within one token's step
        if cache:
            logits, state = net.step(tokens[:, t - 1].repeat(copies) if t else None, t, labels, state, n * copies)
        else:
            logits = net(tokens[:, : t + 1].repeat(copies, 1), labels)[:, t]
        if guided:
            cond, uncond = logits.float().chunk(2)
            logits = uncond + guidance * (cond - uncond)
        tokens[:, t] = prefix[:, t] if t < given else pick(logits, uniforms[:, t], temperature, top_k)
    return tokens


def uniforms(seeds: list[int], length: int) -> torch.Tensor:
    """(N, length) uniforms in [0, 1): the standard-normal latents of the seeds through the normal CDF."""
    return torch.special.ndtr(latents(seeds, length).double()).clamp(max=1 - 1e-12)


def bits_per_dim(nats_per_token: torch.Tensor) -> torch.Tensor:
    """Token NLL (nats) -> bits per RGB sub-pixel: a token stands for 3 dims. Over palette tokens, not 8-bit values:
    comparable between genart models with the same palette, not with PixelCNN's 8-bit figures."""
    return nats_per_token / math.log(2) / 3


class AutoregressiveLoaded(GenerativeLoaded):
    """`.sample(seeds, labels, truncation, temperature, top_k)`; truncation scales the temperature (0 = greedy)."""

    family = "autoregressive"

    def __init__(self, nets: dict, meta: dict, checkpoint_hash: str, cfg: AutoregressiveConfig):
        super().__init__(nets, meta, checkpoint_hash)  # "model", the token net (and the vqvae family's decoder)
        self.cfg, self.conditional = cfg, cfg.conditional
        self.side = self.nets["model"].size  # tokens per row: one per pixel here, one per 4x4 patch in vqvae
        self.latent_dim = self.side**2  # one uniform per token

    @property
    def guidance_trained(self) -> bool:
        """Trained with a "no class" start token: sampling can take guidance above 1."""
        return self.nets["model"].null_label is not None

    @property
    def palette(self) -> torch.Tensor:
        return self.nets["model"].palette

    def _images(self, tokens: torch.Tensor) -> torch.Tensor:
        return from_tokens(tokens, self.palette, self.image_size).float()

    def _sample(self, noise, labels, truncation, temperature, top_k, prefix=None, cache=True, guidance=None) -> torch.Tensor:
        from genart.models.sampling import truncate

        temp = float(self.cfg.temperature if temperature is None else temperature) * float(truncate(torch.ones(1), truncation))
        k = self.cfg.top_k if top_k is None else int(top_k)
        scale = float(self.cfg.guidance if guidance is None else guidance)
        return sample_tokens(self.nets["model"], noise.to(self.device), labels, temp, k, prefix, cache, scale)

    @torch.no_grad()
    def sample(self, seeds: list[int], labels: list[int] | None = None, truncation: float = 1.0,
               temperature: float | None = None, top_k: int | None = None, cache: bool = True,
               guidance: float | None = None) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1], a pure function of (seed, label, truncation, temperature, top_k, guidance);
        None = the model's config."""
        seeds = list(seeds)
        if not seeds:
            raise UserError("sample: give at least one seed")
        check_guidance(guidance, self.family, self.guidance_trained)  # as GenerativeLoaded.sample does
        noise = uniforms(seeds, self.latent_dim)
        return self._images(self._sample(noise, self._labels(seeds, labels), truncation, temperature, top_k, cache=cache,
                                         guidance=guidance))

    def _tokens(self, x01: torch.Tensor) -> torch.Tensor:
        return to_tokens(x01, self.palette)

    def tokens(self, images01: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) in [0, 1] -> (N, side^2) tokens after the training crop + resize to image_size."""
        return self._tokens(resize(check_images01(images01, "tokens").to(self.device).float(), self.image_size))

    @torch.no_grad()
    def complete(self, images01: torch.Tensor, seeds: list[int] | None = None, labels: list[int] | None = None,
                 rows: int | None = None, truncation: float = 1.0) -> torch.Tensor:
        """Keep the top `rows` rows of each image (default: half), sample the rest: (N, 3, S, S) in [0, 1].

        A class-conditional model without `labels` completes each image as its own class: the one under which its
        kept rows are likeliest (not the seed's default class, which would draw another genre below the cut)."""
        prefix = self.tokens(images01)
        seeds = list(range(len(prefix))) if seeds is None else list(seeds)
        if len(seeds) != len(prefix):
            raise UserError(f"complete: {len(seeds)} seeds for {len(prefix)} images; give one seed per image")
        rows = completion_rows(rows, self.image_size)
        noise = uniforms(seeds, self.latent_dim)
        keep = rows * self.side // self.image_size * self.side  # the tokens of the kept rows
        kept = prefix[:, :keep]
        if labels is not None or not self.conditional or keep == 0:  # nothing kept: each seed's own class, as sample
            classes = self._labels(seeds, labels)
        else:
            classes = self.likeliest_labels(kept)
        tokens = self._sample(noise, classes, truncation, None, None, kept)
        return self._images(tokens)

    @torch.no_grad()
    def likeliest_labels(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T) leading tokens -> (N,) the class under which each sequence is likeliest (summed token NLL)."""
        net = self.nets["model"]
        nll = torch.stack([
            F.cross_entropy(net(tokens, torch.full((len(tokens),), k, device=tokens.device)).float().transpose(1, 2),
                            tokens, reduction="none").sum(1)
            for k in range(self.num_labels)])  # (K, N)
        return nll.argmin(0)

    @torch.no_grad()
    def interpolate(self, seed_a: int, seed_b: int, steps: int, label: int | None = None) -> torch.Tensor:
        """There is no latent space to walk: image i keeps seed_a's sampling noise for the first (1 - i/(steps-1)) of
        the raster and takes seed_b's for the rest, so frame 0 is seed_a's sample, the last has seed_b's noise, and each
        frame in between shares seed_a's top rows (exactly: the tokens there are the same) and then diverges. A
        class-conditional model stays in one class, `label` or seed_a's own (as the latent families' walks)."""
        from genart.models.sampling import slerp

        slerp(torch.ones(2), torch.ones(2), int(steps))  # the same steps check as the latent families
        a, b = uniforms([seed_a], self.latent_dim)[0], uniforms([seed_b], self.latent_dim)[0]
        cuts = [round(self.latent_dim * (1 - i / (steps - 1))) for i in range(steps)]
        noise = torch.stack([torch.cat([a[:c], b[c:]]) for c in cuts])  # (steps, L)
        labels = self._labels([seed_a] * steps, None if label is None else [label] * steps)
        return self._images(self._sample(noise, labels, 1.0, None, None))


class AutoregressiveFamily:
    name = "autoregressive"
    config_cls = AutoregressiveConfig
    supported_sizes = SIZES
    needs_labels = False
    generative = True
    best_metric = ("val_bits_per_dim", "min")
    default_augment = "flip"  # no crops: the model must learn the pictures as they are
    recent_batches = 0  # before_checkpoint needs no training batches

    def build(self, cfg: AutoregressiveConfig, image_size: int, num_labels: int, inference: bool = False) -> dict[str, nn.Module]:
        check_size(self.name, image_size, SIZES)
        check_conditional(cfg.conditional, num_labels)
        if cfg.backbone == "transformer" and cfg.embed_dim % cfg.num_heads:
            raise UserError(f"model.embed_dim {cfg.embed_dim} must be divisible by model.num_heads {cfg.num_heads}")
        net = TokenModel(cfg, image_size, num_labels)
        if not inference and cfg.palette not in (None, GRID):  # inference reads the palette from the checkpoint's weights
            net.palette.copy_(read_palette(cfg.palette, cfg.colors))
        return {"model": net}

    def trainable(self) -> tuple[str, ...]:
        return ("model",)

    def optimizers(self, cfg: AutoregressiveConfig, nets: dict) -> dict[str, torch.optim.Optimizer]:
        params = [p for p in nets["model"].parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim == 2 and p.shape[0] > 0 and not _is_embedding(nets["model"], p)]
        rest = [p for p in params if all(p is not q for q in decay)]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        return {"model": torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))}

    def train_step(self, cfg: AutoregressiveConfig, nets: dict, opts: dict, batch: dict, step: int,
                   precision: Precision | None = None) -> dict[str, float]:
        precision = precision or Precision()
        net = nets["model"]
        net.train()
        tokens = to_tokens((batch["image"] + 1) / 2, unwrap(net).palette)  # (B, L), from the images on the fly
        labels = drop_labels(net, labels_of(batch, required=cfg.conditional), cfg.label_dropout)
        for group in opts["model"].param_groups:  # a pure function of the step: resumes need no scheduler state
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        with precision.autocast():
            logits = net(tokens, labels)  # (B, L, K)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        opts["model"].zero_grad(set_to_none=True)
        precision.step("model", loss, opts["model"])
        return finite({"loss": loss.item(), "bits_per_dim": float(bits_per_dim(loss.detach()))}, "autoregressive")

    def before_checkpoint(self, cfg, nets: dict, recent: Sequence[dict] = ()) -> None:
        """Nothing to bring up to date: the trained net is the inference net."""

    def evaluate(self, cfg: AutoregressiveConfig, nets: dict, batches: Iterable[dict]) -> dict[str, float]:
        """val_bits_per_dim: the val split's token NLL in bits per RGB sub-pixel (see bits_per_dim)."""
        net = unwrap(nets["model"])
        device = device_of(nets)
        total, count = 0.0, 0
        with eval_mode(net):
            for batch in batches:
                tokens = to_tokens((batch["image"].to(device).float() + 1) / 2, net.palette)
                labels = batch["label"].to(device).long().clamp(min=0) if cfg.conditional else None
                total += F.cross_entropy(net(tokens, labels).float().flatten(0, 1), tokens.flatten(), reduction="sum").item()
                count += tokens.numel()
        return {"val_bits_per_dim": float(bits_per_dim(torch.tensor(total / count)))} if count else {}

    def fixed_inputs(self, cfg: AutoregressiveConfig, image_size: int, num_labels: int, example_batch: dict) -> dict:
        nrow = int(math.ceil(math.sqrt(cfg.grid_size)))
        fixed = {"noise": uniforms(range(cfg.grid_size), image_size**2), "images": example_batch["image"][:nrow].detach().cpu().float()}
        if cfg.conditional:  # classes in turn, as `.sample` gives seeds 0, 1, 2, ...
            fixed["labels"] = torch.tensor([default_label(s, max(num_labels, 1)) for s in range(cfg.grid_size)])
            fixed["image_labels"] = example_batch["label"][:nrow].long().clamp(min=0)
        return fixed

    def sample_images(self, cfg: AutoregressiveConfig, nets: dict, fixed: dict) -> Image.Image:
        """Samples, then a row of real images (as palette tokens) and a row of their completions from the top half."""
        net = unwrap(nets["model"])
        device = device_of(nets)
        size = net.size
        with eval_mode(net):
            labels = fixed.get("labels")
            samples = sample_tokens(net, fixed["noise"].to(device), None if labels is None else labels.to(device), cfg.temperature,
                                    cfg.top_k, guidance=cfg.guidance)
            real = to_tokens((fixed["images"].to(device) + 1) / 2, net.palette)  # (n, L)
            image_labels = fixed.get("image_labels")
            done = sample_tokens(net, fixed["noise"][: len(real)].to(device), None if image_labels is None else image_labels.to(device),
                                 cfg.temperature, cfg.top_k, prefix=real[:, : (size // 2) * size], guidance=cfg.guidance)
        nrow = int(math.ceil(math.sqrt(cfg.grid_size)))
        pictures = [from_tokens(t, net.palette, size) for t in (samples, real, done)]
        pad = nrow - len(samples) % nrow if len(samples) % nrow else 0
        blank = torch.ones(pad, 3, size, size, device=device)
        return make_grid(torch.cat([pictures[0], blank, pictures[1], pictures[2]]), nrow=nrow)

    def inference(self, cfg: AutoregressiveConfig, nets: dict, state: dict) -> AutoregressiveLoaded:
        return AutoregressiveLoaded({"model": unwrap(nets["model"])}, meta_from_state(state), state.get("checkpoint_hash", ""), cfg)


def _is_embedding(net: nn.Module, p: torch.Tensor) -> bool:
    net = unwrap(net)
    return any(p is q for q in (net.token.weight, net.start.weight, net.row, net.col))


FAMILY = AutoregressiveFamily()
