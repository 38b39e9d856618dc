"""Batch inference for real: stylize / generate / score on Ray Data over folders, archives and S3, with tiny models."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from genart import models, storage
from genart.cli import main
from genart.data import images
from genart.errors import UserError
from genart.infer import RunOptions, generate, naming, stylize, tiling
from genart.models.tiny import tiny_checkpoint

PHOTO = os.path.join(os.path.dirname(__file__), "..", "genart", "assets", "photos", "figures.jpg")
SIZES = [(40, 30), (30, 52), (64, 64), (90, 20), (17, 33)]  # (width, height): several sizes and aspect ratios


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "style": tiny_checkpoint(root / "style", "style", 32, channels=4, num_res_blocks=1),
        "dcgan": tiny_checkpoint(root / "dcgan", "dcgan", 16, ("a", "b", "c"), base_channels=8, latent_dim=16, conditional=True),
        "critic": tiny_checkpoint(root / "critic", "critic", 16, ("cats", "dogs"), base_channels=4, num_stages=2),
    }


def _picture(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _inputs() -> tuple[dict[str, bytes], dict[str, tuple[int, int]], dict[str, str]]:
    """(files, good rel path -> (w, h), bad rel path -> expected reason prefix). Cap: 5000 px (see --max-pixels)."""
    files, good = {}, {}
    for i, size in enumerate(SIZES):
        rel = f"{'deep/er/' if i % 2 else ''}img{i}.{'png' if i % 3 else 'jpg'}"
        files[rel] = _encode(_picture(i, size), "PNG" if i % 3 else "JPEG")
        good[rel] = size
    jpeg = _encode(_picture(9, (40, 40)), "JPEG")
    bad = {"bad/empty.png": "empty file", "bad/truncated.jpg": "corrupt or truncated image",
           "bad/notes.png": "not an image", "bad/huge.png": "too many pixels"}
    files.update({"bad/empty.png": b"", "bad/truncated.jpg": jpeg[: len(jpeg) // 2],
                  "bad/notes.png": b"this is text, not a picture\n", "bad/huge.png": _encode(_picture(10, (100, 80)), "PNG")})
    return files, good, bad


def _write_tree(root: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        storage.write_bytes(storage.join(root, rel), data)


def _errors(out: str) -> dict[str, str]:
    lines = storage.read_text(storage.join(out, "errors.jsonl")).splitlines()
    return {json.loads(line)["source"]: json.loads(line)["reason"] for line in lines}


def _outputs(out: str) -> dict[str, bytes]:
    return {storage.relative(out, u): storage.read_bytes(u) for u, _ in storage.find(out)
            if storage.relative(out, u) not in naming.SIDECARS}


def _check_stylized(out: str, good: dict, bad: dict, ext: str, max_side: int | None = None) -> None:
    outputs = _outputs(out)
    expected = {naming.output_key(rel, ext) for rel in good}
    assert set(outputs) == expected
    for rel, (w, h) in good.items():
        img = images.decode_image(outputs[naming.output_key(rel, ext)])
        if max_side and max(w, h) > max_side:
            scale = max_side / max(w, h)
            w, h = max(1, round(w * scale)), max(1, round(h * scale))
        assert img.size == (w, h), rel  # size and aspect ratio kept
    errors = _errors(out)
    assert len(errors) == len(bad)
    for rel, reason in bad.items():
        source = next(s for s in errors if s.endswith(rel))
        assert errors[source].startswith(reason), (rel, errors[source])
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    assert manifest["counts"]["inputs"] == len(good) + len(bad)
    assert manifest["counts"]["written"] == len(good) and manifest["counts"]["errors"] == len(bad)
    assert manifest["model"]["hash"] and manifest["images_per_second"] > 0


# ---------------------------------------------------------------- naming (no Ray)


def test_output_names_cannot_escape():
    assert naming.safe_rel("../../evil.png") == "evil.png"
    assert naming.safe_rel("/etc/cron.d/x.png") == "etc/cron.d/x.png"
    assert naming.safe_rel("a\\..\\..\\b.png") == "a/b.png"
    assert naming.safe_rel("C:\\Windows\\x.png") == "C_/Windows/x.png"
    assert naming.safe_rel("x\x00y/./.hidden.png") == "x_y/hidden.png"
    assert naming.safe_rel("manifest.json") == "_manifest.json"
    # a long folder name cut at a space: names.json holds the cut name, and a resume re-checks it with safe_rel
    cut = naming.safe_rel("a" + "\u732b" * 66 + " after/x.png")  # 199 bytes, then a space at the cut
    assert naming.safe_rel(cut, max_bytes=None) == cut and cut.split("/")[0] == "a" + "\u732b" * 66
    assert naming.output_key("cats/a.jpeg", ".webp") == "cats/a.webp"
    renames = naming.unique_keys([("s1", "a.png"), ("s2", "A.png"), ("s0", "a.png"), ("s3", "b.png")])
    assert renames == {"s0": "a.png", "s1": "a~2.png", "s2": "a~3.png"}  # the smallest source keeps the plain name


def test_a_resume_never_hands_an_input_another_inputs_output_name():
    """Inputs added (or removed) between a run and its --resume must not move the `~N` names: the written
    outputs keep their inputs, and a new input never counts as done because of another input's picture."""
    first = naming.unique_keys([("b", "x.png"), ("c", "x.png")])
    assert first == {"b": "x.png", "c": "x~2.png"}
    # "a" sorts first and would take x.png; "d" brings its own x~2.png, which "c" holds
    later = [("a", "x.png"), ("b", "x.png"), ("c", "x.png"), ("d", "x~2.png")]
    resumed = naming.unique_keys(later, fixed=first, done={"x.png", "x~2.png"})
    assert resumed == {"a": "x~3.png", "b": "x.png", "c": "x~2.png", "d": "x~2~2.png"}
    # "c" is gone: its x~2.png stays its own; a newcomer named x.png is renamed past every name held or written
    again = naming.unique_keys([("b", "x.png"), ("e", "x.png")], fixed=resumed, done={"x.png", "x~2.png", "x~4.png"})
    assert again == {"b": "x.png", "e": "x~5.png"}
    # one input wrote x.png alone; now two share it and nothing says which one wrote it
    with pytest.raises(UserError, match="--resume: x.png was written before other inputs came to share its name"):
        naming.unique_keys([("a", "x.png"), ("b", "x.png")], fixed={}, done={"x.png"})
    assert naming.unique_keys([("a", "x.png"), ("b", "x.png")], fixed={}, done=set()) == {"a": "x.png", "b": "x~2.png"}


