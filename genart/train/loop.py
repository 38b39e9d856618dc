"""The one `train_loop_per_worker` every model family trains with (Ray Train V2 + DDP); the family supplies the nets
and the step, this file supplies resume, metrics, checkpoints, samples and validation (the data feed is in
genart.train.worker_data). It reads as numbered steps: [1] model and optimizers, [2] resume, [3] data, [4] the
family's train_step, [5] report / checkpoint, [6] finish.

Every worker calls `ray.train.report` at the same steps, the checkpoint steps only (V2 requires it: report is a
barrier, and costs seconds). Rank 0 alone saves the checkpoint and writes the run files (genart.train.outputs),
log rows included; the others report checkpoint=None.
"""

from __future__ import annotations

import collections
import contextlib
import math
import shutil
import sys
import tempfile
import time
from typing import Iterable

import torch

from genart import runtime, storage
from genart.errors import UserError, one_line
from genart.models.training import Precision, set_seed, unwrap
from genart.train import outputs
from genart.train.config import TrainConfig
from genart.train.worker_data import ValSplit, train_batches



def train_loop_per_worker(config: dict) -> None:
    """config: {"train_config": TrainConfig as a dict, "image_size": int, "label_names": [str], "run_dir": str,
    "cached": bool (the train split is decoded and shuffled in the object store, see data.cache_max_mb)}.

    Ray Train retries every worker failure up to run.max_failures times (forever at -1) from the last checkpoint,
    with the same RNG streams: a diverged loss or a UserError (a corrupt optimizer state) would come back each
    time. Such an error leaves a failure note first; the attempt Ray starts next finds it and returns at once, and
    the driver prints the note (trainer.train). Other errors (a lost node, a killed worker) are retried."""
    note = outputs.failure_note(config["run_dir"])
    if storage.exists(note):
        return
    try:
        _train(config)
    except (UserError, FloatingPointError) as exc:
        storage.write_text(note, one_line(exc, with_type=False))
        raise


