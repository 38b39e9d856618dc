"""Stylize model-stage throughput, one actor in-process: images of one size stacked into one forward pass (genart's
StylizeActor) vs one image per forward pass (the previous behaviour), and --deterministic (batch-invariant kernels).
`--compile` adds the batched path with the style net under `torch.compile` (Inductor; compile time reported apart).

    python bench/bench_batching.py --images 8 --width 192 --height 128 --threads 2 --rounds 2 [--compile]
Prints JSON; modes alternate within each round so load drifting on a shared machine hits all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from genart.infer import stages  # noqa: E402
from genart.models.tiny import tiny_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per actor call (= --batch-size)")
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time the net under torch.compile")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = [{"source": f"i{i}", "key": f"i{i}.png", "error": None, "width": args.width, "height": args.height,
             "pixels": rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8).tobytes()}
            for i in range(args.images)]
    table = pa.Table.from_pylist(rows, schema=stages.WORK_SCHEMA)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_checkpoint(os.path.join(tmp, "style"), "style", 256, full_size=True)  # 32 channels, 5 res blocks
        fast = stages.StylizeActor(ckpt, threads=args.threads, tile=1024, overlap=None)
        exact = stages.StylizeActor(ckpt, threads=args.threads, deterministic=True, tile=1024, overlap=None)
        modes = {
            "batched": lambda: fast(table),
            "one_per_forward": lambda: [fast(table.slice(i, 1)) for i in range(table.num_rows)],
            "batched_deterministic": lambda: exact(table),
        }
        compile_s = None
        if args.compile:
            import torch

            compiled = stages.StylizeActor(ckpt, threads=args.threads, tile=1024, overlap=None)
            compiled.model.nets["transformer"] = torch.compile(compiled.model.nets["transformer"])
            started = time.perf_counter()
            compiled(table)  # the first call compiles (one shape: every image here has the same size)
            compile_s = time.perf_counter() - started
            modes["batched_compiled"] = lambda: compiled(table)
        for fn in modes.values():  # warm-up (oneDNN primitive caches)
            fn()
        rates: dict[str, list[float]] = {k: [] for k in modes}
        for _ in range(args.rounds):
            for name, fn in modes.items():
                started = time.perf_counter()
                fn()
                rates[name].append(args.images / (time.perf_counter() - started))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(json.dumps({
        "benchmark": "stylize_batching", "images": args.images, "size": [args.width, args.height], "threads": args.threads,
        "images_per_s": {k: round(v, 2) for k, v in med.items()},
        "runs": {k: [round(r, 2) for r in v] for k, v in rates.items()},
        "batched_vs_one_per_forward": round(med["batched"] / med["one_per_forward"], 3),
        "deterministic_vs_one_per_forward": round(med["batched_deterministic"] / med["one_per_forward"], 3),
        **({"compiled_vs_batched": round(med["batched_compiled"] / med["batched"], 3),
            "compile_seconds": round(compile_s, 1)} if args.compile else {}),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }, indent=1))


if __name__ == "__main__":
    main()
