"""Tiny real models of every family, built in a second on a CPU: for tests, benchmarks, `genart train --dry-run`
and `make smoke`. Real use trains its checkpoints with `genart train`.

    cfg = tiny_config("vae", latent_dim=4)                                     # TINY_MODEL widths, overrides on top
    run = tiny_checkpoint("/tmp/t/dcgan", "dcgan", 16, ["a", "b"], conditional=True)   # for genart.models.load
    served = serving_checkpoints("/tmp/t")          # {"dcgan": ..., "vae": ..., "critic": ..., "starry": ..., "wave": ...}
"""

from __future__ import annotations

import collections
import os
from typing import Any, Sequence

import numpy as np
import torch

from genart.data.synth import GENRES, render
from genart.models import REGISTRY
from genart.models.checkpoint import save_checkpoint

# Per family: the narrowest widths its config accepts that still build a working net (keys absent = config's own).
TINY_MODEL = {
    "dcgan": {"latent_dim": 8, "base_channels": 4, "max_channels": 16, "label_embed_dim": 4, "grid_size": 4,
              "eval_samples": 8},
    "vae": {"latent_dim": 8, "base_channels": 4, "max_channels": 16, "grid_size": 4},
    "vqvae": {"codebook_size": 8, "code_dim": 4, "channels": 8, "res_blocks": 1, "prior_start_step": 1,
              "prior_embed_dim": 8, "prior_layers": 1, "prior_heads": 1, "prior_warmup_steps": 0, "grid_size": 4},
    "critic": {"base_channels": 4, "embed_dim": 8, "num_stages": 1},
    "style": {"channels": 4, "num_res_blocks": 0, "random_filters": 4, "style_size": 32, "grid_size": 2},
    "autoregressive": {"embed_dim": 8, "num_layers": 1, "num_heads": 1, "mlp_ratio": 1, "grid_size": 2,
                       "warmup_steps": 0},
}


def tiny_config(family: str, full_size: bool = False, **overrides: Any):
    """`family`'s model config at TINY_MODEL's widths (full_size=True: the family's own defaults), `overrides` on top."""
    widths = {} if full_size else TINY_MODEL.get(family, {})
    return REGISTRY[family].config_cls.model_validate({**widths, **overrides, "family": family})


def tiny_nets(cfg, image_size: int, label_names: Sequence[str] = (), seed: int = 0, train_steps: int = 0,
              inference: bool = False) -> dict[str, torch.nn.Module]:
    """`cfg`'s nets, seeded by `seed`; with train_steps, trained that many real steps on synthetic genre images (a
    label named after a genre gets that genre's images, so a critic learns the genres)."""
    fam = REGISTRY[cfg.family]
    torch.manual_seed(seed)
    nets = fam.build(cfg, image_size, len(label_names), inference=inference and not train_steps)
    if train_steps:
        _train(fam, cfg, nets, list(label_names), image_size, train_steps, seed)
        if inference:
            nets = {name: nets[name] for name in fam.build(cfg, image_size, len(label_names), inference=True)}
    return nets


def _train(fam, cfg, nets, labels: list[str], image_size: int, steps: int, seed: int, batch_size: int = 32) -> None:
    rng = np.random.default_rng(seed)
    opts = fam.optimizers(cfg, {name: nets[name] for name in fam.trainable()})
    genres = [label if label in GENRES else GENRES[i % len(GENRES)] for i, label in enumerate(labels)] or list(GENRES)
    recent = collections.deque(maxlen=fam.recent_batches)  # as the training loop keeps them for before_checkpoint
    for step in range(steps):
        ys = rng.integers(0, len(genres), size=batch_size)
        imgs = [np.asarray(render(genres[y], int(rng.integers(1 << 30)), image_size, seed), np.float32) for y in ys]
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2) / 127.5 - 1  # (B, 3, S, S) in [-1, 1]
        label = torch.from_numpy(ys) if labels else torch.full((batch_size,), -1)  # -1: unlabelled
        batch = {"image": x, "label": label.long()}
        fam.train_step(cfg, nets, opts, batch, step)
        recent.append(batch)
    fam.before_checkpoint(cfg, nets, list(recent))  # as the training loop does before every save (EMA / BatchNorm statistics)


def tiny_checkpoint(out_dir: str, family: str, image_size: int, label_names: Sequence[str] = (), seed: int = 0,
                    train_steps: int = 0, full_size: bool = False, **overrides: Any) -> str:
    """A `family` model (tiny_config, then tiny_nets) saved as out_dir/step-<train_steps>; returns out_dir, a run
    folder that `genart.models.load`, the batch jobs and Serve take like one from `genart train`."""
    cfg = tiny_config(family, full_size, **overrides)
    nets = tiny_nets(cfg, image_size, label_names, seed, train_steps, inference=True)
    state = {"family": family, "step": train_steps, "config": cfg.model_dump(mode="json"), "image_size": image_size,
             "label_names": list(label_names), "metrics": {}}
    save_checkpoint(os.path.join(str(out_dir), f"step-{train_steps:06d}"), nets, {}, state)
    return str(out_dir)


def serving_checkpoints(out_dir: str, image_size: int = 32, critic_steps: int = 40) -> dict[str, str]:
    """One small model of each served family (two styles, a conditional DCGAN, a critic that has learnt the
    genres), named as they are served; for the serving tests, the playground and bench/bench_serve.py."""
    genres = list(GENRES)
    small = {"latent_dim": 16, "base_channels": 8, "max_channels": 32}
    style = {"channels": 4, "num_res_blocks": 1}
    return {
        "dcgan": tiny_checkpoint(f"{out_dir}/dcgan", "dcgan", image_size, genres, seed=1, conditional=True, **small),
        "vae": tiny_checkpoint(f"{out_dir}/vae", "vae", image_size, seed=2, **small),
        "critic": tiny_checkpoint(f"{out_dir}/critic", "critic", image_size, genres, seed=3, train_steps=critic_steps,
                                  base_channels=8, num_stages=2, embed_dim=16),
        "starry": tiny_checkpoint(f"{out_dir}/starry", "style", image_size, seed=4, **style),
        "wave": tiny_checkpoint(f"{out_dir}/wave", "style", image_size, seed=5, **style),
    }
