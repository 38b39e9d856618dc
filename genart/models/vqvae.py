"""VQ-VAE with a Transformer prior (van den Oord et al. 2017; Razavi et al. 2019): images as maps of codebook tokens,
new images as token maps drawn by genart's own `TokenModel`, then decoded.

    genart train workflows/configs/vqvae.yaml --set data.path=results/quickstart/data/synth
One run trains both, one after the other: steps [0, prior_start_step) train the VQ-VAE (an EMA codebook, dead
entries restarted at encoder outputs, straight-through gradients); from prior_start_step on the VQ-VAE is frozen
and the prior learns the token maps of the training batches (raster order, the genre as start token). The VAE's
Gaussian over a vector code draws the stripes genre as colour fields (README, "Sample quality"); token maps keep
the bands, and a sequence model over them can draw them.
Loaded: `.sample(seeds, labels, truncation)`, `.interpolate`, `.complete(images)` (as the autoregressive family:
it is one, over tokens instead of palette colours) and `.reconstruct(x)` (as the VAE).
"""

from __future__ import annotations

import math
from typing import Iterable, Literal, Sequence

import torch
import torch.distributed as dist
from PIL import Image
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from genart.config import Section
from genart.data.palette import MAX_COLORS
from genart.errors import UserError
from genart.models import autoregressive
from genart.models.autoregressive import (AutoregressiveConfig, AutoregressiveLoaded, TokenModel, check_trained_for_guidance,
                                          drop_labels, sample_tokens, uniforms)
from genart.models.family import check_size, device_of, meta_from_state
from genart.models.sampling import check_images01, default_label, reconstruction_grid, through_square
from genart.models.training import Precision, check_conditional, eval_mode, finite, labels_of, unwrap

SIZES = (16, 32, 64)
DOWNSAMPLE = 4  # image side / token-map side: 32 px -> an 8x8 map, 64 tokens
# An entry whose assignments (EMA of its count per batch) fall below DEAD_USAGE is dead: restarted at an encoder
# output. New and restarted entries start at twice that, so one no batch picks is restarted after ~70 steps (decay
# 0.99). Starting them at 1 left ~85 % of the codebook unused for the first ~250 steps (measured, vqvae.yaml's model,
# batch 64: train MSE 0.093 vs 0.064 at step 200; the same at 600, val 0.035 vs 0.037): short runs gain.
DEAD_USAGE = 0.06
START_USAGE = 2 * DEAD_USAGE


class VQVAEConfig(Section):
    family: Literal["vqvae"] = "vqvae"  # model family tag
    codebook_size: int = Field(256, ge=2, le=MAX_COLORS)  # codebook entries K = the prior's vocabulary
    code_dim: int = Field(32, ge=1)  # width of a codebook entry
    channels: int = Field(128, ge=2)  # hidden width of encoder and decoder (half of it at full resolution)
    res_blocks: int = Field(2, ge=0)  # residual blocks at token resolution, in the encoder and in the decoder
    commitment: float = Field(0.25, ge=0)  # weight of ||encoder output - its entry||^2 (the paper's beta)
    ema_decay: float = Field(0.99, gt=0, lt=1)  # codebook entries are EMA means of the outputs assigned to them
    lr: float = Field(1e-3, gt=0)  # Adam, VQ-VAE steps
    # Steps [0, prior_start_step) train the VQ-VAE, the later ones the prior on its frozen codes (train.max_steps =
    # prior_start_step + prior_steps)
    prior_start_step: int = Field(600, ge=1)  # 0 would leave the codebook unstarted: every code token 0
    prior_steps: int = Field(4000, ge=1)  # length of the prior's cosine learning-rate decay (to 10 %, then held)
    prior_embed_dim: int = Field(128, ge=8)  # the prior Transformer's width
    prior_layers: int = Field(4, ge=1)  # its blocks
    prior_heads: int = Field(4, ge=1)  # its attention heads (prior_embed_dim divisible by it)
    prior_dropout: float = Field(0.1, ge=0, lt=1)  # dropout in the prior while training: 200 pictures a genre over-fit
    prior_lr: float = Field(1e-3, gt=0)  # AdamW, after warm-up
    prior_warmup_steps: int = Field(100, ge=0)  # the prior's linear learning-rate warm-up, in prior steps
    prior_weight_decay: float = Field(0.01, ge=0)  # AdamW weight decay on the prior (matrices only, not embeddings or norms)
    conditional: bool = False  # the genre starts each token sequence: samples per genre (needs labelled data)
    label_dropout: float = Field(0.0, ge=0, lt=1)  # share of prior sequences started "no genre": needed for guidance
    guidance: float = Field(1.0, ge=0)  # classifier-free guidance at sampling (1 = off; see AutoregressiveConfig)
    temperature: float = Field(1.0, gt=0)  # sampling temperature (x truncation at sample time; 0 truncation = argmax)
    top_k: int = Field(0, ge=0)  # sample from the k likeliest tokens only; 0 = all
    grid_size: int = Field(32, ge=2)  # grid at each checkpoint: half reconstructions, half samples

    @model_validator(mode="after")
    def _guidance_trained_for(self) -> "VQVAEConfig":
        check_trained_for_guidance(self.guidance, self.conditional, self.label_dropout)
        return self

    def prior_config(self) -> AutoregressiveConfig:
        """The prior as the autoregressive family's config: a Transformer over `codebook_size` tokens."""
        return AutoregressiveConfig(colors=self.codebook_size, palette=autoregressive.GRID, embed_dim=self.prior_embed_dim,
                                    num_layers=self.prior_layers, num_heads=self.prior_heads, dropout=self.prior_dropout,
                                    conditional=self.conditional, lr=self.prior_lr, warmup_steps=self.prior_warmup_steps,
                                    weight_decay=self.prior_weight_decay, temperature=self.temperature, top_k=self.top_k,
                                    label_dropout=self.label_dropout, guidance=self.guidance)


