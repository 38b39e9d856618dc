"""Experiment (issue 11's open lead, not a genart feature): a VQ-VAE whose prior is genart's own Transformer, beside
the shipped VAE, on bench_quality's data and judge.

    .venv/bin/python bench/exp_vae_token_prior.py                       # ~16 min on 2 CPU cores (the prior: ~14)
    .venv/bin/python bench/exp_vae_token_prior.py --prior-steps 1500 --views flip --out results/exp_vq_flip

The shipped VAE draws the stripes genre as colour fields: a Gaussian over its vector codes lands between the 200
pictures' codes, where the decoder paints their average. Here the code is an 8x8 map of codebook entries (van den
Oord et al. 2017: EMA codebook, dead entries restarted at encoder outputs, straight-through gradients), which
reconstructs stripes as sharp bands, and the prior is `genart.models.autoregressive.TokenModel` (raster order, the
genre as start token) trained afterwards on the codes of the training images' eight dihedral views (the synthetic
genres are unchanged in distribution by quarter turns and flips; `--views flip` gives it two). Both models train in
plain loops in this process on the same prepared train split and batch; the shipped VAE through
`VAEFamily.train_step` with workflows/configs/vae.yaml's model section. The judge is bench_quality's. Prints one
JSON object; sample grids (one genre per row) go to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(__file__))
import bench_quality as bq  # noqa: E402  (bench/ is not a package)

from genart.data.read import label_names  # noqa: E402
from genart.models.autoregressive import AutoregressiveConfig, TokenModel, sample_tokens, uniforms  # noqa: E402
from genart.models.sampling import latents, make_grid, seed_labels  # noqa: E402
from genart.models.training import Precision  # noqa: E402
from genart.models.vae import FAMILY as VAE_FAMILY, VAE, VAEConfig, _decode_prior  # noqa: E402
from genart.train.augment import augment_batch  # noqa: E402


class Residual(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, 1, 1), nn.ReLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class VQVAE(nn.Module):
    """(B, 3, 32, 32) in [-1, 1] -> (reconstruction, commitment loss, tokens (B, 64)); codebook (K, D) by EMA."""

    def __init__(self, codebook: int, dim: int = 32, decay: float = 0.99):
        super().__init__()
        self.k, self.dim, self.decay = codebook, dim, decay
        self.encoder = nn.Sequential(nn.Conv2d(3, 64, 4, 2, 1), nn.ReLU(), nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU(),
                                     nn.Conv2d(128, 128, 3, 1, 1), Residual(128), Residual(128), nn.ReLU(),
                                     nn.Conv2d(128, dim, 1))  # (B, D, 8, 8)
        self.decoder = nn.Sequential(nn.Conv2d(dim, 128, 3, 1, 1), Residual(128), Residual(128), nn.ReLU(),
                                     nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.ReLU(),
                                     nn.ConvTranspose2d(64, 3, 4, 2, 1), nn.Tanh())
        self.register_buffer("codebook", torch.zeros(codebook, dim))
        self.register_buffer("usage", torch.zeros(codebook))  # EMA of assignments per entry
        self.register_buffer("sums", torch.zeros(codebook, dim))  # EMA of the vectors assigned to each entry
        self.started = False

    def tokens(self, flat: torch.Tensor) -> torch.Tensor:
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.T + self.codebook.pow(2).sum(1)[None]
        return dist.argmin(1)

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 64) -> quantized map (B, D, 8, 8)."""
        b, t = tokens.shape
        side = int(math.isqrt(t))
        return self.codebook[tokens].view(b, side, side, self.dim).permute(0, 3, 1, 2)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, tokens: torch.Tensor) -> None:
        if not self.started:  # the codebook starts as encoder outputs of the first batch
            self.codebook.copy_(flat[torch.randint(0, len(flat), (self.k,))])
            self.sums.copy_(self.codebook)
            self.usage.fill_(1.0)
            self.started = True
        onehot = F.one_hot(tokens, self.k).float()
        self.usage.lerp_(onehot.sum(0), 1 - self.decay)
        self.sums.lerp_(onehot.T @ flat, 1 - self.decay)
        self.codebook.copy_(self.sums / self.usage.clamp(min=1e-5)[:, None])
        dead = self.usage < 0.06  # unused for ~hundreds of steps: restart at a random encoder output
        if dead.any():
            fresh = flat[torch.randint(0, len(flat), (int(dead.sum()),))]
            self.codebook[dead], self.sums[dead], self.usage[dead] = fresh, fresh, 1.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        flat = h.permute(0, 2, 3, 1).reshape(-1, self.dim)
        if self.training:
            self._update(flat.detach(), self.tokens(flat.detach()))
        tokens = self.tokens(flat.detach()).view(len(x), -1)
        q = self.lookup(tokens)
        commit = (h - q).pow(2).mean()
        return self.decoder(h + (q - h).detach()), commit, tokens  # straight-through gradients