def test_a_workflow_rerun_after_retraining_redoes_the_step_instead_of_refusing(tmp_path):
    """--resume refuses outputs of another run (a new model hash); a workflow's redo_changed starts the step over,
    keeping files that are not the job's own out of it (they still stop the job)."""
    from genart.infer import output

    out = str(tmp_path / "samples")
    before = {"command": "generate", "input": None, "format": "png", "model_hash": "aaa", "options": {"num": 1, "seed": 0}}
    output.start(out, before, resume=True, overwrite=False)
    (tmp_path / "samples" / "seed0-000000.png").write_bytes(b"old")
    (tmp_path / "samples" / "manifest.json").write_text("{}")
    after = {**before, "model_hash": "bbb"}
    with pytest.raises(UserError, match="model_hash: 'aaa' then, 'bbb' now"):
        output.start(out, after, resume=True, overwrite=False)
    output.start(out, before, resume=True, overwrite=False, redo_changed=True)  # same run: resumed, files kept
    assert (tmp_path / "samples" / "seed0-000000.png").exists()
    output.start(out, after, resume=True, overwrite=False, redo_changed=True)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["run.json"]
    assert json.loads((tmp_path / "samples" / "run.json").read_text())["model_hash"] == "bbb"


def test_a_job_on_another_jobs_output_records_what_drew_it(tmp_path):
    """A score (or stylize) run on a generate or stylize output recorded the critic and the folder, not its
    pictures: after they were redrawn under the same names (a retrained generator, another archive stylized with
    --overwrite), a resume kept the old scores of other pictures. (The quickstart guarded only a rerun that redrew
    them in the same process, not one cut short between the steps.)"""
    from genart.infer import jobs

    samples, out = tmp_path / "samples", str(tmp_path / "scores")
    (samples / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(samples / "seed0-000000.png")
    Image.new("RGB", (8, 8)).save(samples / "sub" / "a.png")
    drawn = {"command": "stylize", "input": "A.zip", "format": "png", "model_hash": "m1", "options": {"tile": None}}
    (samples / "run.json").write_text(json.dumps(drawn))

    def score(run: RunOptions, src=samples, to=out):
        jobs._image_work("score", str(src), str(to), "parquet", None, {}, run, "critic1")
        return json.loads((Path(to) / "run.json").read_text())

    assert score(RunOptions())["input_run"] == {"command": "stylize", "input": "A.zip", "model_hash": "m1",
                                               "options": {"tile": None}, "input_run": None}
    score(RunOptions(resume=True))  # the same pictures: resumed
    for changed in ({"model_hash": "m2"}, {"input": "B.zip"}):  # a retrained model; another archive, same names
        (samples / "run.json").write_text(json.dumps({**drawn, **changed}))
        key = next(iter(changed))
        with pytest.raises(UserError, match=f"input_run.{key}: .* then, .* now"):
            score(RunOptions(resume=True))
        assert score(RunOptions(resume=True, redo_changed=True))["input_run"][key] == changed[key]  # workflows: redone
    # inside a job's output (a subfolder, one file) is the same; the user's own pictures have no run record
    assert score(RunOptions(), samples / "sub", tmp_path / "s2")["input_run"]["input"] == "B.zip"
    assert score(RunOptions(), samples / "sub" / "a.png", tmp_path / "s3")["input_run"]["input"] == "B.zip"
    (tmp_path / "mine").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "mine" / "b.png")
    assert "input_run" not in score(RunOptions(), tmp_path / "mine", tmp_path / "s4")
    # a run.json that cannot be read (S3's AccessDenied above a role's prefix; here a folder of that name)
    (tmp_path / "mine" / "run.json").mkdir()
    assert "input_run" not in score(RunOptions(), tmp_path / "mine", tmp_path / "s5")
    # a run recorded before input runs were: a --resume goes on as recorded, not refused as another run
    old = {k: v for k, v in score(RunOptions(overwrite=True)).items() if k != "input_run"}
    (tmp_path / "scores" / "run.json").write_text(json.dumps(old))
    assert "input_run" not in score(RunOptions(resume=True))


