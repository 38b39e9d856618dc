"""The serving settings: the `args` of the Serve app (cluster/serve.yaml, a RayService, or `genart serve --config`).

    from genart.serve.config import ServeArgs, parse_args
    settings = parse_args({"models": {"dcgan": "runs/dcgan"}, "max_upload_mb": 10})   # UserError on a bad key
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from genart import storage
from genart.config import Section, validate

MAX_N = 64  # images per /v1/generate request and frames per /v1/interpolate request
MAX_LIKED = 100  # liked ids per /v1/recommend request


class Autoscaling(Section):
    """Replica autoscaling of every deployment (Serve's autoscaling_config)."""

    min_replicas: int = Field(1, ge=0)  # 1 keeps a warm replica (no cold start); 0 scales to zero when idle
    max_replicas: int = Field(2, ge=1)  # upper bound per deployment
    # Add model replicas when each has more than this in flight. None = max_batch_size: a replica asks for a peer
    # once its batches are full, not while they are still filling (the ingress gets 0.8 x its own maximum).
    target_ongoing_requests: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _order(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


class ServeArgs(Section):
    """Everything the app builder `genart.serve.app:build(args)` accepts; unknown keys are rejected."""

    # name -> checkpoint: a run folder (its best checkpoint) or a checkpoint folder, local or s3://
    models: dict[str, str] = Field(default_factory=dict)
    # a `genart index` folder, local or s3://, served by /v1/similar and /v1/recommend (None = no search)
    index: str | None = None
    max_upload_mb: float = Field(20.0, gt=0)  # larger request bodies are refused with 413
    max_pixels: int = Field(16_000_000, ge=1)  # decoded uploads with more pixels are refused with 400
    request_timeout_s: float = Field(30.0, gt=0)  # a request running longer gets 504
    max_queued_requests: int = Field(64, ge=1)  # per caller (each ingress replica) of a model; beyond it 503
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    api_key_env: str = "GENART_API_KEY"  # env var holding the API key; unset or empty = no key needed
    # --- genart's own knobs (defaults fit the embedded local Ray)
    style_root: str | None = None  # folder of style checkpoints, one sub-folder per style name, served on demand
    batching: bool = True  # dynamic request batching (@serve.batch); false = one request per model call
    max_batch_size: int = Field(16, ge=1)  # requests per batch for /v1/stylize and /v1/classify
    max_batch_images: int = Field(256, ge=MAX_N)  # images per batch for /v1/generate (a request has up to 64)
    batch_wait_timeout_s: float = Field(0.01, ge=0)  # how long a batch waits to fill
    # In flight per model replica. None = 1.25 x the autoscaling target (Ray's guidance: ~20-50 % above it, so
    # requests wait in the router, where a new replica can take them, not inside a busy replica).
    max_ongoing_requests: int | None = Field(None, ge=1)
    ingress_max_ongoing_requests: int = Field(256, ge=1)  # in flight per ingress (HTTP) replica, and as many queued
    max_styles_per_replica: int = Field(4, ge=1)  # style models kept loaded per replica (LRU eviction)
    num_cpus_per_replica: float = Field(0.25, ge=0)  # CPU reservation of each replica (small: fits a laptop Ray)
    num_gpus_per_replica: float = Field(0.0, ge=0)  # GPUs for each model replica (0 = CPU)
    # torch intra-op threads per replica; 0 = max(1, int(num_cpus_per_replica)). More threads than reserved CPUs
    # spin against each other on a busy node (seen: 2 threads 50x slower than 1 on a loaded 2-core box).
    torch_threads: int = Field(0, ge=0)
    access_log: bool = True  # Serve's per-request log line in every deployment; false saves CPU at high request rates
    max_side_limit: int = Field(1024, ge=16)  # largest `max_side` a /v1/stylize or /v1/reconstruct call may ask for

    @field_validator("models")
    @classmethod
    def _names(cls, models: dict[str, str]) -> dict[str, str]:
        for name, uri in models.items():
            if not storage.is_safe_name(name, storage.MODEL_NAME_MAX):  # names appear in URLs and deployment names
                raise ValueError(f"model name {name!r}: {storage.SAFE_NAME_RULE}, "
                                 f"at most {storage.MODEL_NAME_MAX} characters")
            if not isinstance(uri, str) or not uri.strip():
                raise ValueError(f"model {name!r}: give a checkpoint path or s3:// uri")
        return models

    @field_validator("index")
    @classmethod
    def _index_uri(cls, uri: str | None) -> str | None:
        if uri is not None and not uri.strip():
            raise ValueError("index: give a `genart index` folder or s3:// uri, or leave the key out")
        return uri.strip() if uri else None

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, name: str) -> str:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise ValueError(f"api_key_env {name!r}: must be the NAME of an environment variable, never the key itself")
        return name

    @model_validator(mode="after")
    def _something_to_serve(self) -> "ServeArgs":
        if not self.models and not self.style_root and not self.index:
            raise ValueError("models: give at least one model (name: checkpoint), a style_root or an index")
        return self

    @model_validator(mode="after")
    def _queues(self) -> "ServeArgs":
        target = self.model_target  # the explicit target, or its default, max_batch_size
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < target:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= the model replicas' "
                             f"target_ongoing_requests ({target:g}: autoscaling.target_ongoing_requests, else "
                             f"max_batch_size); Ray suggests ~20-50 % above it")
        return self

    @property
    def model_target(self) -> float:
        """target_ongoing_requests of every model deployment."""
        return self.autoscaling.target_ongoing_requests or float(self.max_batch_size)

    @property
    def model_max_ongoing(self) -> int:
        return self.max_ongoing_requests or max(1, math.ceil(1.25 * self.model_target))

    def model_autoscaling(self) -> dict:
        return {**self.autoscaling.model_dump(), "target_ongoing_requests": self.model_target}

    def ingress_autoscaling(self) -> dict:
        target = max(1.0, 0.8 * self.ingress_max_ongoing_requests)
        return {**self.autoscaling.model_dump(), "target_ongoing_requests": target}

    def batch_config(self) -> dict:
        """The model deployments' user_config: batch parameters, applied in their reconfigure() (and changeable
        in a running app by editing user_config in the Serve config, without restarting replicas)."""
        return {"max_batch_size": self.max_batch_size, "max_batch_images": self.max_batch_images,
                "batch_wait_timeout_s": self.batch_wait_timeout_s}

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus_per_replica))

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def parse_args(args: Any, source: str = "serve args") -> ServeArgs:
    """A dict (YAML `args`) or ServeArgs -> validated ServeArgs; a bad key is a one-line UserError."""
    if isinstance(args, ServeArgs):
        return args
    return validate(ServeArgs, dict(args or {}), source=source)