def _train(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from genart import models

    runtime.quiet_logs(training=True)
    cfg = TrainConfig.model_validate(config["train_config"])
    family = models.REGISTRY[cfg.model.family]
    image_size, label_names, run_dir = config["image_size"], config["label_names"], config["run_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # Intra-op threads = this worker's CPUs, explicitly: Ray's OMP_NUM_THREADS default is skipped whenever the
    # driver's environment already sets it, and it may land after torch has sized its pool.
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))

    # [1] Prepare model and optimizers: the family's nets, trainable ones wrapped in DDP by prepare_model.
    # Same seed on every rank: nets that DDP does not broadcast (EMA copies, loss networks) start identical.
    set_seed(cfg.train.seed)
    # files the config names relative to the driver's folder (a style image): the worker runs in another one
    built = cfg.model.files_from(config["cwd"]) if hasattr(cfg.model, "files_from") and config.get("cwd") else cfg.model
    nets = family.build(built, image_size, len(label_names))
    for name, net in nets.items():
        nets[name] = ray.train.torch.prepare_model(net) if name in family.trainable() else net.to(device)
    opts = family.optimizers(cfg.model, nets)
    precision = Precision(cfg.train.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # autotuned conv kernels, as the inference actors use (fixed shapes)

    # [2] Resume from the newest complete checkpoint, if there is one (nets, optimizers, GradScalers, RNG streams).
    start_step, resumed_row = _resume(run_dir, cfg.train.seed, nets, opts, precision, rank)
    files = outputs.RunFiles(run_dir, start_step) if rank == 0 else None
    if files is not None:  # an attempt killed after storing its checkpoint, before writing that step's files
        files.recover_row(start_step, resumed_row, *best_metric(cfg))
    val = ValSplit() if rank == 0 else None
    if rank == 0:
        verb = f"resumed from {outputs.checkpoint_name(start_step)}" if start_step else "started"
        _say(f"{cfg.model.family}: {verb} on {world} worker(s), {device}; training to step {cfg.train.max_steps}")

    # [3] Data: this worker's shard of the train split as endless augmented batches; rank 0 also keeps the val split
    # and the fixed inputs of the sample grid (from the first val batch, else from the first train batch).
    augment = cfg.data.augment or family.default_augment
    data_seed = _seed(cfg.train.seed, "data", rank, start_step)  # per rank and resume point (a retry repeats it)
    batches = train_batches(cfg, device, augment, data_seed, cached=config.get("cached", False))
    fixed = _fixed_inputs(family, cfg, image_size, label_names, val.example(label_names)) if rank == 0 else None

    window = _Window()
    # The latest batches, for family.before_checkpoint, which runs on rank 0 only: other ranks keep none
    recent = collections.deque(maxlen=family.recent_batches if rank == 0 else 0)
    stop = outputs.stop_request(run_dir)
    step, stopping = start_step, False
    while step < cfg.train.max_steps and not stopping:
        # [4] Train step: the family's own (forward, losses, backward, optimizer steps); it returns scalar metrics.
        batch = next(batches)
        if step == start_step:
            window.reset()  # the first batch's wait is the pipeline's start-up (a cached split read whole): no step
        recent.append(batch)
        if rank == 0 and fixed is None:
            fixed = _fixed_inputs(family, cfg, image_size, label_names, {**batch, "label_names": label_names})
        window.add(family.train_step(cfg.model, nets, opts, batch, step, precision))
        step += 1

        # [5] Report / checkpoint, every log_every_steps and at every checkpoint step.
        at_checkpoint = step % cfg.train.checkpoint_every_steps == 0 or step == cfg.train.max_steps
        if step % cfg.train.log_every_steps and not at_checkpoint:
            continue
        # Everything below runs on every rank at the same steps (steps count alike everywhere), because it holds
        # collectives: the stop broadcast, the RNG gather, the metric all-reduce, and ray.train.report.
        # A preempted driver asked for a checkpoint now (trainer._checkpoint_on_sigterm): save one and return.
        stopping = _stop_requested(stop, rank, world, device)
        at_checkpoint = at_checkpoint or stopping
        # Every rank's RNG streams go into the checkpoint, so a resumed rank draws the noise it would have drawn.
        rng_ranks = _gather_rng(world) if at_checkpoint else None
        row = {"step": step, **window.means(world, device), "images_per_second": window.rate(cfg.data.batch_size * world),
               "start_step": start_step}
        if not at_checkpoint:
            # Log rows go to metrics.jsonl and the progress line only, not through ray.train.report: a report
            # costs ~2 s here (a cross-rank barrier through Ray actors), which at every log step cost 40 % of
            # the throughput (bench/bench_train.py).
            if rank == 0:
                _log(files, row, cfg, flush=not storage.is_s3(run_dir))
        # ray.train.report is a barrier in Train V2: every rank must call it the same number of times, at the same
        # steps. All ranks report exactly once per checkpoint step and nowhere else; only rank 0 carries the files.
        elif rank == 0:
            meta = {"family": cfg.model.family, "config": cfg.model_dump(mode="json"), "image_size": image_size,
                    "label_names": label_names, "precision": precision.state_dict(), "rng_ranks": rng_ranks}
            with _rng_kept():  # the streams go on as saved: as a run resumed from this checkpoint draws them
                with _saved_checkpoint(family, cfg, nets, opts, val, row, meta, recent) as (checkpoint, ranked_row):
                    ray.train.report(ranked_row, checkpoint=checkpoint, checkpoint_dir_name=outputs.checkpoint_name(step))
                _after_checkpoint(files, family, cfg, nets, fixed, row)
        else:
            ray.train.report(row, checkpoint=None, checkpoint_dir_name=outputs.checkpoint_name(step))
        # The next window starts where this one was measured (report time counts), except after a checkpoint:
        # validation, saving and sample grids do not count against images_per_second.
        window.reset(None if at_checkpoint else window.measured)

    # [6] Finish: the last step (max_steps, or the one a stop request named) was a checkpoint step, so every
    # rank has reported it and rank 0 has written its files; TorchTrainer.fit returns on the driver, which
    # prints the run summary (trainer.summarize).


def _resume(run_dir: str, seed: int, nets: dict, opts: dict, precision: Precision, rank: int) -> tuple[int, dict]:
    """Restore the checkpoint to resume from into nets, opts and precision; returns its step (0: a fresh run) and
    the metrics row it was saved with. Seeds this rank's noise stream unless the checkpoint held it."""
    start_step, restored_rng, row = 0, False, {}
    checkpoint = _resume_checkpoint(run_dir)
    if checkpoint:
        from genart.models.checkpoint import restore_training

        with checkpoint.as_directory() as local:
            # nets, optimizers, GradScalers, and this rank's own RNG streams (every rank's are saved)
            state = restore_training(local, nets, opts, precision, rank=rank)
        start_step, restored_rng = int(state["step"]), bool(state.get("rng_restored"))
        row = dict(state.get("metrics") or {})
    if not restored_rng:  # a fresh run (or an old checkpoint with one RNG): different noise per rank
        set_seed(_seed(seed, "noise", rank, start_step))
    return start_step, row


def _fixed_inputs(family, cfg: TrainConfig, image_size: int, label_names: list[str], example: dict | None) -> dict | None:
    """The family's fixed sample-grid inputs (same latents/images at every checkpoint), from an example batch. From
    the val split they stay the same across resumes too; from the first train batch (no val split) a resume draws
    other pictures, as its data order is another."""
    if example is None:
        return None
    example = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in example.items()}
    return family.fixed_inputs(cfg.model, image_size, len(label_names), example)