def test_names_json_cannot_send_an_output_outside_the_root(tmp_path):
    """names.json is read back on --resume and its names become output paths: one that safe_rel would change
    (`..`, an absolute path, a sidecar's name) is refused, naming the file."""
    for bad in ("../../escaped.png", "/etc/x.png", "manifest.json", "a/./b.png"):
        (tmp_path / "names.json").write_text(json.dumps({"/in/a.jpg": "a.png", "/in/b.jpg": bad}))
        with pytest.raises(UserError, match=f"{tmp_path}/names.json"):
            naming.read_names(str(tmp_path))
    long = naming.output_key("é" * 150 + ".jpg", ".png").replace(".png", "~2.png")  # past the name cap by "~2.png"
    good = {"/in/a.jpg": "a.png", "/in/b.jpg": "deep/a~2.png", "/in/c.jpg": long}
    (tmp_path / "names.json").write_text(json.dumps(good))
    assert naming.read_names(str(tmp_path)) == good


def test_a_file_never_takes_the_name_of_another_outputs_folder():
    """shots.jpg -> shots.png and shots.png/1.jpg -> shots.png/1.png cannot both be written to a disk: the file is
    renamed (~N, past every name and folder in use); names.json keys stay; a file written before is refused."""
    pairs = [("/in/shots.jpg", "shots.png"), ("/in/shots.png/1.jpg", "shots.png/1.png"),
             ("/in/Shots~2.png/x.jpg", "Shots~2.png/x.png")]
    assert naming.unique_keys(pairs) == {"/in/shots.jpg": "shots~3.png"}
    # resuming: a folder written before renames a newcomer; names.json's names are kept
    assert naming.unique_keys([("/in/shots.jpg", "shots.png")], done={"SHOTS.png/1.png"}) == {"/in/shots.jpg": "shots~2.png"}
    assert naming.unique_keys(pairs, fixed={"/in/shots.jpg": "shots~3.png"}, done={"shots~3.png"}) == {
        "/in/shots.jpg": "shots~3.png"}
    with pytest.raises(UserError, match="--resume: shots.png was written before"):
        naming.unique_keys(pairs, done={"shots.png"})


def _stylize_record(src) -> dict:
    return {"command": "stylize", "input": str(src), "format": "png", "model_hash": "h", "options": {}}


def test_overwrite_removes_only_what_an_earlier_run_wrote(tmp_path):
    """An input inside the output is refused; --overwrite removes the files the earlier run's records name (its
    sidecars, the outputs of the inputs run.json names, names.json's names), never a picture they do not."""
    from genart.infer import output

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name in ("a.jpg", "b.jpg", "c.webp"):
        _picture(1, (8, 8)).save(src / name)
    (out / "photos").mkdir(parents=True)
    _picture(2, (8, 8)).save(out / "photos" / "p.png")
    with pytest.raises(UserError, match="inside --output"):
        output.check_outside(str(out / "photos"), str(out))
    (out / "run.json").write_text(json.dumps(_stylize_record(src)))
    (out / "names.json").write_text(json.dumps({str(src / "c.webp"): "c~2.png"}))
    for name in ("manifest.json", "errors.jsonl", "a.png", "b.png.tmp-0123abcd", "c~2.png"):
        (out / name).write_bytes(b"written by the run")
    again = {**_stylize_record(src), "model_hash": "retrained"}
    with pytest.raises(UserError, match="photos/p.png"):
        output.start(str(out), again, resume=False, overwrite=True)
    assert (out / "photos" / "p.png").exists() and (out / "a.png").exists()
    (out / "photos" / "p.png").unlink()
    output.start(str(out), again, resume=False, overwrite=True)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == ["run.json"]


