"""`genart train --dry-run`: the same run on one worker, for two steps, with the smallest model the family allows.

    genart train workflows/configs/vae.yaml --set data.path=data/synth --dry-run
Checks that a config, its data and the cluster fit together in seconds (pytorch/examples' `--dry-run`).
"""

from __future__ import annotations

import tempfile

from genart import config as config_lib
from genart import storage
from genart.data.palette import palette_path
from genart.errors import UserError
from genart.models.tiny import TINY_MODEL
from genart.train.config import TrainConfig

DRY_RUN_STEPS = 2


def dry_run_config(cfg: TrainConfig, output: str | None = None) -> TrainConfig:
    """`cfg` shrunk to a dry run: tiny model, one worker, DRY_RUN_STEPS steps, no evaluation, run folder under
    `output` (default: a new temporary folder), so a real run of the same config is never touched or resumed."""
    raw = cfg.model_dump(mode="json")
    raw["model"].update(TINY_MODEL[cfg.model.family])
    if cfg.model.family == "autoregressive" and raw["model"]["palette"] is None:
        # No `genart palette` needed for a dry run: the even RGB lattice of the same size.
        if not storage.exists(palette_path(cfg.data.path, cfg.model.colors)):
            raw["model"]["palette"] = "grid"
    raw["data"]["batch_size"] = min(cfg.data.batch_size, 4)
    raw["train"].update(max_steps=DRY_RUN_STEPS, checkpoint_every_steps=DRY_RUN_STEPS, log_every_steps=1)
    raw["scaling"].update(num_workers=1, cpus_per_worker=min(cfg.scaling.cpus_per_worker, 1.0))
    name = cfg.run_name[: storage.RUN_NAME_MAX - len("-dry-run")]  # a name at the cap still has room for the suffix
    raw["run"].update(storage=output or tempfile.mkdtemp(prefix="genart-dry-run-"), name=f"{name}-dry-run", max_failures=0)
    raw["eval"]["every_checkpoints"] = 0
    raw["eval"]["best_metric"] = None
    return config_lib.validate(TrainConfig, raw)


def clear_earlier(cfg: TrainConfig) -> None:
    """Under --output a dry run's folder is always <output>/<name>-dry-run: an earlier dry run's there is removed,
    else this one would resume at step DRY_RUN_STEPS, train nothing and pass (or refuse a changed config with
    advice a dry run cannot follow). A folder of that name that genart did not write is left alone: an error."""
    run_dir = storage.join(cfg.run.storage, cfg.run_name)
    if not storage.exists(run_dir):
        return
    if not storage.exists(storage.join(run_dir, "config.yaml")):
        raise UserError(f"--output: {run_dir} exists and is not a genart dry run; choose another --output")
    storage.remove(run_dir)


def describe(cfg: TrainConfig) -> str:
    """What the dry run will train: the family and its resolved config, as YAML."""
    return f"dry run: {cfg.model.family}, {DRY_RUN_STEPS} steps on 1 worker, config:\n{config_lib.to_yaml(cfg)}"
