"""The workflows in workflows/, run for real in reduced form on the shared local Ray.

quickstart: every artifact it promises, and a report whose every image loads in headless Chromium.
cluster_stylize: data, runs and outputs on the moto S3 server, a corrupt archive member reported, a rerun resumes.
train_then_deploy: candidates trained and evaluated, the winner deployed and answering HTTP, then kept on a rerun.
"""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import requests
import yaml
from PIL import Image
from genart.runtime import free_port

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"


def load_workflow(name: str):
    spec = importlib.util.spec_from_file_location(f"workflow_{name}", WORKFLOWS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the configs' annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def is_png(data: bytes) -> tuple[int, int]:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return img.size


# ---------------------------------------------------------------- quickstart


QUICK = ["synth_images=60", "num_workers=1", "steps.dcgan=6", "steps.vae=6", "steps.critic=6", "steps.style=4",
         "generate=8", "stylize_max_side=48", "content_size=32"]


@pytest.fixture(scope="module")
def quickstart(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    qs = load_workflow("quickstart")
    summary = qs.run(str(WORKFLOWS / "quickstart.yaml"), str(out), tuple(QUICK))
    return out, summary


@pytest.mark.slow
def test_quickstart_makes_every_promised_artifact(quickstart):
    out, summary = quickstart
    for family in ("dcgan", "vae", "critic", "style"):
        run = summary["runs"][family]
        assert run["step"] == {"style": 4}.get(family, 6)
        assert is_png(Path(run["loss_curve"]).read_bytes())
        grids = sorted(Path(run["samples"]).glob("*.png"))
        assert grids, f"{family}: no sample grid"
        assert is_png(grids[-1].read_bytes())
    # generate -> stylize -> score: nothing lost, nothing failed.
    jobs = summary["jobs"]
    for family in ("dcgan", "vae"):  # both generators draw samples, and the critic names every one
        assert jobs[f"generate_{family}"]["written"] == 8 and jobs[f"generate_{family}"]["errors"] == 0
        assert jobs[f"score_{family}"]["written"] == 8 and jobs[f"score_{family}"]["errors"] == 0
    archive_members = len(__import__("zipfile").ZipFile(out / "data" / "to_stylize.zip").namelist())
    assert jobs["stylize"]["inputs"] == archive_members and jobs["stylize"]["written"] == archive_members
    stylized = [p for p in (out / "stylized").rglob("*.png")]
    assert len(stylized) == archive_members
    # The critic scored exactly the stylized images: the job's own files in that folder are not inputs.
    assert jobs["score_stylized"]["inputs"] == archive_members and jobs["score_stylized"]["errors"] == 0
    assert json.loads((out / "summary.json").read_text())["jobs"] == jobs
    assert yaml.safe_load((out / "quickstart.yaml").read_text())["steps"]["dcgan"] == 6


@pytest.mark.slow
def test_quickstart_report_opens_with_every_image(quickstart, browser):
    out, summary = quickstart
    page = browser.new_page()
    try:
        page.goto((out / "index.html").as_uri())
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.complete && e.naturalWidth])")
        shown = dict(page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.clientWidth])"))
        links = page.eval_on_selector_all("a", "els => els.map(e => e.getAttribute('href'))")
        headings = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
        captions = page.eval_on_selector_all("figcaption", "els => els.map(e => e.textContent)")
        rows = page.eval_on_selector_all("tr", "els => els.map(r => [...r.children].map(c => c.textContent))")
    finally:
        page.close()
    assert len(images) >= 4 * 2 + 2 * 8 + 1  # a grid + loss curve per family, each generator's samples, stylized images
    broken = [src for src, width in images if not width]
    assert not broken, f"images that did not load: {broken}"
    for href in links:
        assert (out / href).exists(), f"dead link in the report: {href}"
    assert any("Stylized" in h for h in headings) and any("Training: dcgan" in h for h in headings)
    # small pixel pictures are shown enlarged (nearest-neighbour), the sample grid at 2x, a single sample at 3x
    natural = dict(images)
    grid = next(src for src in natural if src.startswith("runs/dcgan/samples/"))
    sample = next(src for src in natural if src.startswith("samples/"))
    assert (shown[grid], shown[sample]) == (2 * natural[grid], 3 * natural[sample])
    # and their captions say how a grid is laid out
    assert any("one genre per row: circles, gradient, grid, noise, stripes" in c for c in captions)
    assert any("top: real | reconstruction pairs; below: samples" in c for c in captions)
    # each sample says the genre it was drawn as and what the critic named it; a table counts the agreement
    assert sum(c.startswith(("circles -> ", "gradient -> ")) for c in captions) >= 2 * 2
    assert any("Does the critic see the genre drawn?" in h for h in headings)
    assert rows[0] == ["drawn as", "dcgan", "vae"] and rows[-1][0] == "all"
    assert all(cell.split(" ")[2] == "8" for cell in rows[-1][1:]), rows[-1]  # "k / 8 ...": every sample counted