def test_overwrite_checks_everything_before_removing_anything(tmp_path):
    """A file the earlier run did not write stops --overwrite before any output is removed."""
    from genart.infer import output

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _picture(1, (8, 8)).save(src / "a.jpg")
    out.mkdir()
    (out / "run.json").write_text(json.dumps(_stylize_record(src)))
    (out / "manifest.json").write_text("{}")
    (out / "a.png").write_bytes(b"styled")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        output.start(str(out), _stylize_record(src), resume=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "manifest.json", "notes.txt", "run.json"]


def test_a_refused_resume_leaves_a_finished_output_finished(tmp_path):
    """--resume refused (a new input shares a written output's name) changes nothing at --output: the finished run
    keeps its manifest.json, it is not left looking interrupted."""
    from genart.infer import jobs

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _picture(1, (8, 8)).save(src / "x.jpg")
    jobs._image_work("stylize", str(src), str(out), "png", ".png", {}, RunOptions(), "h")
    (out / "x.png").write_bytes(b"styled")
    (out / "manifest.json").write_text("{}")
    _picture(2, (8, 8)).save(src / "x.webp")
    with pytest.raises(UserError, match="x.png was written before"):
        jobs._image_work("stylize", str(src), str(out), "png", ".png", {}, RunOptions(resume=True), "h")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "run.json", "x.png"]


def test_deduping_shards_never_deletes_the_only_copy_of_a_row(tmp_path):
    """Shards {x}, {x, y}, {y} in that (name) order, as a retried task leaves them: the middle one, cut to {y}, was
    rewritten under the name of the last ({y}'s), which the same pass then deleted as a duplicate: y was gone."""
    import pyarrow as pa

    from genart.infer import output

    def shard(keys):
        return output.write_shard(str(tmp_path), pa.table({"key": keys, "value": [f"{k}!" for k in keys]}))

    def name(keys):  # where write_shard puts a batch of these keys
        return os.path.basename(output.write_shard(str(tmp_path / "names"), pa.table({"key": keys})))

    # two keys whose shards sort x, xy, y (the shard names are hashes of the keys)
    x, y = next((a, b) for a in map(str, range(40)) for b in map(str, range(40))
                if a != b and name([a]) < name([a, b]) < name([b]))
    for keys in ([x], [x, y], [y]):
        shard(keys)
    assert output.dedupe_shards(str(tmp_path)) == 2
    rows = [row for uri in output.shards(str(tmp_path)) for row in output.read_shard(uri).to_pylist()]
    assert sorted(row["key"] for row in rows) == sorted([x, y])
    assert output.dedupe_shards(str(tmp_path)) == 0


def test_tile_overlap_is_checked_against_the_tile_as_used():
    """Tiles are rounded down to a multiple of 16 (tiling.ALIGN): --tile 40 is a 32 px tile, so at most 16 overlap."""
    with pytest.raises(UserError, match="--tile-overlap 20: .* 16"):
        stylize("no-such-model", "no-such-input", "no-such-output", tile=40, tile_overlap=20)


def test_tile_blend_weights_are_a_partition_of_unity():
    offsets = tiling.starts(320, 128, 16)
    assert offsets[0] == 0 and offsets[-1] == 320 - 128 and all(o % tiling.ALIGN == 0 for o in offsets)
    assert all(b - a <= 128 - 16 for a, b in zip(offsets, offsets[1:]))  # overlaps >= 16 px
    total = torch.zeros(320)
    for i, start in enumerate(offsets):
        total[start : start + 128] += tiling._window(offsets, i, 128)
    assert torch.allclose(total, torch.ones(320), atol=1e-6)


# ---------------------------------------------------------------- stylize


