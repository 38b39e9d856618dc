"""`genart train` config: model (one of the families), data, train, scaling, run and eval sections.

    cfg = load_config("workflows/configs/dcgan.yaml", ["train.max_steps=200", "scaling.num_workers=1"])
Unknown keys and wrong types are one-line UserErrors naming the key (see genart.config).
"""

from __future__ import annotations

from typing import Iterable, Literal

from pydantic import Field, field_validator

from genart import config as config_lib, storage
from genart.config import Section
from genart.models import ModelConfig
from genart.train.augment import Augment


def check_run_name(name: str) -> str:
    """A run name becomes a folder under run.storage: the one safe-name rule (genart.storage), for field validators."""
    if not storage.is_safe_name(name, storage.RUN_NAME_MAX):
        raise ValueError(f"{storage.SAFE_NAME_RULE}, at most {storage.RUN_NAME_MAX} characters")
    return name


class DataSection(Section):
    path: str  # prepared dataset (`genart prepare`), local folder or s3:// prefix
    image_size: int | None = Field(None, ge=8)  # square side in px; None = the size the dataset was prepared at
    batch_size: int = Field(32, ge=1)  # images per step on EACH worker (global batch = batch_size x num_workers)
    # none | flip | crop (random crop from a 112.5% upscale) | crop_flip | dihedral (quarter turns and flips: only
    # for data that looks the same turned, e.g. textures); null = the family's default: flip for generators (crops
    # would teach them zoomed images), crop_flip for the critic and style content.
    # Digits, text and anything with a handedness want none or crop. true/false are read as null/none.
    augment: Augment | None = None
    # Train on random crop_size x crop_size windows of the image_size images, at their own scale (no zoom; before
    # `augment`'s flip, instead of its zoom crop). null = whole images. Validation and sample grids use whole images.
    crop_size: int | None = Field(None, ge=8)
    # Rows each worker draws a streamed batch from (a local shuffle buffer, in batches); a cached split is
    # permuted in full on every epoch instead.
    shuffle_buffer_batches: int = Field(16, ge=1)
    # Train splits up to this size (decoded float32) are decoded once, globally shuffled, and held by the workers,
    # which permute their share every epoch; bigger ones stream from storage every epoch in a random block order
    # through the shuffle buffer (prepare already writes rows in a mixed order). 0 = always stream.
    cache_max_mb: int = Field(512, ge=0)

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_bool(cls, value):
        return {True: None, False: "none"}.get(value, value) if isinstance(value, bool) else value


class TrainSection(Section):
    max_steps: int = Field(1000, ge=1)  # total optimizer steps; re-running with a larger value continues the run
    checkpoint_every_steps: int = Field(250, ge=1)  # checkpoint + sample grid + validation every N steps (and at the end)
    keep_last: int = Field(3, ge=1)  # Ray keeps the keep_last best checkpoints (by best metric; else newest) + the latest
    log_every_steps: int = Field(25, ge=1)  # progress line + metrics.jsonl row every N steps
    # initial weights, noise and a cached split's order: same prepared data + seed = the same run (a streamed split's
    # block order is not fixed; float rounding in multi-threaded ops can still differ)
    seed: int = Field(0, ge=0)
    # mixed precision on GPUs: auto/true = bf16 autocast (fp16 + loss scaling where bf16 is missing), false = fp32;
    # always fp32 on CPUs (auto says nothing there, true adds a note)
    amp: bool | Literal["auto"] = "auto"

    @field_validator("amp", mode="before")
    @classmethod
    def _amp(cls, value):
        if isinstance(value, str) and value.strip().lower() not in {"auto", "true", "false", "yes", "no", "on", "off"}:
            raise ValueError("use auto (bf16/fp16 on GPUs, fp32 on CPUs), true or false")
        return value.strip().lower() if isinstance(value, str) else value


class ScalingSection(Section):
    # Data-parallel training workers (DDP), one process each; [MIN, MAX] = elastic (Ray Train V2): start with what
    # the cluster can place (at least MIN), go on with fewer after a lost node, grow back to MAX (see README)
    num_workers: int | tuple[int, int] = 1
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = Field(1.0, gt=0)  # logical CPUs reserved per worker (Ray Data needs some left over)
    # Elastic runs: how often a healthy run checks whether more workers now fit; growing restarts the workers from
    # the latest checkpoint (Ray's ScalingConfig(elastic_resize_monitor_interval_s))
    elastic_resize_interval_s: float = Field(60.0, ge=0)

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value):
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError("use a number >= 1, or [MIN, MAX] with 1 <= MIN <= MAX")
        return value

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def workers_text(self) -> str:
        return f"{self.min_workers}-{self.max_workers}" if self.min_workers != self.max_workers else str(self.max_workers)


class RunSection(Section):
    storage: str = "runs"  # parent folder of run folders: local path or s3://bucket/prefix
    name: str | None = None  # run folder name; None = the model family. Same storage + name = resume
    max_failures: int = Field(3, ge=-1)  # worker failures to recover from (from the last checkpoint); -1 = forever

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        return value if value is None else check_run_name(value)


class EvalSection(Section):
    every_checkpoints: int = Field(0, ge=0)  # run genart.evaluate on every Nth checkpoint; 0 = never
    num_generated: int = Field(1000, ge=2)  # images generated per evaluation (real side: the whole dataset)
    renamed = {"num_samples": "num_generated"}  # the old name of num_generated still loads
    features: str | None = None  # feature network for the evaluation metrics; None = genart.evaluate's default
    best_metric: str | None = None  # pick best.json by this evaluation metric (e.g. fid1k_critic), not the val metric
    best_mode: Literal["min", "max"] | None = None  # which way best_metric is better; None = the metric's own (FID down)


class TrainConfig(Section):
    # model.family selects dcgan | vae | vqvae | autoregressive | critic | style; the other keys are the family's
    model: ModelConfig
    data: DataSection
    train: TrainSection = TrainSection()
    scaling: ScalingSection = ScalingSection()
    run: RunSection = RunSection()
    eval: EvalSection = EvalSection()

    @property
    def run_name(self) -> str:
        return self.run.name or self.model.family


def load_config(path: str | None, overrides: Iterable[str] = ()) -> TrainConfig:
    """The YAML file plus `--set` overrides, validated (unknown keys and bad values are one-line UserErrors)."""
    return config_lib.load(TrainConfig, path, overrides)