@pytest.mark.slow
def test_quickstart_rerun_resumes_without_training_again(quickstart, capsys):
    out, _ = quickstart
    qs = load_workflow("quickstart")
    summary = qs.run(str(WORKFLOWS / "quickstart.yaml"), str(out), tuple(QUICK))
    assert not any(run["trained"] for run in summary["runs"].values())
    assert "(resumed: critic, dcgan, vae, style trained by an earlier run)" in (out / "index.html").read_text()
    assert summary["jobs"]["stylize"]["already_done"] == summary["jobs"]["stylize"]["inputs"]
    assert summary["jobs"]["score_dcgan"]["already_done"] == summary["jobs"]["score_dcgan"]["inputs"]  # nothing redrawn
    assert "nothing to do" in capsys.readouterr().out


def test_quickstart_rerun_with_other_data_sizes_prepares_its_data_again(ray_session, tmp_path):
    """A rerun with another synth_images reused the old dataset while quickstart.yaml recorded the new value."""
    qs = load_workflow("quickstart")
    (tmp_path / "data").mkdir()
    synth, paintings = qs.prepare_data(qs.QuickstartConfig(synth_images=50, image_size=16, content_size=24), str(tmp_path))
    made = (tmp_path / "data" / "paintings" / "manifest.json").stat().st_mtime_ns
    qs.prepare_data(qs.QuickstartConfig(synth_images=55, image_size=16, content_size=24), str(tmp_path))
    assert json.loads((tmp_path / "data" / "synth" / "manifest.json").read_text())["counts"]["input"] == 55
    assert (tmp_path / "data" / "paintings" / "manifest.json").stat().st_mtime_ns == made  # unchanged: kept


def test_a_resume_conflict_says_what_changed_and_a_longer_run_resumes(tmp_path):
    """The trainer's one resume check tells a workflow what changed (ResumeConflict.change), so the quickstart can
    train that run again instead of copying the check (it had its own, which drifted from the trainer's)."""
    from genart.train.trainer import ResumeConflict, _check_resumable

    qs = load_workflow("quickstart")
    settings = {"data.path": str(tmp_path), "run.storage": str(tmp_path / "runs"), "run.name": "style",
                "data.image_size": 48, "train.max_steps": 100}
    configs = str(WORKFLOWS / "configs" / "style.yaml")
    first = qs.workflow.training_config(configs, {**settings, "model.style_image": "starry_night.jpg"})
    run_dir = tmp_path / "runs" / "style"
    (run_dir / "step-000100").mkdir(parents=True)
    state = {"config": {"model": first.model.model_dump(mode="json")}, "image_size": 48, "label_names": []}
    (run_dir / "step-000100" / "state.json").write_text(json.dumps(state))
    longer = qs.workflow.training_config(configs, {**settings, "model.style_image": "starry_night.jpg",
                                                   "train.max_steps": 500})
    _check_resumable(longer, str(run_dir), "step-000100", 48, [])  # more steps: resumed
    wave = qs.workflow.training_config(configs, {**settings, "model.style_image": "wave.jpg"})
    with pytest.raises(ResumeConflict, match="choose a new run.name") as refused:
        _check_resumable(wave, str(run_dir), "step-000100", 48, [])
    assert refused.value.change == "model.style_image: 'starry_night.jpg' then, 'wave.jpg' now"
    with pytest.raises(ResumeConflict) as refused:
        _check_resumable(first, str(run_dir), "step-000100", 40, [])
    assert refused.value.change == "image size: 48 px then, 40 px now"

    # the crop is data to the trainer (it resumes on another), but what the quickstart's style run is: its own check
    assert qs._crop_then(str(tmp_path / "runs" / "nothing")) is False
    (run_dir / "config.yaml").write_text(qs.config.to_yaml(first))
    assert qs._crop_then(str(run_dir)) is None  # whole paintings
    cropped = qs.workflow.training_config(configs, {**settings, "data.crop_size": 32})
    (run_dir / "config.yaml").write_text(qs.config.to_yaml(cropped))
    assert qs._crop_then(str(run_dir)) == 32

    (tmp_path / "runs" / "dcgan").mkdir()
    qs._forget_runs(str(tmp_path), ("critic", "dcgan", "vae"), "the synthetic data is made again")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["style"]