def test_stylize_folder_cli(tmp_path, ckpts, ray_session):
    files, good, bad = _inputs()
    src, out = str(tmp_path / "in"), str(tmp_path / "out")
    _write_tree(src, files)
    args = ["stylize", "--model", ckpts["style"], "--input", src, "--output", out, "--max-pixels", "5000",
            "--tile", "48", "--batch-size", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "5 outputs from 9 inputs, 4 errors" in result.output
    _check_stylized(out, good, bad, ".png")
    # A finished output is never silently replaced or mixed into.
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    other = CliRunner().invoke(main, args[:-2] + ["--batch-size", "2", "--resume", "--max-side", "20"])
    assert other.exit_code == 2 and "different run" in other.output
    nested = CliRunner().invoke(main, ["stylize", "--model", ckpts["style"], "--input", src, "--output", f"{src}/styled"])
    assert nested.exit_code == 2 and "inside --input" in nested.output
    before = _outputs(out)
    inner = CliRunner().invoke(main, ["stylize", "--model", ckpts["style"], "--input", f"{out}/deep", "--output", out,
                                      "--overwrite"])
    assert inner.exit_code == 2 and "inside --output" in inner.output and _outputs(out) == before


def test_stylize_resume_keeps_output_names_when_inputs_are_added(tmp_path, ckpts, ray_session):
    """b.jpg and b.png both become b.png. b.bmp, added before --resume, sorts first, so it would have taken b.png
    and been skipped as done (b.jpg's picture) while b.png's was written again; it gets a name of its own, and the
    two written pictures keep theirs."""
    src, out = tmp_path / "in", str(tmp_path / "out")
    src.mkdir()
    seeds = {"b.jpg": 1, "b.png": 2, "b.bmp": 3}
    for name in ("b.png", "b.jpg"):
        _picture(seeds[name], (40, 32)).save(src / name)
    args = ["stylize", "--model", ckpts["style"], "--input", str(src), "--output", out, "--batch-size", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    before = _outputs(out)
    assert sorted(before) == ["b.png", "b~2.png"]
    _picture(seeds["b.bmp"], (40, 32)).save(src / "b.bmp")
    result = CliRunner().invoke(main, args + ["--resume"])
    assert result.exit_code == 0, result.output
    after = _outputs(out)
    assert sorted(after) == ["b.png", "b~2.png", "b~3.png"]
    assert all(after[k] == before[k] for k in before)  # not rewritten: still the same inputs' pictures
    assert after["b~3.png"] not in before.values()  # b.bmp's own picture (before: b.png's, written again)
    names = json.loads((tmp_path / "out" / "names.json").read_text())
    assert names == {str(src / "b.jpg"): "b.png", str(src / "b.png"): "b~2.png", str(src / "b.bmp"): "b~3.png"}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["written_this_run"] == 1 and manifest["counts"]["already_done"] == 2


def test_stylize_s3_prefix(ckpts, s3_bucket, ray_session):
    files, good, bad = _inputs()
    src, out = f"s3://{s3_bucket}/photos", f"s3://{s3_bucket}/styled"
    _write_tree(src, files)
    stylize(ckpts["style"], src, out, fmt="webp", max_side=48, max_pixels=5000, run=RunOptions(progress=False))
    _check_stylized(out, good, bad, ".webp", max_side=48)


def test_archive_member_names_cannot_escape_output(tmp_path, ckpts, ray_session):
    archive = tmp_path / "in" / "evil.zip"
    archive.parent.mkdir()
    pic = _encode(_picture(1, (20, 16)), "PNG")
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("../../evil.png", "/abs/evil2.png", "ok/../../../evil3.png", "fine/a.png", "fine\\..\\..\\evil4.png"):
            zf.writestr(zipfile.ZipInfo(name), pic)
    out = tmp_path / "deep" / "out"
    stylize(ckpts["style"], str(archive), str(out), run=RunOptions(progress=False))
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png"))
    assert all(w.startswith("deep/out/") for w in written), written  # nothing escaped
    assert sorted(_outputs(str(out))) == ["abs/evil2.png", "evil.png", "fine/a.png", "fine/evil4.png", "ok/evil3.png"]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2)))


