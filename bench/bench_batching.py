"""Stylize model-stage throughput, one actor in-process: images of one size stacked into one forward pass (genart's
StylizeActor) vs one image per forward pass (the previous behaviour), and --deterministic (batch-invariant kernels).
`--compile` adds the batched path with the style net under `torch.compile` (Inductor; compile time reported apart).
`--sweep 1,2,4,8,16` instead times the net's forward pass at each number of images per pass (no cap: what
`models.family.images_per_pass` chooses on a CPU is reported beside each).

    python bench/bench_batching.py --images 8 --width 192 --height 128 --threads 2 --rounds 2 [--compile]
    python bench/bench_batching.py --sweep 1,2,4,8,16 --images 16 --width 128 --height 128 --threads 1 --rounds 2
    python bench/bench_batching.py --device cuda --images 64 --width 512 --height 512 --sweep 1,4,16,64
Prints JSON; modes alternate within each round so load drifting on a shared machine hits all of them. With
`--device cuda` the actor runs as genart's GPU actors do (bf16/fp16 autocast, channels-last, cudnn.benchmark) and
the JSON adds GPU utilisation and peak memory per mode (bench/gpu.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import gpu  # noqa: E402


def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give images per pass as N,N,... (e.g. 1,2,4,8,16)")
    return sizes


def sweep(actor, args, phases: gpu.Phases) -> dict:
    """images/s of the style net's forward pass at each number of images per pass, rounds alternating sizes."""
    import torch

    from genart.models.family import images_per_pass

    gen = torch.Generator().manual_seed(0)
    stacks = {b: torch.rand(b, 3, args.height, args.width, generator=gen) for b in args.sweep}
    passes = {b: max(1, round(args.images / b)) for b in args.sweep}  # about --images images per measurement

    def run(b: int) -> float:
        with actor.inference():
            started = gpu.now()
            for _ in range(passes[b]):
                actor._forward(stacks[b])  # (b, 3, H, W) -> CPU float32: the output copy ends the GPU's work
            return passes[b] * b / (gpu.now() - started)

    for b in args.sweep:  # warm-up: oneDNN primitive caches, cuDNN autotuning per shape
        run(b)
    rates: dict[int, list[float]] = {b: [] for b in args.sweep}
    for _ in range(args.rounds):
        for b in args.sweep:
            with phases(f"per_pass_{b}"):
                rates[b].append(run(b))
    med = {b: statistics.median(v) for b, v in rates.items()}
    return {
        "images_per_s_by_images_per_pass": {str(b): round(v, 2) for b, v in med.items()},
        "runs": {str(b): [round(r, 2) for r in v] for b, v in rates.items()},
        f"over_{args.sweep[0]}_per_pass": {str(b): round(v / med[args.sweep[0]], 3) for b, v in med.items()},
        "genart_images_per_pass": {str(b): images_per_pass(actor.device, args.height, args.width, b) for b in args.sweep},
    }


def _all_written(*tables: pa.Table) -> None:
    """The actor turns a failed image into an error row, not an exception: a rate over failures is no rate."""
    for table in tables:
        errors = [e for e in table.column("error").to_pylist() if e]
        if errors:
            raise SystemExit(f"bench_batching: {len(errors)} images failed, e.g. {errors[0]}")


def modes_run(ckpt: str, table: pa.Table, args, phases: gpu.Phases) -> dict:
    from genart.infer import stages

    use_gpu = args.device == "cuda"
    fast = stages.StylizeActor(ckpt, threads=args.threads, use_gpu=use_gpu, tile=1024, overlap=None)
    exact = stages.StylizeActor(ckpt, threads=args.threads, use_gpu=use_gpu, deterministic=True, tile=1024, overlap=None)
    modes = {
        "batched": lambda: _all_written(fast(table)),
        "one_per_forward": lambda: _all_written(*[fast(table.slice(i, 1)) for i in range(table.num_rows)]),
        "batched_deterministic": lambda: _all_written(exact(table)),
    }
    compile_s = None
    if args.compile:
        import torch

        compiled = stages.StylizeActor(ckpt, threads=args.threads, use_gpu=use_gpu, tile=1024, overlap=None)
        compiled.model.nets["transformer"] = torch.compile(compiled.model.nets["transformer"])
        started = gpu.now()
        # the first call compiles: every image here has one size, but a CPU splits the stack into passes of
        # images_per_pass images (8 at 192x128: 5 + 3), so up to two batch shapes
        _all_written(compiled(table))
        compile_s = gpu.now() - started
        modes["batched_compiled"] = lambda: _all_written(compiled(table))
    for fn in modes.values():  # warm-up (oneDNN primitive caches, cuDNN autotuning)
        fn()
    rates: dict[str, list[float]] = {k: [] for k in modes}
    for _ in range(args.rounds):
        for name, fn in modes.items():
            with phases(name):
                started = gpu.now()
                fn()  # the actor returns CPU bytes: the GPU's work is done when it returns
                rates[name].append(args.images / (gpu.now() - started))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "images_per_s": {k: round(v, 2) for k, v in med.items()},
        "runs": {k: [round(r, 2) for r in v] for k, v in rates.items()},
        "batched_vs_one_per_forward": round(med["batched"] / med["one_per_forward"], 3),
        "deterministic_vs_one_per_forward": round(med["batched_deterministic"] / med["one_per_forward"], 3),
        **({"compiled_vs_batched": round(med["batched_compiled"] / med["batched"], 3),
            "compile_seconds": round(compile_s, 1)} if args.compile else {}),
        "setup": fast.placement.describe(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per actor call (= --batch-size)")
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time the net under torch.compile")
    parser.add_argument("--sweep", type=batch_sizes, default=None, metavar="N,N,...",
                        help="instead: img/s of the forward pass at each number of images per pass")
    gpu.device_arg(parser)
    args = parser.parse_args()
    gpu.require(args.device)

    from genart.infer import stages
    from genart.models.tiny import tiny_checkpoint

    rng = np.random.default_rng(0)
    rows = [{"source": f"i{i}", "key": f"i{i}.png", "error": None, "width": args.width, "height": args.height,
             "pixels": rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8).tobytes()}
            for i in range(args.images)]
    table = pa.Table.from_pylist(rows, schema=stages.WORK_SCHEMA)
    phases = gpu.Phases(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_checkpoint(os.path.join(tmp, "style"), "style", 256, full_size=True)  # 32 channels, 5 res blocks
        if args.sweep:
            actor = stages.StylizeActor(ckpt, threads=args.threads, use_gpu=args.device == "cuda", tile=None)
            result = {"benchmark": "stylize_images_per_pass", **sweep(actor, args, phases),
                      "setup": actor.placement.describe()}
        else:
            result = {"benchmark": "stylize_batching", **modes_run(ckpt, table, args, phases)}
    if args.device == "cpu" and not args.sweep:
        result.pop("setup")  # the CPU JSON stays what it was (fp32, no channels-last)
    print(json.dumps({
        "benchmark": result.pop("benchmark"), "device": args.device, "images": args.images,
        "size": [args.width, args.height], "threads": args.threads, **result,
        **({"gpu": phases.summaries} if args.device == "cuda" else {}),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }, indent=1))


if __name__ == "__main__":
    main()
