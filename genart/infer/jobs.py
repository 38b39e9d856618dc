"""The batch-inference jobs: `stylize`, `generate` and `score`, each one streaming Ray Data pipeline.

    genart stylize --model runs/style-wave --input photos.zip --output s3://bucket/styled --tile 1024
    genart generate --model runs/dcgan-demo --num 10000 --output out/gen --seed 0
    genart score --model runs/critic --input data/prepared --output out/scores

read -> decode + validate (tasks) -> model (actor pool, model loaded once per actor) -> encode + write (tasks);
the driver only receives one small status per row. Memory stays bounded by the batch sizes, not the input size.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Annotated

from pydantic import Field, field_validator

from genart import storage
from genart.config import Options, Rule
from genart.data import images, sources
from genart.errors import UserError
from genart.infer import naming, output, stages


POOL_RULE = Rule("--batch-size must be >= 1 and --concurrency N or MIN-MAX with 1 <= MIN <= MAX")
WORKER_RULE = Rule("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")


class RunOptions(Options):
    """How a job runs (not what it computes): these may change between a run and its --resume."""

    batch_size: Annotated[int, Field(ge=1), POOL_RULE] = 8  # rows per model call
    # model actors: N, or (min, max) for a pool that autoscales between them
    concurrency: Annotated[int | tuple[int, int], POOL_RULE] = 1
    gpus_per_worker: Annotated[float, Field(ge=0), WORKER_RULE] = 0.0  # GPUs per model actor (0 = CPU)
    cpus_per_worker: Annotated[float, Field(gt=0), WORKER_RULE] = 1.0  # CPUs per model actor (= its torch threads)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    deterministic: bool = False  # outputs independent of batching (slower kernels; see stages.ModelActor)
    autocast: bool | None = None  # bf16/fp16 autocast; None = on with GPUs, off on CPUs

    @field_validator("concurrency")
    @classmethod
    def _pool(cls, value):
        low, high = (value, value) if isinstance(value, int) else value
        if not 1 <= low <= high:
            raise ValueError("1 <= MIN <= MAX")
        return value

    @property
    def pool_size(self) -> tuple[int, int]:
        """(min, max) model actors."""
        c = self.concurrency
        return (int(c[0]), int(c[1])) if isinstance(c, (tuple, list)) else (int(c), int(c))


def parse_concurrency(text: str | int) -> int | tuple[int, int]:
    """`--concurrency` "4" -> 4, "1-4" -> (1, 4); anything else is a one-line UserError."""
    value = str(text).strip()
    try:
        if "-" in value:
            low, high = (int(v) for v in value.split("-", 1))
            if 1 <= low <= high:
                return (low, high) if low < high else low
        elif int(value) >= 1:
            return int(value)
    except ValueError:
        pass
    raise UserError(f"--concurrency {text}: give a number of model actors (e.g. 2) or MIN-MAX (e.g. 1-4)")


def _load(uri: str, family: str | tuple[str, ...], command: str):
    """(resolved checkpoint uri, Loaded) — actors load the resolved one, so all use the same weights."""
    from genart import models

    loaded = models.load(uri, family=family, command=f"genart {command}")
    return loaded.meta["checkpoint"], loaded


def _model_info(ckpt: str, loaded) -> dict:
    return {"checkpoint": ckpt, "family": loaded.family, "hash": loaded.checkpoint_hash, "step": loaded.meta.get("step")}


def _model_stage(ds, actor_cls, ckpt: str, run: RunOptions, **options):
    import ray

    threads = max(1, int(run.cpus_per_worker))
    low, high = run.pool_size
    # compute=ActorPoolStrategy is Ray Data's current form (map_batches' `concurrency=` is deprecated since 2.51);
    # min < max gives a pool that Ray Data grows while the model stage is the bottleneck and shrinks when idle.
    pool = ray.data.ActorPoolStrategy(size=low) if low == high else ray.data.ActorPoolStrategy(min_size=low, max_size=high)
    return ds.map_batches(
        actor_cls,
        batch_size=run.batch_size,
        batch_format="pyarrow",
        compute=pool,
        num_cpus=run.cpus_per_worker,
        num_gpus=run.gpus_per_worker or None,
        fn_constructor_kwargs=dict(checkpoint=ckpt, threads=threads, use_gpu=run.gpus_per_worker > 0,
                                   deterministic=run.deterministic, autocast=run.autocast, **options),
        # Also keeps Ray from fusing the decode tasks into the actors: decoding must overlap the model, not queue before it.
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}},
    )


def _write_stage(ds, out: str, fmt: str, run: RunOptions):
    rows = 256 if fmt == "parquet" else run.batch_size  # a Parquet shard per 256 rows
    return ds.map_batches(stages.write_batch, batch_size=rows, batch_format="pyarrow", fn_kwargs={"out": out, "fmt": fmt})


def _drain(ds, tally: output.Tally, progress: output.Progress) -> None:
    try:
        for status in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            tally.add(status)
            progress.update(tally, status.num_rows)
    finally:
        progress.close()


# Ray Data coalesces a task's output into blocks of up to 128 MiB by default: a whole read unit (64 images) or
# actor call would then move downstream at once, and decoding, the model and writing would take turns instead of
# overlapping. Small blocks keep a few images in flight between the stages (and the memory bound tight).
BLOCK_BYTES = 1 << 20


@contextlib.contextmanager
def _pipeline_context(run: RunOptions):
    """Start/connect Ray; datasets built inside the block get small blocks (each Dataset copies the context)."""
    import ray

    from genart import runtime

    runtime.init()
    ctx = ray.data.DataContext.get_current()
    saved = ctx.target_max_block_size, ctx.enable_progress_bars
    # genart's own line (output.Progress) counts images end to end; Ray's per-operator bars would fight it
    ctx.target_max_block_size, ctx.enable_progress_bars = BLOCK_BYTES, False
    try:
        yield
    finally:
        ctx.target_max_block_size, ctx.enable_progress_bars = saved


def _finish(command: str, out: str, fmt: str, tally: output.Tally, inputs: int, already: int, started: float,
            model: dict, options: dict, src: str | None, extra_files: dict | None = None) -> dict:
    if fmt == "parquet":
        output.dedupe_shards(out)
    written = already + tally.written
    if written + tally.errors != inputs:
        # Never a silent drop: an input neither written nor reported is a bug worth stopping for.
        raise RuntimeError(f"{command} lost track of inputs: {inputs} planned, {written} written, {tally.errors} errors")
    seconds = time.time() - started
    manifest = {
        "command": command, "input": src, "output": out, "format": fmt, "model": model, "options": options,
        "counts": {"inputs": inputs, "written": written, "errors": tally.errors, "already_done": already,
                   "written_this_run": tally.written},
        "error_reasons": dict(tally.reasons),
        "seconds": round(seconds, 2),
        "images_per_second": round((tally.written + tally.errors) / seconds, 2) if seconds else 0.0,
    }
    return output.finish(out, fmt, tally, manifest, extra_files)


# ---------------------------------------------------------------- stylize and score: image inputs


def _image_job(command: str, actor_cls, families: tuple[str, ...], model_uri: str, src: str, out: str, fmt: str,
               ext: str | None, options: dict, run: RunOptions, max_pixels: int, max_side: int | None,
               actor_options: dict | None = None) -> dict:
    inside = storage.fsspec_fs(out)[1].rstrip("/") + "/"
    if storage.is_s3(out) == storage.is_s3(src) and inside.startswith(storage.fsspec_fs(src)[1].rstrip("/") + "/"):
        raise UserError(f"--output {out} is inside --input {src}: a rerun would read its own outputs; choose another --output")
    started = time.time()
    ckpt, loaded = _load(model_uri, families, command)
    model = _model_info(ckpt, loaded)
    del loaded
    plan = sources.plan([src])
    pairs = [(source, naming.output_key(rel, ext)) for source, rel in naming.planned_names(plan)]
    renames = naming.unique_keys(pairs)
    keys = {source: renames.get(source, key) for source, key in pairs}
    del pairs
    output.start(out, {"command": command, "input": src, "format": fmt, "model_hash": model["hash"], "options": options},
                 run.resume, run.overwrite)
    done = output.done_keys(out, fmt) if run.resume else set()
    already = sum(1 for key in keys.values() if key in done)
    todo = naming.prune_plan(plan, lambda s, r: keys.get(s) not in done) if done else plan
    del keys
    tally = output.Tally()
    with _pipeline_context(run):
        import ray

        if todo.units or todo.failures:
            skip_ref = ray.put(done) if done and any(u.kind == "parquet" for u in todo.units) else None
            raw, _ = sources.read_images([src], the_plan=todo)
            ds = raw.map_batches(stages.decode_batch, batch_size=run.batch_size, batch_format="pyarrow",
                                 fn_kwargs=dict(ext=ext, renames=renames, skip_ref=skip_ref, max_pixels=max_pixels,
                                                max_side=max_side))
            ds = _model_stage(ds, actor_cls, ckpt, run, **(actor_options or {}))
            _drain(_write_stage(ds, out, fmt, run), tally, output.Progress(command, plan.num_inputs - already, run.progress))
    return _finish(command, out, fmt, tally, plan.num_inputs, already, started, model, options, src)


def stylize(model: str, src: str, out: str, fmt: str = "png", max_side: int | None = None, tile: int | None = 1024,
            tile_overlap: int | None = None, max_pixels: int = images.DEFAULT_MAX_PIXELS,
            run: RunOptions | None = None) -> dict:
    """Stylise every image under `src` into `out`, keeping each one's relative path, aspect ratio and size."""
    run = run or RunOptions()
    if fmt not in (*output.IMAGE_EXT, "parquet"):
        raise UserError(f"--format {fmt}: must be png, jpeg, webp or parquet")
    if max_side is not None and max_side < 8:
        raise UserError(f"--max-side {max_side}: must be >= 8")
    if tile is not None and tile < 32:
        raise UserError(f"--tile {tile}: must be >= 32 (or 0 for no tiling)")
    if tile_overlap is not None and tile and not 0 < tile_overlap < tile // 2 + 1:
        raise UserError(f"--tile-overlap {tile_overlap}: must be between 1 and half the tile ({tile // 2})")
    ext = output.IMAGE_EXT.get(fmt, ".png")
    options = {"max_side": max_side, "tile": tile or None, "tile_overlap": tile_overlap, "max_pixels": max_pixels}
    return _image_job("stylize", stages.StylizeActor, ("style",), model, src, out, fmt, ext, options, run, max_pixels,
                      max_side, actor_options={"tile": tile or None, "overlap": tile_overlap})


