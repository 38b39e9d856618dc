"""MNIST-style idx pairs as a `genart prepare` source: labels, pixels, splits, broken files, the real MNIST test split."""

from __future__ import annotations

import collections
import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from genart import storage
from genart.cli import main
from genart.data import images, sources
from genart.data import prepare as prep

# ../shared/data beside the checkout (as CI has it); GENART_MNIST points elsewhere
MNIST = os.environ.get("GENART_MNIST", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
# Digits in the MNIST test split (t10k-labels-idx1-ubyte), 0..9.
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def write_idx(folder, prefix: str, pixels: np.ndarray, labels: list[int] | None, gz: bool = True) -> str:
    """Write `prefix`-images-idx3-ubyte[.gz] (and -labels-idx1-ubyte[.gz]) as MNIST does; returns the images path."""
    os.makedirs(folder, exist_ok=True)
    opener, ext = (gzip.open, ".gz") if gz else (open, "")
    count, rows, cols = pixels.shape
    path = os.path.join(folder, f"{prefix}-images-idx3-ubyte{ext}")
    with opener(path, "wb") as f:
        f.write(struct.pack(">4I", 0x0803, count, rows, cols) + pixels.astype(np.uint8).tobytes())
    if labels is not None:
        with opener(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{ext}"), "wb") as f:
            f.write(struct.pack(">2I", 0x0801, len(labels)) + bytes(labels))
    return path


def digits(n: int, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """n distinct 28x28 grey pictures (noise, so no two are duplicates) and labels cycling 0..9."""
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8), [i % 10 for i in range(n)]


def _rows(dest: str) -> list[dict]:
    shards = sorted(p for p in os.listdir(dest) if p.endswith(".parquet"))
    return [row for p in shards for row in pq.read_table(os.path.join(dest, p)).to_pylist()]


def _rejected(dest: str) -> dict[str, str]:
    lines = storage.read_text(os.path.join(dest, "rejected.jsonl")).splitlines()
    return {json.loads(x)["source"]: json.loads(x)["reason"] for x in lines}


def test_prepare_idx_pair_labels_and_pixels_round_trip(tmp_path, ray_session):
    pixels, labels = digits(60)
    src = tmp_path / "mnist"
    images_path = write_idx(src, "t10k", pixels, labels)
    dest = str(tmp_path / "out")
    manifest = prep.prepare([str(src)], dest, prep.PrepareOptions(val_fraction=0.3), progress=False)

    assert manifest["counts"] == {"input": 60, "written": 60, "rejected": 0, "duplicates": 0, "near_duplicates": 0,
                                  "near_duplicates_dropped": 0}
    assert manifest["labels"] == {str(d): d for d in range(10)}
    assert manifest["sources"] == [images_path]  # the labels file is consumed by its images file, not an input
    rows = _rows(dest)
    assert len(rows) == 60 and manifest["splits"]["train"] > 0 and manifest["splits"]["val"] > 0
    for row in rows:
        index = int(row["source"].rsplit("#", 1)[1])
        assert row["source"] == f"{images_path}#{index}"
        assert row["label_name"] == str(labels[index]) and row["label"] == labels[index]
        assert row["split"] == prep.split_of(row["id"], 0.3)
        rgb = np.asarray(images.decode_image(row["image"]))  # grey -> RGB, lossless
        assert rgb.shape == (28, 28, 3)
        assert all(np.array_equal(rgb[..., c], pixels[index]) for c in range(3))


def test_prepare_idx_cli_resizes_and_plain_files_work(tmp_path, ray_session):
    pixels, labels = digits(30, seed=1)
    src = tmp_path / "raw"
    write_idx(src, "train", pixels, labels, gz=False)  # uncompressed, as Kaggle ships them
    dest = str(tmp_path / "out")
    result = CliRunner().invoke(main, ["prepare", str(src), "--out", dest, "--size", "32"])
    assert result.exit_code == 0, result.output
    assert "prepared 30 images" in result.output and "labels 10" in result.output
    rows = _rows(dest)
    assert len(rows) == 30 and all((r["width"], r["height"]) == (32, 32) for r in rows)
    assert collections.Counter(r["label_name"] for r in rows) == collections.Counter(str(d) for d in labels)


def test_idx_planning_pairs_and_label_options(tmp_path):
    pixels, labels = digits(5000)
    images_path = write_idx(tmp_path / "a", "t10k", pixels, labels)
    # The images file on its own finds its labels beside it; runs of IDX_IMAGES_PER_UNIT images per read task.
    plan = sources.plan([images_path])
    assert plan.num_inputs == 5000 and plan.failures == [] and plan.label_names == [str(d) for d in range(10)]
    assert [u.count for u in plan.units] == [2048, 2048, 904] and {u.kind for u in plan.units} == {"idx"}
    records = [r for u in plan.units for t in sources.read_unit(u) for r in t.to_pylist()]
    assert [r["label_name"] for r in records] == [str(x) for x in labels]
    assert all(r["error"] is None for r in records)
    assert np.array_equal(np.asarray(images.decode_image(records[4321]["data"]))[..., 0], pixels[4321])
    assert sources.plan([images_path], labels="none").label_names == []
    # What stylize and score name their outputs by, and what a --resume skips, are the reader's own sources
    # (before, idx units were opened as Parquet there: a stylize of MNIST files died at planning).
    from genart.infer import naming

    assert sources.input_names(plan) == [(r["source"], r["rel_path"]) for r in records]
    done = {records[7]["source"], records[3000]["source"]}
    left = naming.prune_plan(plan, lambda source, rel: source not in done)
    assert sum(u.count for u in left.units) == 5000 - 2
    assert {r["source"] for u in left.units for t in sources.read_unit(u) for r in t.to_pylist()} & done == set()
    # No labels file: unlabelled images. A labels file alone: one clear reject.
    lonely = write_idx(tmp_path / "b", "x", pixels[:3], None)
    assert sources.plan([lonely]).label_names == [] and sources.plan([lonely]).num_inputs == 3
    write_idx(tmp_path / "c", "y", pixels[:3], labels[:3])
    os.remove(tmp_path / "c" / "y-images-idx3-ubyte.gz")
    orphan = sources.plan([str(tmp_path / "c")])
    assert orphan.units == [] and orphan.failures[0]["reason"].startswith("bad idx file: a labels file without its")


def test_broken_idx_files_are_one_clear_reject_each(tmp_path):
    pixels, labels = digits(60)
    folder = tmp_path / "broken"
    cut = write_idx(folder, "cut", pixels, labels)  # gzip stream cut short
    with open(cut, "r+b") as f:
        f.truncate(os.path.getsize(cut) // 2)
    short = write_idx(folder, "short", pixels, labels, gz=False)  # plain file cut short
    with open(short, "r+b") as f:
        f.truncate(16 + 30 * 784 + 5)
    magic = write_idx(folder, "magic", pixels, labels)
    with gzip.open(magic, "wb") as f:
        f.write(struct.pack(">4I", 0x0801, 60, 28, 28) + pixels.tobytes())
    huge = write_idx(folder, "huge", pixels[:1], labels[:1])
    with gzip.open(huge, "wb") as f:
        f.write(struct.pack(">4I", 0x0803, 2**31, 28, 28))  # a header claiming 1.7 TB is refused before reading
    extra = write_idx(folder, "extra", pixels, labels)
    with gzip.open(extra, "wb") as f:
        f.write(struct.pack(">4I", 0x0803, 60, 28, 28) + pixels.tobytes() + b"\0" * 10)
    mismatch = write_idx(folder, "mismatch", pixels, labels[:59])
    good = write_idx(folder, "good", pixels[:10] // 2, labels[:10])

    plan = sources.plan([str(folder)])
    reasons = {f["source"]: f["reason"] for f in plan.failures}
    assert set(reasons) == {cut, short, magic, huge, extra, mismatch}
    assert all("\n" not in r and len(r) < 300 for r in reasons.values())
    assert reasons[cut].startswith("bad idx file: truncated or corrupt gzip stream")
    assert reasons[short] == ("bad idx file: truncated: header says 60 images of 28x28 (47040 bytes of pixels), "
                              "the file holds 23525 bytes; fetch it again")
    assert reasons[magic].startswith("bad idx file: magic number 0x00000801, expected 0x00000803")
    assert reasons[huge].startswith("bad idx file: header says 2147483648 images of 28x28: outside the caps")
    assert reasons[extra].startswith("bad idx file: trailing bytes")
    assert reasons[mismatch] == "bad idx file: mismatch-labels-idx1-ubyte.gz holds 59 labels for 60 images"
    assert [u.uri for u in plan.units] == [good] and plan.num_inputs == 10 + 6

    # Broken after planning (a file replaced mid-job): every image of the unit is a reject, never a crash.
    with gzip.open(good, "wb") as f:
        f.write(struct.pack(">4I", 0x0803, 10, 28, 28) + pixels[:4].tobytes())
    records = [r for t in sources.read_unit(plan.units[0]) for r in t.to_pylist()]
    assert len(records) == 10 and [r["error"] is None for r in records] == [True] * 4 + [False] * 6
    assert records[4]["error"] == "bad idx file: truncated at image 4"


def test_prepare_reports_a_truncated_idx_file_in_one_line(tmp_path, ray_session):
    pixels, labels = digits(20)
    src = tmp_path / "raw"
    write_idx(src, "good", pixels, labels)
    cut = write_idx(src, "cut", pixels, labels)
    with open(cut, "r+b") as f:
        f.truncate(os.path.getsize(cut) - 100)
    dest = str(tmp_path / "out")
    result = CliRunner().invoke(main, ["prepare", str(src), "--out", dest])
    assert result.exit_code == 0, result.output
    assert "prepared 20 images" in result.output and "1 x bad idx file" in result.output
    assert list(_rejected(dest)) == [cut]


def test_prepare_real_mnist_test_split(tmp_path, ray_session):
    """The real MNIST test split (must be there: a missing file is a failure), prepared as README shows."""
    assert os.path.isfile(os.path.join(MNIST, "t10k-images-idx3-ubyte.gz")), f"{MNIST} is missing the MNIST test split"
    dest = str(tmp_path / "mnist")
    manifest = prep.prepare([MNIST], dest, prep.PrepareOptions(size=32, val_fraction=0.1), progress=False)
    # Near duplicates are only reported by default. Handwritten digits at 28 px are finer than the perceptual hash
    # resolves, so thousands of distinct digits pair up (7,195 of 10,000 at the default threshold): not asserted.
    near = manifest["counts"].pop("near_duplicates")
    assert manifest["counts"] == {"input": 10_000, "written": 10_000, "rejected": 0, "duplicates": 0,
                                  "near_duplicates_dropped": 0}
    assert near == len(storage.read_text(os.path.join(dest, "near_duplicates.jsonl")).splitlines())
    assert manifest["labels"] == {str(d): d for d in range(10)}
    assert manifest["splits"]["val"] > 900 and sum(manifest["splits"].values()) == 10_000
    shards = sorted(p for p in os.listdir(dest) if p.endswith(".parquet"))
    table = pa.concat_tables(pq.read_table(os.path.join(dest, p), columns=["label", "width"]) for p in shards)
    assert table.num_rows == 10_000
    counts = collections.Counter(table.column("label").to_pylist())
    assert [counts[d] for d in range(10)] == MNIST_TEST_COUNTS
    assert set(table.column("width").to_pylist()) == {32}