def dihedral(x: torch.Tensor, views: str) -> list[torch.Tensor]:
    turns = [x.rot90(k, (2, 3)) for k in range(4)] if views == "dihedral" else [x]
    return turns + [v.flip(3) for v in turns]


def train_vae(x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, seed: int) -> VAE:
    """The shipped VAE config in a plain loop over VAEFamily.train_step."""
    with open(os.path.join(bq.CONFIGS, "vae.yaml")) as f:
        cfg = VAEConfig(**yaml.safe_load(f)["model"])
    torch.manual_seed(seed)
    nets = {"vae": VAE(cfg, x.shape[-1], int(y.max()) + 1)}
    opts = VAE_FAMILY.optimizers(cfg, nets)
    gen = torch.Generator().manual_seed(seed)
    for step, idx in enumerate(bq.batches(len(x), batch, steps, seed)):
        image = augment_batch(x[idx], "flip", gen)  # the family's default augmentation, as genart train applies it
        VAE_FAMILY.train_step(cfg, nets, opts, {"image": image, "label": y[idx]}, step, Precision())
    return nets["vae"].eval()


def train_vq(x: torch.Tensor, steps: int, batch: int, codebook: int, seed: int) -> VQVAE:
    torch.manual_seed(seed)
    vq = VQVAE(codebook)
    opt = torch.optim.Adam(vq.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for idx in bq.batches(len(x), batch, steps, seed):
        xb = augment_batch(x[idx], "flip", gen)
        recon, commit, _ = vq(xb)
        loss = (recon - xb).pow(2).mean() + 0.25 * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return vq.eval()


def train_prior(tokens: torch.Tensor, labels: torch.Tensor, codebook: int, steps: int, batch: int, seed: int,
                num_labels: int) -> tuple[TokenModel, float]:
    """TokenModel over the 8x8 token maps, the genre as start token; AdamW, warm-up then cosine decay."""
    torch.manual_seed(seed)
    cfg = AutoregressiveConfig.model_construct(**{**AutoregressiveConfig().model_dump(), "colors": codebook,
                                                  "embed_dim": 128, "num_layers": 4, "dropout": 0.1, "conditional": True})
    prior = TokenModel(cfg, int(math.isqrt(tokens.shape[1])), num_labels)
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-3, weight_decay=0.01)
    prior.train()
    loss = torch.zeros(())
    for step, idx in enumerate(bq.batches(len(tokens), batch, steps, seed + 1)):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        logits = prior(tokens[idx], labels[idx])  # (B, 64, K)
        loss = F.cross_entropy(logits.reshape(-1, codebook), tokens[idx].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return prior.eval(), float(loss)


def genre_rows(x01: torch.Tensor, labels: torch.Tensor, genres: list[str], per_row: int = 12):
    """One row of samples per genre, enlarged 2x."""
    grid = make_grid(torch.cat([x01[labels == g][:per_row] for g in range(len(genres))]), nrow=per_row)
    return grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="training steps of the VAE and the VQ-VAE (quickstart: 600)")
    p.add_argument("--prior-steps", type=int, default=4000, help="training steps of the Transformer prior")
    p.add_argument("--codebook", type=int, default=256, help="codebook entries = the prior's vocabulary")
    p.add_argument("--views", choices=("dihedral", "flip"), default="dihedral", help="views of each image the prior learns")
    p.add_argument("--temperatures", default="1.0,0.85", help="comma-separated sampling temperatures")
    p.add_argument("--num-generated", type=int, default=1000)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--judge-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/exp_vae_token_prior")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    result: dict = {"experiment": "vae_token_prior", "config": vars(args)}
    with tempfile.TemporaryDirectory(prefix="genart-exp-vq-") as root:
        synth, _ = bq.prepare_data(root, args.images, bq.CONTENT_SIZE)
        genres = label_names(synth)
        x01, y = bq.read_split(synth, "train")
    x = x01 * 2 - 1
    share = np.bincount(y.numpy(), minlength=len(genres)) / len(y)
    judge = bq.train_judge(x01, y, len(genres), args.judge_steps, 64)
    real_feats, _ = bq.judge_outputs(judge, x01)
    stripes = x[y == genres.index("stripes")][:200]  # training stripes, to see what each model reconstructs
    seeds = list(range(args.num_generated))
    labels = torch.tensor(seed_labels(seeds, None, len(genres)))

    def judged(samples01: torch.Tensor, recon01: torch.Tensor, name: str) -> dict:
        named = bq.judge_outputs(judge, recon01)[1].argmax(1) == genres.index("stripes")
        genre_rows(samples01, labels, genres).save(os.path.join(args.out, f"{name}.png"))
        return {**bq.quality(judge, samples01, real_feats, share, genres), "grid": f"{name}.png",
                "stripes_reconstructed_named_stripes": round(float(named.mean()), 3)}

    t = time.perf_counter()
    vae = train_vae(x, y, args.steps, args.batch_size, args.seed)
    with torch.no_grad():
        samples = _decode_prior(vae, latents(seeds, vae.prior.mean.shape[1]), labels, False)
        recon = vae.decode(vae.encode(stripes)[0])
    result["vae_shipped"] = {**judged((samples + 1) / 2, (recon + 1) / 2, "vae_shipped"),
                             "seconds": round(time.perf_counter() - t, 1)}
    t = time.perf_counter()
    vq = train_vq(x, args.steps, args.batch_size, args.codebook, args.seed)
    with torch.no_grad():
        tokens = torch.cat([vq(v)[2] for v in dihedral(x, args.views)])
        recon = vq(stripes)[0]
        recon_mse = float(((vq(x)[0] - x) / 2).pow(2).mean())
    vq_seconds = time.perf_counter() - t
    t = time.perf_counter()
    prior, prior_loss = train_prior(tokens, y.repeat(len(tokens) // len(y)), args.codebook, args.prior_steps,
                                    args.batch_size, args.seed, len(genres))
    result["vq"] = {"seconds": round(vq_seconds, 1), "recon_mse_train": round(recon_mse, 5),
                    "codebook_used": int(tokens.unique().numel()), "prior_sequences": len(tokens),
                    "prior_loss_nats_per_token": round(prior_loss, 3), "prior_seconds": round(time.perf_counter() - t, 1)}
    for temp in (float(v) for v in args.temperatures.split(",")):
        with torch.no_grad():
            toks = sample_tokens(prior, uniforms(seeds, tokens.shape[1]), labels, temp, 0)
            samples = torch.cat([vq.decoder(vq.lookup(toks[i:i + 250])) for i in range(0, len(toks), 250)])
        result[f"vq_prior_t{temp}"] = judged((samples + 1) / 2, (recon + 1) / 2, f"vq_prior_t{temp}")
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
