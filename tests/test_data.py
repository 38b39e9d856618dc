"""The data layer for real: the image gate, `genart prepare` on folders, archives and S3, and streamed reading."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from click.testing import CliRunner

from genart import storage
from genart.cli import main
from genart.data import images, prepare as prep
from genart.data.read import read_manifest, training_dataset
from genart.errors import UserError

sys.path.insert(0, os.path.dirname(__file__))
import corpus  # noqa: E402


JOB_MANIFEST = json.dumps({"command": "stylize", "counts": {"inputs": 2, "written": 2, "errors": 0}})


def _rows(dest: str) -> list[dict]:
    fs, _ = storage.arrow_fs(dest)
    rows = []
    for part in storage.listdir(dest):
        if part.endswith(".parquet"):
            rows.extend(pq.read_table(storage.arrow_fs(part)[1], filesystem=fs).to_pylist())
    return rows


def _rejected(dest: str) -> dict[str, str]:
    lines = storage.read_text(storage.join(dest, "rejected.jsonl")).splitlines()
    return {json.loads(line)["source"]: json.loads(line)["reason"] for line in lines}


def test_image_gate_verdicts():
    for rel, (data, expected) in corpus.files().items():
        if expected in (None, "duplicate"):
            img = images.decode_image(data)
            assert img.mode == "RGB", rel
        else:
            with pytest.raises(images.Reject) as err:
                images.decode_image(data)
            assert err.value.reason.startswith(expected), (rel, err.value.reason)
    rotated = images.decode_image(corpus.files()["dogs/rotated.jpg"][0])
    assert rotated.size == (20, 40)  # EXIF orientation applied
    sixteen = np.asarray(images.decode_image(corpus.files()["dogs/sixteen.png"][0]))
    assert sixteen.max() > 200  # 16-bit scaled to 8 bits, not clipped to its low byte


def test_high_bit_depth_images_keep_their_brightness():
    """16-bit and float pictures are scaled by the depth their file declares, not by their brightest pixel: a dark
    16-bit PGM stays dark (it came out 257x too bright), a float TIFF in [0, 1] is not black."""
    import io

    def pgm(maxval: int, value: int) -> bytes:
        return b"P5\n4 4\n%d\n" % maxval + np.full((4, 4), value, ">u2").tobytes()

    def tiff(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "TIFF")
        return buf.getvalue()

    def grey(data: bytes) -> int:
        pixel = images.decode_image(data).getpixel((1, 1))
        assert pixel[0] == pixel[1] == pixel[2]
        return pixel[0]

    assert grey(pgm(65535, 200)) == 1 and grey(pgm(65535, 32768)) == 128 and grey(pgm(1023, 1023)) == 255
    assert grey(pgm(4095, 2048)) == 128
    assert grey(tiff(np.full((4, 4), 200, np.uint16))) == 1  # opens as I;16
    assert grey(tiff(np.full((4, 4), 0.5, np.float32))) == 128  # opens as F
    assert grey(tiff(np.full((4, 4), 1 << 30, np.int32))) == 128  # opens as I: 32 signed bits


def test_prepare_folder(tmp_path, ray_session):
    src = tmp_path / "raw"
    files = corpus.write_folder(str(src))
    dest = str(tmp_path / "prepared")
    manifest = prep.prepare([str(src)], dest, prep.PrepareOptions(size=16, val_fraction=0.3), progress=False)

    kept = [r for r, (_, e) in files.items() if e is None]
    bad = {r: e for r, (_, e) in files.items() if e not in (None, "duplicate")}
    assert manifest["counts"] == {"input": len(files), "written": len(kept), "rejected": len(bad), "duplicates": 1,
                                  "near_duplicates": 2, "near_duplicates_dropped": 0}
    assert manifest["labels"] == {"birds": 0, "cats": 1, "dogs": 2}
    assert manifest["image_size"] == 16 and manifest["version"] == 1 and manifest["genart_version"]
    assert sum(manifest["splits"].values()) == len(kept)

    rows = _rows(dest)
    assert sorted(os.path.relpath(r["source"], src) for r in rows) == sorted(kept)
    by_rel = {os.path.relpath(r["source"], src): r for r in rows}
    assert by_rel["cats/deeper/nested.png"]["label_name"] == "cats"  # deeper files keep the first-level label
    assert all(r["label"] == manifest["labels"][r["label_name"]] for r in rows)
    assert all((r["width"], r["height"]) == (16, 16) for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(r["split"] == prep.split_of(r["id"], 0.3) for r in rows)
    assert all(images.decode_image(r["image"]).size == (16, 16) for r in rows)

    rejected = {os.path.relpath(s, src): reason for s, reason in _rejected(dest).items()}
    assert set(rejected) == set(bad)
    for rel, reason in rejected.items():
        assert reason.startswith(bad[rel]), (rel, reason)
    dups = [json.loads(x) for x in storage.read_text(os.path.join(dest, "duplicates.jsonl")).splitlines()]
    assert [os.path.relpath(d["source"], src) for d in dups] == ["birds/dup_b.bmp"]
    # Two plain white pictures (transparent pixels composited onto white) and two plain red ones, in other sizes:
    # near duplicates, reported and (without --near-dedup) kept.
    near = [json.loads(x) for x in storage.read_text(os.path.join(dest, "near_duplicates.jsonl")).splitlines()]
    assert [(os.path.relpath(p["kept_source"], src), os.path.relpath(p["duplicate_source"], src)) for p in near] == [
        ("cats/palette_transparent.png", "cats/rgba.png"), ("dogs/cmyk.jpg", "dogs/rotated.jpg")]
    assert not [p for p in os.listdir(dest) if p.startswith("_staging-")]


def test_prepare_archives_report_bad_members_and_cross_archive_duplicates(tmp_path, ray_session):
    zpath, tpath = str(tmp_path / "corpus.zip"), str(tmp_path / "corpus.tar.gz")
    files = corpus.write_zip(zpath)
    corpus.write_tar(tpath)
    corpus.corrupt_zip_member(zpath, "cats/good.jpg")
    dest = str(tmp_path / "out")
    manifest = prep.prepare([zpath, tpath], dest, prep.PrepareOptions(size=16), progress=False)

    n = len(files)
    good = sum(1 for _, e in files.values() if e is None)
    bad = sum(1 for _, e in files.values() if e not in (None, "duplicate"))
    c = manifest["counts"]
    assert c["input"] == 2 * n
    # The corrupt zip member is rejected; its tar twin survives. Every other good picture appears twice.
    assert c["written"] == good
    assert c["rejected"] == 2 * bad + 1
    assert c["duplicates"] == 2 * n - c["written"] - c["rejected"]
    reasons = _rejected(dest)
    assert reasons[f"{zpath}!corpus/cats/good.jpg"].startswith("unreadable archive member")
    assert set(manifest["labels"]) == {"birds", "cats", "dogs"}  # the zip's single top folder is not a label


def test_prepare_s3_to_s3_and_read_back(tmp_path, s3_bucket, ray_session):
    from genart.data.synth import make_synth

    local = tmp_path / "synth"
    make_synth(str(local), num=20, size=24)
    storage.upload_dir(str(local), f"s3://{s3_bucket}/raw")
    dest = f"s3://{s3_bucket}/prepared"
    manifest = prep.prepare([f"s3://{s3_bucket}/raw"], dest, prep.PrepareOptions(size=16, val_fraction=0.0), progress=False)
    assert manifest["counts"] == {"input": 20, "written": 20, "rejected": 0, "duplicates": 0, "near_duplicates": 0,
                                  "near_duplicates_dropped": 0}
    assert read_manifest(dest)["labels"] == manifest["labels"]
    assert all(s.startswith(f"s3://{s3_bucket}/raw/") for s in (r["source"] for r in _rows(dest)))
    batch = next(iter(training_dataset(dest, "train", 16).iter_batches(batch_size=32, batch_format="numpy")))
    assert batch["image"].shape == (20, 3, 16, 16)


def _near_copy_corpus(folder) -> set[tuple[str, str]]:
    """Shipped paintings, near copies of some of them, and distinct synthetic images; returns the planted
    (original, copy) file names. A copy's name sorts after its original's, so the original is the one kept."""
    import glob

    from genart.data.synth import GENRES, render

    folder.mkdir()
    paintings = sorted(glob.glob(os.path.join(os.path.dirname(images.__file__), "..", "assets", "paintings", "*", "*.jpg")))[:8]
    planted = set()
    for i, path in enumerate(paintings):
        img = images.decode_image(open(path, "rb").read())
        img.save(folder / f"p{i}.png")
        w, h = img.size
        copy = {0: ("jpeg", lambda: img), 1: ("half", lambda: img.resize((w // 2, h // 2))),
                2: ("crop3", lambda: img.crop((round(w * 0.015), round(h * 0.015), w - round(w * 0.015), h - round(h * 0.015)))),
                3: ("side2", lambda: img.crop((round(w * 0.02), 0, w, h)))}.get(i)
        if copy:
            name = f"p{i}_{copy[0]}.jpg"
            copy[1]().save(folder / name, quality=75)  # every copy is also re-encoded as JPEG
            planted.add((f"p{i}.png", name))
    for i in range(40):
        render(GENRES[i % len(GENRES)], i // len(GENRES), 48).save(folder / f"s{i:02d}.png")
    return planted


def test_near_duplicates_reported_and_dropped(tmp_path, ray_session):
    src = tmp_path / "raw"
    planted = _near_copy_corpus(src)
    total = 8 + len(planted) + 40
    dest = str(tmp_path / "report")
    manifest = prep.prepare([str(src)], dest, prep.PrepareOptions(size=16, val_fraction=0.5), progress=False)
    pairs = [json.loads(line) for line in storage.read_text(os.path.join(dest, "near_duplicates.jsonl")).splitlines()]
    assert {(os.path.basename(p["kept_source"]), os.path.basename(p["duplicate_source"])) for p in pairs} == planted
    rows = {r["source"]: r for r in _rows(dest)}
    assert all(rows[p["kept_source"]]["id"] == p["kept_id"] and rows[p["duplicate_source"]]["id"] == p["duplicate_id"] for p in pairs)
    # A kept near copy is in its original's split, never a train picture's twin in val (each id alone would hash
    # some of these pairs apart), and the manifest counts the splits the shards hold.
    assert any(prep.split_of(p["kept_id"], 0.5) != prep.split_of(p["duplicate_id"], 0.5) for p in pairs)
    assert all(rows[p["kept_source"]]["split"] == rows[p["duplicate_source"]]["split"] for p in pairs)
    held = collections.Counter(r["split"] for r in rows.values())
    assert manifest["splits"] == {"train": held["train"], "val": held["val"]}
    assert all(0 <= p["distance"] <= manifest["near_dedup"]["threshold"] for p in pairs)
    assert manifest["counts"] == {"input": total, "written": total, "rejected": 0, "duplicates": 0,
                                  "near_duplicates": len(planted), "near_duplicates_dropped": 0}

    # --near-dedup drops the copies (and only them); the same pairs are reported.
    dropped = str(tmp_path / "dropped")
    result = CliRunner().invoke(main, ["prepare", str(src), "--out", dropped, "--size", "16", "--near-dedup"])
    assert result.exit_code == 0, result.output
    assert f"near duplicates {len(planted)} (dropped" in result.output
    assert sorted(os.path.basename(r["source"]) for r in _rows(dropped)) == sorted(
        n for n in os.listdir(src) if n not in {c for _, c in planted})
    again = read_manifest(dropped)
    assert again["counts"]["written"] == total - len(planted) == sum(again["splits"].values())
    assert again["counts"]["near_duplicates_dropped"] == len(planted)
    reported = [json.loads(line) for line in storage.read_text(os.path.join(dropped, "near_duplicates.jsonl")).splitlines()]
    assert [(p["kept_id"], p["duplicate_id"], p["distance"]) for p in reported] == [
        (p["kept_id"], p["duplicate_id"], p["distance"]) for p in pairs]

    # --near-threshold 0: only pictures with equal hashes pair up (here a re-encoded or halved copy or two).
    strict = prep.prepare([str(src)], str(tmp_path / "strict"), prep.PrepareOptions(size=16, near_threshold=0), progress=False)
    assert strict["counts"]["near_duplicates"] == sum(p["distance"] == 0 for p in pairs) < len(planted)
    bad = CliRunner().invoke(main, ["prepare", str(src), "--out", str(tmp_path / "x"), "--near-threshold", "500"])
    assert bad.exit_code == 2 and "--near-threshold 500" in bad.output


def test_round_trip_tensors(tmp_path, synth_dir, ray_session):
    dest = str(tmp_path / "synth32")
    manifest = prep.prepare([synth_dir], dest, prep.PrepareOptions(size=32, val_fraction=0.2), progress=False)
    for split in ("train", "val"):
        seen, labels = 0, []
        for batch in training_dataset(dest, split, 16).iter_torch_batches(batch_size=8):
            img = batch["image"]
            assert img.shape[1:] == (3, 16, 16) and str(img.dtype) == "torch.float32"
            assert -1.0 <= float(img.min()) and float(img.max()) <= 1.0
            seen += img.shape[0]
            labels.extend(batch["label"].tolist())
        assert seen == manifest["splits"][split]
        assert set(labels) <= set(range(5)) and len(set(labels)) > 1


def test_prepare_cli_errors_leave_destination_untouched(tmp_path, synth_dir, ray_session):
    runner = CliRunner()
    dest = str(tmp_path / "ds")
    result = runner.invoke(main, ["prepare", str(tmp_path / "missing"), "--out", dest])
    assert result.exit_code == 2 and "source not found" in result.output and not os.path.exists(dest)

    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(main, ["prepare", str(empty), "--out", dest])
    assert result.exit_code == 2 and "no input files" in result.output
    for flag, value in (("--shard-rows", "0"), ("--max-pixels", "-1")):  # refused before Ray starts
        result = runner.invoke(main, ["prepare", synth_dir, "--out", dest, flag, value])
        assert result.exit_code == 2 and flag in result.output and not os.path.exists(dest), result.output

    ok = runner.invoke(main, ["prepare", synth_dir, "--out", dest, "--size", "16"])
    assert ok.exit_code == 0, ok.output
    assert "prepared 100 images" in ok.output
    before = {p: os.path.getmtime(os.path.join(dest, p)) for p in os.listdir(dest)}
    again = runner.invoke(main, ["prepare", synth_dir, "--out", dest, "--size", "16"])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert {p: os.path.getmtime(os.path.join(dest, p)) for p in os.listdir(dest)} == before

    afile = tmp_path / "a_file"
    afile.write_text("x")
    result = runner.invoke(main, ["prepare", synth_dir, "--out", str(afile / "sub")])
    assert result.exit_code == 2 and "cannot write" in result.output
    assert len(result.output.strip().splitlines()) == 1

    over = runner.invoke(main, ["prepare", synth_dir, "--out", dest, "--size", "8", "--overwrite"])
    assert over.exit_code == 0, over.output
    assert read_manifest(dest)["image_size"] == 8


def test_crash_before_manifest_leaves_no_finished_dataset(tmp_path, synth_dir, ray_session, monkeypatch):
    dest = str(tmp_path / "ds")

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash during finalize")

    monkeypatch.setattr(prep, "_finalize", crash)
    with pytest.raises(RuntimeError):
        prep.prepare([synth_dir], dest, prep.PrepareOptions(size=16), progress=False)
    assert not os.path.exists(os.path.join(dest, "manifest.json"))
    with pytest.raises(Exception):
        read_manifest(dest)
    monkeypatch.undo()
    manifest = prep.prepare([synth_dir], dest, prep.PrepareOptions(size=16), progress=False)
    assert manifest["counts"]["written"] == 100
    assert not [p for p in os.listdir(dest) if p.startswith("_staging-")]  # the crashed run's staging is gone


@pytest.mark.slow
def test_reading_a_dataset_larger_than_the_object_store_streams(tmp_path):
    """~1.5 GB of decoded tensors through a 400 MB object store: nothing spills, so nothing was materialised."""
    script = textwrap.dedent(
        f"""
        import io, json, os, numpy as np, pyarrow as pa, pyarrow.parquet as pq, ray
        from PIL import Image
        root = {str(tmp_path / "big")!r}
        os.makedirs(root)
        rng = np.random.default_rng(0)
        for shard in range(20):
            pngs = []
            for i in range(100):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, "PNG", compress_level=0)
                pngs.append(buf.getvalue())
            pq.write_table(pa.table({{"image": pngs, "label": [0] * 100, "split": ["train"] * 100}}),
                           f"{{root}}/part-{{shard:05d}}.parquet")
        json.dump({{"splits": {{"train": 2000, "val": 0}}, "counts": {{"written": 2000}}, "image_size": 256, "labels": {{}}}},
                  open(f"{{root}}/manifest.json", "w"))
        # address="local": a new instance, never one found in /tmp/ray (another job's `ray start` on this machine)
        ray.init(address="local", num_cpus=4, object_store_memory=400 * 1024 * 1024, include_dashboard=False)
        from genart.data.read import training_dataset
        n = 0
        for batch in training_dataset(root, "train", 256).iter_batches(batch_size=32, batch_format="numpy"):
            n += len(batch["label"])
        from ray._private.internal_api import memory_summary
        summary = memory_summary(ray.get_runtime_context().gcs_address, stats_only=True)
        spilled = [line for line in summary.splitlines() if "Spilled" in line]
        print(json.dumps({{"rows": n, "spilled": spilled}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rows"] == 2000
    assert not result["spilled"], result["spilled"]


def test_a_job_output_folder_is_an_input_without_its_own_files(tmp_path):
    """stylize -> score: the images of a finished job's folder are the inputs, its manifest and logs are not;
    a prepared dataset's folder still means its Parquet shards."""
    from genart.data import sources

    out = tmp_path / "stylized"
    (out / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(out / "a" / "x.png")
    Image.new("RGB", (8, 8)).save(out / "y.png")
    for name in ("run.json", "errors.jsonl"):
        (out / name).write_text("{}")
    (out / "manifest.json").write_text(JOB_MANIFEST)
    plan = sources.plan([str(out)])
    rels = sorted(r for unit in plan.units for r in unit.rel_paths)
    assert rels == ["a/x.png", "y.png"] and plan.num_inputs == 2

    (out / "notes.txt").write_text("hi")  # anything else stays an input (and is reported if it is no image)
    assert sources.plan([str(out)]).num_inputs == 3


def test_synth_cli(tmp_path):
    result = CliRunner().invoke(main, ["datasets", "synth", "--out", str(tmp_path), "--num", "10", "--size", "16"])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == ["circles", "gradient", "grid", "noise", "stripes"]
    assert len(os.listdir(tmp_path / "grid")) == 2


def _read_all(plan) -> list[dict]:
    """Every record the plan's units yield, read in this process (what the Ray read tasks run)."""
    from genart.data import sources

    return [row for unit in plan.units for table in sources.read_unit(unit) for row in table.to_pylist()]


def test_photos_beside_an_earlier_jobs_output_stay_inputs(tmp_path):
    """A manifest.json only shapes its own folder: photos next to an earlier job's Parquet output are still read."""
    import pyarrow as pa

    from genart.data import sources

    root = tmp_path / "mix"
    (root / "photos").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8)).save(root / "photos" / f"p{i}.png")
    (root / "scores").mkdir()
    (root / "scores" / "manifest.json").write_text(JOB_MANIFEST)
    (root / "scores" / "errors.jsonl").write_text("")
    pq.write_table(pa.table({"source": ["x"], "label": ["circles"]}), root / "scores" / "part-0.parquet")
    plan = sources.plan([str(root)])
    assert plan.num_inputs == 4  # three photos + one Parquet row (reported later: it holds no image bytes)
    assert sorted(r for u in plan.units if u.kind == "files" for r in u.rel_paths) == [
        "photos/p0.png", "photos/p1.png", "photos/p2.png"]


def test_repeated_archive_member_names_are_one_input_and_reported_copies(tmp_path):
    """`tar -r` appends newer copies of a.png: one input per name, read from its last copy (the one `tar -x` and
    `unzip` keep), each earlier copy a reported reject, and every planned input still yields exactly one record
    (before: 'lost track of inputs' after the whole job)."""
    import io
    import tarfile
    import warnings
    import zipfile

    from genart.data import sources
    from genart.infer import naming

    copies = [corpus._png(Image.new("RGB", (8, 8), (k, k, k))) for k in (1, 2, 3)]  # a.png, oldest first
    members = [("a.png", copies[0]), ("a.png", copies[1]), ("b.png", copies[0]), ("a.png", copies[2])]
    tar_path, zip_path = tmp_path / "dup.tar", tmp_path / "dup.zip"
    with tarfile.open(tar_path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with warnings.catch_warnings(), zipfile.ZipFile(zip_path, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns "Duplicate name": that is the point here
        for name, data in members:
            zf.writestr(name, data)
    for path in (tar_path, zip_path):
        plan = sources.plan([str(path)])
        assert plan.num_inputs == 4 and [f["reason"][:26] for f in plan.failures] == ["duplicate member name in t"] * 2
        assert [f["source"] for f in plan.failures] == [f"{path}!a.png (copy 1)", f"{path}!a.png (copy 2)"]
        for kept in (plan, naming.prune_plan(plan, lambda source, rel: True)):  # a --resume reads the pruned plan
            records = {r["rel_path"]: r["data"] for r in _read_all(kept)}
            assert records == {"a.png": copies[2], "b.png": copies[0]}, path
        names = sources.input_names(plan)  # what a job names its outputs by: four distinct sources
        assert len({source for source, _ in names}) == 4


def test_parquet_rows_keep_distinct_identities_and_a_damaged_file_is_reported(tmp_path):
    import pyarrow as pa

    from genart.data import sources

    pngs = [corpus._png(Image.effect_noise((32, 32), 40 + i).convert("RGB")) for i in range(64)]
    # A provenance tag in `source` (every row "wikiart") and integer labels: a user's Parquet, not genart's.
    tagged = tmp_path / "tagged.parquet"
    pq.write_table(pa.table({"image": pngs[:3], "source": ["wikiart"] * 3, "label_name": [1, 2, 1]}), tagged)
    plan = sources.plan([str(tagged)])
    records = _read_all(plan)
    assert len({r["source"] for r in records}) == 3 and [r["label_name"] for r in records] == ["1", "2", "1"]
    assert [s for s, _ in sources.input_names(plan)] == [r["source"] for r in records]
    # genart's own prepared data names rows by their original, distinct sources, as before.
    named = tmp_path / "named.parquet"
    pq.write_table(pa.table({"image": pngs[:2], "source": ["raw/a.png", "raw/b.png"]}), named)
    assert [r["source"] for r in _read_all(sources.plan([str(named)]))] == ["raw/a.png", "raw/b.png"]

    # Damaged data pages (the footer intact, so planning sees 64 rows): 64 reported rejects, no exception.
    damaged = tmp_path / "damaged.parquet"
    pq.write_table(pa.table({"image": pngs}), damaged, compression="snappy")
    raw = bytearray(damaged.read_bytes())
    for i in range(200, 4000):
        raw[i] ^= 0x5A
    damaged.write_bytes(bytes(raw))
    plan = sources.plan([str(damaged)])
    records = _read_all(plan)
    assert plan.num_inputs == 64 and len(records) == 64, len(records)
    assert all(r["error"] and r["error"].startswith("unreadable parquet file") for r in records)
    assert sorted(s for s, _ in sources.input_names(plan)) == sorted(r["source"] for r in records)


def test_files_over_the_byte_cap_are_rejected_unread(tmp_path):
    """A zip member bigger than any image the pixel cap allows is a reject, not gigabytes in a worker's memory."""
    import zipfile

    from genart.data import sources

    cap = images.file_byte_cap(1000)  # 8 bytes a pixel + 1 MiB
    assert cap == 8000 + (1 << 20) and images.file_byte_cap(None) is None
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.png", b"\0" * (cap + 1))  # ~1 KB compressed
        zf.writestr("ok.png", corpus._png(Image.new("RGB", (8, 8))))
    plan = sources.plan([str(tmp_path / "bomb.zip")])
    records = {r["rel_path"]: r for unit in plan.units for t in sources.read_unit(unit, max_bytes=cap)
               for r in t.to_pylist()}
    assert records["zeros.png"]["data"] is None and records["zeros.png"]["error"].startswith("file too large")
    assert records["ok.png"]["data"] and records["ok.png"]["error"] is None


def test_images_outside_the_class_folders_are_counted_and_refused_by_label_models(tmp_path, ray_session):
    """A loose file beside the class folders has no label: the manifest counts it, and a model that trains on
    labels says so before any worker starts (each worker used to stop at the first label -1, retried 3 times)."""
    from genart.train.config import load_config
    from genart.train.trainer import check

    src = tmp_path / "raw"
    for i, folder in enumerate(("cats", "dogs", "cats", "dogs", ".")):
        (src / folder).mkdir(parents=True, exist_ok=True)
        Image.effect_noise((16, 16), 30 + 10 * i).convert("RGB").save(src / folder / f"p{i}.png")
    dest = str(tmp_path / "ds")
    manifest = prep.prepare([str(src)], dest, prep.PrepareOptions(size=16, val_fraction=0.0), progress=False)
    assert manifest["unlabelled"] == 1 and manifest["labels"] == {"cats": 0, "dogs": 1}
    cfg = load_config(None, ["model.family=critic", f"data.path={dest}", "data.batch_size=2", "scaling.num_workers=1"])
    with pytest.raises(UserError, match="1 images of .* are outside its class folders"):
        check(cfg)
    # Checked at the size the net trains on (crops): the style network's two stride-2 stages need multiples of 4.
    style = load_config(None, ["model.family=style", "model.loss_network=random", f"data.path={dest}",
                               "data.batch_size=2", "scaling.num_workers=1", "data.crop_size=14"])
    with pytest.raises(UserError, match="data.crop_size=14: the style network trains on sides that are multiples of 4"):
        check(style)


def test_a_class_left_without_training_images_is_counted_and_named_in_the_summary(tmp_path, ray_session):
    """A class folder whose every file was rejected stayed in the labels, and nothing said that no model would ever
    see it (a conditional generator then drew noise for every seed of that class)."""
    src = tmp_path / "raw"
    for i, folder in enumerate(("cats", "dogs", "cats", "dogs")):
        (src / folder).mkdir(parents=True, exist_ok=True)
        Image.effect_noise((16, 16), 30 + 10 * i).convert("RGB").save(src / folder / f"p{i}.png")
    (src / "birds").mkdir()
    (src / "birds" / "broken.png").write_bytes(b"not a png")
    manifest = prep.prepare([str(src)], str(tmp_path / "ds"), prep.PrepareOptions(size=16, val_fraction=0.0),
                            progress=False)
    assert manifest["labels"] == {"birds": 0, "cats": 1, "dogs": 2}
    assert manifest["label_counts"] == {"birds": {"train": 0, "val": 0}, "cats": {"train": 2, "val": 0},
                                        "dogs": {"train": 2, "val": 0}}
    lines = prep.summary(manifest).splitlines()
    assert [line for line in lines if "no training images" in line] == [
        "  ! label 'birds': no training images (no image of it was kept; see rejected.jsonl and duplicates.jsonl)"]


def test_planning_skips_what_is_not_a_picture_of_the_dataset_and_says_so(tmp_path):
    """A zip made on a Mac holds __MACOSX/ with a ._copy of every image: as a folder it became a class of its own
    and merged the real ones into one ('art'). Dot-files and dot-folders (.DS_Store, .ipynb_checkpoints/) are
    not read either, and each is a reported reject, not a silent drop."""
    import zipfile

    from genart.data import sources

    archive = tmp_path / "art.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for label in ("cats", "dogs"):
            z.writestr(f"art/{label}/a.png", corpus._png(Image.new("RGB", (8, 8))))
            z.writestr(f"__MACOSX/art/{label}/._a.png", b"\x00\x05\x16\x07 AppleDouble")
    plan = sources.plan([str(archive)])
    assert plan.label_names == ["cats", "dogs"] and plan.num_inputs == 4
    assert sorted(f["source"].split("!")[1] for f in plan.failures) == ["__MACOSX/art/cats/._a.png", "__MACOSX/art/dogs/._a.png"]
    assert {f["reason"] for f in plan.failures} == {sources.HIDDEN_REASON}

    folder = tmp_path / "photos"
    for rel in ("cats/a.png", "cats/.ipynb_checkpoints/a-checkpoint.png", "dogs/b.png", ".DS_Store"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(folder / rel, "PNG")
    plan = sources.plan([str(folder)])
    assert plan.label_names == ["cats", "dogs"] and plan.num_inputs == 4 and len(plan.failures) == 2
    assert sorted(r for u in plan.units for r in u.rel_paths) == ["cats/a.png", "dogs/b.png"]


def test_sources_given_twice_or_nested_are_refused_and_so_is_an_output_inside_a_source(tmp_path):
    """Overlapping sources planned every shared file twice (both copies written, or a crash after the whole
    run), and `prepare data --out data/prepared` read its own earlier shards on a rerun."""
    from genart.data import sources

    (tmp_path / "data" / "cats").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "cats" / "a.png")
    data, cats = str(tmp_path / "data"), str(tmp_path / "data" / "cats")
    for srcs in ([data, cats], [cats, data], [data, data + "/"]):
        with pytest.raises(UserError, match="overlap .* give each input once"):
            sources.plan(srcs)
    assert sources.plan([cats]).num_inputs == 1
    result = CliRunner().invoke(main, ["prepare", data, "--out", f"{data}/prepared"])
    assert result.exit_code == 2 and "is inside SRC" in result.output, result.output
    assert not (tmp_path / "data" / "prepared").exists()


def test_another_tools_manifest_does_not_hide_its_folders_images(tmp_path):
    """Only a manifest.json genart wrote makes a folder mean "its shards": a downloaded dataset with its own
    manifest.json and metadata.parquet beside its JPEGs keeps the JPEGs as inputs."""
    import pyarrow as pa

    from genart.data import sources

    root = tmp_path / "download"
    (root / "images").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(root / "images" / f"{i}.jpg")
    (root / "manifest.json").write_text(json.dumps({"name": "some-dataset", "files": 3}))
    pq.write_table(pa.table({"file": ["0.jpg", "1.jpg", "2.jpg"], "caption": ["a", "b", "c"]}), root / "metadata.parquet")
    plan = sources.plan([str(root)], labels="none")
    files = sorted(r for u in plan.units if u.kind == "files" for r in u.rel_paths)
    assert files == ["images/0.jpg", "images/1.jpg", "images/2.jpg", "manifest.json"]  # the JSON: a reported reject


def test_parquet_label_names_that_are_numbers_are_the_labels_of_their_rows(tmp_path):
    """Planning kept the raw values (and dropped 0) while the reader made them text: every row's label was
    missing from the label map."""
    import pyarrow as pa

    from genart.data import sources

    pngs = [corpus._png(Image.new("RGB", (8, 8), (i, 0, 0))) for i in range(3)]
    pq.write_table(pa.table({"image": pngs, "label_name": [0, 1, 0]}), tmp_path / "digits.parquet")
    plan = sources.plan([str(tmp_path / "digits.parquet")])
    assert plan.label_names == ["0", "1"]
    assert [r["label_name"] for r in _read_all(plan)] == ["0", "1", "0"]


def test_colour_keyed_transparency_is_composited_like_a_palette_images(tmp_path):
    """An RGB or grey PNG with a transparent colour key: that colour is see-through, so it turns white as a
    palette image's transparent index does (it stayed black)."""
    import io

    for mode, key in (("RGB", (0, 0, 0)), ("L", 0)):
        img = Image.new(mode, (4, 4), key)
        img.putpixel((0, 0), (200, 10, 10) if mode == "RGB" else 200)
        buf = io.BytesIO()
        img.save(buf, "PNG", transparency=key)
        rgb = images.decode_image(buf.getvalue(), 10_000)
        assert rgb.getpixel((1, 1)) == (255, 255, 255) and rgb.getpixel((0, 0)) != (255, 255, 255), mode


def test_prepare_overwrite_replaces_a_palette_genart_wrote_and_synth_writes_to_s3(tmp_path, s3_bucket):
    """--overwrite refused a dataset folder holding `genart palette`'s palette-16.json (genart's own file, stale
    once the data is replaced); `datasets synth --out s3://...` wrote a local folder named 's3:'."""
    dest = tmp_path / "ds"
    dest.mkdir()
    (dest / "manifest.json").write_text("{}")
    (dest / "palette-16.json").write_text("{}")
    prep._check_dest(str(dest), overwrite=True)  # no "holds files that are not part of a genart dataset"
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        prep._check_dest(str(dest), overwrite=True)

    from genart.data.synth import make_synth

    uri = f"s3://{s3_bucket}/synth"
    make_synth(uri, num=5, size=8)
    assert len([u for u, _ in storage.find(uri) if u.endswith(".png")]) == 5
    assert not os.path.exists("s3:")


def test_local_and_s3_files_are_read_in_units_of_their_own_store(tmp_path, s3_bucket):
    """`prepare ./photos s3://bucket/more`: `mixed` re-chunked every plain file together, and a unit reads all its
    files on its first file's store, so one store's files were all "unreadable"."""
    from genart.data import sources

    local = tmp_path / "photos"
    local.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(local / f"l{i}.png")
        storage.write_bytes(f"s3://{s3_bucket}/more/s{i}.png", corpus._png(Image.new("RGB", (8, 8), (0, i, 0))))
    plan = prep.mixed(sources.plan([str(local), f"s3://{s3_bucket}/more"]))
    assert all(len({storage.is_s3(item) for item in unit.items}) == 1 for unit in plan.units)
    records = _read_all(plan)
    assert len(records) == 6 and not any(r["error"] for r in records), [r["error"] for r in records]


def test_archive_links_are_reported_not_dropped(tmp_path):
    """GNU tar stores a file's second hard link as a link member, and a symbolic link as one: both vanished (never
    planned, read, rejected or counted). Each is now a reported reject, as is a zip's symbolic link (its bytes are
    the target's path, not a picture)."""
    import io
    import stat
    import tarfile
    import zipfile

    from genart.data import sources

    png = corpus._png(Image.new("RGB", (8, 8), (200, 0, 0)))
    tar_path = tmp_path / "h.tar"
    with tarfile.open(tar_path, "w") as tf:  # what `tar cf h.tar d` writes for d/dog/1.png, its hard link, a symlink
        info = tarfile.TarInfo("d/dog/1.png")
        info.size = len(png)
        tf.addfile(info, io.BytesIO(png))
        for name, kind, target in (("d/cat/1.png", tarfile.LNKTYPE, "d/dog/1.png"), ("d/dog/2.png", tarfile.SYMTYPE, "1.png")):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, target
            tf.addfile(link)
    plan = sources.plan([str(tar_path)])
    assert plan.num_inputs == 3
    reasons = {f["source"]: f["reason"] for f in plan.failures}
    assert reasons == {
        f"{tar_path}!d/cat/1.png": "hard link in the archive: not read (a link to d/dog/1.png, which is read as itself)",
        f"{tar_path}!d/dog/2.png": "symbolic link in the archive: not read (a link to 1.png)"}
    records = _read_all(plan)
    assert [(r["rel_path"], r["label_name"], r["data"]) for r in records] == [("dog/1.png", "dog", png)]
    assert len({source for source, _ in sources.input_names(plan)}) == 3

    zip_path = tmp_path / "s.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("cats/a.png", png)
        link = zipfile.ZipInfo("cats/b.png")
        link.create_system, link.external_attr = 3, (stat.S_IFLNK | 0o777) << 16  # how Info-ZIP's `zip -y` stores one
        zf.writestr(link, "a.png")
    plan = sources.plan([str(zip_path)])
    assert plan.num_inputs == 2 and [r["rel_path"] for r in _read_all(plan)] == ["a.png"]
    assert plan.failures == [{"source": f"{zip_path}!cats/b.png",
                              "reason": "symbolic link in the archive: not read (a link to a.png)"}]


def test_names_that_are_not_utf8_are_reported_rejects_not_a_crash(tmp_path):
    """A Latin-1 file name (caf\xe9.png, from an old disk or tar) reaches Python with a surrogate for the odd byte, which
    no Arrow table, JSON record or output name can carry: every job over such a folder or tar died on the driver
    with a UnicodeEncodeError before any work. Now it is one reported reject, named with the byte escaped."""
    import io
    import tarfile

    from genart.data import sources
    from genart.infer import naming

    red = corpus._png(Image.new("RGB", (8, 8), "red"))
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "ok.png").write_bytes(red)
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as f:
        f.write(red)
    tar_path = folder / "old.tar"
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name in ("in.png", os.fsdecode(b"na\xefve.png")):
            info = tarfile.TarInfo(name)
            info.size = len(red)
            tf.addfile(info, io.BytesIO(red))
    plan = sources.plan([str(folder)])
    assert plan.num_inputs == 4
    assert sorted((f["source"], f["reason"]) for f in plan.failures) == [
        (f"{folder}/caf\\xe9.png", sources.BAD_NAME_REASON), (f"{tar_path}!na\\xefve.png", sources.BAD_NAME_REASON)]
    keys = [naming.output_key(rel, ".png") for _, rel in sources.input_names(plan)]  # raised UnicodeEncodeError
    assert len(keys) == 4 and {"in.png", "ok.png"} <= set(keys)
    assert sorted(r["rel_path"] for r in _read_all(plan)) == ["in.png", "ok.png"]
    with pytest.raises(UserError, match=r"source .*caf\\xe9.png: the name is not valid UTF-8"):
        sources.plan([os.fsdecode(os.path.join(os.fsencode(folder), b"caf\xe9.png"))])


def test_pipes_and_other_special_files_are_reported_rejects_never_read(tmp_path):
    """A named pipe in an input folder (a stray `mkfifo`) was listed as an image, and reading it waited forever for a
    writer: the whole job hung with nothing written. Now it is a reported reject and the files beside it are read
    (a link to a file too); a pipe given as the source is a one-line error; a file that turns into a pipe after
    planning is a reject of the read, which never blocks."""
    from genart.data import sources

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "ok.png").write_bytes(corpus._png(Image.new("RGB", (8, 8), "red")))
    (folder / "link.png").symlink_to(folder / "ok.png")
    os.mkfifo(folder / "pipe.png")
    plan = sources.plan([str(folder)])
    assert plan.num_inputs == 3
    assert [(f["source"], f["reason"]) for f in plan.failures] == [(str(folder / "pipe.png"), sources.SPECIAL_REASON)]
    assert sorted(r["rel_path"] for r in _read_all(plan) if r["error"] is None) == ["link.png", "ok.png"]
    with pytest.raises(UserError, match="pipe.png: not a regular file"):
        sources.plan([str(folder / "pipe.png")])
    (folder / "ok.png").unlink()
    os.mkfifo(folder / "ok.png")
    assert {r["rel_path"]: r["error"] for r in _read_all(plan)}["ok.png"] == sources.SPECIAL_REASON


def test_archive_member_names_are_read_as_paths_whatever_their_spelling(tmp_path):
    """`tar cf x.tar ./photos` names members ./photos/cat/1.png: everything was labelled 'photos'. A zip written with
    Windows separators (photos\\cat\\1.png) had no labels, and its folder entries (photos\\cat\\) were planned as
    files and rejected as empty. A name that climbs out of the archive is read inside it, as unzip and tar do."""
    import io
    import tarfile
    import zipfile

    from genart.data import sources

    red, blue = (corpus._png(Image.new("RGB", (8, 8), c)) for c in ("red", "blue"))
    tar_path = tmp_path / "dot.tar"
    with tarfile.open(tar_path, "w") as tf:
        for name, data in (("./photos/cat/1.png", red), ("./photos/dog/1.png", blue), ("./photos/.DS_Store", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    plan = sources.plan([str(tar_path)])
    assert plan.label_names == ["cat", "dog"] and plan.num_inputs == 3
    assert [f["reason"] for f in plan.failures] == [sources.HIDDEN_REASON]
    assert {(r["source"], r["rel_path"], r["label_name"], r["data"]) for r in _read_all(plan)} == {
        (f"{tar_path}!./photos/cat/1.png", "cat/1.png", "cat", red), (f"{tar_path}!./photos/dog/1.png", "dog/1.png", "dog", blue)}

    zip_path = tmp_path / "win.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for name, data in (("photos\\cat\\", b""), ("photos\\cat\\1.png", red), ("photos\\dog\\1.png", blue),
                           ("__MACOSX\\photos\\cat\\._1.png", b"x"), ("photos/../../dog/2.png", red), ("..", red)):
            zf.writestr(name, data)
    plan = sources.plan([str(zip_path)])
    assert plan.label_names == ["cat", "dog"] and plan.num_inputs == 5
    assert {f["source"]: f["reason"] for f in plan.failures} == {
        f"{zip_path}!__MACOSX\\photos\\cat\\._1.png": sources.HIDDEN_REASON, f"{zip_path}!..": sources.EMPTY_NAME_REASON}
    assert sorted((r["rel_path"], r["label_name"], r["data"]) for r in _read_all(plan)) == [
        ("cat/1.png", "cat", red), ("dog/1.png", "dog", blue), ("dog/2.png", "dog", red)]
    assert [sources._member_path(n) for n in ("../../x.png", "ok/../../../y.png", "/abs//a/./b.png", "./", "..\\")] == [
        "x.png", "ok/y.png", "abs/a/b.png", None, None]

    # two spellings of one path are one input, read from its last copy (as `tar -x` leaves it), not two rows
    twice = tmp_path / "twice.tar"
    with tarfile.open(twice, "w") as tf:
        for name, data in (("x.png", red), ("./x.png", blue), ("x.png", red), ("./x.png", blue)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    plan = sources.plan([str(twice)])
    assert plan.num_inputs == 4 and sorted(f["source"] for f in plan.failures) == [
        f"{twice}!./x.png (copy 1)", f"{twice}!x.png (copy 1)", f"{twice}!x.png (copy 2)"]
    assert [(r["source"], r["rel_path"], r["data"]) for r in _read_all(plan)] == [(f"{twice}!./x.png", "x.png", blue)]


def test_s3_folder_markers_are_not_inputs(s3_server, s3_bucket):
    """The AWS console's "Create folder" writes an empty key ending in '/' (Hadoop writes `name_$folder$`): each
    was planned as a file and rejected as empty, inflating the input and reject counts."""
    import boto3

    from genart.data import sources

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for key in ("photos/", "photos/cat/", "photos/dog_$folder$"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"")
    png = corpus._png(Image.new("RGB", (8, 8)))
    for key in ("photos/cat/1.png", "photos/dog/1.png"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=png)
    root = f"s3://{s3_bucket}/photos"
    assert storage.find(root) == [(f"{root}/cat/1.png", len(png)), (f"{root}/dog/1.png", len(png))]
    plan = sources.plan([root])
    assert plan.num_inputs == 2 and not plan.failures and plan.label_names == ["cat", "dog"]


def test_parquet_rows_follow_the_labels_choice_and_their_folder(tmp_path):
    """`--labels none` still labelled a Parquet file's rows from its label_name column, and data/cat/x.parquet
    without that column did not take 'cat' as its folder's label. Now Parquet is labelled like an idx file: a row's
    own label_name, else its folder's; with --labels dirs, its folder's; with --labels none, none. The plan's label
    names are exactly the labels the rows get."""
    import pyarrow as pa

    from genart.data import sources

    pngs = [corpus._png(Image.new("RGB", (8, 8), (i, 0, 0))) for i in range(4)]
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "dog").mkdir()
    pq.write_table(pa.table({"image": pngs[:2]}), tmp_path / "data" / "cat" / "x.parquet")
    pq.write_table(pa.table({"image": pngs[2:], "label_name": ["puppy", None]}), tmp_path / "data" / "dog" / "y.parquet")
    data = str(tmp_path / "data")
    for labels, expected in ((None, ["cat", "cat", "puppy", "dog"]), ("dirs", ["cat", "cat", "dog", "dog"]),
                             ("none", [None] * 4)):
        plan = sources.plan([data], labels)
        got = [r["label_name"] for r in sorted(_read_all(plan), key=lambda r: r["source"])]
        assert got == expected, labels
        assert plan.label_names == sorted({label for label in expected if label}), labels
    # A Parquet file given as SRC has no folder label: its rows keep their own, or none.
    assert [r["label_name"] for r in _read_all(sources.plan([str(tmp_path / "data" / "dog" / "y.parquet")]))] == ["puppy", None]


def test_parquet_rows_over_the_byte_cap_are_rejected_without_being_expanded(tmp_path):
    """A dictionary-encoded column of one 4 MiB blob repeated is a file of a few hundred bytes; the reader turned
    every row into Python bytes before checking the cap (256 MiB for 64 rows). Over-cap rows are now rejected from
    their Arrow lengths, and rows under the cap still read."""
    import tracemalloc

    import pyarrow as pa

    from genart.data import sources

    blob, png = b"\0" * (4 << 20), corpus._png(Image.new("RGB", (8, 8)))
    path = tmp_path / "bomb.parquet"
    pq.write_table(pa.table({"image": [png] + [blob] * 31 + [png]}), path, compression="zstd")
    assert path.stat().st_size < 10_000
    plan = sources.plan([str(path)])
    tracemalloc.start()
    try:
        records = [r for unit in plan.units for t in sources.read_unit(unit, max_bytes=1 << 20) for r in t.to_pylist()]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["data"] for r in records] == [png] + [None] * 31 + [png]
    assert all(r["error"] == f"file too large: {4 << 20} bytes > cap {1 << 20}" for r in records[1:-1])
    assert peak < 16 << 20, peak  # Python objects: before, 31 copies of the blob (124 MiB)
    # and Arrow's own memory, in a fresh process (its pool's peak is per process): measured 72 MiB at 8 rows a read
    # (8 copies of the blob and the decoding's buffers), 136 MiB at 64 (all 31), 16 MiB at 1
    code = ("import sys, pyarrow as pa\nfrom genart.data import sources\n"
            "plan = sources.plan([sys.argv[1]])\n"
            "n = sum(len(t) for u in plan.units for t in sources.read_unit(u, max_bytes=1 << 20))\n"
            "print(n, pa.default_memory_pool().max_memory())\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    rows, arrow_peak = map(int, result.stdout.split())
    assert rows == 33 and arrow_peak < 100 << 20, (rows, arrow_peak, result.stderr[-2000:])


def test_a_12_bit_tiff_is_scaled_by_its_depth():
    """Pillow opens a 12-bit grey TIFF (12 bits a sample, packed, as scanners and cameras write them) as I;16 with
    values 0..4095; scaled as 16-bit, its white came out nearly black (16 of 255)."""
    import io
    import struct

    def tiff12(side: int, value: int) -> bytes:
        bits = format(value, "012b") * side * side  # every pixel `value`; rows end on a byte for an even side
        pixels = int(bits, 2).to_bytes(len(bits) // 8, "big")
        tags = {256: side, 257: side, 258: 12, 259: 1, 262: 1, 273: 0, 277: 1, 278: side, 279: len(pixels)}
        pixels_at = 8 + 2 + 12 * len(tags) + 4  # header, tag count, the tags, next-IFD offset
        ifd = b"".join(struct.pack("<HHII", tag, 4, 1, pixels_at if tag == 273 else v) for tag, v in tags.items())
        return b"II*\x00" + struct.pack("<IH", 8, len(tags)) + ifd + b"\x00" * 4 + pixels

    for value, grey in ((4095, 255), (2048, 128), (0, 0)):
        data = tiff12(4, value)
        assert Image.open(io.BytesIO(data)).mode == "I;16"
        assert images.decode_image(data).getpixel((1, 1)) == (grey,) * 3, value