def test_tiled_stylize_matches_untiled(tmp_path, ckpts, ray_session):
    """figures.jpg (768 x 512) in 256 px tiles through the pipeline vs the whole image through the model at once."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "figures.jpg").write_bytes(open(PHOTO, "rb").read())
    out = str(tmp_path / "out")
    manifest = stylize(ckpts["style"], str(src), out, tile=256, run=RunOptions(progress=False))
    assert manifest["counts"]["written"] == 1
    tiled_px = np.asarray(images.decode_image(storage.read_bytes(storage.join(out, "figures.png"))))

    model = models.load(ckpts["style"], family="style")
    x = images.to_tensor01([images.decode_image(open(PHOTO, "rb").read())])
    whole = np.asarray(images.from_tensor01(model.stylize(x))[0])
    assert tiled_px.shape == whole.shape == (512, 768, 3)
    # --tile 0 (the CLI's "never tile") is the whole image at once through the pipeline too.
    untiled = str(tmp_path / "untiled")
    assert stylize(ckpts["style"], str(src), untiled, tile=0, run=RunOptions(progress=False))["counts"]["written"] == 1
    assert _psnr(np.asarray(images.decode_image(storage.read_bytes(storage.join(untiled, "figures.png")))), whole) > 45
    psnr = _psnr(tiled_px, whole)
    # Per-tile statistics (what naive tiling does) for comparison: visibly worse.
    naive = tiling.tiled(model.stylize, x[0], 256, 52, layers=None)
    naive_psnr = _psnr(np.asarray(images.from_tensor01(naive[None])[0]), whole)
    assert psnr > 40 and psnr > naive_psnr + 10, (psnr, naive_psnr)
    # Away from the seams the two agree to within a few grey levels.
    mask = np.ones(whole.shape[:2], dtype=bool)
    for axis, length in ((0, 512), (1, 768)):
        for start in tiling.starts(length, 256, 52):
            for edge in (start, start + 256):
                if 0 < edge < length:
                    sl = slice(max(0, edge - 64), edge + 64)
                    mask[(sl, slice(None)) if axis == 0 else (slice(None), sl)] = False
    diff = np.abs(tiled_px.astype(int) - whole.astype(int))[mask]
    assert diff.mean() < 1.0 and diff.max() <= 6, (diff.mean(), diff.max())  # what is left: approximate norm statistics


@pytest.mark.slow
def test_stylize_killed_then_resumed_matches_uninterrupted(tmp_path, ckpts, ray_session):
    src, out, ref = tmp_path / "in", tmp_path / "out", tmp_path / "ref"
    # enough pictures that the job cannot finish between two looks: tiny ones stylize at hundreds a second and are
    # written in bursts of ~30-60 (with 80, one CI run saw 0 then all 80)
    n = 400
    files = {f"{'ab'[i % 2]}/p{i:03d}.png": _encode(_picture(i, (24 + i % 7, 20 + i % 5)), "PNG") for i in range(n)}
    files["a/broken.jpg"] = b"\xff\xd8\xff\xe0 truncated"
    _write_tree(str(src), files)
    # --deterministic: batch-invariant kernels, so batch size 1 (here) and 4 (the reference) give the same bytes
    args = ["stylize", "--model", ckpts["style"], "--input", str(src), "--output", str(out), "--batch-size", "1",
            "--deterministic"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    genart = os.path.join(os.path.dirname(sys.executable), "genart")
    proc = subprocess.Popen([genart, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: the driver and the Ray it started
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(list(out.rglob("p*.png"))) < 5 and proc.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a power cut, mid-run
        proc.wait()
    done_before = len(list(out.rglob("p*.png")))
    assert 5 <= done_before < n and not (out / "manifest.json").exists()

    result = CliRunner().invoke(main, args + ["--resume"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["already_done"] >= done_before and manifest["counts"]["written"] == n
    stylize(ckpts["style"], str(src), str(ref), run=RunOptions(batch_size=4, progress=False, deterministic=True))
    resumed, reference = _outputs(str(out)), _outputs(str(ref))
    assert sorted(resumed) == sorted(reference) and len(reference) == n  # nothing missing, duplicated or stray
    assert all(resumed[k] == reference[k] for k in reference)  # byte for byte
    assert (out / "errors.jsonl").read_text().replace(str(out), "") == (ref / "errors.jsonl").read_text().replace(str(ref), "")


# ---------------------------------------------------------------- a job Ray cannot finish


class _Reader:
    """What a Ray Data iterator looks like to genart: some batches, then (then="stall") waiting for a block that never
    comes, as after a lost node Ray could not recover, until stop() shuts the execution down; or (then="fail") an
    error. `unwound` is set once the iteration has ended."""

    def __init__(self, batches: list, then: str):
        self.batches, self.then = batches, then
        self.stopped, self.unwound = threading.Event(), threading.Event()

    def __iter__(self):
        try:
            yield from self.batches
            if self.then == "fail":
                raise ValueError("a task failed")
            if self.then == "stall":
                self.stopped.wait()
        finally:
            self.unwound.set()

    def stop(self):
        self.stopped.set()


def _watch(reader: _Reader, stall_s: float, what: str = "x", then: str = ""):
    from genart.infer.pipeline import watched

    return watched(reader, stall_s, what, then, reader.stop)


def test_a_stalled_job_stops_with_one_line_and_its_reader_unwinds():
    """A stylize job whose node was lost waited forever once Ray could not recover the work in flight. Now no output
    for the stall timeout is a one-line JobStalled saying what to do, and the reader's execution is stopped."""
    from genart.infer.pipeline import JobStalled

    reader, got, started = _Reader(["a"], "stall"), [], time.monotonic()
    with pytest.raises(JobStalled, match=r"^stylize: no output for 0.5 s, so the job was stopped .*; use --resume$"):
        for batch in _watch(reader, 0.5, "stylize", "use --resume"):
            got.append(batch)
    assert got == ["a"] and reader.unwound.wait(10) and time.monotonic() - started < 10
    assert not [t for t in threading.enumerate() if t.name == "genart-stylize"]


