"""Tiny checkpoints of every family (untrained, or a briefly trained critic) to exercise the serving stack.

    models = make_tiny_checkpoints("/tmp/tiny")   # {"dcgan": ".../dcgan", "vae": ..., "critic": ..., "starry": ..., "wave": ...}
Used by the tests and bench/bench_serve.py; real use serves checkpoints from `genart train`.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from genart.data.synth import GENRES, render
from genart.models import REGISTRY
from genart.models.checkpoint import save_checkpoint


def make_checkpoint(out_dir: str, family: str, config: dict | None = None, image_size: int = 32,
                    label_names: list[str] | None = None, seed: int = 0, train_steps: int = 0) -> str:
    """Build a `family` model from `config` (the model section), optionally train it a few steps on synthetic
    genre images (critic only: it learns the genre labels), and save it as `out_dir/step-000000`; returns out_dir."""
    fam = REGISTRY[family]
    cfg = fam.config_cls.model_validate({"family": family, **(config or {})})
    labels = list(label_names or [])
    torch.manual_seed(seed)
    nets = fam.build(cfg, image_size, len(labels), inference=train_steps == 0)
    if train_steps:
        _train(fam, cfg, nets, labels, image_size, train_steps, seed)
        nets = {name: nets[name] for name in fam.build(cfg, image_size, len(labels), inference=True)}
    ckpt = os.path.join(out_dir, f"step-{train_steps:06d}")
    state = {"family": family, "step": train_steps, "config": cfg.model_dump(mode="json"), "image_size": image_size,
             "label_names": labels, "metrics": {}}
    save_checkpoint(ckpt, nets, {}, state)
    return out_dir


def _train(fam, cfg, nets, labels, image_size, steps, seed) -> None:
    rng = np.random.default_rng(seed)
    opts = fam.optimizers(cfg, nets)
    for step in range(steps):
        ys = rng.integers(0, len(labels), size=32)
        imgs = [np.asarray(render(labels[y], int(rng.integers(1 << 30)), image_size, seed), np.float32) for y in ys]
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2) / 127.5 - 1  # (B, 3, S, S) in [-1, 1]
        fam.train_step(cfg, nets, opts, {"image": x, "label": torch.from_numpy(ys)}, step)


def make_tiny_checkpoints(out_dir: str, image_size: int = 32, critic_steps: int = 40) -> dict[str, str]:
    """One small model of each family (two styles), named as they would be served."""
    genres = list(GENRES)
    small = {"latent_dim": 16, "base_channels": 8, "max_channels": 32}
    return {
        "dcgan": make_checkpoint(f"{out_dir}/dcgan", "dcgan", {**small, "conditional": True}, image_size, genres, seed=1),
        "vae": make_checkpoint(f"{out_dir}/vae", "vae", small, image_size, seed=2),
        "critic": make_checkpoint(f"{out_dir}/critic", "critic", {"base_channels": 8, "num_stages": 2, "embed_dim": 16},
                                  image_size, genres, seed=3, train_steps=critic_steps),
        "starry": make_checkpoint(f"{out_dir}/starry", "style", {"channels": 4, "num_res_blocks": 1}, image_size, seed=4),
        "wave": make_checkpoint(f"{out_dir}/wave", "style", {"channels": 4, "num_res_blocks": 1}, image_size, seed=5),
    }
