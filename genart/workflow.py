"""What the scripts in workflows/ share: config in (YAML + `--set`, written next to the results), numbered
steps that print their timing, and one-line errors with exit status 2.

    flow = Workflow("quickstart", QuickstartConfig)
    cfg = flow.load(config_path, overrides); flow.record(cfg, out)   # validated; written to <out>/quickstart.yaml
    with flow.step("train dcgan"): ...                    # "==> [2] train dcgan" ... "    (41 s)"
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Generic, Iterable, Iterator, TypeVar

import click

from genart import config, storage
from genart.errors import UserError

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
    """Run a workflow's body; a UserError (bad config, missing data, unreachable cluster) is one line and exit 2."""
    try:
        body()
    except UserError as exc:
        click.echo(f"{name}: error: {exc}", err=True)
        sys.exit(2)