def _late(delay_s: float, batches: list):
    time.sleep(delay_s)
    yield from batches


def test_a_watched_reader_passes_everything_through_and_stops_when_left():
    from genart.infer.pipeline import watched

    reader = _Reader([1, 2, 3], "end")
    assert list(_watch(reader, 5)) == [1, 2, 3] and reader.unwound.is_set() and not reader.stopped.is_set()
    with pytest.raises(ValueError, match="a task failed"):
        list(_watch(_Reader([1], "fail"), 5))
    reader = _Reader([1, 2], "stall")
    for batch in _watch(reader, 60):
        break  # the consumer leaves (an error of its own, Ctrl-C): the reader does not run on behind it
    assert reader.stopped.is_set() and reader.unwound.wait(10)
    # the clock starts at the first batch: before it a job may wait for resources or load its models
    assert list(watched(_late(1.0, ["a", "b"]), 0.3, "x", "", lambda: None)) == ["a", "b"]
    for no_limit in (0, float("inf")):  # wait forever (inf once overflowed the queue's timeout)
        reader = _Reader([1], "end")
        assert list(_watch(reader, no_limit)) == [1] and reader.unwound.is_set()
    assert not [t for t in threading.enumerate() if t.name == "genart-x"]


def test_the_stall_timeout_is_off_on_the_embedded_ray_and_on_by_default_on_a_cluster(ray_session, monkeypatch):
    """The watchdog is for jobs on a cluster, where a node can be lost; on the embedded Ray a quiet job is only a slow
    one (a batch of big photos on CPUs), never stopped unless asked."""
    from genart import runtime
    from genart.infer.pipeline import STALL_TIMEOUT_S, resume_hint, stall_limit

    assert runtime.is_embedded() and stall_limit(None) == 0 and stall_limit(7.5) == 7.5
    monkeypatch.setattr(runtime, "_embedded", False)  # what init records after joining a cluster at an address
    assert stall_limit(None) == STALL_TIMEOUT_S and stall_limit(0) == 0
    # the workflows always resume: they are told to run again, not to add the --resume they do not take
    assert "run the same command with --resume" in resume_hint(False) and "command again" in resume_hint(True)


def test_a_stalled_ray_data_job_stops_and_ray_goes_on(ray_session):
    """The same on a real Ray Data pipeline: a task that never finishes in time stops the job within the timeout,
    and the shared Ray runs the next job as before."""
    import ray

    from genart.infer.pipeline import JobStalled, execution_stopper, pipeline_context, watched

    def slow(batch):
        time.sleep(600 if 5 in batch["id"] else 0)
        return batch

    with pipeline_context():
        idle_cpus = ray.available_resources().get("CPU", 0)  # other modules' actors may hold some
        ds = ray.data.range(8, override_num_blocks=8).map_batches(slow, batch_size=1)
        started, got = time.monotonic(), []
        with pytest.raises(JobStalled):
            for batch in watched(ds.iter_batches(batch_size=None), 3, "generate", "use --resume", execution_stopper(ds)):
                got.extend(batch["id"].tolist())
        assert time.monotonic() - started < 60
        assert got and 5 not in got  # the job was under way: the one slow task is what stopped it
        # the execution was shut down: the reader thread ended, and the 600 s task no longer holds its CPU
        assert not [t for t in threading.enumerate() if t.name == "genart-generate"]
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU", 0) < idle_cpus and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray.available_resources().get("CPU", 0) >= idle_cpus
        assert sorted(ray.data.range(4).map_batches(lambda b: {"id": b["id"] * 2}).to_pandas()["id"]) == [0, 2, 4, 6]


# ---------------------------------------------------------------- generate


