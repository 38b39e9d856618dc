"""`make smoke`: the pipeline's genart subcommands once on a few synthetic images, on one embedded local Ray, PASS/FAIL per step.

    python workflows/smoke.py [--out DIR] [--keep-going] [--all-families]
Like pytorch/examples' run_python_examples.sh: a quick end-to-end check, not a quality test. Each command runs
in this process through the real CLI (click's runner), so Ray starts once. `train --dry-run` runs once, for dcgan,
whose checkpoint generate, evaluate and audit load; the critic and style checkpoints the other steps load are tiny
untrained ones from genart.models.tiny. A dry run is ~20-35 s of Ray Train starting its processes, CPU-bound (side
by side they took longer), so the other families' dry runs are opt-in: --all-families runs all six and the later
steps use their checkpoints (every family really trains in tests/test_train.py, tests/test_autoregressive.py and
tests/test_vqvae.py).
Not run: serve (a long-lived server, covered by tests/test_serve.py), recommend (it takes ids a person picked from
an index; covered by tests/test_search.py) and submit/jobs (they need a Ray cluster).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable

from click.testing import CliRunner

from genart.cli import main as genart

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
FAMILIES = {"dcgan": "dcgan.yaml", "vae": "vae.yaml", "vqvae": "vqvae.yaml", "critic": "critic.yaml", "style": "style.yaml",
            "autoregressive": "autoregressive_transformer.yaml"}
DRY_RUN = ("dcgan",)  # the families dry-run by default (--all-families: every one)


def tiny_models(runs: str) -> None:
    """An untrained critic (features, score) and style net (stylize) at 16 px, of the widths a dry run trains."""
    from genart.data.synth import GENRES
    from genart.models.tiny import tiny_checkpoint

    tiny_checkpoint(f"{runs}/critic-tiny", "critic", 16, sorted(GENRES))
    tiny_checkpoint(f"{runs}/style-tiny", "style", 16)


def steps(out: str, all_families: bool = False) -> list[tuple[str, list[str] | Callable[[], None]]]:
    """(name, genart arguments or a function) in order; later steps read what earlier ones wrote."""
    raw, data, runs = f"{out}/raw", f"{out}/data", f"{out}/runs"
    families = list(FAMILIES) if all_families else list(DRY_RUN)
    run = {family: f"{runs}/{family}-dry-run" if family in families else f"{runs}/{family}-tiny" for family in FAMILIES}
    critic_features = f"critic:{run['critic']}"
    query = f"{raw}/circles/circles-00000.png"
    plan: list = [
        ("datasets synth", ["datasets", "synth", "--out", raw, "--num", "40", "--size", "16"]),
        ("prepare", ["prepare", raw, "--out", data, "--size", "16", "--val-fraction", "0.2"]),
        ("palette", ["palette", "--data", data, "--colors", "16"]),
    ]
    for family in families:
        plan.append((f"train --dry-run {family}", ["train", f"{CONFIGS}/{FAMILIES[family]}", "--set", f"data.path={data}",
                                                   "--set", "data.image_size=16", "--dry-run", "--output", runs]))
    if not all_families:
        plan.append(("tiny critic + style models", lambda: tiny_models(runs)))
    return plan + [
        ("generate", ["generate", "--model", run["dcgan"], "--num", "4", "--output", f"{out}/generated"]),
        ("stylize", ["stylize", "--model", run["style"], "--input", raw, "--output", f"{out}/stylized"]),
        ("score", ["score", "--model", run["critic"], "--input", f"{out}/generated", "--output", f"{out}/scores"]),
        ("evaluate", ["evaluate", "--model", run["vae" if all_families else "dcgan"], "--data", data, "--num", "8",
                      "--features", critic_features, "--output", f"{out}/evaluate.json"]),
        ("audit", ["audit", "--model", run["dcgan"], "--data", data, "--num", "8", "--features", critic_features,
                   "--output", f"{out}/audit"]),
        ("index", ["index", "--input", data, "--output", f"{out}/index", "--features", critic_features]),
        ("similar", ["similar", "--index", f"{out}/index", "--image", query, "-k", "3", "--sheet", f"{out}/similar.png"]),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="Working folder (default: a new temporary folder).")
    parser.add_argument("--keep-going", action="store_true", help="Run the later steps after a failure.")
    parser.add_argument("--all-families", action="store_true", help="Dry-run every family's training, not only dcgan's (~1.5 min more).")
    args = parser.parse_args()
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="genart-smoke-"))
    plan = steps(out, args.all_families)
    runner, results, start = CliRunner(), [], time.time()
    for name, argv in plan:
        began = time.time()
        if callable(argv):
            argv()  # not a command: a bug here is a traceback, as in any script
            ok = True
        else:
            result = runner.invoke(genart, argv)
            ok = result.exit_code == 0
        results.append(ok)
        print(f"{'PASS' if ok else 'FAIL'}  {name:<31} {time.time() - began:5.1f} s", flush=True)
        if not ok:
            print("\n".join("      " + line for line in result.output.strip().splitlines()[-15:]), file=sys.stderr)
            if result.exception and not isinstance(result.exception, SystemExit):
                print(f"      {type(result.exception).__name__}: {result.exception}", file=sys.stderr)
            if not args.keep_going:
                break
    passed = all(results) and len(results) == len(plan)
    print(f"{'PASS' if passed else 'FAIL'}  smoke: {sum(results)}/{len(plan)} steps in {time.time() - start:.0f} s ({out})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
