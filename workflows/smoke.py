"""`make smoke`: every genart subcommand once on a few synthetic images, on one embedded local Ray, PASS/FAIL per step.

    python workflows/smoke.py [--out DIR] [--keep-going]
Like pytorch/examples' run_python_examples.sh: a quick end-to-end check, not a quality test. Each command runs
in this process through the real CLI (click's runner), so Ray starts once. Not run: serve (a long-lived server,
covered by tests/test_serve.py) and submit/jobs (they need a Ray cluster).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from click.testing import CliRunner

from genart.cli import main as genart

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
FAMILIES = {"dcgan": "dcgan.yaml", "vae": "vae.yaml", "critic": "critic.yaml", "style": "style.yaml",
            "autoregressive": "autoregressive_transformer.yaml"}


def steps(out: str) -> list[tuple[str, list[str]]]:
    """(name, genart arguments) in order; later steps read what earlier ones wrote."""
    raw, data, runs = f"{out}/raw", f"{out}/data", f"{out}/runs"
    run = {family: f"{runs}/{family}-dry-run" for family in FAMILIES}
    critic_features = f"critic:{run['critic']}"
    query = f"{raw}/circles/circles-00000.png"
    plan = [
        ("datasets synth", ["datasets", "synth", "--out", raw, "--num", "40", "--size", "16"]),
        ("prepare", ["prepare", raw, "--out", data, "--size", "16", "--val-fraction", "0.2"]),
        ("palette", ["palette", "--data", data, "--colors", "16"]),
    ]
    for family, config in FAMILIES.items():
        plan.append((f"train --dry-run {family}", ["train", f"{CONFIGS}/{config}", "--set", f"data.path={data}",
                                                   "--set", "data.image_size=16", "--dry-run", "--output", runs]))
    return plan + [
        ("generate", ["generate", "--model", run["dcgan"], "--num", "4", "--output", f"{out}/generated"]),
        ("stylize", ["stylize", "--model", run["style"], "--input", raw, "--output", f"{out}/stylized"]),
        ("score", ["score", "--model", run["critic"], "--input", f"{out}/generated", "--output", f"{out}/scores"]),
        ("evaluate", ["evaluate", "--model", run["vae"], "--data", data, "--num", "8", "--features", critic_features,
                      "--output", f"{out}/evaluate.json"]),
        ("audit", ["audit", "--model", run["dcgan"], "--data", data, "--num", "8", "--features", critic_features,
                   "--output", f"{out}/audit"]),
        ("index", ["index", "--input", data, "--output", f"{out}/index", "--features", critic_features]),
        ("similar", ["similar", "--index", f"{out}/index", "--image", query, "-k", "3", "--sheet", f"{out}/similar.png"]),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="Working folder (default: a new temporary folder).")
    parser.add_argument("--keep-going", action="store_true", help="Run the later steps after a failure.")
    args = parser.parse_args()
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="genart-smoke-"))
    runner, results, start = CliRunner(), [], time.time()
    for name, argv in steps(out):
        began = time.time()
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
    passed = all(results) and len(results) == len(steps(out))
    print(f"{'PASS' if passed else 'FAIL'}  smoke: {sum(results)}/{len(steps(out))} steps in {time.time() - start:.0f} s ({out})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
