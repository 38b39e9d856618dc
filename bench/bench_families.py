"""genart's generator families side by side at the same training time: DCGAN, VAE, Transformer and LSTM at 16 px.

    .venv/bin/python bench/bench_families.py                          # 180 s of optimizer time each, 1,000 samples
    .venv/bin/python bench/bench_families.py --budget-s 20 --num-generated 200 --images 300   # smoke, ~5 min

Every family trains through `genart train` on the same prepared 16 px synthetic genres (the shipped config of each
family, `--set` overrides appended, 1 worker, global batch 32) until its optimizer steps have taken `--budget-s`
seconds (measured from metrics.jsonl as bench_quality.step_seconds does: start-up, validation and checkpoints are
not counted). A run trains a short first chunk, measures its step rate, then continues to the step count that rate
predicts for the budget (genart resumes a run when max_steps grows), correcting once more if it fell short. Then each
final checkpoint draws N samples (seeds 0..N-1; conditional models take genre seed % 5) and bench_quality's judge,
trained here on the real 16 px images, gives FID (fid1k_judge), the recognised share and each genre's share of
the samples ("sorted into every genre": rarest_genre_ratio >= 0.6). The autoregressive models also report their
val bits/dim. Prints one JSON object on stdout; `families.png` (a row of samples per family) goes to --out.
The VQ-VAE is not among them: it trains in two stages (codes, then a prior over them) whose split one time budget
does not decide; `bench_quality.py --only vqvae` measures it at its shipped 600 + 4,000 steps, beside the VAE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(__file__))
import bench_quality as bq  # noqa: E402  (the judge, the metrics and genart's train entry point, shared)

SIZE = 16
FAMILIES = {  # name -> its shipped config in workflows/configs
    "dcgan": "dcgan",
    "vae": "vae",
    "transformer": "autoregressive_transformer",
    "lstm": "autoregressive_lstm",
}
FIRST_CHUNK = {"dcgan": 200, "vae": 200, "transformer": 40, "lstm": 60}  # steps before the rate is measured


def log(msg: str) -> None:
    print(f"[bench_families] {msg}", file=sys.stderr, flush=True)


def prepare_data(root: str, num_images: int, colors: int) -> str:
    from genart.data.palette import fit_palette
    from genart.data.prepare import PrepareOptions, prepare
    from genart.data.synth import make_synth

    make_synth(f"{root}/raw/synth16", num=num_images, size=SIZE, seed=0)
    prepare([f"{root}/raw/synth16"], f"{root}/synth16", PrepareOptions(size=SIZE, val_fraction=0.1), progress=False)
    fit_palette(f"{root}/synth16", colors)
    return f"{root}/synth16"


def train_for(name: str, data: str, runs: str, budget_s: float, overrides: list[str]) -> tuple[str, dict]:
    """Train `name` in chunks until its optimizer time reaches budget_s; -> (run dir, timing)."""
    from genart.train.config import load_config
    from genart.train.trainer import train

    config = FAMILIES[name]
    steps, chunks, started = FIRST_CHUNK[name], 0, time.perf_counter()
    while True:
        cfg = load_config(os.path.join(bq.CONFIGS, f"{config}.yaml"), [
            f"data.path={data}", f"data.image_size={SIZE}", "data.batch_size=32", f"run.storage={runs}",
            f"run.name={name}", f"train.max_steps={steps}", "train.checkpoint_every_steps=1000000",
            "train.keep_last=1", f"train.log_every_steps={max(1, FIRST_CHUNK[name] // 4)}", "scaling.num_workers=1",
            "scaling.cpus_per_worker=1", "eval.every_checkpoints=0", *overrides])
        summary = train(cfg, echo=log)
        chunks += 1
        spent = bq.step_seconds(summary["run_dir"], cfg.data.batch_size)
        log(f"{name}: {steps} steps took {spent:.1f} s of optimizer time (budget {budget_s:.0f} s)")
        if spent >= 0.95 * budget_s or chunks == 4:
            break
        steps = max(steps + 1, int(steps * budget_s / max(spent, 1e-6)))
    return summary["run_dir"], {"steps": steps, "optimizer_s": round(spent, 1), "chunks": chunks,
                                "wall_s": round(time.perf_counter() - started, 1),
                                "final_metrics": summary["final_metrics"]}


def sample(run_dir: str, num: int) -> tuple[torch.Tensor, float]:
    """N samples at the judge's size (N, 3, 16, 16) in [0, 1], and the seconds they took."""
    from genart import models

    model = models.load(run_dir)
    seeds, t = list(range(num)), time.perf_counter()
    out = torch.cat([model.sample(seeds[i : i + 100]) for i in range(0, num, 100)])
    return out, time.perf_counter() - t