@pytest.mark.slow
def test_quickstart_trains_a_run_again_when_its_config_changed_what_it_trains(quickstart, tmp_path, capsys):
    """quickstart.yaml lists other shipped styles, but a rerun with another style_image into the same --out stopped
    at "model.style_image: ... keep the run's model config or choose a new run.name", which a quickstart user cannot
    do. Now such a run starts over (in a copy of the quickstart's finished style run, here)."""
    import shutil

    out, _ = quickstart
    qs = load_workflow("quickstart")
    shutil.copytree(out / "runs" / "style", tmp_path / "runs" / "style")
    overrides = dict(item.split("=", 1) for item in QUICK)
    cfg = qs.QuickstartConfig(content_size=int(overrides["content_size"]), style_image="wave.jpg",
                              steps={"style": int(overrides["steps.style"])}, num_workers=1)
    summary = qs.train_one(cfg, "style", str(out / "data" / "paintings"), str(tmp_path))
    assert summary["trained"] and summary["start_step"] == 0, summary
    assert "model.style_image: 'starry_night.jpg' then, 'wave.jpg' now: " in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "runs" / "style" / "config.yaml").read_text())["model"]["style_image"] == "wave.jpg"


def test_report_links_and_captions_survive_unusual_file_names(tmp_path):
    """A stylized image named `a#1 <b>.png` linked as `a#1 ...` (a fragment: the link went nowhere) and, where a
    name reached the page unescaped, its `<b>` bolded the rest of the page."""
    from genart.report import Section, render

    name = "a#1 <b>.png"
    Image.new("RGB", (4, 4)).save(tmp_path / name)
    page = render(str(tmp_path), "t", "intro", [Section("s", images=[(str(tmp_path / name), name)],
                                                         links=[(str(tmp_path / name), name)])])
    assert "href='a%231%20%3Cb%3E.png'" in page and "src='a%231%20%3Cb%3E.png'" in page
    assert "<b>" not in page and "a#1 &lt;b&gt;.png" in page


def test_workflow_bad_config_is_one_line_and_exit_2(tmp_path):
    for name in ("quickstart", "cluster_stylize", "train_then_deploy"):
        result = subprocess.run([sys.executable, str(WORKFLOWS / f"{name}.py"), "--set", "no_such_key=1"],
                                capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{name}: error:") and "no_such_key" in lines[0], result.stderr


# ---------------------------------------------------------------- cluster_stylize on S3


def _put(s3, bucket: str, key: str, data: bytes) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=data)


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.slow
def test_cluster_stylize_on_s3_reports_rejects_and_resumes(ray_session, s3_server, s3_bucket, tmp_path):
    import boto3

    from genart import assets

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    paintings = sorted(p for p in Path(assets.PAINTINGS).rglob("*.jpg"))[:10]
    for p in paintings:
        _put(s3, s3_bucket, f"genart/raw/content/{p.name}", p.read_bytes())
    # Two top folders (one would be stripped as the archive's wrapper folder) and a corrupt member.
    members = {f"photos/{p.name}": p.read_bytes() for p in sorted(Path(assets.PHOTOS).rglob("*.jpg"))[:1]}
    members.update({f"paintings/{p.name}": p.read_bytes()
                    for p in sorted(Path(assets.PAINTINGS).rglob("*.jpg"))[-2:]})
    members["paintings/broken.jpg"] = b"\xff\xd8\xff not really a jpeg"
    _put(s3, s3_bucket, "genart/raw/to_stylize.tar", _tar(members))

    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({
        "bucket": f"s3://{s3_bucket}/genart",
        "train": {"image_size": 32, "max_steps": 3, "batch_size": 2, "num_workers": 1, "use_gpu": False,
                  "cpus_per_worker": 1, "style_image": "wave.jpg",
                  "set": ["model.channels=4", "model.num_res_blocks=1", "model.style_size=32",
                          "train.checkpoint_every_steps=3", "model.grid_size=2"]},
        "stylize": {"concurrency": 1, "gpus_per_worker": 0, "cpus_per_worker": 1, "batch_size": 2,
                    "max_side": 48, "tile": None, "format": "png", "preview": 4},
    }))
    cs = load_workflow("cluster_stylize")
    summary = cs.run(str(config))

    def keys(prefix: str) -> set[str]:
        found = s3.list_objects_v2(Bucket=s3_bucket, Prefix=prefix).get("Contents", [])
        return {o["Key"][len(prefix):] for o in found}

    assert "manifest.json" in keys("genart/datasets/content/")
    assert {f"step-000003/{f}" for f in ("model.safetensors", "state.json")} <= keys("genart/runs/style/")
    outputs = keys("genart/stylized/")
    good = {name.rsplit(".", 1)[0] + ".png" for name in members if "broken" not in name}
    assert len(good) == 3 and good <= outputs and "paintings/broken.png" not in outputs
    assert summary["stylize"] == {**summary["stylize"], "inputs": 4, "written": 3, "errors": 1}
    errors = s3.get_object(Bucket=s3_bucket, Key="genart/stylized/errors.jsonl")["Body"].read().decode()
    assert "broken.jpg" in errors
    report = keys("genart/reports/cluster_stylize/")
    assert {"summary.json", "preview.png", "cluster_stylize.yaml"} <= report
    preview = s3.get_object(Bucket=s3_bucket, Key="genart/reports/cluster_stylize/preview.png")["Body"].read()
    assert is_png(preview)[0] > 48

    again = cs.run(str(config))  # prepared data is reused, the run is complete, finished images are skipped
    assert not again["run"]["trained"]
    assert again["stylize"]["already_done"] == 3 and again["stylize"]["written_this_run"] == 0


