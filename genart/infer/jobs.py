"""The batch-inference jobs: `stylize`, `generate` and `score`, each one streaming Ray Data pipeline.

    genart stylize --model results/runs/style --input photos.zip --output s3://bucket/styled --tile 1024
    genart generate --model results/runs/dcgan --num 10000 --output out/gen --seed 0
    genart score --model results/runs/critic --input data/prepared --output out/scores

read -> decode + validate (tasks) -> model (actor pool, model loaded once per actor) -> encode + write (tasks);
the driver only receives one small status per row. Memory stays bounded by the batch sizes, not the input size.
stylize and score share one chain (_image_job); generate builds its own from indices. The model stage
(RunOptions.model_stage) is `compute=ActorPoolStrategy(min_size, max_size)` (Ray Data's current form; map_batches'
`concurrency=` is deprecated since 2.51): with min < max, Ray Data grows the pool while the model is the bottleneck
and shrinks it when idle.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, NamedTuple

from pydantic import Field, field_validator

from genart import storage
from genart.config import Options, Rule
from genart.data import images, sources
from genart.errors import UserError
from genart.infer import naming, output, stages
from genart.infer.pipeline import drain, pipeline_context, resume_hint


POOL_RULE = Rule("--batch-size must be >= 1 and --concurrency N or MIN-MAX with 1 <= MIN <= MAX")
WORKER_RULE = Rule("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
STALL_RULE = Rule("--stall-timeout {value}: must be >= 0 seconds (0: wait forever)")


class RunOptions(Options):
    """How a job runs (not what it computes): these may change between a run and its --resume."""

    batch_size: Annotated[int, Field(ge=1), POOL_RULE] = 8  # rows per model call
    # model actors: N, or (min, max) for a pool that autoscales between them
    concurrency: Annotated[int | tuple[int, int], POOL_RULE] = 1
    gpus_per_worker: Annotated[float, Field(ge=0), WORKER_RULE] = 0.0  # GPUs per model actor (0 = CPU)
    cpus_per_worker: Annotated[float, Field(gt=0), WORKER_RULE] = 1.0  # CPUs per model actor (= its torch threads)
    resume: bool = False
    overwrite: bool = False
    # with resume (workflows): outputs of another run (a retrained model, other options) are replaced, not refused
    redo_changed: bool = False
    progress: bool = True
    deterministic: bool = False  # outputs independent of batching (slower kernels; see stages.ModelActor)
    autocast: bool | None = None  # bf16/fp16 autocast; None = on with GPUs, off on CPUs
    # stop with JobStalled when no output comes for this long after the first (0: wait forever; None: 1800 s on a
    # cluster, never on the embedded Ray: pipeline.stall_limit)
    stall_timeout_s: Annotated[float | None, Field(ge=0), STALL_RULE] = None

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

    @property
    def threads(self) -> int:
        """torch (and OpenMP/MKL) threads in each model actor: its whole CPUs."""
        return max(1, int(self.cpus_per_worker))

    def actor_kwargs(self) -> dict:
        """The stages.ModelActor constructor arguments that come from how the job runs."""
        return dict(threads=self.threads, use_gpu=self.gpus_per_worker > 0, deterministic=self.deterministic,
                    autocast=self.autocast)

    def actor_env(self) -> dict:
        """The model actors' runtime_env. Besides the thread counts, it keeps Ray Data from fusing the decode tasks
        into the actors (a different runtime_env): decoding must overlap the model, not queue before it."""
        return {"env_vars": {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}}

    def model_stage(self, **constructor_kwargs) -> dict:
        """map_batches arguments of a job's model stage: an actor pool of pool_size actors, each built with
        `constructor_kwargs`, taking batch_size rows per call on its CPUs/GPUs with its own runtime_env.
            ds.map_batches(stages.ScoreActor, **run.model_stage(checkpoint=ckpt, **run.actor_kwargs()))"""
        import ray

        low, high = self.pool_size
        return dict(fn_constructor_kwargs=constructor_kwargs,
                    compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
                    batch_size=self.batch_size, batch_format="pyarrow",
                    num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker or None,
                    runtime_env=self.actor_env())


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


def _model_info(loaded) -> dict:
    """What a job's manifest records about its model (a `models.load` result). "checkpoint" is the resolved
    checkpoint the actors then load, so all of them use the same weights; the driver's copy is dropped."""
    return {"checkpoint": loaded.meta["checkpoint"], "family": loaded.family, "hash": loaded.checkpoint_hash,
            "step": loaded.meta.get("step")}


def _write_rows(fmt: str, run: RunOptions) -> int:
    """Rows per write task: a Parquet shard per 256 rows; image files as they come from the model."""
    return 256 if fmt == "parquet" else run.batch_size


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