class Residual(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, 1, 1), nn.ReLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Codebook(nn.Module):
    """K entries of width D, each the EMA mean of the encoder outputs assigned to it (the paper's appendix).

    Under DDP every rank adds the same all-reduced counts and sums, and starts and restarts come from rank 0, so every
    rank holds the same codebook at every step (DDP's buffer broadcast would repair a difference only a step late).
    """

    def __init__(self, size: int, dim: int, decay: float):
        super().__init__()
        self.size, self.dim, self.decay = size, dim, decay
        self.register_buffer("entries", torch.zeros(size, dim))
        self.register_buffer("usage", torch.zeros(size))  # EMA of how many outputs each entry got per batch
        self.register_buffer("sums", torch.zeros(size, dim))  # EMA of the sum of those outputs
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))  # entries set from a first batch

    def assign(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) index of each vector's nearest entry. In fp32 under autocast too: bf16 distances would
        pick wrong entries."""
        with torch.autocast(flat.device.type, enabled=False):
            flat = flat.float()
            dist_sq = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.entries.T + self.entries.pow(2).sum(1)[None]
            return dist_sq.argmin(1)

    @torch.no_grad()
    def update(self, flat: torch.Tensor, tokens: torch.Tensor) -> None:
        """One EMA step with a batch's encoder outputs (N, D) and their assignments (N,), in fp32 (the buffers' type)
        whatever autocast the training step runs under."""
        with torch.autocast(flat.device.type, enabled=False):
            self._update(flat.float(), tokens)

    def _update(self, flat: torch.Tensor, tokens: torch.Tensor) -> None:
        if not bool(self.started):  # start at encoder outputs: entries far from every output would never be picked
            self.entries.copy_(flat[torch.randint(0, len(flat), (self.size,), device=flat.device)])
            _from_rank0(self.entries)
            self.usage.fill_(START_USAGE)
            self.sums.copy_(self.entries * START_USAGE)
            self.started.fill_(True)
        onehot = F.one_hot(tokens, self.size).to(flat.dtype)  # (N, K)
        counts, sums = onehot.sum(0), onehot.T @ flat
        if _world() > 1:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
            counts, sums = counts / _world(), sums / _world()
        self.usage.lerp_(counts, 1 - self.decay)
        self.sums.lerp_(sums, 1 - self.decay)
        self.entries.copy_(self.sums / self.usage.clamp(min=1e-5)[:, None])
        dead = self.usage < DEAD_USAGE
        if bool(dead.any()):
            fresh = flat[torch.randint(0, len(flat), (int(dead.sum()),), device=flat.device)]
            self.entries[dead], self.sums[dead], self.usage[dead] = fresh, fresh * START_USAGE, START_USAGE
            for buf in (self.entries, self.sums):
                _from_rank0(buf)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _from_rank0(t: torch.Tensor) -> None:
    if _world() > 1:
        dist.broadcast(t, 0)


class VQVAE(nn.Module):
    """(B, 3, S, S) in [-1, 1] -> (reconstruction, commitment loss, tokens (B, (S/4)^2)); `encode` / `decode` tokens."""

    def __init__(self, cfg: VQVAEConfig, image_size: int):
        super().__init__()
        c, d = cfg.channels, cfg.code_dim
        self.side = image_size // DOWNSAMPLE
        self.encoder = nn.Sequential(nn.Conv2d(3, c // 2, 4, 2, 1), nn.ReLU(), nn.Conv2d(c // 2, c, 4, 2, 1), nn.ReLU(),
                                     nn.Conv2d(c, c, 3, 1, 1), *[Residual(c) for _ in range(cfg.res_blocks)], nn.ReLU(),
                                     nn.Conv2d(c, d, 1))  # (B, D, S/4, S/4)
        self.decoder = nn.Sequential(nn.Conv2d(d, c, 3, 1, 1), *[Residual(c) for _ in range(cfg.res_blocks)], nn.ReLU(),
                                     nn.ConvTranspose2d(c, c // 2, 4, 2, 1), nn.ReLU(),
                                     nn.ConvTranspose2d(c // 2, 3, 4, 2, 1), nn.Tanh())
        self.codebook = Codebook(cfg.codebook_size, d, cfg.ema_decay)

    def _flat(self, h: torch.Tensor) -> torch.Tensor:
        return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # (B * side^2, D), raster order

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, side^2) -> their entries as a map (B, D, side, side)."""
        b = len(tokens)
        return self.codebook.entries[tokens].view(b, self.side, self.side, -1).permute(0, 3, 1, 2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> tokens (B, side^2)."""
        return self.codebook.assign(self._flat(self.encoder(x)).float()).view(len(x), -1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, side^2) -> (B, 3, S, S) in [-1, 1]."""
        return self.decoder(self.lookup(tokens))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        flat = self._flat(h).float()
        tokens = self.codebook.assign(flat.detach())  # once: the EMA update below moves the entries after the lookup
        q = self.lookup(tokens.view(len(x), -1)).to(h.dtype)
        commit = (h - q.detach()).float().pow(2).mean()
        if self.training:
            self.codebook.update(flat.detach(), tokens)
        return self.decoder(h + (q - h).detach()), commit, tokens.view(len(x), -1)  # straight-through gradients


class VQVAELoaded(AutoregressiveLoaded):
    """The autoregressive family's sampling, completion and interpolation over codebook tokens, decoded by the VQ-VAE;
    plus `.reconstruct(x)`."""

    family = "vqvae"

    def __init__(self, nets: dict, meta: dict, checkpoint_hash: str, cfg: VQVAEConfig):
        super().__init__({"model": nets["prior"], "vqvae": nets["vqvae"]}, meta, checkpoint_hash, cfg.prior_config())

    def _images(self, tokens: torch.Tensor) -> torch.Tensor:
        return ((self.nets["vqvae"].decode(tokens).float() + 1) / 2).clamp(0, 1)

    def _tokens(self, x01: torch.Tensor) -> torch.Tensor:
        return self.nets["vqvae"].encode(x01 * 2 - 1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> decode(encode(x)), same shape (resized to image_size and back, as the VAE's)."""
        vqvae = self.nets["vqvae"]
        return through_square(check_images01(x, "reconstruct").to(self.device), self.image_size,
                              lambda small: vqvae.decode(vqvae.encode(small)))


class VQVAEFamily:
    name = "vqvae"
    config_cls = VQVAEConfig
    supported_sizes = SIZES
    needs_labels = False
    generative = True
    # The prior trains last and its learning rate decays to the end: the latest checkpoint is the one to use
    best_metric = ("step", "max")
    # No crops (the decoder must learn the pictures as they are). Data whose genres keep their look under quarter
    # turns (the synthetic genres, textures) can set data.augment=dihedral: the prior then sees eight views.
    default_augment = "flip"
    recent_batches = 0  # before_checkpoint needs no training batches

    def build(self, cfg: VQVAEConfig, image_size: int, num_labels: int, inference: bool = False) -> dict[str, nn.Module]:
        check_size(self.name, image_size, SIZES)
        check_conditional(cfg.conditional, num_labels)
        if cfg.prior_embed_dim % cfg.prior_heads:
            raise UserError(f"model.prior_embed_dim {cfg.prior_embed_dim} must be divisible by model.prior_heads {cfg.prior_heads}")
        return {"vqvae": VQVAE(cfg, image_size), "prior": TokenModel(cfg.prior_config(), image_size // DOWNSAMPLE, num_labels)}

    def trainable(self) -> tuple[str, ...]:
        return ("vqvae", "prior")

    def optimizers(self, cfg: VQVAEConfig, nets: dict) -> dict[str, torch.optim.Optimizer]:
        prior = autoregressive.FAMILY.optimizers(cfg.prior_config(), {"model": nets["prior"]})["model"]
        return {"vqvae": torch.optim.Adam(nets["vqvae"].parameters(), lr=cfg.lr), "prior": prior}

    def train_step(self, cfg: VQVAEConfig, nets: dict, opts: dict, batch: dict, step: int,
                   precision: Precision | None = None) -> dict[str, float]:
        precision = precision or Precision()
        x = batch["image"]  # (B, 3, S, S) in [-1, 1]
        if step < cfg.prior_start_step:
            vqvae = nets["vqvae"]
            vqvae.train()
            with precision.autocast():
                recon, commit, tokens = vqvae(x)
            mse = (recon.float() - x).pow(2).mean()
            loss = mse + cfg.commitment * commit
            opts["vqvae"].zero_grad(set_to_none=True)
            precision.step("vqvae", loss, opts["vqvae"])
            used = tokens.unique().numel()
            return finite({"loss": loss.item(), "recon_mse": mse.item(), "commit": commit.item(), "codes_used": float(used)}, "vqvae")
        labels = drop_labels(nets["prior"], labels_of(batch, required=cfg.conditional), cfg.label_dropout)
        vqvae = unwrap(nets["vqvae"])  # frozen: no DDP forward, no gradients
        with eval_mode(vqvae):
            tokens = vqvae.encode(x)  # (B, L)
        prior = nets["prior"]
        prior.train()
        for group in opts["prior"].param_groups:  # a pure function of the step: resumes need no scheduler state
            group["lr"] = _prior_lr(cfg, step - cfg.prior_start_step)
        with precision.autocast():
            logits = prior(tokens, labels)  # (B, L, K)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        opts["prior"].zero_grad(set_to_none=True)
        precision.step("prior", loss, opts["prior"])
        return finite({"prior_loss": loss.item()}, "vqvae prior")

    def before_checkpoint(self, cfg, nets: dict, recent: Sequence[dict] = ()) -> None:
        """Nothing to bring up to date: the trained nets are the inference nets."""

    def evaluate(self, cfg: VQVAEConfig, nets: dict, batches: Iterable[dict]) -> dict[str, float]:
        """val_recon_mse (per pixel, [-1, 1] units, as the VAE's) and val_prior_loss (nats per token of the val split's
        token maps under the prior)."""
        vqvae, prior = unwrap(nets["vqvae"]), unwrap(nets["prior"])
        device = device_of(nets)
        mse, nll, images, tokens_seen = 0.0, 0.0, 0, 0
        with eval_mode(vqvae, prior):
            for batch in batches:
                x = batch["image"].to(device).float()
                tokens = vqvae.encode(x)
                mse += (vqvae.decode(tokens) - x).pow(2).mean().item() * len(x)
                labels = batch["label"].to(device).long().clamp(min=0) if cfg.conditional else None
                nll += F.cross_entropy(prior(tokens, labels).float().flatten(0, 1), tokens.flatten(), reduction="sum").item()
                images, tokens_seen = images + len(x), tokens_seen + tokens.numel()
        return {"val_recon_mse": mse / images, "val_prior_loss": nll / tokens_seen} if images else {}

    def fixed_inputs(self, cfg: VQVAEConfig, image_size: int, num_labels: int, example_batch: dict) -> dict:
        half = cfg.grid_size // 2
        fixed = {"images": example_batch["image"][:half].detach().cpu().float(),
                 "noise": uniforms(range(half), (image_size // DOWNSAMPLE) ** 2)}
        if cfg.conditional:  # samples: genres in turn, as `.sample` gives seeds 0, 1, 2, ...
            fixed["labels"] = torch.tensor([default_label(s, max(num_labels, 1)) for s in range(half)])
        return fixed

    def sample_images(self, cfg: VQVAEConfig, nets: dict, fixed: dict) -> Image.Image:
        """Rows alternate real / reconstruction, then samples from the prior (noise before prior_start_step)."""
        vqvae, prior = unwrap(nets["vqvae"]), unwrap(nets["prior"])
        device = device_of(nets)
        with eval_mode(vqvae, prior):
            x = fixed["images"].to(device)
            recon = vqvae.decode(vqvae.encode(x))
            labels = fixed.get("labels")
            tokens = sample_tokens(prior, fixed["noise"].to(device), None if labels is None else labels.to(device),
                                   cfg.temperature, cfg.top_k, guidance=cfg.guidance)
            samples = vqvae.decode(tokens)
        return reconstruction_grid(x, recon, samples)

    def inference(self, cfg: VQVAEConfig, nets: dict, state: dict) -> VQVAELoaded:
        nets = {k: unwrap(v) for k, v in nets.items()}
        return VQVAELoaded(nets, meta_from_state(state), state.get("checkpoint_hash", ""), cfg)


def _prior_lr(cfg: VQVAEConfig, t: int) -> float:
    """Linear warm-up, then a cosine decay to 10 % at prior_steps, held there (a longer run still learns, slowly)."""
    warm = min(1.0, (t + 1) / max(1, cfg.prior_warmup_steps))
    done = min(1.0, t / cfg.prior_steps)
    return cfg.prior_lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))


FAMILY = VQVAEFamily()
