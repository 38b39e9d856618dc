"""Steady-state training throughput: genart's Ray Train loop (1 worker) vs a plain PyTorch loop, same model,
batch size, threads and number of measured steps (warm-up steps excluded). Prints JSON; target ratio >= 0.95.

    python bench/bench_train.py --family dcgan --image-size 64 --batch-size 32 --threads 2 --steps 100
Plain and Ray runs alternate (plain, ray, plain, ray, plain) and medians are compared, so that load drifting on a
shared machine hits both sides. `--device cuda`: the Ray worker trains as genart does on a GPU (scaling.use_gpu,
train.amp auto = bf16/fp16 autocast, cudnn.benchmark), the plain loop on the same GPU with the same Precision;
the JSON adds GPU utilisation and peak memory per phase (bench/gpu.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import gpu  # noqa: E402

from genart.config import validate  # noqa: E402
from genart.models.training import Precision  # noqa: E402
from genart.train.config import TrainConfig  # noqa: E402

MODELS = {
    "dcgan": {"family": "dcgan", "latent_dim": 64, "base_channels": 32, "max_channels": 256},
    "vae": {"family": "vae", "latent_dim": 64, "base_channels": 32, "max_channels": 128},
    "critic": {"family": "critic", "base_channels": 16, "num_stages": 3, "embed_dim": 64},
}
LOG_EVERY = 10


def make_dataset(root: str, image_size: int, num: int) -> str:
    from genart.data.prepare import PrepareOptions, prepare
    from genart.data.synth import make_synth

    make_synth(os.path.join(root, "raw"), num=num, size=image_size, seed=0)
    dest = os.path.join(root, "data")
    prepare([os.path.join(root, "raw")], dest, PrepareOptions(size=image_size, val_fraction=0.0), progress=False)
    return dest


def plain_loop(cfg: TrainConfig, data: str, warmup: int, steps: int, threads: int, device: str = "cpu") -> float:
    """images/s of a plain single-process loop over the same (already decoded, in-memory: on the GPU if there)
    images, in the precision genart's loop uses there (`train.amp`)."""
    import numpy as np

    from genart import models
    from genart.data.read import label_names, training_dataset
    from genart.models.training import set_seed

    torch.set_num_threads(threads)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # as genart.train.loop does on a GPU
    rows = training_dataset(data, "train", cfg.data.image_size).take_all()
    images = torch.from_numpy(np.stack([r["image"] for r in rows])).to(device)  # (N, 3, S, S) in [-1, 1]
    labels = torch.tensor([int(r["label"]) for r in rows], device=device)
    family = models.REGISTRY[cfg.model.family]
    set_seed(cfg.train.seed)
    nets = {k: net.to(device) for k, net in family.build(cfg.model, cfg.data.image_size, len(label_names(data))).items()}
    opts = family.optimizers(cfg.model, nets)
    precision = Precision(cfg.train.amp, device)
    b = cfg.data.batch_size
    gen = torch.Generator().manual_seed(0)

    def batch() -> dict:
        idx = torch.randint(0, len(images), (b,), generator=gen).to(device)
        return {"image": images[idx].contiguous(), "label": labels[idx]}

    for step in range(warmup):
        family.train_step(cfg.model, nets, opts, batch(), step, precision)
    started = gpu.now()
    for step in range(warmup, warmup + steps):
        family.train_step(cfg.model, nets, opts, batch(), step, precision)  # its .item() metrics sync the GPU
    return steps * b / (gpu.now() - started)


def ray_loop(cfg: TrainConfig, warmup: int) -> tuple[float, dict]:
    """images/s of genart's Ray Train loop, from metrics.jsonl windows after the warm-up steps."""
    from genart.train import outputs
    from genart.train.trainer import train

    summary = train(cfg, echo=lambda *_: None)
    rows = [r for r in outputs.read_metrics(summary["run_dir"]) if r["step"] > warmup]
    images = len(rows) * LOG_EVERY * cfg.data.batch_size
    seconds = sum(LOG_EVERY * cfg.data.batch_size / r["images_per_second"] for r in rows)
    return images / seconds, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(MODELS), default="dcgan")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads = CPUs of the one Ray worker")
    parser.add_argument("--warmup", type=int, default=20, help="steps excluded from both measurements")
    parser.add_argument("--steps", type=int, default=100, help="measured steps (a multiple of 10)")
    parser.add_argument("--images", type=int, default=512, help="synthetic images in the dataset")
    parser.add_argument("--rounds", type=int, default=2, help="Ray runs, each followed by a plain run (plus one before)")
    gpu.device_arg(parser)
    args = parser.parse_args()
    gpu.require(args.device)

    from genart import runtime

    runtime.init()
    # Ray runs its workers at niceness 15 (raylet's worker_niceness); the plain loop (this process, after Ray has
    # started) gets the same, so that other load on the machine slows both alike.
    os.nice(max(0, 15 - os.nice(0)))
    with tempfile.TemporaryDirectory(prefix="genart-bench-") as root:
        data = make_dataset(root, args.image_size, args.images)
        total = args.warmup + args.steps
        cfg = validate(TrainConfig, {
            "model": MODELS[args.family],
            "data": {"path": data, "image_size": args.image_size, "batch_size": args.batch_size, "augment": False},
            "train": {"max_steps": total, "checkpoint_every_steps": total, "log_every_steps": LOG_EVERY},
            "scaling": {"num_workers": 1, "cpus_per_worker": args.threads, "use_gpu": args.device == "cuda"},
            "run": {"storage": os.path.join(root, "runs"), "name": "bench"},
        })
        # plain, ray, plain, ray, ..., plain: medians, so that load drifting on a shared machine hits both sides
        phases = gpu.Phases(args.device)
        with phases("plain"):
            plain = [plain_loop(cfg, data, args.warmup, args.steps, args.threads, args.device)]
        ray_rates, fit_seconds = [], []
        for round_ in range(args.rounds):
            with phases("ray_train"):  # the whole fit, start-up included: utilisation is a lower bound
                rate, summary = ray_loop(cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": f"bench-{round_}"})}), args.warmup)
            ray_rates.append(rate)
            fit_seconds.append(summary["seconds"])
            with phases("plain"):
                plain.append(plain_loop(cfg, data, args.warmup, args.steps, args.threads, args.device))
    print(json.dumps({
        "benchmark": "train_throughput", "device": args.device,
        "family": args.family, "image_size": args.image_size, "batch_size": args.batch_size, "threads": args.threads,
        "warmup_steps": args.warmup, "measured_steps": args.steps,
        "plain_images_per_s": round(statistics.median(plain), 1), "plain_runs": [round(r, 1) for r in plain],
        "ray_train_images_per_s": round(statistics.median(ray_rates), 1), "ray_train_runs": [round(r, 1) for r in ray_rates],
        "ratio": round(statistics.median(ray_rates) / statistics.median(plain), 3), "target_ratio": 0.95,
        "ray_fit_seconds": fit_seconds,
        **({"precision": str(Precision(cfg.train.amp, "cuda").dtype), "gpu": phases.summaries}
           if args.device == "cuda" else {}),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }, indent=1))


if __name__ == "__main__":
    main()
