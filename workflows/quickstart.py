"""The quickstart workflow: everything genart does, end to end, on the embedded local Ray (or --address).

    python workflows/quickstart.py --out results/quickstart            # what `make quickstart` runs
    python workflows/quickstart.py --out /tmp/qs --set steps.dcgan=40  # a shorter run

Steps: sample data -> prepare -> train DCGAN, VAE, critic and one style network -> sample grid ->
stylize a small archive -> score it and the samples with the critic -> results/quickstart/index.html.
"""

from __future__ import annotations

import collections
import html
import json
import os
import shlex
import zipfile
from typing import Callable, Iterable

import click
import yaml
from pydantic import Field

from genart import assets, config, report, runtime, storage, workflow
from genart.workflow import Workflow

HERE = os.path.dirname(os.path.abspath(__file__))


class Steps(config.Section):
    dcgan: int = Field(3000, ge=1)
    vae: int = Field(600, ge=1)
    critic: int = Field(300, ge=1)
    style: int = Field(100, ge=1)


class QuickstartConfig(config.Section):
    synth_images: int = Field(1000, ge=50)  # synthetic labelled images (5 genres)
    image_size: int = 32  # dcgan / vae / critic resolution
    content_size: int = 48  # the paintings' training size (it stylizes any size)
    # Training windows of them (data.crop_size), 0 = whole paintings. Windows of larger paintings teach the net at
    # the scale it stylizes at, but measured worse at this budget (bench_quality: 192 px, 48 px windows, 100 steps:
    # hole pixels 7.7 % vs 3.0 %; dark bands along bright edges): the README has the figures.
    content_crop: int = Field(0, ge=0)
    num_workers: int = Field(2, ge=1)  # Ray Train workers per run
    steps: Steps = Steps()
    style_image: str = "starry_night.jpg"
    generate: int = Field(64, ge=1)
    stylize_max_side: int = Field(256, ge=16)


def prepare_data(cfg: QuickstartConfig, out: str) -> tuple[str, str]:
    """Synthetic genres for the GAN/VAE/critic, the shipped paintings as style-transfer content."""
    from genart.data.prepare import PrepareOptions, prepare, summary
    from genart.data.synth import make_synth

    synth_raw, synth = f"{out}/data/raw/synth", f"{out}/data/synth"
    paintings = f"{out}/data/paintings"
    if not _prepared_as(synth, cfg.image_size, cfg.synth_images):  # a rerun with other sizes redoes its data
        if storage.exists(f"{synth}/manifest.json"):  # and the models on it (a deleted folder comes back the same)
            _forget_runs(out, ("critic", "dcgan", "vae"), "the synthetic data is made again at other sizes")
        storage.remove(synth_raw)
        make_synth(synth_raw, num=cfg.synth_images, size=cfg.image_size, seed=0)
        opts = PrepareOptions(size=cfg.image_size, val_fraction=0.1, overwrite=True)
        click.echo(summary(prepare([synth_raw], synth, opts, progress=False)))
    if not _prepared_as(paintings, cfg.content_size):
        if storage.exists(f"{paintings}/manifest.json"):
            _forget_runs(out, ("style",), "the paintings are prepared again at another size")
        opts = PrepareOptions(size=cfg.content_size, labels="none", val_fraction=0.1, overwrite=True)
        click.echo(summary(prepare([str(assets.PAINTINGS), str(assets.PHOTOS)], paintings, opts, progress=False)))
    return synth, paintings


def _prepared_as(data: str, size: int, inputs: int | None = None) -> bool:
    """Whether `data` is a finished dataset made at `size` from `inputs` pictures (None: any number)."""
    uri = f"{data}/manifest.json"
    if not storage.exists(uri):
        return False
    manifest = json.loads(storage.read_text(uri))
    return manifest.get("image_size") == size and inputs in (None, manifest.get("counts", {}).get("input"))


def _forget_runs(out: str, families: Iterable[str], why: str) -> None:
    """Remove the quickstart's own runs of `families`: they would resume (or count as finished) on what changed."""
    for family in families:
        run_dir = f"{out}/runs/{family}"
        if storage.exists(run_dir):
            click.echo(f"note: {why}: {run_dir} is trained again from step 0")
            storage.remove(run_dir)


def _crop_then(run_dir: str):
    """The data.crop_size the run at `run_dir` trained on (None: whole images), or False when there is no such run."""
    saved = storage.join(run_dir, "config.yaml")
    if not storage.exists(saved):
        return False
    try:
        return ((yaml.safe_load(storage.read_text(saved)) or {}).get("data") or {}).get("crop_size")
    except (yaml.YAMLError, AttributeError):
        return False  # not a config genart wrote: the trainer's own checks decide


