"""Serving throughput and latency: /v1/generate and /v1/stylize over HTTP with and without batching, vs the bare model.

    .venv/bin/python bench/bench_serve.py [--requests 192] [--throughput-optimized] [--out results/bench_serve.json]
Prints JSON. `--throughput-optimized` starts Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Ray's direct-ingress, gRPC,
user-code-on-the-main-loop mode). GET /healthz at concurrency 1 is the floor of the HTTP path (proxy + ingress, no
model call). Models are untrained (speed does not depend on the weights): a DCGAN at 32 px in its default
config (one image per request, the case batching is for) and a fast-style net on 96x128 photos. Client and
server share this machine, so the load generator competes with Serve for the same cores. `--device cuda`: the two
model deployments share one GPU (`num_gpus_per_replica: 0.5`; replicas run as the batch actors do: bf16/fp16
autocast, channels-last, cudnn.benchmark), the bare side runs in the same setup on it; throughput_rps is images/s
(one image per request), and the JSON adds GPU utilisation and peak memory per phase (bench/gpu.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import gpu  # noqa: E402

CONCURRENCY = (1, 32)


def _summary(latencies: list[float], wall_s: float, statuses: dict) -> dict:
    lat = sorted(latencies)
    pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2)  # noqa: E731
    return {"requests": len(lat), "throughput_rps": round(len(lat) / wall_s, 1), "p50_ms": pick(0.50),
            "p99_ms": pick(0.99), "mean_ms": round(statistics.fmean(lat) * 1000, 2), "statuses": statuses}


async def _http_load(url: str, make_request, concurrency: int, total: int, method: str = "POST") -> dict:
    """`total` requests from `concurrency` closed-loop clients; latencies of the 200s."""
    import aiohttp

    latencies, statuses = [], {}
    counter = iter(range(total))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def client():
            for i in counter:
                kwargs = make_request(i)
                t0 = time.perf_counter()
                async with session.request(method, url, **kwargs) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                    if response.status == 200:
                        latencies.append(time.perf_counter() - t0)

        for _ in range(2):  # warm up connections and replicas
            kwargs = make_request(0)
            async with session.request(method, url, **kwargs) as response:
                await response.read()
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return _summary(latencies, wall, statuses)


def _bare_load(call, concurrency: int, total: int) -> dict:
    """The same work in-process: `concurrency` threads, each calling the model one request at a time."""
    latencies, lock = [], threading.Lock()
    counter = iter(range(total))

    def worker():
        for i in counter:
            t0 = time.perf_counter()
            call(i)
            with lock:
                latencies.append(time.perf_counter() - t0)

    call(0)
    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _summary(latencies, time.perf_counter() - start, {200: len(latencies)})


def _photo_png() -> bytes:
    from genart.assets import PHOTOS
    from genart.data.images import cap_side, decode_image, encode_png

    img = decode_image((PHOTOS / "figures.jpg").read_bytes())
    return encode_png(cap_side(img, 128))


def make_models(out: str) -> dict[str, str]:
    from genart.models.tiny import tiny_checkpoint

    return {
        "dcgan": tiny_checkpoint(f"{out}/dcgan", "dcgan", 32, seed=1, full_size=True),  # default DCGAN config at 32 px
        "style": tiny_checkpoint(f"{out}/style", "style", 64, seed=2, full_size=True, channels=16, num_res_blocks=3),
    }


def bench_bare(models: dict[str, str], photo: bytes, total: int, threads: int, device: str = "cpu") -> dict:
    """Model + the endpoint's own encoding, no Serve: what a request costs without the serving stack, in the
    replicas' own device and precision setup."""
    import torch

    from genart import models as registry
    from genart.data.images import cap_side, decode_image
    from genart.models.family import InferenceSetup
    from genart.serve import inference
    from genart.serve.ingress import _grid_png, _rgb_png

    torch.set_num_threads(threads)
    setup = InferenceSetup(use_gpu=device == "cuda")
    gen, style = setup.place(registry.load(models["dcgan"])), setup.place(registry.load(models["style"]))

    def generate(i):
        with setup.inference():  # per thread, as each replica enters it in its worker thread
            frames = inference.generate(gen, [inference.GenerateJob((i,))])[0]
        return _grid_png(frames, 1)

    def stylize(i):
        arr = np.asarray(cap_side(decode_image(photo), 512), dtype=np.uint8)
        with setup.inference():
            out = inference.stylize(style, [arr])[0]
        return _rgb_png(out)

    out = {}
    for name, call in (("generate", generate), ("stylize", stylize)):
        for c in CONCURRENCY:
            out[f"{name}_c{c}"] = _bare_load(call, c, total if c > 1 else total // 2)
    return out


def bench_http(base: str, photo: bytes, total: int) -> dict:
    def gen_request(i):
        return {"json": {"model": "dcgan", "n": 1, "seed": i}}

    def style_request(i):
        import aiohttp

        form = aiohttp.FormData()
        form.add_field("image", photo, filename="photo.png", content_type="image/png")
        form.add_field("model", "style")
        return {"data": form}

    # the HTTP path alone (proxy + ingress, no model call): its c=32 throughput caps what batching the model can win
    out = {f"healthz_c{c}": asyncio.run(_http_load(base + "/healthz", lambda i: {}, c, total if c > 1 else total // 2,
                                                   method="GET")) for c in CONCURRENCY}
    for name, path, make in (("generate", "/v1/generate", gen_request), ("stylize", "/v1/stylize", style_request)):
        for c in CONCURRENCY:
            before = _generator_stats() if name == "generate" else None
            out[f"{name}_c{c}"] = asyncio.run(_http_load(base + path, make, c, total if c > 1 else total // 2))
            if before is not None:  # how the generator's requests ran: alone (idle replica) or queued into batches
                after = _generator_stats()
                delta = {k: after[k] - before[k] for k in after}
                delta["mean_batch_requests"] = round(delta["queued"] / delta["batches"], 2) if delta["batches"] else 0.0
                out[f"{name}_c{c}"]["replica"] = delta
    return out


def _generator_stats() -> dict | None:
    """None in throughput-optimized mode: there a handle's router runs on the loop that first used it, and each
    measurement here has a loop of its own."""
    from ray import serve

    if os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1":
        return None
    return serve.get_deployment_handle("generator-dcgan", app_name="bench").batch_stats.remote().result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=192, help="requests per measurement at concurrency 32")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--throughput-optimized", action="store_true",
                        help="start Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (read by Serve's controller and replicas)")
    gpu.device_arg(parser)
    opts = parser.parse_args()
    gpu.require(opts.device)
    if opts.throughput_optimized:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"  # before Ray starts: its processes inherit it

    from ray import serve

    from genart import runtime
    from genart.serve.app import build
    from genart.serve.config import parse_args
    from genart.serve.run import start_http

    if opts.device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    phases = gpu.Phases(opts.device)
    with tempfile.TemporaryDirectory(prefix="genart-bench-serve-") as tmp:
        models = make_models(tmp)
        photo = _photo_png()
        common = {"models": models, "api_key_env": "GENART_BENCH_NO_KEY",
                  # one replica; target_ongoing_requests / max_ongoing_requests: genart's defaults (16 / 20)
                  "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                  "max_queued_requests": 1000, "access_log": False,
                  # both model deployments (generator, styles) on one GPU
                  **({"num_gpus_per_replica": 0.5} if opts.device == "cuda" else {})}
        report = {"device": opts.device, "machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()},
                  "throughput_optimized": opts.throughput_optimized,
                  "models": {"generate": "dcgan 32px default config, n=1 per request",
                             "stylize": "style channels=16 res_blocks=3, 128x96 photo"}}
        threads = parse_args(common).threads
        runtime.init()
        # Ray runs the proxy and replicas at niceness 15 (raylet's worker_niceness): this process (the bare model and
        # the HTTP client) gets the same, after Ray has started, so other load on the machine slows both sides alike
        os.nice(max(0, 15 - os.nice(0)))
        with phases("bare"):
            report["bare"] = bench_bare(models, photo, opts.requests, threads, opts.device)

        host, port = start_http("127.0.0.1", runtime.free_port(), access_log=False)
        for label, extra in (("serve_batched", {"batching": True}), ("serve_unbatched", {"batching": False})):
            serve.run(build({**common, **extra}), name="bench", route_prefix="/bench")
            with phases(label):
                report[label] = bench_http(f"http://{host}:{port}/bench", photo, opts.requests)
            serve.delete("bench")

        g32 = lambda k: report[k]["generate_c32"]["throughput_rps"]  # noqa: E731
        s32 = lambda k: report[k]["stylize_c32"]["throughput_rps"]  # noqa: E731
        report["summary"] = {
            "generate_c32_batched_over_unbatched": round(g32("serve_batched") / g32("serve_unbatched"), 2),
            "stylize_c32_batched_over_unbatched": round(s32("serve_batched") / s32("serve_unbatched"), 2),
            "generate_c1_serve_added_p50_ms": round(report["serve_batched"]["generate_c1"]["p50_ms"] - report["bare"]["generate_c1"]["p50_ms"], 2),
            "healthz_c1_p50_ms": report["serve_batched"]["healthz_c1"]["p50_ms"],
            "healthz_c32_rps": report["serve_batched"]["healthz_c32"]["throughput_rps"],
            "bare_generate_c32_rps": report["bare"]["generate_c32"]["throughput_rps"],
            "generate_c1_unbatched_added_p50_ms": round(report["serve_unbatched"]["generate_c1"]["p50_ms"] - report["bare"]["generate_c1"]["p50_ms"], 2),
            "stylize_c1_serve_added_p50_ms": round(report["serve_batched"]["stylize_c1"]["p50_ms"] - report["bare"]["stylize_c1"]["p50_ms"], 2),
            "targets": {"generate_c32_batched_over_unbatched": ">= 3", "generate_c1_serve_added_p50_ms": "<= 5"},
        }
        if opts.device == "cuda":
            report["gpu"] = phases.summaries
        report["machine"]["load_avg_end"] = os.getloadavg()
    text = json.dumps(report, indent=1)
    print(text)
    if opts.out:
        os.makedirs(os.path.dirname(opts.out) or ".", exist_ok=True)
        with open(opts.out, "w") as f:
            f.write(text)
    sys.exit(0)


if __name__ == "__main__":
    main()