def score(model: str, src: str, out: str, max_pixels: int = images.DEFAULT_MAX_PIXELS,
          run: RunOptions | None = None) -> dict:
    """Classify and embed every image under `src` with a critic: Parquet shards of (key, source, label, probs,
    embedding) in `out`."""
    run = run or RunOptions(batch_size=64)
    return _image_job("score", stages.ScoreActor, ("critic",), model, src, out, "parquet", None, {"max_pixels": max_pixels},
                      run, max_pixels, None)


# ---------------------------------------------------------------- generate: indices in


def _drop_done(batch, skip_ref):
    import pyarrow.compute as pc

    done = stages._get_cached(skip_ref)
    return batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=done)))


def generate(model: str, num: int, out: str, seed: int = 0, truncation: float = 1.0, label: str | None = None,
             fmt: str = "png", run: RunOptions | None = None) -> dict:
    """Generate `num` images; image i of seed S comes from latent seed (S << 32) | i, whatever the batching."""
    import pyarrow as pa

    run = run or RunOptions(batch_size=64)
    if num < 1:
        raise UserError(f"--num {num}: must be >= 1")
    if not 0 <= seed < 2**31:
        raise UserError(f"--seed {seed}: must be between 0 and 2**31 - 1")
    from genart.models.sampling import check_truncation, default_label, parse_label

    check_truncation(truncation, "--truncation")
    if fmt not in ("png", "parquet"):
        raise UserError(f"--format {fmt}: must be png or parquet")
    started = time.time()
    from genart.models import GENERATIVE

    ckpt, loaded = _load(model, GENERATIVE, "generate")
    info = _model_info(ckpt, loaded)
    conditional, names = bool(getattr(loaded, "conditional", False)), loaded.label_names
    del loaded
    label_index = parse_label(label, names, conditional, "--label")
    ext = ".png"
    options = {"num": num, "seed": seed, "truncation": truncation, "label": label_index}
    output.start(out, {"command": "generate", "input": None, "format": fmt, "model_hash": info["hash"], "options": options},
                 run.resume, run.overwrite)
    name_of = {stages.image_name(seed, i, num, ext): i for i in range(num)} if run.resume else {}
    done = [name_of[k] for k in output.done_keys(out, fmt) if k in name_of] if run.resume else []
    tally = output.Tally()
    with _pipeline_context(run):
        import ray

        if len(done) < num:
            ds = ray.data.range(num)
            if done:
                skip_ref = ray.put(pa.array(sorted(done), pa.int64()))
                ds = ds.map_batches(_drop_done, batch_format="pyarrow", fn_kwargs={"skip_ref": skip_ref})
            ds = _model_stage(ds, stages.GenerateActor, ckpt, run, seed=seed, num=num, ext=ext, label=label_index,
                              truncation=truncation)
            _drain(_write_stage(ds, out, fmt, run), tally, output.Progress("generate", num - len(done), run.progress))
    extra = {}
    if fmt != "parquet":
        failed = tally.failed_sources
        lines = []
        for i in range(num):
            if f"seed {seed} index {i}" in failed:
                continue
            z = stages.latent_seed(seed, i)
            lab = (label_index if label_index is not None else default_label(z, len(names))) if conditional else None
            lines.append(json.dumps({"file": stages.image_name(seed, i, num, ext), "seed": seed, "index": i,
                                     "latent_seed": z, "label": lab, "label_name": None if lab is None else names[lab],
                                     "truncation": truncation}))
        extra["images.jsonl"] = "\n".join(lines) + "\n"
    return _finish("generate", out, fmt, tally, num, len(done), started, info, options, None, extra)


__all__ = ["RunOptions", "parse_concurrency", "stylize", "generate", "score"]