# ---------------------------------------------------------------- train_then_deploy


def test_a_served_checkpoint_pruned_by_keep_last_keeps_its_recorded_value(tmp_path, capsys):
    """Training on past the deployed step prunes its folder (keep_last) while the replicas still serve it: its
    recorded value is compared, where reading its weights used to stop the workflow; with no record it is left out."""
    ttd = load_workflow("train_then_deploy")
    cfg = ttd.TrainThenDeployConfig()
    gone = str(tmp_path / "runs" / "dcgan-a" / "step-000600")
    serving = {"checkpoint": gone, "checkpoint_hash": "abc"}
    settings = {"metric": cfg.selection.metric}
    previous = {"evaluated_with": settings, "rows": [{"checkpoint": gone, "checkpoint_hash": "abc", "value": 0.5}]}
    rows = ttd.evaluate_all(cfg, {}, settings, previous, serving)
    assert rows == [{"candidate": "(serving now)", "checkpoint": gone, "checkpoint_hash": "abc", "step": None, "value": 0.5}]
    assert ttd.evaluate_all(cfg, {}, {"metric": "other"}, previous, serving) == []
    assert "cannot be compared" in capsys.readouterr().out


def test_metric_values_are_reused_only_in_the_same_features_weights(tmp_path, monkeypatch):
    """The values kept for reuse were keyed by selection settings, with the features as the string
    `critic:results/quickstart/runs/critic`: a critic trained on since measured in another space, and old and new
    checkpoints were compared across the two. The features' own weights are now part of the key."""
    from genart.evaluate import reference
    from genart.models.tiny import tiny_checkpoint

    ttd = load_workflow("train_then_deploy")
    critic = tmp_path / "critic"
    tiny_checkpoint(str(critic), "critic", 16, ["a", "b"], seed=1, base_channels=4, num_stages=2, embed_dim=8)
    monkeypatch.setattr(reference, "dataset_hash", lambda data: "data")
    cfg = ttd.TrainThenDeployConfig(selection={"metric": "fid1k_critic", "features": f"critic:{critic}"})
    before = ttd.evaluated_with(cfg)
    assert ttd.evaluated_with(cfg) == before
    tiny_checkpoint(str(critic), "critic", 16, ["a", "b"], seed=2, base_channels=4, num_stages=2, embed_dim=8,
                    train_steps=1)  # trained on: step-000001, the latest
    assert ttd.evaluated_with(cfg)["features_weights"] != before["features_weights"]


def test_two_candidates_of_one_name_are_refused():
    """One name is one run folder: the second candidate resumed the first's run (or was refused mid-workflow)."""
    from genart.config import validate
    from genart.errors import UserError

    ttd = load_workflow("train_then_deploy")
    with pytest.raises(UserError, match="candidate name 'a' is used twice"):
        validate(ttd.TrainThenDeployConfig, {"candidates": [{"name": "a"}, {"name": "a", "set": ["model.lr=0.001"]}]})


