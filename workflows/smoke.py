"""`make smoke`: every genart subcommand once on a few synthetic images, on one embedded local Ray, PASS/FAIL per step.

    python workflows/smoke.py [--out DIR] [--keep-going] [--serial]
Like pytorch/examples' run_python_examples.sh: a quick end-to-end check, not a quality test. Each command runs
in this process through the real CLI (`genart.cli.main`), so Ray starts once. The five `train --dry-run` steps
(one per family) run side by side: each is mostly Ray Train starting its controller and worker processes, and
those start-ups overlap instead of adding up. Not run: serve (a long-lived server, covered by
tests/test_serve.py) and submit/jobs (they need a Ray cluster).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

from genart.cli import main as genart

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
FAMILIES = {"dcgan": "dcgan.yaml", "vae": "vae.yaml", "critic": "critic.yaml", "style": "style.yaml",
            "autoregressive": "autoregressive_transformer.yaml"}
# Half a logical CPU per dry-run worker: the five fit beside each other on the embedded Ray (4 logical CPUs on a
# 2-core machine) and still leave Ray Data its CPU (genart.runtime.DATA_RESERVED_CPUS).
DRY_RUN_CPUS = 0.5


def stages(out: str) -> list[list[tuple[str, list[str]]]]:
    """(name, genart arguments) in order, in groups: the steps of a group run at the same time, and read only what
    earlier groups wrote."""
    raw, data, runs = f"{out}/raw", f"{out}/data", f"{out}/runs"
    run = {family: f"{runs}/{family}-dry-run" for family in FAMILIES}
    critic_features = f"critic:{run['critic']}"
    query = f"{raw}/circles/circles-00000.png"
    dry_runs = [(f"train --dry-run {family}", ["train", f"{CONFIGS}/{config}", "--set", f"data.path={data}",
                                               "--set", "data.image_size=16", "--set",
                                               f"scaling.cpus_per_worker={DRY_RUN_CPUS}", "--dry-run", "--output", runs])
                for family, config in FAMILIES.items()]
    return [
        [("datasets synth", ["datasets", "synth", "--out", raw, "--num", "40", "--size", "16"])],
        [("prepare", ["prepare", raw, "--out", data, "--size", "16", "--val-fraction", "0.2"])],
        [("palette", ["palette", "--data", data, "--colors", "16"])],
        dry_runs,
        [("generate", ["generate", "--model", run["dcgan"], "--num", "4", "--output", f"{out}/generated"])],
        [("stylize", ["stylize", "--model", run["style"], "--input", raw, "--output", f"{out}/stylized"])],
        [("score", ["score", "--model", run["critic"], "--input", f"{out}/generated", "--output", f"{out}/scores"])],
        [("evaluate", ["evaluate", "--model", run["vae"], "--data", data, "--num", "8", "--features", critic_features,
                       "--output", f"{out}/evaluate.json"])],
        [("audit", ["audit", "--model", run["dcgan"], "--data", data, "--num", "8", "--features", critic_features,
                    "--output", f"{out}/audit"])],
        [("index", ["index", "--input", data, "--output", f"{out}/index", "--features", critic_features])],
        [("similar", ["similar", "--index", f"{out}/index", "--image", query, "-k", "3", "--sheet", f"{out}/similar.png"])],
    ]


class ThreadOutput(io.TextIOBase):
    """sys.stdout and sys.stderr while the steps run: what a step's thread writes goes to that step's buffer (its
    output, shown if it fails), anything else (Ray's forwarded worker logs, progress bars) to `rest`."""

    encoding, errors = "utf-8", "strict"

    def __init__(self) -> None:
        self.buffers: dict[int, io.StringIO] = {}
        self.rest = io.StringIO()

    def write(self, text: str) -> int:
        return self.buffers.get(threading.get_ident(), self.rest).write(text)

    def writable(self) -> bool:
        return True


def run_step(argv: list[str], output: ThreadOutput) -> tuple[int, str, BaseException | None, float]:
    """One `genart` command, as the shell would run it: (exit code, its output, a bug's exception, seconds)."""
    began, buffer, error = time.time(), io.StringIO(), None
    output.buffers[threading.get_ident()] = buffer
    try:
        genart.main(args=argv, prog_name="genart")  # standalone: exits through SystemExit like the real command
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:  # noqa: BLE001 - a bug in one step is reported, the smoke run goes on to its summary
        code, error = 1, exc
        buffer.write(traceback.format_exc())
    finally:
        del output.buffers[threading.get_ident()]
    return code, buffer.getvalue(), error, time.time() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="Working folder (default: a new temporary folder).")
    parser.add_argument("--keep-going", action="store_true", help="Run the later steps after a failure.")
    parser.add_argument("--serial", action="store_true", help="Run the train dry runs one after another.")
    args = parser.parse_args()
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="genart-smoke-"))
    plan = stages(out)
    total = sum(len(group) for group in plan)
    console, console_err, results, start = sys.stdout, sys.stderr, [], time.time()

    def report(name: str, outcome: tuple) -> None:
        code, text, error, seconds = outcome
        results.append(code == 0)
        print(f"{'PASS' if code == 0 else 'FAIL'}  {name:<31} {seconds:5.1f} s", file=console, flush=True)
        if code != 0:
            print("\n".join("      " + line for line in text.strip().splitlines()[-15:]), file=console_err)
            if error is not None:
                print(f"      {type(error).__name__}: {error}", file=console_err)

    captured = ThreadOutput()
    sys.stdout = sys.stderr = captured
    try:
        for group in plan:
            if len(group) > 1 and not args.serial:  # one thread per step; Ray was started by an earlier step
                began = time.time()
                with ThreadPoolExecutor(max_workers=len(group)) as pool:
                    futures = [(name, pool.submit(run_step, argv, captured)) for name, argv in group]
                    for name, future in futures:
                        report(name, future.result())
                print(f"      ({len(group)} steps side by side in {time.time() - began:.1f} s)", file=console, flush=True)
            else:
                for name, argv in group:
                    report(name, run_step(argv, captured))
                    if not results[-1] and not args.keep_going:
                        break
            if not all(results) and not args.keep_going:
                break
    finally:
        sys.stdout, sys.stderr = console, console_err
    passed = all(results) and len(results) == total
    print(f"{'PASS' if passed else 'FAIL'}  smoke: {sum(results)}/{total} steps in {time.time() - start:.0f} s ({out})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
