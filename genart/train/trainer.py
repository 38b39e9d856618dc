"""`genart train`: check the config against the data and the cluster, then run the one TorchTrainer (Ray Train V2, DDP).

    genart train workflows/configs/dcgan.yaml --set data.path=results/quickstart/data/synth --set train.max_steps=200
Re-running the same command (same run.storage and run.name) resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time

from genart import config as config_lib
from genart import runtime, storage
from genart.errors import UserError, one_line
from genart.train import outputs
from genart.train.config import TrainConfig

VAL_MAX_BYTES = 256 << 20


def run_dir_of(cfg: TrainConfig) -> str:
    return storage.join(cfg.run.storage, cfg.run_name)


def train(cfg: TrainConfig, address: str | None = None, echo=print) -> dict:
    """Train (or resume) the run `cfg` describes; returns a summary dict. UserError before any worker starts."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from genart.train.loop import train_loop_per_worker

    runtime.init(address)
    cfg = resolve(cfg)
    plan = check(cfg, address)
    run_dir = plan["run_dir"]
    if plan["start_step"] >= cfg.train.max_steps:
        echo(f"{run_dir} is already at step {plan['start_step']} (train.max_steps={cfg.train.max_steps}); nothing to do. "
             f"Raise train.max_steps to continue it.")
        return summarize(cfg, run_dir, seconds=0.0, start_step=plan["start_step"], trained=False)
    for note in plan["notes"]:
        echo(f"note: {note}")
    storage.write_text(storage.join(run_dir, "config.yaml"), config_lib.to_yaml(cfg))
    where = "resuming" if plan["start_step"] else "starting"
    echo(f"{where} {cfg.model.family} run {run_dir} at step {plan['start_step']} of {cfg.train.max_steps}: "
         f"{cfg.scaling.workers_text} worker(s) x batch {cfg.data.batch_size}, {plan['image_size']} px, "
         f"{plan['train_rows']} train / {plan['val_rows']} val images")

    datasets, cached = _datasets(cfg, plan["image_size"], plan["train_rows"], plan["has_val"])
    loop_config = {
        "train_config": cfg.model_dump(mode="json"),
        "image_size": plan["image_size"],
        "label_names": plan["label_names"],
        "run_dir": run_dir,
        "cached": cached,
        "cwd": os.getcwd(),  # where relative file names in the model config start (StyleConfig.files_from)
    }
    fs = storage.arrow_fs(cfg.run.storage)[0] if storage.is_s3(cfg.run.storage) else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=storage.arrow_fs(cfg.run.storage)[1],
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=checkpoint_config(cfg),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # rank 0 prints the progress lines
        ),
        datasets=datasets,
        # Only the train split is sharded; rank 0 reads the whole (small) val split for validation.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    started = time.time()
    stop, failed = outputs.stop_request(run_dir), outputs.failure_note(run_dir)
    for marker in (stop, failed):  # left by a driver that was killed while it waited
        storage.remove(marker)
    try:
        with _checkpoint_on_sigterm(stop, echo) as preempted:
            trainer.fit()
        _raise_failure_note(failed, run_dir)  # the worker's error ended the run; its retry returned at once
    except ray.train.TrainingFailedError as exc:
        _raise_failure_note(failed, run_dir)  # run.max_failures=0: the error came back as it was
        raise RuntimeError(f"training failed (run.max_failures={cfg.run.max_failures}); see the worker error above") from exc
    finally:
        for marker in (stop, failed):
            storage.remove(marker)  # (remove checks that it is there)
    summary = summarize(cfg, run_dir, seconds=time.time() - started, start_step=plan["start_step"], trained=True)
    if preempted.is_set() and summary["step"] < cfg.train.max_steps:
        latest = outputs.list_checkpoints(run_dir, complete=True)
        echo(f"stopped by SIGTERM at step {summary['step']}; latest checkpoint {latest[-1][1] if latest else '-'}")
        raise runtime.Terminated()
    return summary


