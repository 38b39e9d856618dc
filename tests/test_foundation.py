"""Configs, storage and the runtime guard: the pieces every subcommand stands on."""

from __future__ import annotations

from typing import Literal

import pyarrow.fs as pafs
import pytest
from pydantic import Field

from genart import config, runtime, storage
from genart.errors import UserError


class Inner(config.Section):
    max_steps: int = 10  # steps to run
    lr: float = 1e-3


class Outer(config.Section):
    family: Literal["a", "b"] = "a"
    train: Inner = Field(default_factory=Inner)


def test_yaml_then_overrides_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 5\n")
    cfg = config.load(Outer, path, ["train.lr=0.5", "family=b"])
    assert (cfg.train.max_steps, cfg.train.lr, cfg.family) == (5, 0.5, "b")
    assert "max_steps: 5" in config.to_yaml(cfg)


def test_set_reads_values_as_yaml_1_2_would():
    """PyYAML is YAML 1.1: `--set run.name=0755` was the int 493, `name=2024` and `name=no` were type errors."""
    from genart.train.config import load_config

    assert [config.parse_override(f"a={v}")[1] for v in ("3", "0.5", "true", "[1, 2]", "0755", "1:30", "no", "on")] == [
        3, 0.5, True, [1, 2], "0755", "1:30", "no", "on"]
    base = ["model.family=critic", "data.path=x"]
    assert load_config(None, [*base, "run.name=0755"]).run.name == "0755"
    assert load_config(None, [*base, "run.name=2024"]).run.name == "2024"
    assert load_config(None, [*base, "run.name=no"]).run.name == "no"
    assert load_config(None, [*base, "train.seed=012"]).train.seed == 12  # an int key still reads the digits
    # `true` for a number was 1 (pydantic's lax mode): max_steps=true trained one step
    for item in ("train.max_steps=true", "scaling.num_workers=false", "scaling.cpus_per_worker=true"):
        with pytest.raises(UserError, match=rf"{item.split('=')[0]}: Input should be a valid .*\(got '(true|false)'\)"):
            load_config(None, [*base, item])
    assert load_config(None, [*base, "scaling.use_gpu=true"]).scaling.use_gpu is True
    assert load_config(None, [*base, "data.path=123"]).data.path == "123"
    # the rest of YAML's readings of a scalar: a comment, a float, hex, an anchor, a date (run.name=#exp1 was None:
    # the default run, resumed and its config.yaml overwritten)
    with pytest.raises(UserError, match=r"run.name: .*\(got '#exp1'\)"):
        load_config(None, [*base, "run.name=#exp1"])
    typed = ["data.path=data/My Pics #2", "data.path=2024.10", "run.name=0x1F", "data.path=&a exp", "run.name=2024-01-02"]
    cfgs = [load_config(None, [*base, item]) for item in typed]
    assert [cfgs[0].data.path, cfgs[1].data.path, cfgs[2].run.name, cfgs[3].data.path, cfgs[4].run.name] == [
        "data/My Pics #2", "2024.10", "0x1F", "&a exp", "2024-01-02"]
    assert [config.parse_override(f"a={v}")[1] for v in ("null", "~", "-3", "2e-4", "'0755'", "{b: 1}", "photos: 2023",
                                                          "- a")] == [None, None, -3, "2e-4", "0755", {"b": 1},
                                                                      "photos: 2023", "- a"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.max_stepz=3"], "train.max_stepz: unknown key"),
        (["train.max_steps=lots"], "train.max_steps: Input should be a valid integer"),
        (["family=c"], "family: "),
        (["novalue"], "expected KEY=VALUE"),
    ],
)
def test_bad_keys_give_one_line_naming_the_key(overrides, message):
    with pytest.raises(UserError) as err:
        config.load(Outer, None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_config_errors_name_the_key_as_typed_and_where_it_came_from(tmp_path):
    """A --set typo was blamed on the YAML file; a key of a value that may be one of two types carried pydantic's
    member name (`scaling.num_workers.int`); a rule across a whole config printed an empty key and "Value error, ";
    a binary file passed for the config was a UnicodeDecodeError traceback."""
    from genart.serve.config import ServeArgs
    from genart.train.config import load_config

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model:\n  family: dcgan\ndata:\n  path: d\n")
    with pytest.raises(UserError, match=r"^\S*run.yaml \+ --set: scaling.num_workers: Input should be"):
        load_config(str(yaml_file), ["scaling.num_workers=1,2"])
    with pytest.raises(UserError, match=r"\+ --set: scaling.num_workers: Input should be a valid integer \("):
        load_config(str(yaml_file), ["scaling.num_workers={a: 1}"])  # a mapping there: pydantic tried 'int' too
    with pytest.raises(UserError, match=r"^\S*run.yaml: model.latent_dim: Input should be greater"):
        yaml_file.write_text("model:\n  family: dcgan\n  latent_dim: 0\ndata:\n  path: d\n")
        load_config(str(yaml_file))
    with pytest.raises(UserError) as err:
        config.validate(ServeArgs, {}, source="serve args")
    assert str(err.value).startswith("serve args: ") and ": :" not in str(err.value) and "Value error" not in str(err.value)
    (tmp_path / "w.yaml").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(UserError, match="w.yaml: cannot be read as a YAML text file"):
        load_config(str(tmp_path / "w.yaml"))


def test_datasets_synth_refuses_bad_options_in_one_line(tmp_path):
    """A negative --seed (numpy's SeedSequence) and an --out that is a file ended in tracebacks; --num 2 listed
    three genres with 0 images."""
    from click.testing import CliRunner

    from genart.cli import main

    (tmp_path / "afile").write_text("hi")
    for args, message in ((["--seed", "-1"], "-1 is not in the range x>=0"), (["--out", str(tmp_path / "afile")],
                                                                            "a file, not a folder")):
        result = CliRunner().invoke(main, ["datasets", "synth", "--out", str(tmp_path / "s"), "--num", "2",
                                           "--size", "8", *args])
        assert result.exit_code == 2 and message in result.output, result.output
    result = CliRunner().invoke(main, ["datasets", "synth", "--out", str(tmp_path / "s"), "--num", "2", "--size", "8"])
    assert result.exit_code == 0 and "wrote 2 images in 2 genres" in result.output and " 0" not in result.output


def test_renamed_keys_still_load_and_later_keys_win(tmp_path):
    """model.num_samples became grid_size, eval.num_samples num_generated: old YAML, --set and checkpoints still load."""
    from genart.models.dcgan import DCGANConfig
    from genart.train.config import TrainConfig

    old = tmp_path / "old.yaml"
    old.write_text("model:\n  family: dcgan\n  num_samples: 9\ndata:\n  path: d\neval:\n  num_samples: 50\n")
    cfg = config.load(TrainConfig, old)
    assert (cfg.model.grid_size, cfg.eval.num_generated) == (9, 50)
    assert "num_samples" not in config.to_yaml(cfg)  # saved under today's names
    assert config.load(TrainConfig, old, ["model.grid_size=4"]).model.grid_size == 4  # the override, not the YAML
    new = tmp_path / "new.yaml"
    new.write_text("model:\n  family: dcgan\n  grid_size: 9\ndata:\n  path: d\n")
    assert config.load(TrainConfig, new, ["model.num_samples=4"]).model.grid_size == 4
    assert DCGANConfig.current_keys({"num_samples": 3, "latent_dim": 8}) == {"grid_size": 3, "latent_dim": 8}
    with pytest.raises(UserError, match="model.grid_size"):
        config.load(TrainConfig, old, ["model.num_samples=0"])


def test_one_safe_name_rule():
    for name in ("dcgan", "run-2.b_c", "a" * storage.RUN_NAME_MAX):
        assert storage.is_safe_name(name, storage.RUN_NAME_MAX)
    for name in ("", ".", "..", "../x", "a/b", "-a", "a b", "run\n", "a" * (storage.RUN_NAME_MAX + 1), None):
        assert not storage.is_safe_name(name, storage.RUN_NAME_MAX)
    assert not storage.is_safe_name("a" * (storage.MODEL_NAME_MAX + 1), storage.MODEL_NAME_MAX)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        config.load(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        config.load(Outer, bad)


def test_local_storage_writes_are_atomic(tmp_path):
    target = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(target, b"hello")
    assert storage.read_bytes(target) == b"hello"
    assert [p for p in (tmp_path / "a").iterdir()] == [tmp_path / "a" / "b.bin"]  # no temp files left
    with pytest.raises(UserError, match="not found"):
        storage.read_bytes(str(tmp_path / "missing"))
    # a failed write (here: the target is a folder) leaves no temp file behind
    (tmp_path / "a" / "dir").mkdir()
    with pytest.raises(OSError):
        storage.write_bytes(str(tmp_path / "a" / "dir"), b"x")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin", "dir"]


def test_a_workflow_stopped_by_sigterm_exits_143_not_1():
    """A workflow body stopped by SIGTERM (runtime.Terminated) or Ctrl-C printed click's "Aborted!" and exited 1:
    a preempted workflow read as failed. (A subprocess: the stop path shuts Ray down.)"""
    import subprocess
    import sys

    code = ("import sys\nfrom genart import runtime, workflow\n"
            "def body():\n    raise runtime.Terminated() if sys.argv[1] == 'term' else KeyboardInterrupt()\n"
            "workflow.run_main('wf', body)\n")
    for arg, rc, name in (("term", 143, "SIGTERM"), ("int", 130, "Ctrl-C")):
        result = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, timeout=120)
        assert result.returncode == rc, result.stderr
        assert result.stderr.strip() == f"wf: stopped by {name}; run the same command again to resume"


def test_other_uri_schemes_are_refused_not_made_local_folders(tmp_path, monkeypatch):
    """`S3://bucket/runs`, `s3:/bucket` and `gs://bucket` were local folders ./S3:/bucket/runs and so on: results
    written to the local disk with no word."""
    monkeypatch.chdir(tmp_path)
    for uri in ("S3://bucket/runs", "s3:/bucket/runs", "gs://bucket/runs", "file:///tmp/runs"):
        for call in (lambda: storage.join(uri, "dcgan"), lambda: storage.write_text(storage.join(uri, "a"), "x"),
                     lambda: storage.arrow_fs(uri)):
            with pytest.raises(UserError, match="local paths and s3:// URIs only"):
                call()
    assert list(tmp_path.iterdir()) == []
    assert storage.join("s3://bucket/runs", "dcgan") == "s3://bucket/runs/dcgan"
    assert storage.join(str(tmp_path / "a:b"), "c") == str(tmp_path / "a:b" / "c")  # a colon in a local name


def test_s3_storage_honours_aws_endpoint_url(s3_bucket):
    uri = f"s3://{s3_bucket}/x/y.txt"
    storage.write_text(uri, "hi")
    assert storage.read_text(uri) == "hi"
    assert storage.listdir(f"s3://{s3_bucket}/x") == [uri]
    # pyarrow's S3 filesystem ignores AWS_ENDPOINT_URL by itself; genart's must reach the same server.
    fs, path = storage.arrow_fs(uri)
    assert fs.get_file_info(path).type == pafs.FileType.File
    assert storage.find(f"s3://{s3_bucket}") == [(uri, 2)]
    storage.remove(f"s3://{s3_bucket}/x")
    assert not storage.exists(uri)


def test_runtime_refuses_layouts_that_starve_ray_data(ray_session):
    total = runtime.cluster_cpus()
    assert total >= 4  # the embedded instance advertises more logical CPUs than this 2-core machine has
    runtime.check_training_fits(2, 1.0)
    with pytest.raises(UserError, match="Ray Data needs"):
        runtime.check_training_fits(int(total), 1.0)
    assert runtime.local_cpus() >= runtime.MIN_LOCAL_CPUS


def test_a_run_waiting_for_workers_says_so_in_one_line_not_a_traceback(ray_session):
    """Ray Train's controller logs its placement-group timeout (every 60 s while a run waits for room) with a
    traceback; genart's log setup, which runs in every Ray worker process (the controller is one), makes it a line."""
    import io
    import logging

    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    @ray_session.remote
    def filtered_in_worker() -> bool:
        return runtime._WAITING_FOR_WORKERS in logging.getLogger(runtime.CONTROLLER_LOGGER).filters

    assert ray_session.get(filtered_in_worker.remote())

    runtime.quiet_logs()
    logger = logging.getLogger(runtime.CONTROLLER_LOGGER)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    try:
        for error in (WorkerGroupStartupTimeoutError(num_workers=2), RuntimeError("a real controller bug")):
            try:
                raise error
            except Exception as exc:  # noqa: BLE001 - logged as Ray's controller logs it
                logger.exception("Error in control loop iteration: %s", exc)
    finally:
        logger.removeHandler(handler)
    waiting, bug = out.getvalue().split("ERROR ", 1)
    assert waiting.startswith("WARNING waiting for resources: 2 training workers") and waiting.count("\n") == 1
    assert "Traceback" not in waiting and "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" not in waiting
    assert "a real controller bug" in bug and "Traceback" in bug  # anything else keeps its traceback


def test_every_command_that_writes_takes_both_out_and_output():
    """`prepare --out` and `generate --output` were both idioms in this CLI: a user's guess of either now works."""
    import click

    from genart.cli import main

    def commands(group: click.Group, prefix: str = ""):
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                yield from commands(cmd, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", cmd

    writers = {}
    for name, cmd in commands(main):
        for param in cmd.params:
            flags = set(getattr(param, "opts", []))
            if flags & {"--out", "--output"}:
                writers[name] = flags
    assert {"prepare", "datasets synth", "palette", "generate", "stylize", "score", "index", "audit"} <= set(writers)
    assert all({"--out", "--output"} <= flags for flags in writers.values()), writers


def test_a_rule_across_a_sections_keys_is_one_short_line():
    """A model rule over several keys (guidance needs label_dropout) names them; it does not print the whole section."""
    from pathlib import Path

    from genart.train.config import load_config

    config = Path(__file__).resolve().parents[1] / "workflows" / "configs" / "vqvae.yaml"
    with pytest.raises(UserError) as exc:
        load_config(str(config), ["model.guidance=2"])
    message = str(exc.value)
    assert "model: " in message and "guidance 2 needs conditional: true and label_dropout > 0" in message
    assert "{" not in message and "\n" not in message