@contextlib.contextmanager
def _rng_kept():
    """Rank 0's checkpoint work (BatchNorm recalibration with dropout on, validation's noise, sample grids) leaves the
    RNG streams as the checkpoint saved them, so a run that goes on draws what a run resumed from it draws."""
    from genart.models.checkpoint import restore_rng, rng_state

    saved = rng_state()
    try:
        yield
    finally:
        restore_rng(*saved)


@contextlib.contextmanager
def _saved_checkpoint(family, cfg: TrainConfig, nets: dict, opts: dict, val: ValSplit, row: dict, meta: dict,
                      recent: Iterable[dict] = ()):
    """Rank 0: validate (into row), save every net + optimizer + RNG into a temp folder; yields (Checkpoint, the row
    Ray ranks it by) for ray.train.report, and removes the folder once Ray has copied it to storage."""
    import ray.train

    from genart.models.checkpoint import record_metrics, save_checkpoint

    step = row["step"]
    local = tempfile.mkdtemp(prefix="genart-ckpt-")
    try:
        # e.g. the EMA generator's or the critic's BatchNorm statistics
        family.before_checkpoint(cfg.model, {k: unwrap(v) for k, v in nets.items()}, list(recent))
        row.update(_validate(family, cfg, nets, val))
        save_checkpoint(local, nets, opts, {**meta, "step": step, "metrics": dict(row)})
        scores = _run_eval(cfg, local, step)
        if scores:
            row.update(scores)
            record_metrics(local, scores)
        # Ray keeps checkpoints by this score (CheckpointConfig in trainer.py): one without it ranks last (NaN),
        # here only; metrics.jsonl keeps the row as measured.
        metric, _ = best_metric(cfg)
        yield ray.train.Checkpoint.from_directory(local), {**row, metric: _finite_or_nan(row.get(metric))}
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _resume_checkpoint(run_dir: str):
    """The checkpoint to resume from: Ray's latest, unless it is gone from storage (or Ray knows none), then the
    newest complete one in the run folder (`checkpoint.incomplete`: a half-uploaded one is never picked)."""
    import ray.train

    latest = ray.train.get_checkpoint()
    done = outputs.list_checkpoints(run_dir, complete=True)
    if latest is not None:
        name = latest.path.rstrip("/").rsplit("/", 1)[-1]
        if name in {n for _, n in done}:
            return latest
    if not done:
        return None
    fs, path = storage.arrow_fs(storage.join(run_dir, done[-1][1]))
    if latest is not None and ray.train.get_context().get_world_rank() == 0:
        _say(f"Ray's latest checkpoint {latest.path} is missing; resuming from {done[-1][1]}, the newest complete one")
    return ray.train.Checkpoint(path, filesystem=fs)


def _stop_requested(marker: str, rank: int, world: int, device: torch.device) -> bool:
    """Whether the stop marker exists, as rank 0 sees it, on every rank (they must all stop at the same step).
    The flag lives on the training device: NCCL (GPU workers) moves CUDA tensors only, gloo CPU ones."""
    wanted = torch.tensor([1.0 if rank == 0 and storage.exists(marker) else 0.0], device=device)
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.broadcast(wanted, src=0)
    return bool(wanted.item())


# ---------------------------------------------------------------- data


def _seed(base: int, stream: str, rank: int, step: int) -> int:
    """A seed for one (stream, rank, start step): SeedSequence hashing, so no two ranks or resume points share one
    (two resumes from one checkpoint do: a retry draws what the first try drew)."""
    import numpy as np

    return int(np.random.SeedSequence([base, rank, step, sum(map(ord, stream))]).generate_state(1)[0])


def _gather_rng(world: int) -> list:
    """Every rank's RNG state (python, numpy, torch), gathered on every rank (rank 0 saves them)."""
    from genart.models.checkpoint import rng_state

    mine = rng_state()
    if world == 1 or not torch.distributed.is_initialized():
        return [mine]
    everyone: list = [None] * world
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