def _raise_failure_note(note: str, run_dir: str) -> None:
    """The error a worker noted before it raised (train_loop_per_worker), as one line; nothing if it noted none."""
    if storage.exists(note):
        raise UserError(f"training stopped: {storage.read_text(note).strip()} (the run's checkpoints are in {run_dir})")


@contextlib.contextmanager
def _checkpoint_on_sigterm(stop: str, echo):
    """While fit() runs, the first SIGTERM (Kubernetes, spot reclaim, `docker stop`) writes the stop marker instead of
    raising: the workers agree on it at their next log step, save a checkpoint there and return, so fit() ends
    normally and a rerun resumes from that step. A second SIGTERM raises runtime.Terminated (Ray aborts the run; the
    rerun starts from the last periodic checkpoint). Yields an Event set once SIGTERM arrived."""
    preempted = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield preempted
        return

    def on_sigterm(signum, frame) -> None:
        if preempted.is_set():
            runtime.raise_terminated(signum, frame)
        preempted.set()
        echo("SIGTERM: saving a checkpoint at the next log step, then stopping (SIGTERM again to stop now)")
        storage.write_text(stop, "SIGTERM\n")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield preempted
    finally:
        signal.signal(signal.SIGTERM, previous)


def scaling_config(cfg: TrainConfig):
    """num_workers an int, or (min, max): Train V2's elastic worker group, which (re)starts at the size the cluster
    can place now and grows toward max (data.batch_size stays per worker; see README, Running on a cluster)."""
    import ray.train

    workers = cfg.scaling.num_workers
    return ray.train.ScalingConfig(num_workers=workers if isinstance(workers, int) else tuple(workers),
                                   use_gpu=cfg.scaling.use_gpu, resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
                                   elastic_resize_monitor_interval_s=cfg.scaling.elastic_resize_interval_s)


def checkpoint_config(cfg: TrainConfig):
    """Ray Train keeps (and deletes) the checkpoints: the train.keep_last best by the run's best metric, plus always
    the latest (a resume starts there). Without the metric (no val split, or a checkpoint eval skipped) a checkpoint
    ranks last, so those runs keep their most recent ones. best.json names Ray's first."""
    import ray.train

    from genart.train.loop import best_metric

    metric, mode = best_metric(cfg)
    return ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_last, checkpoint_score_attribute=metric,
                                      checkpoint_score_order=mode)


def resolve(cfg: TrainConfig) -> TrainConfig:
    """A copy with the run name spelt out and local paths made absolute (Ray Train workers run in another folder)."""
    cfg = cfg.model_copy(deep=True)
    cfg.run.name = cfg.run_name
    cfg.run.storage = storage.absolute(cfg.run.storage)
    cfg.data.path = storage.absolute(cfg.data.path)
    kind, _, uri = (cfg.eval.features or "").partition(":")
    if uri:  # critic:runs/critic, inception:weights.pth
        cfg.eval.features = f"{kind}:{storage.absolute(uri)}"
    if hasattr(cfg.model, "resolve_paths"):  # a family's files that default to the dataset's (e.g. a palette)
        cfg.model = cfg.model.resolve_paths(cfg.data.path)
    return cfg