class _ImageWork(NamedTuple):
    """What an image job still has to do: the whole plan, the part not yet written, and the output names."""

    plan: sources.Plan  # every input under --input
    todo: sources.Plan  # the inputs a --resume has not written yet (= plan without --resume)
    renames: dict[str, str]  # source -> output key, where two inputs would otherwise write the same key
    done: set[str]  # output keys already written
    already: int  # inputs whose output is already written

    @property
    def remaining(self) -> int:
        return self.plan.num_inputs - self.already

    def skip_ref(self):
        """The done keys in the object store for decode_batch, only where it needs them (Parquet inputs are read
        whole, so their written rows are dropped there; other inputs are pruned from the plan)."""
        import ray

        return ray.put(self.done) if self.done and any(u.kind == "parquet" for u in self.todo.units) else None


def _image_work(command: str, src: str, out: str, fmt: str, ext: str | None, options: dict, run: RunOptions,
                model_hash: str) -> _ImageWork:
    """Plan the inputs, name their outputs, start (or resume) the output folder, and leave out what is written.
    Everything that can refuse runs before the output folder is touched: a refused --resume leaves it as it was."""
    plan = sources.plan([src])
    pairs = [(source, naming.output_key(rel, ext)) for source, rel in sources.input_names(plan)]
    record = {"command": command, "input": src, "format": fmt, "model_hash": model_hash, "options": options}
    upstream = output.input_run(src)
    if upstream is not None and not _recorded_without_input_run(out, run):
        record["input_run"] = upstream  # the input is another job's output: what drew it is part of this run
    begin = output.check(out, record, run.resume, run.overwrite, run.redo_changed, plan)
    done = output.done_keys(out, fmt) if begin.resume else set()
    fixed = naming.read_names(out) if begin.resume else {}
    renames = naming.unique_keys(pairs, fixed, done)
    output.commit(out, record, begin)
    naming.write_names(out, fixed, renames)
    keys = {source: renames.get(source, key) for source, key in pairs}
    already = sum(1 for key in keys.values() if key in done)
    todo = naming.prune_plan(plan, lambda s, r: keys.get(s) not in done) if done else plan
    return _ImageWork(plan, todo, renames, done, already)


def _recorded_without_input_run(out: str, run: RunOptions) -> bool:
    """A --resume of a run recorded before genart recorded input runs: compared as it was recorded (it would be
    refused as another run, its work lost). Workflows (redo_changed) start such a run over instead: scores are
    cheap, and stale ones are what input_run is there to catch."""
    if not run.resume or run.redo_changed:
        return False
    stored = output.read_record(storage.join(out, "run.json"))  # {} when there is none
    return bool(stored) and "input_run" not in stored


def stylize(model: str, src: str, out: str, fmt: str = "png", max_side: int | None = None, tile: int | None = 1024,
            tile_overlap: int | None = None, max_pixels: int = images.DEFAULT_MAX_PIXELS,
            run: RunOptions | None = None) -> dict:
    """Stylise every image under `src` into `out`, keeping each one's relative path, aspect ratio and size."""
    run = run or RunOptions()
    if fmt not in (*output.IMAGE_EXT, "parquet"):
        raise UserError(f"--format {fmt}: must be png, jpeg, webp or parquet")
    if max_side is not None and max_side < 8:
        raise UserError(f"--max-side {max_side}: must be >= 8")
    if tile and tile < 32:  # 0 (or None): never tile
        raise UserError(f"--tile {tile}: must be >= 32 (or 0 for no tiling)")
    if tile_overlap is not None and tile:
        from genart.infer.tiling import tile_side  # here: tiling imports torch

        side = tile_side(tile)  # what the tiles really are: more overlap than half of that is not reached
        if not 0 < tile_overlap <= side // 2:
            raise UserError(f"--tile-overlap {tile_overlap}: must be between 1 and half the tile ({side // 2}; "
                            f"tiles are rounded down to a multiple of 16 px, so --tile {tile} cuts {side} px tiles)")
    ext = output.IMAGE_EXT.get(fmt, ".png")
    options = {"max_side": max_side, "tile": tile or None, "tile_overlap": tile_overlap, "max_pixels": max_pixels}
    return _image_job("stylize", "style", model, src, out, fmt, ext, options, run, stages.StylizeActor,
                      dict(tile=tile or None, overlap=tile_overlap))


def score(model: str, src: str, out: str, max_pixels: int = images.DEFAULT_MAX_PIXELS,
          run: RunOptions | None = None) -> dict:
    """Classify and embed every image under `src` with a critic: Parquet shards of (key, source, label, probs,
    embedding) in `out`."""
    return _image_job("score", "critic", model, src, out, "parquet", None, {"max_pixels": max_pixels},
                      run or RunOptions(batch_size=64), stages.ScoreActor, {})


