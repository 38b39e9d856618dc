"""Train a style network on a cluster's GPU workers, then stylize a whole archive with it; data and results on S3.

    # from your laptop, on the cluster of cluster/aws.yaml (or a KubeRay RayCluster):
    genart submit --address http://127.0.0.1:8265 -- \
        python workflows/cluster_stylize.py --set bucket=s3://my-bucket/genart
    # on a laptop, on the embedded local Ray, without GPUs:
    python workflows/cluster_stylize.py --config my.yaml --set train.use_gpu=false --set stylize.gpus_per_worker=0

Steps: prepare the content images into a dataset (skipped when it exists) -> train the style network with DDP
(an interrupted run resumes from its last checkpoint) -> stylize the archive with model actors (a rerun skips
finished images) -> preview.png and summary.json in a report folder. Every step reads and writes S3, so
any node can run any part and a new driver picks up where the last one stopped.
"""

from __future__ import annotations

import json
import os

import click
from pydantic import Field

from genart import config, report, runtime, storage, workflow
from genart.workflow import Workflow

HERE = os.path.dirname(os.path.abspath(__file__))


class TrainPart(config.Section):
    config: str = "configs/style.yaml"  # base training config (relative to workflows/); the keys below override it
    style_image: str = "starry_night.jpg"  # a shipped style name, a path on every node, or an s3:// uri
    image_size: int = Field(256, ge=16)  # content crops the network trains on (px); it stylizes any size after
    max_steps: int = Field(4000, ge=1)
    batch_size: int = Field(8, ge=1)  # per worker
    num_workers: int = Field(4, ge=1)  # DDP workers, one GPU each when use_gpu
    use_gpu: bool = True
    cpus_per_worker: float = Field(3, gt=0)  # CPUs per training worker; leave Ray Data some on each node
    set: list[str] = []  # any other training keys, as --set items: ["model.style_weight=20", ...]


class StylizePart(config.Section):
    concurrency: int = Field(4, ge=1)  # model actors (one GPU each when gpus_per_worker=1)
    gpus_per_worker: float = Field(1.0, ge=0)
    cpus_per_worker: float = Field(2.0, gt=0)
    batch_size: int = Field(8, ge=1)  # images per model call
    max_side: int | None = Field(1024, ge=8)  # longer side of the outputs; None = each image's own size
    tile: int | None = Field(1024, ge=32)  # stylize larger images in overlapping tiles of this size; None = whole
    format: str = "jpeg"  # png | jpeg | webp | parquet
    preview: int = Field(16, ge=0)  # images on preview.png (0 = none)
    # stop when no output comes for this long after the first (a node lost whose work Ray could not recover);
    # None: the batch jobs' default (1800 s on a cluster), 0: wait forever
    stall_timeout_s: float | None = Field(None, ge=0)


class ClusterStylizeConfig(config.Section):
    bucket: str = "s3://YOUR-BUCKET/genart"  # every path below that is relative lives under this prefix
    content: list[str] = ["raw/content"]  # content images for training: folders, archives or prefixes
    dataset: str = "datasets/content"  # where the prepared content dataset goes
    runs: str = "runs"  # run.storage of the training run
    run_name: str = "style"
    archive: str = "raw/to_stylize.tar"  # the archive (or folder / prefix) to stylize
    output: str = "stylized"  # where the stylized images go, with the archive's relative paths
    report: str = "reports/cluster_stylize"  # this workflow's config, summary.json and preview.png
    train: TrainPart = TrainPart()
    stylize: StylizePart = StylizePart()

    def uri(self, path: str) -> str:
        """A relative path under `bucket`; absolute paths and s3:// uris as they are."""
        return path if storage.is_s3(path) or os.path.isabs(path) else storage.join(self.bucket, path)