def sheet(rows: dict[str, torch.Tensor], path: str, per_row: int = 20, scale: int = 3) -> str:
    cell, head = SIZE * scale + 2, 14
    img = Image.new("RGB", (90 + per_row * cell, len(rows) * (cell + head)), "white")
    draw = ImageDraw.Draw(img)
    for r, (name, x) in enumerate(rows.items()):
        y = r * (cell + head)
        draw.text((2, y + head + cell // 2 - 6), name, fill="black")
        for i, t in enumerate(x[:per_row]):
            tile = Image.fromarray((t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            img.paste(tile.resize((SIZE * scale, SIZE * scale), Image.Resampling.NEAREST), (90 + i * cell, y + head))
    img.save(path)
    return path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=180.0, help="optimizer seconds per family")
    parser.add_argument("--num-generated", "--num-samples", type=int, default=1000, help="images generated per model for the metrics")
    parser.add_argument("--images", type=int, default=1000, help="synthetic images made, 10%% val")
    parser.add_argument("--colors", type=int, default=16, help="palette of the autoregressive models")
    parser.add_argument("--judge-steps", type=int, default=300)
    parser.add_argument("--only", default=",".join(FAMILIES), help="comma-separated subset of " + ",".join(FAMILIES))
    parser.add_argument("--out", default="results/bench_families")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every family's config (repeatable)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    json_out = os.fdopen(os.dup(1), "w")  # stdout carries only the JSON (Ray's worker prints go to stderr)
    os.dup2(2, 1)
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)

    from genart import runtime
    from genart.data.read import label_names

    runtime.init()
    torch.set_num_threads(1)
    result: dict = {"benchmark": "families", "config": vars(args), "goals": {"rarest_genre_ratio_min": 0.6}}
    rows: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="genart-bench-families-") as root:
        data = prepare_data(root, args.images, args.colors)
        genres = label_names(data)
        train_x, train_y = bq.read_split(data, "train")
        data_share = np.bincount(train_y.numpy(), minlength=len(genres)) / len(train_y)
        judge = bq.train_judge(train_x, train_y, len(genres), args.judge_steps, 64)
        val_x, val_y = bq.read_split(data, "val")
        real_feats, _ = bq.judge_outputs(judge, train_x)
        _, val_probs = bq.judge_outputs(judge, val_x)
        result["judge"] = {"val_accuracy": round(float((val_probs.argmax(1) == val_y.numpy()).mean()), 4)}
        log(f"judge val accuracy {result['judge']['val_accuracy']}")
        for name in [f for f in FAMILIES if f in args.only.split(",")]:
            run_dir, timing = train_for(name, data, f"{root}/runs", args.budget_s, args.overrides)
            samples, sample_s = sample(run_dir, args.num_generated)
            rows[name] = samples
            result[name] = {**bq.quality(judge, samples, real_feats, data_share, genres), **timing,
                            "sampling_ms_per_image": round(1000 * sample_s / args.num_generated, 2)}
            log(f"{name}: {json.dumps({k: v for k, v in result[name].items() if k != 'final_metrics'})}")
    result["grid"] = sheet(rows, os.path.join(os.path.abspath(args.out), "families.png"))
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_1min"] = round(os.getloadavg()[0], 2)
    json_out.write(json.dumps(bq._clean(result), indent=1) + "\n")
    json_out.flush()


if __name__ == "__main__":
    main()