# ---------------------------------------------------------------- metrics and checkpoints (rank 0)


class _Window:
    """Running sums of a family's step metrics between two reports, and the wall time they took."""

    def __init__(self):
        self.reset()

    def reset(self, started: float | None = None) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}  # per metric: a family's metrics can change within a window (vqvae's prior)
        self.steps = 0
        self.started = time.perf_counter() if started is None else started
        self.measured = self.started

    def add(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0) + 1
        self.steps += 1

    def means(self, world: int, device: torch.device) -> dict[str, float]:
        """Means over the window and over every worker (a small all-reduce, at the same steps on every rank), made on
        the training device: NCCL (GPU workers) reduces CUDA tensors only, gloo CPU ones."""
        keys = list(self.sums)  # the family's order, the same on every rank
        values = torch.tensor([self.sums[k] / self.counts[k] for k in keys], dtype=torch.float64, device=device)
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(values)  # a sum; the tensor is tiny
            values /= world
        return {k: float(f"{float(v):.6g}") for k, v in zip(keys, values.cpu())}  # 6 digits: a 1e-7 loss is not 0

    def rate(self, images_per_step: int) -> float:
        self.measured = time.perf_counter()
        return round(self.steps * images_per_step / max(1e-9, self.measured - self.started), 2)


def _validate(family, cfg: TrainConfig, nets: dict, val: ValSplit) -> dict:
    batches = val.batches()
    if not batches:
        return {}
    plain = {k: unwrap(v) for k, v in nets.items()}  # never run a rank-0-only forward through DDP (it syncs buffers)
    return family.evaluate(cfg.model, plain, iter(batches))


def _run_eval(cfg: TrainConfig, local_checkpoint: str, step: int) -> dict:
    """genart.evaluate's scores on every eval.every_checkpoints-th checkpoint (and the last), as eval_* metrics."""
    every, interval = cfg.eval.every_checkpoints, cfg.train.checkpoint_every_steps
    if every <= 0:
        return {}
    # Only on the regular schedule: a checkpoint taken off it (a SIGTERM's, at step 137 of 250) must be stored
    # within the stop's grace period, not after a thousand generated images.
    scheduled = step % interval == 0 and (step // interval) % every == 0
    if not (scheduled or step == cfg.train.max_steps):
        return {}
    from genart.train.trainer import evaluator

    scores = evaluator()(local_checkpoint, cfg.data.path, cfg.eval)
    return {(k if k.startswith("eval_") else f"eval_{k}"): float(v) for k, v in scores.items()}


def best_metric(cfg: TrainConfig) -> tuple[str, str]:
    """(metric, "min" | "max") that ranks checkpoints: eval.best_metric, else the family's validation metric."""
    from genart import models

    if cfg.eval.best_metric:
        from genart.evaluate.registry import better

        name = cfg.eval.best_metric.removeprefix("eval_")
        return "eval_" + name, cfg.eval.best_mode or better(name) or "min"  # (the trainer refused a name with none)
    return models.REGISTRY[cfg.model.family].best_metric


def _finite_or_nan(value) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def _after_checkpoint(files: outputs.RunFiles, family, cfg: TrainConfig, nets: dict, fixed: dict, row: dict) -> None:
    """Rank 0, once the checkpoint is stored: sample grid, metrics, loss curve, best.json, progress line."""
    step = row["step"]
    plain = {k: unwrap(v) for k, v in nets.items()}
    files.save_samples(step, family.sample_images(cfg.model, plain, fixed))
    improved = files.update_best(step, row, *best_metric(cfg))  # Ray deletes the checkpoints it does not keep
    _log(files, row, cfg, flush=True, note=f"checkpoint {outputs.checkpoint_name(step)}" + (" (best)" if improved else ""))
    files.plot_losses()


def _log(files: outputs.RunFiles, row: dict, cfg: TrainConfig, flush: bool, note: str = "") -> None:
    files.add_metrics(row)
    if flush:
        files.flush_metrics()
    shown = "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "start_step", "images_per_second") and not k.startswith("val_accuracy_class_"))
    width = len(str(cfg.train.max_steps))
    _say(f"step {row['step']:>{width}}/{cfg.train.max_steps}  {shown}  | {row['images_per_second']:.1f} img/s" + (f"  [{note}]" if note else ""))


def _say(line: str) -> None:
    # Not print(): Ray Train patches print into its logger and the line would show twice.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