def test_what_is_served_now_is_never_guessed_from_a_refused_key_or_a_server_error(tmp_path, monkeypatch):
    """served_hash asked /v1/models with GENART_API_KEY whatever the serve config's api_key_env, and took any HTTP
    error for "nothing served": the only-if-better check was skipped and the live model replaced. Against a real
    HTTP server on loopback: the config's key is sent, 401 is a UserError, a 503 is waited out, 404 is "none"."""
    import http.server
    import threading

    from genart.errors import UserError

    ttd = load_workflow("train_then_deploy")
    answers, seen = [], []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            seen.append(self.headers.get("Authorization"))
            code = answers.pop(0) if answers else 200
            body = json.dumps({"models": [{"name": "dcgan", "checkpoint_hash": "abc"}]}).encode() if code == 200 else b"{}"
            self.send_response(code)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "serve.yaml").write_text(yaml.safe_dump({"models": {"dcgan": "runs/dcgan"}, "api_key_env": "MY_KEY"}))
        d = ttd.Deploy(port=server.server_address[1], serve_config=str(tmp_path / "serve.yaml"))
        monkeypatch.setenv("MY_KEY", "s3cret")
        key_env = ttd.api_key_env(d)
        assert key_env == "MY_KEY"
        assert ttd.served_hash(d, key_env) == "abc" and seen[-1] == "Bearer s3cret"
        answers.append(401)
        with pytest.raises(UserError, match="refused the API key .*MY_KEY"):
            ttd.served_hash(d, key_env)
        answers.extend([503, 503])
        assert ttd.served_hash(d, key_env) == "abc"  # a replica restarting: asked again
        answers.extend([503] * 10)
        with pytest.raises(UserError, match="HTTP 503"):
            ttd.served_hash(d, key_env, wait_s=0.5)
        answers.clear()
        answers.append(404)
        assert ttd.served_hash(d, key_env) is None
    finally:
        server.shutdown()
    server.server_close()
    assert ttd.served_hash(d, key_env) is None  # nothing listens


@pytest.mark.slow
def test_train_then_deploy_picks_the_best_and_keeps_it(ray_session, synth_dir, tmp_path, capsys):
    from ray import serve

    from genart.data.prepare import PrepareOptions, prepare
    from genart.serve.run import start_http
    from genart.models.tiny import tiny_checkpoint

    data = str(tmp_path / "data")
    prepare([synth_dir], data, PrepareOptions(size=16, val_fraction=0.3), progress=False)
    critic = tiny_checkpoint(str(tmp_path / "critic"), "critic", 16, ["circles", "gradient", "grid", "noise", "stripes"],
                             train_steps=5, full_size=True, base_channels=8)
    host, port = start_http("127.0.0.1", free_port())
    config = tmp_path / "ttd.yaml"
    config.write_text(yaml.safe_dump({
        "data": data, "runs": str(tmp_path / "runs"), "max_steps": 4, "num_workers": 1,
        "candidates": [
            {"name": "small", "set": ["model.base_channels=4", "model.latent_dim=8", "data.batch_size=8",
                                      "train.checkpoint_every_steps=2", "data.image_size=16"]},
            {"name": "hinge", "set": ["model.base_channels=4", "model.latent_dim=8", "data.batch_size=8",
                                      "train.checkpoint_every_steps=2", "data.image_size=16", "model.loss=hinge"]},
        ],
        "selection": {"metric": "kid24_critic", "features": f"critic:{critic}", "num_generated": 24},
        "deploy": {"app_name": "t-ttd", "route_prefix": "/t-ttd", "host": host, "port": port},
    }))
    ttd = load_workflow("train_then_deploy")
    out = tmp_path / "out"
    try:
        first = ttd.run(str(config), str(out))
        rows = first["rows"]
        # keep_last checkpoints of both candidates, each evaluated, best (lowest KID) first.
        assert {r["candidate"] for r in rows} == {"small", "hinge"} and len(rows) == 4
        assert [r["value"] for r in rows] == sorted(r["value"] for r in rows)
        assert first["decision"] == "deploy" and first["winner"] == rows[0]
        models = requests.get(f"http://{host}:{port}/t-ttd/v1/models", timeout=30).json()["models"]
        assert [m["checkpoint_hash"] for m in models if m["name"] == "dcgan"] == [rows[0]["checkpoint_hash"]]
        assert not any("checkpoint" in m for m in models)  # the API never shows server paths
        assert is_png((out / "deployed.png").read_bytes())
        written = yaml.safe_load((out / "serve.yaml").read_text())["applications"][0]
        assert written["import_path"] == "genart.serve.app:build"
        assert written["args"]["models"] == {"dcgan": rows[0]["checkpoint"]}

        second = ttd.run(str(config), str(out))  # nothing new beats what is serving; metric values are reused
        assert second["serving_before"] == {k: rows[0][k] for k in ("checkpoint", "checkpoint_hash")}
        assert second["decision"] == "keep" and second["rows"] == rows
        assert "(evaluated before)" in capsys.readouterr().out
    finally:
        serve.delete("t-ttd")
