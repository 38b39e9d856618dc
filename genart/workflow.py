"""What the scripts in workflows/ share: the options every one takes (--config, --set, --address), config in (YAML +
`--set`, written next to the results), training runs built from a base config, numbered steps that print their
timing, and one-line errors with exit status 2.

    @workflow.command("quickstart", "workflows/quickstart.yaml", "steps.dcgan=40")   # main(config_path, overrides, address)
    flow = Workflow("quickstart", QuickstartConfig)
    cfg = flow.load(config_path, overrides); flow.record(cfg, out)   # validated; written to <out>/quickstart.yaml
    with flow.step("train dcgan"):                                   # "==> [2] train dcgan" ... "    (41 s)"
        train(training_config("workflows/configs/dcgan.yaml", {"data.path": data, "train.max_steps": 40}))
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Generic, Iterable, Iterator, Mapping, TypeVar

import click

from genart import config, runtime, storage

C = TypeVar("C", bound=config.Section)


class Workflow(Generic[C]):
    def __init__(self, name: str, config_cls: type[C]):
        self.name = name
        self.config_cls = config_cls
        self.started = time.time()
        self.timings: dict[str, float] = {}  # step title -> seconds

    def load(self, path: str | None, overrides: Iterable[str]) -> C:
        """The config file plus `--set` overrides, validated (one-line UserError on a bad key or value)."""
        return config.load(self.config_cls, path, overrides)

    def record(self, cfg: C, out: str) -> None:
        """Write the resolved config to <out>/<name>.yaml (local or s3://): a run says how it was made."""
        storage.makedirs(out)
        storage.write_text(storage.join(out, f"{self.name}.yaml"), config.to_yaml(cfg))

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        click.echo(click.style(f"==> [{len(self.timings) + 1}] {title}", bold=True))
        started = time.time()
        try:
            yield
        finally:
            self.timings[title] = round(time.time() - started, 1)
        click.echo(f"    ({self.timings[title]:.0f} s)")

    @property
    def seconds(self) -> float:
        return round(time.time() - self.started, 1)

    def done(self, lines: Iterable[str]) -> None:
        click.echo(click.style(f"==> {self.name} done in {self.seconds:.0f} s", bold=True))
        for line in lines:
            click.echo(f"  {line}")


def run_main(name: str, body: Callable[[], None]) -> None:
    """Run a workflow's body with `genart`'s exits (runtime.command_exits): a UserError is one line and exit 2,
    Ctrl-C and SIGTERM stop Ray and exit 130 / 143 (click alone printed "Aborted!", exit 1)."""
    with runtime.command_exits(name):
        body()


def command(name: str, default_config: str, set_example: str) -> Callable[[Callable], click.Command]:
    """A workflow's `main`: a click command with the options every workflow takes, --config, --set and --address,
    that calls `body(config_path, overrides, address, **its own options)` through `run_main`. Its own options
    (e.g. --out) go above, as `@click.option` on the command."""

    def wrap(body: Callable) -> click.Command:
        @click.command(help=body.__doc__)
        @click.option("--config", "config_path", default=default_config, show_default=True, help="Workflow config (YAML).")
        @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help=f"Override a config key, e.g. --set {set_example}.")
        @click.option("--address", envvar="RAY_ADDRESS", default=None,
                      help="Ray cluster address (default: embedded local Ray).")
        def main(config_path: str, overrides: tuple[str, ...], address: str | None, **options: Any) -> None:
            run_main(name, lambda: body(config_path, overrides, address, **options))

        return main

    return wrap


def training_config(path: str, settings: Mapping[str, Any], extra: Iterable[str] = ()):
    """The TrainConfig of one training run of a workflow: the YAML at `path`, then `settings` ({"data.path": ...,
    "train.max_steps": 100}: the keys `--set` names, typed values), then `extra` `--set` items (the user's own
    keys from the workflow config, which win), validated (one-line UserError on a bad key or value)."""
    from genart.train.config import TrainConfig

    data = config.read_yaml(path)
    for key, value in settings.items():
        config.set_key(data, key.split("."), value)
    return config.validate(TrainConfig, config.apply_overrides(data, extra), source=str(path))


def train(cfg) -> dict:
    """Run one training config (a finished run is skipped, an interrupted one resumes) and print its summary."""
    from genart.train.trainer import format_summary, train as run_train

    summary = run_train(cfg)
    click.echo(format_summary(summary))
    return summary