def train_one(cfg: QuickstartConfig, family: str, data: str, out: str) -> dict:
    """One small run of `family`; re-running the quickstart resumes or skips a finished run, and trains it again from
    step 0 when the quickstart config changed what it trains (another style_image, image size or crop)."""
    from genart.train.trainer import ResumeConflict

    steps = getattr(cfg.steps, family)
    settings = {"data.path": data, "data.image_size": cfg.content_size if family == "style" else cfg.image_size,
                "run.storage": f"{out}/runs", "run.name": family, "scaling.num_workers": cfg.num_workers,
                "train.max_steps": steps, "train.checkpoint_every_steps": max(1, steps // 2),
                "train.log_every_steps": max(1, steps // 10)}
    if family == "style":
        settings["model.style_image"] = cfg.style_image
        if cfg.content_crop:
            settings["data.crop_size"] = cfg.content_crop
    train_cfg = workflow.training_config(os.path.join(HERE, "configs", f"{family}.yaml"), settings)
    # The trainer resumes a run on other crops (they are data, not weights); content_crop is what the style run is
    crop = _crop_then(f"{out}/runs/{family}")
    if crop is not False and crop != train_cfg.data.crop_size:
        _forget_runs(out, (family,), f"data.crop_size: {crop!r} then, {train_cfg.data.crop_size!r} now")
    try:
        return workflow.train(train_cfg)
    except ResumeConflict as exc:  # refused before any step: a quickstart user cannot "choose a new run.name"
        _forget_runs(out, (family,), exc.change)
        return workflow.train(train_cfg)


def make_archive(out: str) -> str:
    """A small zip of photos and paintings to stylize, as a user would hand one over."""
    path = f"{out}/data/to_stylize.zip"
    if not os.path.exists(path):
        with zipfile.ZipFile(path + ".tmp", "w") as zf:  # renamed once whole: a cut-off zip is never reused
            for folder in (assets.PHOTOS, assets.PAINTINGS):
                for root, _, files in os.walk(folder):
                    for name in sorted(files)[:2]:
                        full = os.path.join(root, name)
                        zf.write(full, os.path.relpath(full, folder.parent))
        os.replace(path + ".tmp", path)
    return path


GENERATORS = ("dcgan", "vae")  # the families whose samples the quickstart draws and has the critic name


def batch_jobs(cfg: QuickstartConfig, out: str) -> list[tuple[str, Callable[[], dict]]]:
    """generate from each generator -> stylize an archive -> score the stylized images and the samples with the critic."""
    from genart.infer import jobs

    # Retrained models: their steps are redone. A score job records the model that drew the pictures it scores (the
    # generate or stylize run.json of its input), so pictures redrawn by a retrained model are scored again.
    run = jobs.RunOptions(resume=True, redo_changed=True, progress=False)
    critic = f"{out}/runs/critic"

    def score(images_in: str, scores_out: str) -> Callable[[], dict]:
        return lambda: jobs.score(critic, images_in, scores_out, run=run)

    todo = [(f"generate_{family}", lambda family=family: jobs.generate(
                f"{out}/runs/{family}", cfg.generate, f"{out}/samples/{family}", seed=0, run=run))
            for family in GENERATORS]
    todo += [("stylize", lambda: jobs.stylize(f"{out}/runs/style", make_archive(out), f"{out}/stylized",
                                              max_side=cfg.stylize_max_side, tile=None, run=run)),
             ("score_stylized", score(f"{out}/stylized", f"{out}/scores/stylized"))]
    todo += [(f"score_{family}", score(f"{out}/samples/{family}", f"{out}/scores/samples/{family}"))
             for family in GENERATORS]
    return todo


def serve_command(out: str, families: Iterable[str]) -> str:
    # quoted: a command to copy and paste, from any --out (spaces too)
    return "genart serve " + " ".join(f"--model {shlex.quote(f'{family}={out}/runs/{family}')}" for family in families)


def named_samples(out: str, family: str) -> list[dict]:
    """Each generated sample of `family` with the genre it was drawn as and the critic's label for it, in file order."""
    from genart.infer import output

    asked = {}
    with open(f"{out}/samples/{family}/images.jsonl") as f:
        for line in f:
            row = json.loads(line)
            asked[row["file"]] = row.get("label_name")
    named = {}
    for shard in output.shards(f"{out}/scores/samples/{family}"):  # the score job's own shards, as it lists them
        for row in output.read_shard(shard, ["key", "label_name", "probs"]).to_pylist():
            named[row["key"]] = (row["label_name"], max(row["probs"]))
    return [{"file": f, "asked": asked[f], "named": named[f][0], "p": named[f][1]} for f in sorted(asked) if f in named]


def agreement_table(samples: dict[str, list[dict]], genres: list[str]) -> list[list[str]]:
    """Per genre drawn, per generator: how many samples the critic names that genre, and what it names the rest."""
    def cell(rows: list[dict]) -> str:
        if not rows:
            return "-"
        agree = sum(r["named"] == r["asked"] for r in rows)
        others = collections.Counter(r["named"] for r in rows if r["named"] != r["asked"]).most_common(2)
        rest = f" (else {', '.join(f'{name} {n}' for name, n in others)})" if others else ""
        return f"{agree} / {len(rows)}{rest}"

    table = [["drawn as"] + list(samples)]
    for genre in genres:
        table.append([genre] + [cell([r for r in rows if r["asked"] == genre]) for rows in samples.values()])
    table.append(["all"] + [cell(rows) for rows in samples.values()])
    return table


def write_report(cfg: QuickstartConfig, out: str, runs: dict, seconds: float) -> str:
    from genart.data.read import label_names

    genres = label_names(f"{out}/data/synth")
    listed = ", ".join(genres)
    layout = {"dcgan": f"one genre per row: {listed}, then again",  # how each checkpoint grid is laid out
              "vae": f"top: real | reconstruction pairs; below: samples, a genre each in turn ({listed})"}
    sections = []
    for family, result in runs.items():
        samples = sorted(os.listdir(result["samples"])) if os.path.isdir(result["samples"]) else []
        how = f" ({layout[family]})" if family in layout else ""
        images = [(os.path.join(result["samples"], samples[-1]), f"{family}: {samples[-1]}{how}")] if samples else []
        images.append((result["loss_curve"], f"{family}: loss curve"))
        best = result.get("best") or {}
        value = best.get("value")
        text = (f"{result['step']} steps; best checkpoint {best.get('checkpoint', '-')} by {best.get('metric', '-')} = "
                f"{value:.4g}" if isinstance(value, float) else f"{result['step']} steps")
        sections.append(report.Section(f"Training: {family}", text, images=images, zoom=2,
                                       links=[(result["run_dir"], "run folder"), (result["metrics"], "metrics.jsonl")]))
    samples = {family: named_samples(out, family) for family in GENERATORS}
    for family, rows in samples.items():
        sections.append(report.Section(
            f"Generated samples ({family}, seed 0)",
            f"{len(rows)} images from `genart generate`, the genres in turn; each caption: the genre the sample was "
            "drawn as, then the critic's label and its probability.",
            images=[(f"{out}/samples/{family}/{r['file']}", f"{r['asked']} -> {r['named']} {r['p']:.2f}")
                    for r in rows[:12]], zoom=3))
    stylized = []
    for root, _, files in os.walk(f"{out}/stylized"):
        stylized.extend(os.path.join(root, f) for f in sorted(files) if f.endswith(".png"))
    sections.append(report.Section(f"Stylized archive ({cfg.style_image})", "Each image keeps its size and aspect ratio.",
                                   images=[(p, os.path.relpath(p, f"{out}/stylized")) for p in stylized[:12]]))
    sections.append(report.Section(
        "Does the critic see the genre drawn?",
        "Of each generator's samples drawn as a genre, how many the critic (trained on the real images) names that "
        "genre, and what it names the rest: a genre the critic rarely names is one the generator has not learned.",
        table=agreement_table(samples, genres)))
    resumed = [family for family, result in runs.items() if not result.get("trained", True)]
    how = f" (resumed: {', '.join(resumed)} trained by an earlier run)" if resumed else ""
    intro = (f"Made by <code>workflows/quickstart.py</code> in {seconds:.0f} s{how}. "
             f"Serve these models with <code>{html.escape(serve_command(out, runs))}</code>.")
    return report.write_report(out, "genart quickstart", intro, sections)


def run(config_path: str | None, out: str, overrides: tuple[str, ...] = (), address: str | None = None) -> dict:
    from genart.infer.output import summary as job_summary

    flow = Workflow("quickstart", QuickstartConfig)
    cfg = flow.load(config_path, overrides)
    out = os.path.abspath(out)
    flow.record(cfg, out)
    runtime.init(address)
    with flow.step("prepare data"):
        synth, paintings = prepare_data(cfg, out)
    runs = {}
    for family in ("critic", "dcgan", "vae", "style"):
        steps = getattr(cfg.steps, family)
        with flow.step(f"train {family} ({steps} steps)"):
            runs[family] = train_one(cfg, family, synth if family != "style" else paintings, out)
    results = {}
    for name, job in batch_jobs(cfg, out):
        with flow.step(name.replace("_", " ")):
            results[name] = job()
            click.echo(job_summary(results[name]))
    page = write_report(cfg, out, runs, flow.seconds)
    summary = {"runs": runs, "jobs": {k: v.get("counts") for k, v in results.items()}, "report": page,
               "timings_s": flow.timings, "seconds": flow.seconds}
    with open(f"{out}/summary.json", "w") as f:
        json.dump(summary, f, indent=2, default=str)
    flow.done([f"report:  {page}", f"runs:    {out}/runs/{{{','.join(runs)}}}", f"serve:   {serve_command(out, runs)}"])
    return summary


@click.option("--out", default="results/quickstart", show_default=True, help="Results folder.")
@workflow.command("quickstart", os.path.join(HERE, "quickstart.yaml"), "steps.dcgan=50")
def main(config_path: str, overrides: tuple[str, ...], address: str | None, out: str) -> None:
    """Run the whole genart pipeline on sample data and write an HTML report."""
    run(config_path, out, overrides, address)


if __name__ == "__main__":
    main()