def prepare_content(cfg: ClusterStylizeConfig) -> str:
    from genart.data.prepare import PrepareOptions, prepare, summary

    dataset = cfg.uri(cfg.dataset)
    if storage.exists(storage.join(dataset, "manifest.json")):
        click.echo(f"{dataset} is already prepared; delete it to prepare again")
    else:
        opts = PrepareOptions(size=cfg.train.image_size, labels="none", val_fraction=0.02)
        click.echo(summary(prepare([cfg.uri(p) for p in cfg.content], dataset, opts, progress=False)))
    return dataset


def train_style(cfg: ClusterStylizeConfig, dataset: str) -> dict:
    t = cfg.train
    settings = {"data.path": dataset, "data.image_size": t.image_size, "data.batch_size": t.batch_size,
                "model.style_image": t.style_image, "train.max_steps": t.max_steps,
                "scaling.num_workers": t.num_workers, "scaling.use_gpu": t.use_gpu,
                "scaling.cpus_per_worker": t.cpus_per_worker, "run.storage": cfg.uri(cfg.runs), "run.name": cfg.run_name}
    return workflow.train(workflow.training_config(os.path.join(HERE, t.config), settings, t.set))


def stylize_archive(cfg: ClusterStylizeConfig, run_dir: str) -> dict:
    from genart.infer import jobs

    s = cfg.stylize
    run = jobs.RunOptions(batch_size=s.batch_size, concurrency=s.concurrency, gpus_per_worker=s.gpus_per_worker,
                          cpus_per_worker=s.cpus_per_worker, resume=True, redo_changed=True,
                          stall_timeout_s=s.stall_timeout_s)
    manifest = jobs.stylize(run_dir, cfg.uri(cfg.archive), cfg.uri(cfg.output), fmt=s.format, max_side=s.max_side,
                            tile=s.tile, run=run)
    click.echo(jobs.output.summary(manifest))
    return manifest


def write_preview(cfg: ClusterStylizeConfig) -> str | None:
    """preview.png: the first stylized images (by path), for a glance without downloading the lot."""
    from genart.infer.output import IMAGE_EXT

    images = sorted(uri for uri, _ in storage.find(cfg.uri(cfg.output)) if uri.lower().endswith(tuple(IMAGE_EXT.values())))
    if not images or not cfg.stylize.preview:
        return None
    path = storage.join(cfg.uri(cfg.report), "preview.png")
    storage.write_bytes(path, report.contact_sheet(images[: cfg.stylize.preview]))
    return path


@workflow.command("cluster_stylize", os.path.join(HERE, "cluster_stylize.yaml"), "train.max_steps=100")
def main(config_path: str, overrides: tuple[str, ...], address: str | None) -> None:
    """Train a style network on a cluster and stylize an archive with it."""
    run(config_path, overrides, address)


def run(config_path: str | None, overrides: tuple[str, ...] = (), address: str | None = None) -> dict:
    flow = Workflow("cluster_stylize", ClusterStylizeConfig)
    cfg = flow.load(config_path, overrides)
    out, report_dir = cfg.uri(cfg.output), cfg.uri(cfg.report)
    flow.record(cfg, report_dir)
    runtime.init(address)
    with flow.step("prepare the content images"):
        dataset = prepare_content(cfg)
    with flow.step(f"train the style network ({cfg.train.num_workers} workers, {'GPU' if cfg.train.use_gpu else 'CPU'})"):
        trained = train_style(cfg, dataset)
    with flow.step(f"stylize {cfg.uri(cfg.archive)}"):
        manifest = stylize_archive(cfg, trained["run_dir"])
    with flow.step("preview"):
        preview = write_preview(cfg)
    summary = {"dataset": dataset, "run": trained, "stylize": manifest["counts"], "preview": preview,
               "timings_s": flow.timings, "seconds": flow.seconds}
    storage.write_text(storage.join(report_dir, "summary.json"), json.dumps(summary, indent=2, default=str) + "\n")
    flow.done([f"stylized: {out} ({manifest['counts']['written']} images, {manifest['counts']['errors']} errors: "
               f"see errors.jsonl)", f"preview: {preview or '-'}", f"model:   {trained['run_dir']}",
               f"serve:   genart serve --model style={trained['run_dir']}"])
    return summary


if __name__ == "__main__":
    main()