def _datasets(cfg: TrainConfig, image_size: int, train_rows: int, has_val: bool) -> tuple[dict, bool]:
    """{"train": ..., "val": ...} and whether the train split is cached (see data.cache_max_mb)."""
    from genart.data.read import training_dataset

    cached = train_rows * 3 * image_size * image_size * 4 <= cfg.data.cache_max_mb << 20
    train = training_dataset(cfg.data.path, "train", image_size)
    runtime.quiet_logs(train)
    if cached:
        # Decoded once and shuffled once across the whole split, so each worker's share is a uniform sample of
        # every class (not the shards it happened to be handed); the workers then permute their share per epoch.
        train = train.random_shuffle(seed=cfg.train.seed).materialize()
    else:
        # Streaming restarts the read + decode pipeline every epoch; a new block order each time, plus the
        # workers' shuffle buffer, keeps batches mixed without a full shuffle of a large dataset.
        train = train.randomize_block_order()
    datasets = {"train": train}
    if has_val:
        # The first rows of a prepared split are already mixed across classes (prepare writes them in a hashed
        # order), so a capped val split is a fair sample. Capped at VAL_MAX_BYTES of tensors.
        datasets["val"] = training_dataset(cfg.data.path, "val", image_size).limit(
            max(256, VAL_MAX_BYTES // (3 * image_size * image_size * 4)))
        runtime.quiet_logs(datasets["val"])
    return datasets, cached


# ---------------------------------------------------------------- validation before any worker starts


def check(cfg: TrainConfig, address: str | None = None) -> dict:
    """Everything that can be checked on the driver: data, model vs data, cluster size, storage, resume state."""
    from genart import models, runtime
    from genart.data.read import label_names as read_label_names, read_manifest

    family = models.REGISTRY[cfg.model.family]
    manifest = read_manifest(cfg.data.path)
    splits = manifest.get("splits") or {}
    train_rows, val_rows = int(splits.get("train", 0)), int(splits.get("val", 0))
    if train_rows == 0:
        raise UserError(f"data.path: {cfg.data.path} has no training images ({splits}); prepare a dataset with images in it")
    global_batch = cfg.data.batch_size * cfg.scaling.max_workers
    if train_rows < global_batch:
        raise UserError(
            f"data.batch_size: {cfg.data.batch_size} x {cfg.scaling.max_workers} workers needs at least {global_batch} train images, "
            f"{cfg.data.path} has {train_rows}; lower data.batch_size or scaling.num_workers"
        )
    image_size = cfg.data.image_size or manifest.get("image_size")
    if not image_size:
        raise UserError(f"data.image_size: {cfg.data.path} keeps original image sizes; set data.image_size (e.g. 64)")
    label_names = read_label_names(manifest)
    if family.needs_labels and len(label_names) < 2:
        raise UserError(f"data.path: {cfg.model.family} needs a labelled dataset (one folder per class, >= 2 classes); "
                        f"{cfg.data.path} has {len(label_names)} labels")
    if models.trains_on_labels(cfg.model) and manifest.get("unlabelled"):  # else every worker (and retry) stops at the first label -1
        raise UserError(f"data.path: {manifest['unlabelled']} images of {cfg.data.path} are outside its class folders "
                        f"(no label), and this {cfg.model.family} trains on labels; put them in a class folder and "
                        f"prepare again")
    crop = cfg.data.crop_size
    if crop is not None and (crop > image_size or family.supported_sizes is not None):
        # a fixed-size generator/decoder must see whole images of its own size; only size-free nets train on windows
        why = f"larger than data.image_size={image_size}" if crop > image_size else f"{cfg.model.family} trains on whole images"
        raise UserError(f"data.crop_size={crop}: {why}")
    # the family's own checks (check_size, labels, the critic's stages), as UserErrors, at the size it trains on
    trained = int(crop or image_size)
    family.build(cfg.model, trained, len(label_names))
    if cfg.model.family == "style" and trained % 4:  # its two stride-2 stages; training does not pad (inference does)
        raise UserError(f"data.{'crop_size' if crop else 'image_size'}={trained}: the style network trains on sides "
                        f"that are multiples of 4 (e.g. {trained - trained % 4})")

    notes = []
    if cfg.train.amp is True and not cfg.scaling.use_gpu:
        notes.append("train.amp is ignored on CPUs (mixed precision needs scaling.use_gpu=true)")
    if cfg.scaling.use_gpu:
        _check_gpus(cfg, address)
    # elastic runs must fit MIN workers; more join when the cluster has room
    runtime.check_training_fits(cfg.scaling.min_workers, cfg.scaling.cpus_per_worker, cfg.scaling.use_gpu)
    if cfg.eval.every_checkpoints > 0:
        _check_eval(cfg)
    elif cfg.eval.best_metric:
        raise UserError("eval.best_metric: needs eval.every_checkpoints > 0 (the metric comes from the evaluation)")
    if not val_rows and cfg.eval.every_checkpoints == 0 and family.best_metric[0] != "step":  # else ranked by step anyway
        notes.append(f"{cfg.data.path} has no val split: no validation metrics and no best.json (load picks the latest checkpoint)")

    run_dir = run_dir_of(cfg)
    storage.check_writable(cfg.run.storage)
    done = outputs.list_checkpoints(run_dir, complete=True)
    if done:
        _check_resumable(cfg, run_dir, done[-1][1], int(image_size), label_names)
    return {
        "run_dir": run_dir,
        "image_size": int(image_size),
        "label_names": label_names,
        "train_rows": train_rows,
        "val_rows": val_rows,
        "has_val": val_rows > 0,
        "start_step": done[-1][0] if done else 0,
        "notes": notes,
    }


def _check_gpus(cfg: TrainConfig, address: str | None) -> None:
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    if gpus >= cfg.scaling.min_workers:
        return
    if not address:  # the embedded local Ray cannot grow: waiting for GPUs would hang forever
        raise UserError(f"scaling.use_gpu: this machine has {gpus:g} GPUs for {cfg.scaling.min_workers} workers; "
                        f"set scaling.use_gpu=false or run on a GPU cluster with --address")


def evaluator():
    """genart.evaluate.score_checkpoint, imported only when a run asks for it."""
    try:
        from genart.evaluate import score_checkpoint
    except ImportError as exc:
        raise UserError(f"eval.every_checkpoints: the evaluation module is not available ({exc}); set eval.every_checkpoints=0") from None
    return score_checkpoint


def _check_eval(cfg: TrainConfig) -> None:
    """The evaluation must be able to run on rank 0 (family, feature network) and name the best_metric it reports."""
    evaluator()
    from genart.evaluate import check_features, metric_keys
    from genart.evaluate.reference import subset_rows
    from genart.evaluate.registry import better
    from genart.evaluate.scoring import DEFAULT_SPLIT, GENERATIVE_FAMILIES

    if cfg.model.family not in GENERATIVE_FAMILIES:
        raise UserError(f"eval.every_checkpoints: evaluation scores generated images ({', '.join(GENERATIVE_FAMILIES)}), "
                        f"not a {cfg.model.family}; set eval.every_checkpoints=0")
    features = check_features(cfg.eval.features)  # e.g. Inception weights missing: fail now, not at the first checkpoint
    # e.g. fid1k_critic: names carry N and features (precision/recall: the rows per side, fewer on a small dataset)
    known = metric_keys(features.kind, cfg.eval.num_generated, num_real=subset_rows(cfg.data.path, DEFAULT_SPLIT))
    if not cfg.eval.best_metric:
        return
    name = cfg.eval.best_metric.removeprefix("eval_")
    scores = [k for k in known if better(k)]
    if name not in scores:
        what = "a spread, not a score" if name in known else f"not reported with eval.features={features.text}"
        raise UserError(f"eval.best_metric: {cfg.eval.best_metric!r} is {what}; use one of {', '.join(scores)}")
    # a wrong direction keeps the worst checkpoints and deletes the best (Ray ranks them by it)
    direction = better(name)
    if cfg.eval.best_mode and cfg.eval.best_mode != direction:
        raise UserError(f"eval.best_mode={cfg.eval.best_mode}: higher {name} is "
                        f"{'better' if direction == 'max' else 'worse'}; leave eval.best_mode unset")


class ResumeConflict(UserError):
    """The run cannot resume under this config: what shapes its weights (model config, image size, labels) changed.
    `change` says what, as "model.style_image: 'a.jpg' then, 'b.jpg' now" (a workflow that owns the run, such as the
    quickstart, trains it again from step 0 instead of stopping)."""

    def __init__(self, message: str, change: str):
        super().__init__(message)
        self.change = change


def _check_resumable(cfg: TrainConfig, run_dir: str, latest: str, image_size: int, label_names: list[str]) -> None:
    """Resuming must keep what shapes the weights (model config, image size, labels): checked here, once, instead of
    failing in every worker (and every retry) when the checkpoint does not load. Raises ResumeConflict."""
    from genart import models

    try:
        state = json.loads(storage.read_text(storage.join(run_dir, latest, "state.json")))
    except ValueError as exc:
        raise UserError(f"{run_dir}/{latest}/state.json is not valid JSON ({one_line(exc, with_type=False)}); "
                        f"remove that checkpoint folder to resume from the one before") from None
    old = type(cfg.model).current_keys((state.get("config") or {}).get("model") or {})  # renamed keys: today's names
    try:  # keys added since the run started take their defaults, as its resumed steps will
        old = type(cfg.model).model_validate(old).model_dump(mode="json")
    except (ValueError, UserError):
        pass  # a key since removed: compared as stored, so the message names it
    new = cfg.model.model_dump(mode="json")
    free = type(cfg.model).resume_free
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in free]
    where = f"{run_dir} ({latest})"
    if changed:
        key = changed[0]
        raise ResumeConflict(f"model.{key}: {where} was trained with {old.get(key)!r}, not {new.get(key)!r}; "
                             f"keep the run's model config or choose a new run.name",
                             f"model.{key}: {old.get(key)!r} then, {new.get(key)!r} now")
    if state.get("image_size") != image_size:
        raise ResumeConflict(f"data.image_size: {where} was trained at {state.get('image_size')} px, not {image_size}; "
                             f"keep it or choose a new run.name",
                             f"image size: {state.get('image_size')} px then, {image_size} px now")
    # label names shape the weights only of a model that takes labels (embeddings, class heads); an unconditional
    # generator resumes on a dataset that has gained or renamed a class folder
    if models.trains_on_labels(cfg.model) and list(state.get("label_names") or []) != list(label_names):
        raise ResumeConflict(f"data.path: {where} was trained on labels {state.get('label_names')}, this dataset has "
                             f"{label_names}; use the same labels or a new run.name",
                             f"labels: {state.get('label_names')} then, {label_names} now")


# ---------------------------------------------------------------- summary


def summarize(cfg: TrainConfig, run_dir: str, seconds: float, start_step: int, trained: bool) -> dict:
    rows = outputs.read_metrics(run_dir)
    last = rows[-1] if rows else {}
    checkpoints = [name for _, name in outputs.list_checkpoints(run_dir)]
    best = outputs.read_best(run_dir)
    losses = {k: v for k, v in last.items() if k not in outputs.BOOKKEEPING}
    return {
        "run_dir": run_dir,
        "family": cfg.model.family,
        "trained": trained,
        "start_step": start_step,
        "step": last.get("step", start_step),
        "max_steps": cfg.train.max_steps,
        "seconds": round(seconds, 1),
        "final_metrics": losses,
        "images_per_second": last.get("images_per_second"),
        "checkpoints": checkpoints,
        "best": best,
        "samples": storage.join(run_dir, "samples"),
        "loss_curve": storage.join(run_dir, "loss.png"),
        "metrics": storage.join(run_dir, "metrics.jsonl"),
    }


def format_summary(summary: dict) -> str:
    """The end-of-run report the CLI prints."""
    metrics = "  ".join(f"{k} {_fmt(v)}" for k, v in summary["final_metrics"].items() if not k.startswith("val_accuracy_class_"))
    best = summary["best"]
    lines = [
        f"{'trained' if summary['trained'] else 'run'} {summary['family']}: step {summary['step']}/{summary['max_steps']}"
        + (f" (from {summary['start_step']}) in {summary['seconds']:.0f} s" if summary["trained"] else ""),
        f"  final      {metrics or '-'}",
        f"  best       {best['checkpoint']} ({best['metric']} {_fmt(best['value'])})" if best else "  best       - (no validation metric)",
        f"  run folder {summary['run_dir']}",
        f"  checkpoints {', '.join(summary['checkpoints']) or '-'}",
        f"  samples    {summary['samples']}",
        f"  loss curve {summary['loss_curve']}",
    ]
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