def test_generate_is_deterministic_by_seed(tmp_path, ckpts, ray_session):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    generate(ckpts["dcgan"], 37, a, seed=3, truncation=0.7, run=RunOptions(batch_size=5, concurrency=1, progress=False))
    generate(ckpts["dcgan"], 37, b, seed=3, truncation=0.7, run=RunOptions(batch_size=16, concurrency=2, progress=False))
    out_a, out_b = _outputs(a), _outputs(b)
    assert sorted(out_a) == [f"seed3-{i:06d}.png" for i in range(37)]
    assert out_a == out_b  # same bytes, whatever the batching
    records = [json.loads(line) for line in storage.read_text(storage.join(a, "images.jsonl")).splitlines()]
    assert [(r["seed"], r["index"]) for r in records] == [(3, i) for i in range(37)]
    assert records[5]["latent_seed"] == (3 << 32) | 5 and records[5]["label_name"] in ("a", "b", "c")
    # The same image as the model makes for that latent seed directly (what serving does).
    model = models.load(ckpts["dcgan"], family="dcgan")
    direct = model.sample([records[5]["latent_seed"]], labels=[records[5]["label"]], truncation=0.7)
    assert np.array_equal(np.asarray(images.from_tensor01(direct)[0]), np.asarray(Image.open(io.BytesIO(out_a["seed3-000005.png"]))))


def test_generate_parquet_resume_completes_without_duplicates(tmp_path, ckpts, ray_session):
    out = str(tmp_path / "gen")
    run = RunOptions(batch_size=16, progress=False)
    generate(ckpts["dcgan"], 300, out, seed=1, label="b", fmt="parquet", run=run)
    shards = sorted(u for u in storage.listdir(out) if u.endswith(".parquet"))
    assert len(shards) >= 2
    full = pq.read_table([storage.fsspec_fs(s)[1] for s in shards]).sort_by("index")
    # What a crash leaves behind: some complete shards (each is written whole), no manifest.
    storage.remove(shards[0])
    storage.remove(storage.join(out, "manifest.json"))
    manifest = generate(ckpts["dcgan"], 300, out, seed=1, label="b", fmt="parquet",
                        run=RunOptions(batch_size=32, resume=True, progress=False))
    assert 0 < manifest["counts"]["written_this_run"] < 300 and manifest["counts"]["written"] == 300
    shards = sorted(u for u in storage.listdir(out) if u.endswith(".parquet"))
    again = pq.read_table([storage.fsspec_fs(s)[1] for s in shards]).sort_by("index")
    assert again.column("index").to_pylist() == list(range(300))  # every image once
    assert set(again.column("label").to_pylist()) == {1}
    assert again.column("image").to_pylist() == full.column("image").to_pylist()


# ---------------------------------------------------------------- score


def test_score_agrees_with_the_critic(tmp_path, ckpts, ray_session):
    files, good, bad = _inputs()
    src, out = str(tmp_path / "in"), str(tmp_path / "scores")
    _write_tree(src, files)
    result = CliRunner().invoke(main, ["score", "--model", ckpts["critic"], "--input", src, "--output", out,
                                       "--max-pixels", "5000", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    shards = [storage.fsspec_fs(u)[1] for u in storage.listdir(out) if u.endswith(".parquet")]
    rows = {r["key"]: r for r in pq.read_table(shards).to_pylist()}
    assert sorted(rows) == sorted(good) and len(_errors(out)) == len(bad)
    from genart.serve import inference

    critic = models.load(ckpts["critic"], family="critic")
    assert any(w != h for w, h in good.values())  # non-square inputs: cropped, never squashed, on both paths
    for rel in good:
        # the batch job's score equals the served one: the same crop + resize (inference.critic_input) per image
        served = inference.critic_input(np.asarray(images.decode_image(files[rel])), critic.image_size)
        probs = np.asarray(inference.classify(critic, [served])[0])
        emb = critic.embed(torch.from_numpy(served)[None])[0].numpy()
        row = rows[rel]
        assert np.allclose(row["probs"], probs, atol=1e-5) and np.allclose(row["embedding"], emb, atol=1e-4)
        assert row["label"] == int(probs.argmax()) and row["label_name"] == critic.label_names[row["label"]]
        assert (row["width"], row["height"]) == good[rel]


def test_the_live_line_ends_on_the_final_count():
    """Updates within min_interval_s of the last draw were never drawn, so a job's line could end short of its total
    (e.g. 10/30 for a finished job)."""
    import io

    from genart.infer.output import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    progress = Progress("stylize", 30, stream=terminal, min_interval_s=60)
    for _ in range(3):
        progress.advance(10)
    progress.close()
    assert "stylize: 30/30" in terminal.getvalue()