def _image_job(command: str, family: str, model: str, src: str, out: str, fmt: str, ext: str | None, options: dict,
               run: RunOptions, actor: type, actor_options: dict) -> dict:
    """stylize and score: every image under `src` through `actor` (a `family` model) into `out`.
    read -> decode (tasks) -> the model (actor pool) -> write (tasks); a rerun with --resume skips what is written.
    `options` are the job's recorded options (a resume must match them); the decode stage takes its limits from them."""
    output.check_outside(src, out)
    started = time.time()
    from genart import models

    info = _model_info(models.load(model, family=(family,), command=f"genart {command}"))
    work = _image_work(command, src, out, fmt, ext, options, run, info["hash"])
    tally = output.Tally()
    with pipeline_context():
        if work.todo.units or work.todo.failures:
            raw, _ = sources.read_images([src], max_bytes=images.file_byte_cap(options["max_pixels"]),
                                         the_plan=work.todo)
            ds = raw.map_batches(stages.decode_batch, batch_size=run.batch_size, batch_format="pyarrow",
                                 fn_kwargs=dict(ext=ext, renames=work.renames, skip_ref=work.skip_ref(),
                                                max_pixels=options["max_pixels"], max_side=options.get("max_side")))
            ds = ds.map_batches(actor, **run.model_stage(checkpoint=info["checkpoint"], **actor_options,
                                                         **run.actor_kwargs()))
            ds = ds.map_batches(stages.write_batch, batch_size=_write_rows(fmt, run), batch_format="pyarrow",
                                fn_kwargs={"out": out, "fmt": fmt})
            drain(ds, tally, output.Progress(command, work.remaining, run.progress), run.stall_timeout_s,
                  resume_hint(run.resume))
    return _finish(command, out, fmt, tally, work.plan.num_inputs, work.already, started, info, options, src)


# ---------------------------------------------------------------- generate: indices in


def _drop_done(batch, skip_ref):
    import pyarrow.compute as pc

    done = stages.get_cached(skip_ref)
    return batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=done)))


def generate(model: str, num: int, out: str, seed: int = 0, truncation: float = 1.0, label: str | None = None,
             fmt: str = "png", run: RunOptions | None = None, guidance: float | None = None) -> dict:
    """Generate `num` images; image i of seed S comes from latent seed (S << 32) | i, whatever the batching."""
    import pyarrow as pa

    run = run or RunOptions(batch_size=64)
    if num < 1:
        raise UserError(f"--num {num}: must be >= 1")
    if not 0 <= seed < 2**31:
        raise UserError(f"--seed {seed}: must be between 0 and 2**31 - 1")
    from genart.models.sampling import check_guidance, check_truncation, parse_label, seed_labels

    check_truncation(truncation, "--truncation")
    if fmt not in ("png", "parquet"):
        raise UserError(f"--format {fmt}: must be png or parquet")
    started = time.time()
    from genart import models

    loaded = models.load(model, family=models.GENERATIVE, command="genart generate")
    info = _model_info(loaded)
    ckpt = info["checkpoint"]
    conditional, names = bool(getattr(loaded, "conditional", False)), loaded.label_names
    guidance = check_guidance(guidance, loaded.family, loaded.guidance_trained, "--guidance")
    del loaded
    label_index = parse_label(label, names, conditional, "--label")
    ext = ".png"
    options = {"num": num, "seed": seed, "truncation": truncation, "label": label_index}
    if guidance is not None:  # only when asked: runs without it keep their manifests' options (and resume)
        options["guidance"] = guidance
    begin = output.start(out, {"command": "generate", "input": None, "format": fmt, "model_hash": info["hash"],
                               "options": options}, run.resume, run.overwrite, run.redo_changed)
    name_of = {naming.image_name(seed, i, num, ext): i for i in range(num)} if begin.resume else {}
    done = [name_of[k] for k in output.done_keys(out, fmt) if k in name_of] if begin.resume else []
    tally = output.Tally()
    with pipeline_context():
        import ray

        if len(done) < num:
            ds = ray.data.range(num)  # one row per image: {"id": i}
            if done:
                skip_ref = ray.put(pa.array(sorted(done), pa.int64()))
                ds = ds.map_batches(_drop_done, batch_format="pyarrow", fn_kwargs={"skip_ref": skip_ref})
            ds = ds.map_batches(stages.GenerateActor, **run.model_stage(
                checkpoint=ckpt, seed=seed, num=num, ext=ext, label=label_index, truncation=truncation,
                guidance=guidance, **run.actor_kwargs()))
            ds = ds.map_batches(stages.write_batch, batch_size=_write_rows(fmt, run), batch_format="pyarrow",
                                fn_kwargs={"out": out, "fmt": fmt})
            drain(ds, tally, output.Progress("generate", num - len(done), run.progress), run.stall_timeout_s,
                  resume_hint(run.resume))
    extra = {}
    if fmt != "parquet":
        failed = tally.failed_sources
        lines = []
        for i in range(num):
            if f"seed {seed} index {i}" in failed:
                continue
            z = stages.latent_seed(seed, i)
            lab = seed_labels([z], label_index, len(names))[0] if conditional else None
            lines.append(json.dumps({"file": naming.image_name(seed, i, num, ext), "seed": seed, "index": i,
                                     "latent_seed": z, "label": lab, "label_name": None if lab is None else names[lab],
                                     "truncation": truncation, **({} if guidance is None else {"guidance": guidance})}))
        extra["images.jsonl"] = "\n".join(lines) + "\n"
    return _finish("generate", out, fmt, tally, num, len(done), started, info, options, None, extra)


__all__ = ["RunOptions", "parse_concurrency", "stylize", "generate", "score"]
