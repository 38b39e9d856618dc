"""`genart train` for real: Ray Train V2 fits of every family on tiny synthetic data (2 workers, DDP), resume,
recovery from a killed worker, S3 run storage, config errors before any worker starts, and loading the result.

Five real fits in total (each ~1 minute here); the config-error tests need no fit.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from genart import models, storage
from genart.cli import main
from genart.config import validate
from genart.errors import UserError
from genart.train import outputs
from genart.train.config import TrainConfig, load_config
from genart.train.trainer import checkpoint_config, format_summary, scaling_config, train

TINY_MODELS = {
    "dcgan": {"family": "dcgan", "latent_dim": 16, "base_channels": 8, "max_channels": 32, "grid_size": 16, "eval_samples": 16},
    "vae": {"family": "vae", "latent_dim": 16, "base_channels": 8, "max_channels": 32, "grid_size": 8},
    "critic": {"family": "critic", "base_channels": 8, "num_stages": 3, "embed_dim": 32, "dropout": 0.0},
    "style": {"family": "style", "style_image": "wave.jpg", "style_size": 32, "loss_network": "random", "random_filters": 8,
              "channels": 4, "num_res_blocks": 1, "grid_size": 4},
}


def make_cfg(family: str, data_path: str, storage_uri: str, name: str, **sections) -> TrainConfig:
    raw = {
        "model": dict(TINY_MODELS[family]),
        "data": {"path": data_path, "batch_size": 8},
        "train": {"max_steps": 20, "checkpoint_every_steps": 10, "log_every_steps": 5, "keep_last": 2},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "run": {"storage": storage_uri, "name": name},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return validate(TrainConfig, raw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_session) -> str:
    """300 synthetic images (5 genres) prepared at 32 px, ~20% in the val split (enough val images that an
    accuracy is not a coin toss; the session's 100-image synth_dir leaves ~20)."""
    from genart.data.prepare import PrepareOptions, prepare
    from genart.data.synth import make_synth

    root = tmp_path_factory.mktemp("train-data")
    make_synth(str(root / "raw"), num=300, size=32, seed=1)
    dest = str(root / "synth")
    prepare([str(root / "raw")], dest, PrepareOptions(size=32, val_fraction=0.2), progress=False)
    return dest


def val_images(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The val split as (N, 3, 32, 32) in [0, 1] and labels (N,)."""
    from genart.data.read import training_dataset

    rows = training_dataset(dataset, "val", 32).take_all()
    x = torch.from_numpy(np.stack([r["image"] for r in rows]))
    return (x + 1) / 2, torch.tensor([int(r["label"]) for r in rows])


def check_run_folder(run_dir: str, steps: list[int]) -> list[dict]:
    """The files every run writes; returns metrics.jsonl rows (all losses finite)."""
    for name in ("config.yaml", "metrics.jsonl", "loss.png"):
        assert storage.exists(storage.join(run_dir, name)), name
    for step in steps:
        assert storage.exists(storage.join(run_dir, outputs.checkpoint_name(step), "state.json")), step
        png = storage.read_bytes(storage.join(run_dir, "samples", f"{outputs.checkpoint_name(step)}.png"))
        assert png.startswith(b"\x89PNG")
    rows = outputs.read_metrics(run_dir)
    assert rows and all(np.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows}), "steps must increase, without repeats"
    assert all(r["images_per_second"] > 0 for r in rows)
    return rows


# ---------------------------------------------------------------- config errors: no fit needed


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.max_step=3", "train.max_step: unknown key"),
        ("train.max_steps=many", "train.max_steps"),
        ("scaling.num_workers=0", "scaling.num_workers"),
        ("model.family=gpt", "model"),
        ("model.loss=wasserstein", "model.loss"),
        ("run.name=../elsewhere", "run.name"),
    ],
)
def test_config_errors_name_the_key(override, key):
    path = os.path.join(os.path.dirname(__file__), "..", "workflows", "configs", "dcgan.yaml")
    with pytest.raises(UserError) as err:
        load_config(path, [override])
    assert key in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("family", ["dcgan", "vae", "critic", "style"])
def test_shipped_configs_are_valid(family):
    path = os.path.join(os.path.dirname(__file__), "..", "workflows", "configs", f"{family}.yaml")
    cfg = load_config(path, ["data.path=somewhere"])
    assert cfg.model.family == family and cfg.scaling.cpus_per_worker == 1


def test_data_and_cluster_errors_before_any_worker(dataset, tmp_path):
    from genart.data.prepare import PrepareOptions, prepare

    runs = str(tmp_path / "runs")
    cases = [
        (make_cfg("dcgan", dataset, runs, "a", data={"image_size": 48}), "data.image_size"),
        (make_cfg("critic", dataset, runs, "b", model={"num_stages": 6}), "image_size 32 is too small"),
        (make_cfg("vae", dataset, runs, "c", data={"batch_size": 200}), "data.batch_size"),
        (make_cfg("vae", dataset, runs, "d", scaling={"num_workers": 4, "cpus_per_worker": 2}), "scaling"),
        (make_cfg("vae", str(tmp_path / "nothing"), runs, "e"), "not a prepared dataset"),
        (make_cfg("vae", dataset, runs, "f", scaling={"use_gpu": True}), "scaling.use_gpu"),
        (make_cfg("critic", dataset, runs, "g", eval={"every_checkpoints": 1}), "eval.every_checkpoints"),
        (make_cfg("vae", dataset, runs, "g2", eval={"best_metric": "fid1k_critic"}), "eval.best_metric"),
        (make_cfg("dcgan", dataset, runs, "g3", data={"crop_size": 16}), "data.crop_size"),  # G makes whole images
        (make_cfg("style", dataset, runs, "g4", data={"crop_size": 64}), "data.crop_size"),  # larger than 32 px
    ]
    # an "empty" dataset: every input rejected, so the manifest has no images
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG not really")
    empty = str(tmp_path / "empty")
    prepare([str(bad)], empty, PrepareOptions(size=32), progress=False)
    cases.append((make_cfg("vae", empty, runs, "h"), "data.path"))
    # unlabelled data for a classifier
    unlabelled = str(tmp_path / "unlabelled")
    prepare([_flat_copy(dataset, tmp_path)], unlabelled, PrepareOptions(size=32, labels="none"), progress=False)
    cases.append((make_cfg("critic", unlabelled, runs, "i"), "labelled"))
    for cfg, expected in cases:
        with pytest.raises(UserError) as err:
            train(cfg)
        assert expected in str(err.value) and "\n" not in str(err.value), (cfg.run.name, str(err.value))
        assert not storage.exists(storage.join(runs, cfg.run_name, "config.yaml")), "nothing may be written"


def _flat_copy(dataset: str, tmp_path) -> str:
    """A few of the dataset's images as a flat folder (no class sub-folders)."""
    out = tmp_path / "flat"
    out.mkdir()
    x, _ = val_images(dataset)
    for i, img in enumerate(x[:12]):
        Image.fromarray((img.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)).save(out / f"img{i}.png")
    return str(out)


def test_cli_error_is_one_line_exit_2(tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "workflows", "configs", "vae.yaml")
    result = CliRunner().invoke(main, ["train", path, "--set", "data.batchsize=3"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert "data.batchsize: unknown key" in result.output


# ---------------------------------------------------------------- run-folder bookkeeping (no Ray)


def test_best_json_follows_rays_checkpoint_ranking(tmp_path):
    """Ray keeps the checkpoints (public CheckpointConfig); best.json must name the one Ray ranks first, ties included."""
    run = str(tmp_path / "run")
    files = outputs.RunFiles(run, start_step=40)
    assert files.update_best(10, {"val_loss": 0.5}, "val_loss", "min")
    assert not files.update_best(20, {"val_loss": 0.7}, "val_loss", "min")
    assert files.update_best(30, {"val_loss": 0.5}, "val_loss", "min"), "a tie goes to the newer, as in Ray"
    assert not files.update_best(40, {"val_loss": float("nan")}, "val_loss", "min")
    assert outputs.read_best(run)["checkpoint"] == "step-000030"
    cfg = make_cfg("critic", str(tmp_path), str(tmp_path), "c")
    ray_config = checkpoint_config(cfg)
    assert (ray_config.num_to_keep, ray_config.checkpoint_score_attribute) == (2, "val_accuracy")
    assert str(ray_config.checkpoint_score_order) in ("max", "CheckpointScoreOrder.MAX")
    vae = make_cfg("vae", str(tmp_path), str(tmp_path), "v", eval={"every_checkpoints": 1, "best_metric": "fid32_critic"})
    assert checkpoint_config(vae).checkpoint_score_attribute == "eval_fid32_critic"


def test_a_checkpoint_whose_files_were_never_written_gets_its_row_back_on_resume(tmp_path):
    """Killed after Ray stored step-000200 and before rank 0 wrote that step's metrics row and best.json: the resume
    puts back the row the checkpoint was saved with (eval scores included), and it competes for best.json."""
    run = str(tmp_path / "run")
    first = outputs.RunFiles(run, start_step=0)
    for row in ({"step": 50, "loss": 1.0}, {"step": 100, "loss": 0.9, "val_loss": 0.8}, {"step": 150, "loss": 0.7}):
        first.add_metrics(row)
    first.flush_metrics()
    first.update_best(100, {"val_loss": 0.8}, "val_loss", "min")
    resumed = outputs.RunFiles(run, start_step=200)
    saved = {"step": 200, "loss": 0.6, "val_loss": 0.5, "eval_fid32_critic": 40.0}
    assert resumed.recover_row(200, saved, "val_loss", "min")
    assert [r["step"] for r in outputs.read_metrics(run)] == [50, 100, 150, 200]
    assert outputs.read_metrics(run)[-1]["eval_fid32_critic"] == 40.0
    assert outputs.read_best(run)["checkpoint"] == "step-000200"
    assert not outputs.RunFiles(run, start_step=200).recover_row(200, saved, "val_loss", "min")  # once only
    assert not outputs.RunFiles(run, start_step=0).recover_row(0, {}, "val_loss", "min")  # a fresh run


def test_best_json_past_the_resume_step_is_rebuilt_from_the_kept_checkpoints(tmp_path):
    """Resuming from step 500 because step 1000 was cut short: best.json named step-001000 (missing), and the
    next checkpoint became best whatever its score. It is rebuilt from the rows of complete checkpoints."""
    from genart.models.checkpoint import save_checkpoint

    run = tmp_path / "run"
    first = outputs.RunFiles(str(run), start_step=0)
    for step, loss in ((500, 0.10), (1000, 0.05)):
        first.add_metrics({"step": step, "val_loss": loss})
        first.update_best(step, {"val_loss": loss}, "val_loss", "min")
    first.flush_metrics()
    save_checkpoint(str(run / "step-000500"), {}, {}, {"family": "vae", "step": 500, "config": {}})
    (run / "step-001000").mkdir()  # its upload was cut short: no state.json
    assert outputs.read_best(str(run))["checkpoint"] == "step-001000"
    resumed = outputs.RunFiles(str(run), start_step=500)
    assert outputs.read_best(str(run))["checkpoint"] == "step-000500"
    assert not resumed.update_best(750, {"val_loss": 0.30}, "val_loss", "min")  # worse than step 500's 0.10
    assert outputs.read_best(str(run))["checkpoint"] == "step-000500"
    save_checkpoint(str(tmp_path / "other" / "step-000100"), {}, {}, {"family": "vae", "step": 100, "config": {}})
    (tmp_path / "other" / "best.json").write_text(json.dumps({"checkpoint": "step-000900", "metric": "val_loss",
                                                               "value": 0.1, "mode": "min", "step": 900}))
    outputs.RunFiles(str(tmp_path / "other"), start_step=100)  # no row of a kept checkpoint has the metric
    assert outputs.read_best(str(tmp_path / "other")) is None


def test_an_autoregressive_run_resumes_after_its_dataset_moved(tmp_path):
    """`palette: null` is resolved to <data.path>/palette-K.json and written into the model config; a moved
    dataset changed that path, and the resume was refused with no way around it (the palette is in the weights)."""
    from genart.train.trainer import _check_resumable

    cfg = validate(TrainConfig, {"model": {"family": "autoregressive"}, "data": {"path": str(tmp_path)},
                                 "run": {"storage": str(tmp_path), "name": "a"}})
    run_dir = tmp_path / "a"
    (run_dir / "step-000010").mkdir(parents=True)
    old = cfg.model.model_copy(update={"palette": "/mnt/old/synth16/palette-16.json"})
    state = {"config": {"model": old.model_dump(mode="json")}, "image_size": 16, "label_names": []}
    (run_dir / "step-000010" / "state.json").write_text(json.dumps(state))
    moved = cfg.model_copy(update={"model": cfg.model.model_copy(update={"palette": "/data/synth16/palette-16.json"})})
    _check_resumable(moved, str(run_dir), "step-000010", 16, [])
    wider = moved.model_copy(update={"model": moved.model.model_copy(update={"colors": 32})})
    with pytest.raises(UserError, match="model.colors"):
        _check_resumable(wider, str(run_dir), "step-000010", 16, [])


def test_a_run_resumes_after_an_upgrade_added_model_keys_and_a_broken_state_is_one_line(tmp_path):
    """A checkpoint written before a model key existed (dcgan's mode_seeking_cap) resumes with the key's default;
    a changed key is still refused, and a truncated state.json is a UserError, not a JSONDecodeError."""
    from genart.train.trainer import _check_resumable

    cfg = make_cfg("dcgan", str(tmp_path), str(tmp_path), "d")
    run_dir = tmp_path / "d"
    (run_dir / "step-000010").mkdir(parents=True)
    model = cfg.model.model_dump(mode="json")
    model.pop("mode_seeking_cap")
    state = {"config": {"model": model}, "image_size": 16, "label_names": []}
    (run_dir / "step-000010" / "state.json").write_text(json.dumps(state))
    _check_resumable(cfg, str(run_dir), "step-000010", 16, [])
    state["config"]["model"]["latent_dim"] = model["latent_dim"] + 1
    (run_dir / "step-000010" / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match="model.latent_dim: .* was trained with"):
        _check_resumable(cfg, str(run_dir), "step-000010", 16, [])
    (run_dir / "step-000010" / "state.json").write_text('{"config": {"mo')
    with pytest.raises(UserError, match="not valid JSON"):
        _check_resumable(cfg, str(run_dir), "step-000010", 16, [])


def test_evaluation_runs_on_its_schedule_not_on_a_stop_checkpoint(tmp_path, monkeypatch):
    """A SIGTERM's checkpoint at step 137 (checkpoints every 250) must be saved within the grace period: no eval."""
    from genart.train import loop, trainer

    calls = []
    monkeypatch.setattr(trainer, "evaluator", lambda: lambda ckpt, data, cfg: calls.append(ckpt) or {"fid8_critic": 1.0})
    cfg = make_cfg("vae", str(tmp_path), str(tmp_path), "v", eval={"every_checkpoints": 2},
                   train={"checkpoint_every_steps": 250, "max_steps": 1000})
    ran = {step: bool(loop._run_eval(cfg, f"ckpt-{step}", step)) for step in (137, 250, 500, 750, 900, 1000)}
    assert ran == {137: False, 250: False, 500: True, 750: False, 900: False, 1000: True}
    assert loop._run_eval(cfg, "c", 500) == {"eval_fid8_critic": 1.0}
    off = make_cfg("vae", str(tmp_path), str(tmp_path), "v", eval={"every_checkpoints": 0})  # the default: no eval
    assert [loop._run_eval(off, "c", step) for step in (10, 20)] == [{}, {}] and len(calls) == 3


def test_elastic_num_workers_maps_to_train_v2(tmp_path):
    cfg = make_cfg("critic", str(tmp_path), str(tmp_path), "c", scaling={"num_workers": [1, 3]})
    ray_scaling = scaling_config(cfg)
    assert ray_scaling.num_workers == (1, 3) and ray_scaling.elasticity_enabled
    assert ray_scaling.elastic_resize_monitor_interval_s == 60.0
    quick = make_cfg("critic", str(tmp_path), str(tmp_path), "c", scaling={"num_workers": [1, 3], "elastic_resize_interval_s": 5})
    assert scaling_config(quick).elastic_resize_monitor_interval_s == 5
    assert (cfg.scaling.min_workers, cfg.scaling.max_workers, cfg.scaling.workers_text) == (1, 3, "1-3")
    assert scaling_config(make_cfg("critic", str(tmp_path), str(tmp_path), "c")).num_workers == 2
    with pytest.raises(UserError, match="scaling.num_workers"):
        load_config(None, ["model.family=critic", "data.path=x", "scaling.num_workers=[3, 1]"])


# ---------------------------------------------------------------- real fits


@pytest.mark.slow
def test_critic_learns_resumes_and_loads(dataset, tmp_path):
    """Fits 1 and 2: a critic to step 75, then the same run to step 150 (resumed, never restarted)."""
    runs = str(tmp_path / "runs")
    steps = {"checkpoint_every_steps": 25, "log_every_steps": 10, "keep_last": 1}
    cfg = make_cfg("critic", dataset, runs, "critic", data={"batch_size": 16}, train={"max_steps": 75, **steps})
    first = train(cfg)
    run_dir = first["run_dir"]
    check_run_folder(run_dir, [75])
    assert first["step"] == 75 and first["start_step"] == 0
    text = format_summary(first)
    assert run_dir in text and "samples" in text and "loss curve" in text

    cfg2 = make_cfg("critic", dataset, runs, "critic", data={"batch_size": 16}, train={"max_steps": 150, **steps})
    second = train(cfg2)
    rows = check_run_folder(run_dir, [150])
    assert second["start_step"] == 75 and second["step"] == 150
    assert [r["step"] for r in rows] == sorted({*range(10, 151, 10), 25, 75, 125}), "a row per log step and per checkpoint"
    assert {r["start_step"] for r in rows if r["step"] > 75} == {75}, "the second fit continued from step-000075"
    best = outputs.read_best(run_dir)
    kept = [name for _, name in outputs.list_checkpoints(run_dir)]
    assert kept == sorted({"step-000150", best["checkpoint"]}), "keep_last=1: the best, plus the latest"
    assert "checkpoint_manager_snapshot.json" in os.listdir(run_dir), "Ray's own list, which genart no longer edits"

    # real learning: 5 genres (chance 0.2). With 150 steps at lr 1e-3 the best of the 6 checkpoints reached 0.80-0.93
    # on the ~56-image val split in calibration runs (single checkpoints swing by +-0.15 on so few images);
    # the best checkpoint is checked again, independently, through genart.models.load.
    assert best["metric"] == "val_accuracy" and best["value"] >= 0.6, best
    critic = models.load(run_dir, family="critic")
    x, labels = val_images(dataset)
    accuracy = float((critic.predict(x).argmax(dim=1) == labels).float().mean())
    assert accuracy >= 0.6, accuracy
    assert critic.embed(x[:3]).shape == (3, 32)
    assert critic.meta["step"] == int(best["checkpoint"][5:])

    # already at max_steps: nothing to do, no worker started
    again = train(cfg2)
    assert again["trained"] is False and again["step"] == 150
    # resuming with other weight shapes is refused up front, naming the key
    wider = make_cfg("critic", dataset, runs, "critic", model={"base_channels": 16}, train={"max_steps": 200})
    with pytest.raises(UserError, match="model.base_channels"):
        train(wider)


@pytest.mark.slow
def test_vae_reconstruction_improves_with_evaluation(dataset, tmp_path, monkeypatch):
    """Fit 3, with genart.evaluate's FID on every 2nd checkpoint (features: a small critic checkpoint made here,
    named relative to the working folder: Ray Train's workers run in another one, where `critic:features` was not
    found at the first evaluated checkpoint and the run stopped)."""
    from genart.models.tiny import tiny_checkpoint

    tiny_checkpoint(str(tmp_path / "features"), "critic", 32, ["circles", "gradient", "grid", "noise", "stripes"],
                    base_channels=8, num_stages=3, embed_dim=32)  # untrained: made without a fit
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg("vae", dataset, str(tmp_path / "runs"), "vae", model={"lr": 3e-3}, data={"batch_size": 16},
                   train={"max_steps": 150, "checkpoint_every_steps": 50, "log_every_steps": 10},
                   eval={"every_checkpoints": 2, "num_generated": 32, "features": "critic:features", "best_metric": "fid32_critic"})
    summary = train(cfg)
    rows = check_run_folder(summary["run_dir"], [100, 150])
    val = [r["val_recon_mse"] for r in rows if "val_recon_mse" in r]
    assert val[-1] < val[0], val
    evaluated = [r["step"] for r in rows if "eval_fid32_critic" in r]
    assert evaluated == [100, 150], evaluated  # the 2nd checkpoint and the last
    best = outputs.read_best(summary["run_dir"])
    assert best["metric"] == "eval_fid32_critic" and best["checkpoint"] in ("step-000100", "step-000150")
    assert rows[-1]["recon_mse"] < 0.7 * rows[0]["recon_mse"], (rows[0], rows[-1])

    vae = models.load(summary["run_dir"], family="vae")
    x, _ = val_images(dataset)
    trained_error = float((vae.reconstruct(x) - x).pow(2).mean())
    family = models.REGISTRY["vae"]
    torch.manual_seed(0)
    untrained = family.inference(cfg.model, family.build(cfg.model, 32, 5, inference=True), {"image_size": 32, "step": 0})
    untrained_error = float((untrained.reconstruct(x) - x).pow(2).mean())
    # The untrained decoder's output follows |z| (no GroupNorm), so it draws a near-constant mid-grey picture: a
    # stronger baseline than the full-contrast noise a normalised decoder made (trained 0.076 vs 0.103 measured)
    assert trained_error < 0.85 * untrained_error, (trained_error, untrained_error)
    assert vae.sample([1, 2]).shape == (2, 3, 32, 32)


@pytest.mark.slow
def test_dcgan_survives_a_killed_worker(dataset, tmp_path, ray_session):
    """Fit 4: a worker process is SIGKILLed mid-run; FailureConfig restarts the workers from the last checkpoint."""
    cfg = make_cfg("dcgan", dataset, str(tmp_path / "runs"), "dcgan", model={"lr_g": 1e-3, "lr_d": 1e-3},
                   train={"max_steps": 120, "checkpoint_every_steps": 30, "log_every_steps": 5, "keep_last": 10},
                   run={"max_failures": 2})  # keep_last: retention has its own test; here every checkpoint must stay
    run_dir = storage.join(cfg.run.storage, cfg.run_name)
    killed: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_after, args=(run_dir, 40, killed, stop, "step-000030"), daemon=True)
    killer.start()
    try:
        summary = train(cfg)
    finally:
        stop.set()
        killer.join(timeout=5)
    assert killed.get("pid"), "the worker was not killed before the run ended"
    assert summary["step"] == 120
    rows = check_run_folder(run_dir, [90, 120])
    resumed = {r["start_step"] for r in rows if r["step"] > killed["step"]}
    assert resumed and min(resumed) >= 30, f"after the kill the run resumed from a checkpoint, not step 0: {resumed}"
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)
    swd = [r["val_swd"] for r in rows if "val_swd" in r]
    assert swd[-1] < swd[0], f"samples got closer to the data (sliced Wasserstein, lower is closer): {swd}"

    # the EMA generator moved away from its initial weights, and loads for sampling
    gan = models.load(run_dir, family="dcgan")
    family = models.REGISTRY["dcgan"]
    torch.manual_seed(cfg.train.seed)  # the loop builds the nets right after seeding the same way
    init = family.inference(cfg.model, family.build(cfg.model, 32, 5, inference=True), {"image_size": 32, "step": 0})
    seeds = list(range(8))
    assert float((gan.sample(seeds) - init.sample(seeds)).abs().mean()) > 0.02
    assert torch.equal(gan.sample(seeds), gan.sample(seeds))


def _kill_a_worker_after(run_dir: str, step: int, killed: dict, stop: threading.Event, registered: str) -> None:
    """SIGKILL one Ray Train worker of this session's cluster once metrics.jsonl reaches `step` and Ray's controller
    has registered checkpoint `registered`. (report() returns once the checkpoint is uploaded; the controller takes
    it in when it next polls the workers, so a kill within that poll interval restarts from the one before.)"""
    import ray._private.state as ray_state  # the GCS actor table: works without the dashboard's state API

    snapshot = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
    while not stop.is_set():
        try:
            rows = outputs.read_metrics(run_dir)
            known = os.path.exists(snapshot) and registered in open(snapshot).read()
        except (ValueError, OSError):
            rows, known = [], False
        if rows and rows[-1]["step"] >= step and known:
            pids = sorted(a["Pid"] for a in ray_state.actors().values()
                          if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE")
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.update(pid=pids[-1], step=rows[-1]["step"])
                return
        time.sleep(0.2)


@pytest.mark.slow
def test_style_on_s3_run_storage(dataset, s3_bucket, tmp_path, monkeypatch):
    """Fit 5: checkpoints (Ray's storage_filesystem) and run files (genart.storage) both on S3; the user's own style
    image named relative to the working folder (the driver's check loaded it, then every worker, which Ray Train
    runs in a folder of its own, stopped at "style image not found")."""
    from genart.assets import style_image

    (tmp_path / "mine.jpg").write_bytes(style_image("wave.jpg").read_bytes())
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg("style", dataset, f"s3://{s3_bucket}/runs", "style", model={"style_image": "mine.jpg"},
                   train={"max_steps": 10, "checkpoint_every_steps": 5})
    summary = train(cfg)
    run_dir = summary["run_dir"]
    assert run_dir == f"s3://{s3_bucket}/runs/style"
    check_run_folder(run_dir, [5, 10])
    assert outputs.read_best(run_dir)["metric"] == "val_loss"
    styler = models.load(run_dir, family="style")
    out = styler.stylize(torch.rand(1, 3, 20, 28))
    assert out.shape == (1, 3, 20, 28) and torch.isfinite(out).all()
    # the run's config keeps the name as given: the same run resumed from another folder (a new `genart submit`
    # working dir, which holds its own copy of mine.jpg) is not refused as another style image
    assert models.load(run_dir, family="style").meta["config"]["model"]["style_image"] == "mine.jpg"
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "mine.jpg").write_bytes((tmp_path / "mine.jpg").read_bytes())
    monkeypatch.chdir(tmp_path / "again")
    assert train(cfg)["trained"] is False  # already at max_steps: nothing to do, nothing refused


def test_a_second_dry_run_into_the_same_output_trains_again(tmp_path):
    """With --output, a dry run's folder is always <output>/<name>-dry-run: a second dry run found the first one's
    step 2, trained nothing and passed (exit 0). An earlier dry run there is removed; a foreign folder is refused."""
    from genart.train.dry_run import clear_earlier, dry_run_config

    cfg = dry_run_config(make_cfg("dcgan", str(tmp_path), str(tmp_path / "real"), "d"), str(tmp_path / "out"))
    run_dir = tmp_path / "out" / "d-dry-run"
    (run_dir / "step-000002").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model: {}\n")
    clear_earlier(cfg)
    assert not run_dir.exists()
    clear_earlier(cfg)  # nothing there: nothing to do
    run_dir.mkdir()
    (run_dir / "thesis.tex").write_text("mine")
    with pytest.raises(UserError, match="not a genart dry run"):
        clear_earlier(cfg)
    assert (run_dir / "thesis.tex").exists()
    # a run.name at the cap still gets a dry run (its -dry-run suffix went past the cap: refused, naming a name
    # the user never typed)
    longest = "n" * storage.RUN_NAME_MAX
    assert dry_run_config(make_cfg("dcgan", str(tmp_path), str(tmp_path), longest), str(tmp_path)).run_name == (
        "n" * (storage.RUN_NAME_MAX - 8) + "-dry-run")


def test_an_unconditional_run_resumes_on_a_dataset_with_another_class_folder(tmp_path):
    """Label names shape the weights only of models that take labels; an unconditional DCGAN's resume was refused
    once a class folder was added, while a conditional one's still must be."""
    from genart.train.trainer import _check_resumable

    cfg = make_cfg("dcgan", str(tmp_path), str(tmp_path), "d")
    (tmp_path / "d" / "step-000010").mkdir(parents=True)
    state = {"config": {"model": cfg.model.model_dump(mode="json")}, "image_size": 16, "label_names": ["a", "b"]}
    (tmp_path / "d" / "step-000010" / "state.json").write_text(json.dumps(state))
    _check_resumable(cfg, str(tmp_path / "d"), "step-000010", 16, ["a", "b", "c"])
    conditional = cfg.model_copy(update={"model": cfg.model.model_copy(update={"conditional": True})})
    state["config"]["model"]["conditional"] = True
    (tmp_path / "d" / "step-000010" / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match="trained on labels"):
        _check_resumable(conditional, str(tmp_path / "d"), "step-000010", 16, ["a", "b", "c"])


@pytest.mark.slow
def test_a_diverged_run_stops_at_once_with_one_line_and_is_not_retried_forever(dataset, tmp_path):
    """A NaN loss (FloatingPointError) in a worker was retried from the same checkpoint with the same RNG streams
    run.max_failures times, forever at -1, and then ended in a RuntimeError traceback. Now the worker notes it, the
    retry Ray starts returns at once, and the driver raises it as one line."""
    cfg = make_cfg("dcgan", dataset, str(tmp_path / "runs"), "nan", model={"lr_g": 1e30, "lr_d": 1e30},
                   run={"max_failures": -1})
    with pytest.raises(UserError, match="training stopped: dcgan: loss_.* is nan; lower the learning rate"):
        train(cfg)
    assert not os.path.exists(outputs.failure_note(str(tmp_path / "runs" / "nan")))


@pytest.mark.slow
def test_dry_run_trains_two_steps_of_a_tiny_model_through_the_cli(dataset, tmp_path):
    """`genart train --dry-run`: one worker, two steps, the family's smallest widths, in --output (not run.storage)."""
    from genart.train.dry_run import TINY_MODEL

    path = os.path.join(os.path.dirname(__file__), "..", "workflows", "configs", "critic.yaml")
    out = str(tmp_path / "dry")
    result = CliRunner().invoke(main, ["train", path, "--set", f"data.path={dataset}", "--set", "data.image_size=null",
                                       "--set", f"run.storage={tmp_path / 'real'}", "--dry-run", "--output", out])
    assert result.exit_code == 0, result.output
    assert "dry run: critic, 2 steps on 1 worker" in result.output
    assert "dry run: 2 steps ran (critic)" in result.output
    run_dir = os.path.join(out, "critic-dry-run")
    assert [row["step"] for row in outputs.read_metrics(run_dir) if "loss" in row][-1] == 2
    assert not os.path.exists(tmp_path / "real"), "a dry run must not write into the config's run.storage"
    saved = load_config(os.path.join(run_dir, "config.yaml"))
    assert (saved.train.max_steps, saved.scaling.num_workers) == (2, 1)
    assert saved.model.base_channels == TINY_MODEL["critic"]["base_channels"]
