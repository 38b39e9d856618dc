"""Art search for real: `genart index` on Ray Data over a few hundred images, similar / recommend, incremental reruns,
an S3 round trip on the loopback S3 server, and the memorisation audit."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from genart import storage
from genart.cli import main
from genart.data.synth import make_synth
from genart.errors import UserError
from genart.infer import RunOptions
from genart.models import REGISTRY
from genart.models.checkpoint import save_checkpoint
from genart.models.tiny import tiny_checkpoint
from genart.search.index import build_index
from genart.search.query import SearchIndex

GENRES = ("stripes", "grid", "noise", "gradient")  # synth's genres but circles (see `critic`)


@pytest.fixture(scope="module")
def critic(tmp_path_factory):
    # An untrained critic of the default width is still a real, deterministic feature map. Its pooled random features
    # tell most pictures apart, but not all: synth's "circles" (overlapping discs of similar colours) collide in
    # them (measured: a third of their 2x copies not first), a limit of untrained features, so they are left out.
    root = tmp_path_factory.mktemp("critic")
    return tiny_checkpoint(root / "critic", "critic", 32, ("a", "b"), base_channels=32, num_stages=3, embed_dim=128)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """~300 images in genre folders, plus three bad files."""
    root = tmp_path_factory.mktemp("art")
    make_synth(str(root), num=300, size=32, seed=3, genres=GENRES)
    (root / "noise" / "empty.png").write_bytes(b"")
    (root / "noise" / "notes.png").write_text("not an image")
    good = (root / "grid").glob("*.png").__next__().read_bytes()
    (root / "grid" / "truncated.png").write_bytes(good[: len(good) // 2])
    return str(root)


def _near_copy(path: str) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").resize((64, 64), Image.Resampling.NEAREST).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _run(args: list[str]) -> str:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _json(text: str) -> dict:
    return json.loads(text[text.index("{"):])


def test_index_similar_recommend_and_incremental(tmp_path, art, critic, ray_session):
    src = str(tmp_path / "art")
    shutil.copytree(art, src)
    held_back = sorted((tmp_path / "art" / "stripes").glob("*.png"))[:7]
    spare = tmp_path / "spare"
    spare.mkdir()
    for path in held_back:  # added after the first build
        shutil.move(str(path), spare / path.name)
    out = str(tmp_path / "idx")
    text = _run(["index", "--input", src, "--output", out, "--features", f"critic:{critic}", "--batch-size", "32"])
    manifest = json.loads((tmp_path / "idx" / "index.json").read_text())
    counts = manifest["counts"]
    assert counts["errors"] == 3 and counts["embedded"] == counts["inputs"] - 3 >= 290, text
    errors = [json.loads(line) for line in (tmp_path / "idx" / "errors.jsonl").read_text().splitlines()]
    assert sorted(os.path.basename(e["source"]) for e in errors) == ["empty.png", "notes.png", "truncated.png"]
    meta = pq.read_table(tmp_path / "idx" / "metadata.parquet").to_pylist()
    assert len(meta) == manifest["size"] == counts["embedded"] - counts["duplicates"]
    assert set(meta[0]) == {"id", "source", "label", "width", "height"}
    assert {m["label"] for m in meta} == set(GENRES)

    # similar: a 2x-resized, JPEG re-encoded copy of an indexed image finds that image (first for >= 90 % of them)
    idx = SearchIndex.open(out)
    ranks = []
    for target in meta[::5]:
        found = [h["id"] for h in idx.similar(_near_copy(target["source"]), 5)]
        ranks.append(found.index(target["id"]) if target["id"] in found else None)
    assert None not in ranks and sum(r == 0 for r in ranks) >= 0.95 * len(ranks), ranks
    target = meta[3]
    query = tmp_path / "query.jpg"
    query.write_bytes(_near_copy(target["source"]))
    sheet = tmp_path / "similar.png"
    result = _json(_run(["similar", "--index", out, "--image", str(query), "-k", "5", "--sheet", str(sheet)]))
    assert result["results"][0]["id"] == target["id"] and result["results"][0]["score"] > 0.99, result["results"][:2]
    assert len(result["results"]) == 5 and Image.open(sheet).size[0] > 6 * 96
    bad = CliRunner().invoke(main, ["similar", "--index", out, "--image", str(src) + "/noise/notes.png"])
    assert bad.exit_code == 2 and "notes.png" in bad.output

    # recommend: liked ids never come back; diversity 0 is plain nearest-to-the-mean order
    liked = [meta[0]["id"], meta[1]["id"]]
    result = _json(_run(["recommend", "--index", out, "--liked", ",".join(liked), "-k", "10",
                         "--sheet", str(tmp_path / "rec.png")]))
    ids = [r["id"] for r in result["results"]]
    assert len(ids) == 10 == len(set(ids)) and not set(ids) & set(liked)
    plain = [h["id"] for h in idx.recommend(liked, 10, diversity=0.0)]
    varied = idx.recommend(liked, 10, diversity=0.9)
    assert not set(plain) & set(liked)
    # a repeated liked id counts once, as the API's /v1/recommend drops repeats (it weighed more in the mean here)
    assert [h["id"] for h in idx.recommend([liked[0], *liked, liked[0]], 10, diversity=0.0)] == plain
    pair_sim = lambda hits: np.mean([idx.vectors[idx.row_of[a]] @ idx.vectors[idx.row_of[b]]  # noqa: E731
                                     for a in hits for b in hits if a != b])
    assert pair_sim([h["id"] for h in varied]) < pair_sim(plain)  # MMR trades closeness for variety

    # incremental: add the held-back images; only those are embedded
    for path in held_back:
        shutil.move(str(spare / path.name), path)
    _run(["index", "--input", src, "--output", out, "--features", f"critic:{critic}"])
    again = json.loads((tmp_path / "idx" / "index.json").read_text())["counts"]
    assert again["embedded_this_run"] == 7 and again["already_embedded"] == counts["embedded"]
    assert again["errors"] == 3  # the bad files are retried and reported again, never dropped
    assert SearchIndex.open(out).size == len(meta) + 7

    # a different feature model is refused on the same index
    other = tiny_checkpoint(tmp_path / "critic2", "critic", 32, ("a", "b"), base_channels=4, num_stages=2, embed_dim=32)
    result = CliRunner().invoke(main, ["index", "--input", src, "--output", out, "--features", f"critic:{other}"])
    assert result.exit_code == 2 and "another input or feature model" in result.output


def test_index_refuses_what_would_break_it_before_recording_the_run(tmp_path, critic):
    """An --output inside --input (the next run reads its own shards and thumbnails as inputs), inputs sharing a
    name (raw files beside a dataset prepared from them: every rerun died with "lost track of inputs"), a typo in
    --input (recorded in run.json, so the corrected command was refused) and --overwrite on a folder that is no
    index (its files were deleted): each a one-line error that leaves the folder as it was."""
    import pyarrow as pa

    src = tmp_path / "art"
    (src / "raw").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(src / "raw" / "a.png")
    features = f"critic:{critic}"
    with pytest.raises(UserError, match="inside --input"):
        build_index(str(src), str(src / "idx"), features=features)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    (src / "prepared").mkdir()
    pq.write_table(pa.table({"image": [buf.getvalue()], "source": [str(src / "raw" / "a.png")]}),
                   src / "prepared" / "part-00000.parquet")
    out = tmp_path / "idx"
    with pytest.raises(UserError, match="two inputs are both named .*a.png"):
        build_index(str(src), str(out), features=features)
    with pytest.raises(UserError, match="source not found"):
        build_index(str(tmp_path / "typo"), str(out), features=features)
    assert not out.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "errors.jsonl").write_text("my own notes")
    with pytest.raises(UserError, match="not a genart index"):
        build_index(str(src / "raw"), str(mine), features=features, run=RunOptions(overwrite=True))
    assert (mine / "errors.jsonl").read_text() == "my own notes"


def test_overwrite_rebuilds_an_index_folder_that_holds_other_files_too(tmp_path):
    """--overwrite removed the index's own files, then took the folder for a foreign one (a --sheet PNG, notes left
    beside the index) and refused to rebuild it: the old index gone, every rerun refused."""
    from genart.search import index as index_files

    out = tmp_path / "idx"
    out.mkdir()
    for name in ("run.json", "index.json", "vectors.npy", "faiss.index"):
        (out / name).write_text("{}")
    (out / "sheet.png").write_bytes(b"mine")
    index_files._start(str(out), {"input": "x"}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "sheet.png"]
    assert json.loads((out / "run.json").read_text()) == {"input": "x"}


def test_a_changed_feature_model_is_refused_at_every_query_and_thumbnails_are_read_once(tmp_path, critic, monkeypatch):
    """The extractor was kept before its identity check: the first query said the feature model changed, the next
    ones searched with it. Thumbnails were read lazily without a lock: concurrent first requests each parsed
    thumbnails.parquet (the playground asks for a dozen at once)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa

    manifest = {"features": {"spec": f"critic:{critic}", "identity": "another model"}}
    idx = SearchIndex(str(tmp_path), manifest, np.zeros((1, 4), np.float32), [{"id": "a" * 16}], nn=None)
    for _ in range(2):
        with pytest.raises(UserError, match="feature model .* changed"):
            idx.extractor  # noqa: B018

    pq.write_table(pa.table({"id": ["a" * 16], "thumbnail": [b"jpeg"]}), tmp_path / "thumbnails.parquet")
    reads, real_read = [], storage.read_bytes
    lock = threading.Lock()

    def slow_read(uri):
        with lock:
            reads.append(uri)
        time.sleep(0.05)  # a large file: the others arrive while it is read
        return real_read(uri)

    monkeypatch.setattr(storage, "read_bytes", slow_read)
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(idx.thumbnail, ["a" * 16] * 8 + ["b" * 16]))
    assert got == [b"jpeg"] * 8 + [None] and len(reads) == 1


def test_index_s3_round_trip(tmp_path, critic, s3_bucket, ray_session):
    folder = tmp_path / "imgs"
    make_synth(str(folder), num=40, size=32, seed=5, genres=GENRES)
    fs, _ = storage.fsspec_fs(f"s3://{s3_bucket}")
    fs.put(str(folder) + "/", f"{s3_bucket}/raw/", recursive=True)
    out = f"s3://{s3_bucket}/index"
    manifest = build_index(f"s3://{s3_bucket}/raw", out, features=f"critic:{critic}")
    assert manifest["counts"]["embedded"] == 40 and manifest["counts"]["errors"] == 0
    idx = SearchIndex.open(out)
    target = idx.metadata[7]
    assert target["source"].startswith(f"s3://{s3_bucket}/raw/")
    hits = idx.similar(storage.read_bytes(target["source"]), 3)
    assert hits[0]["id"] == target["id"] and hits[0]["score"] > 0.999
    assert idx.thumbnail(target["id"])[:2] == b"\xff\xd8"  # JPEG thumbnails for sheets and serving
    again = build_index(f"s3://{s3_bucket}/raw", out, features=f"critic:{critic}")
    assert again["counts"]["embedded_this_run"] == 0 and again["counts"]["already_embedded"] == 40


def test_audit_nearest_search_in_blocks_is_the_exact_search(monkeypatch):
    """The audit searches uint8 pixels a block of rows at a time (one float32 faiss index of 20,000 images and their
    mirrors at 128 px held ~16 GB); across blocks it must find what one exact search finds."""
    from genart.search import audit

    rng = np.random.default_rng(0)
    base, query = rng.integers(0, 256, (23, 4, 4, 3), dtype=np.uint8), rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    flat_b, flat_q = base.reshape(23, -1) / 255.0, query.reshape(7, -1) / 255.0
    squared = ((flat_q[:, None] - flat_b[None]) ** 2).sum(-1)  # (7, 23)
    order = np.argsort(squared, axis=1)[:, : audit.RELATIVE_K + 1]
    rms = np.sqrt(np.take_along_axis(squared, order, 1) / 48)
    for block in (3, 5, 4096):
        monkeypatch.setattr(audit, "BLOCK", block)
        relative, rows, nearest_rms = audit._nearest(query, base)
        assert list(rows) == list(order[:, 0])
        np.testing.assert_allclose(nearest_rms, rms[:, 0], rtol=1e-5)
        np.testing.assert_allclose(relative, rms[:, 0] / rms[:, 1:].mean(1), rtol=1e-5)
    features = rng.standard_normal((23, 8)).astype(np.float32)  # the embedding space: float rows as they are
    assert list(audit._nearest(features[:5] + 1e-3, features)[1]) == [0, 1, 2, 3, 4]


def _memorised_generator(folder, train_images: np.ndarray, steps: int = 150, augment: str | None = None) -> str:
    """A DCGAN generator fitted in a plain loop so that every latent lands on one of `train_images`: for each z the
    loss is the distance to the closest of them (a generator that has memorised a tiny set, mode by mode)."""
    fam = REGISTRY["dcgan"]
    cfg = fam.config_cls(latent_dim=16, base_channels=8)
    torch.manual_seed(0)
    nets = fam.build(cfg, 16, 0, inference=True)
    gen = nets["generator_ema"].train().requires_grad_(True)
    targets = torch.from_numpy(train_images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1)  # (8, 3, 16, 16)
    opt = torch.optim.Adam(gen.parameters(), lr=2e-3, betas=(0.5, 0.999))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            out = gen(torch.randn(16, cfg.latent_dim))  # (16, 3, 16, 16)
            loss = ((out[:, None] - targets[None]) ** 2).mean(dim=(2, 3, 4)).min(dim=1).values.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    config = {"model": cfg.model_dump(mode="json"), "data": {"augment": augment}}  # as training writes it
    save_checkpoint(str(folder), {"generator_ema": gen.eval().requires_grad_(False)}, {},
                    {"family": "dcgan", "step": steps, "config": config, "image_size": 16, "label_names": []})
    return str(folder)


def _fresh_generator(folder) -> str:
    return tiny_checkpoint(folder, "dcgan", 16, seed=1, full_size=True, latent_dim=16, base_channels=8)


def test_audit_flags_a_memorising_generator_not_a_fresh_one(tmp_path, critic, ray_session):
    from genart.data.prepare import PrepareOptions, prepare
    from genart.evaluate.preprocess import real_pixels
    from genart.search.audit import audit

    raw = tmp_path / "raw"
    make_synth(str(raw), num=160, size=16, seed=11, genres=GENRES)
    data = str(tmp_path / "data")
    prepare([str(raw)], data, PrepareOptions(size=16, val_fraction=0.25), progress=False)
    train = [r for r in _rows(data) if r["split"] == "train"][:8]
    memorised = _memorised_generator(tmp_path / "memorised", np.stack([real_pixels(r["image"], 16) for r in train]))
    fresh = _fresh_generator(tmp_path / "fresh")

    copied = audit(memorised, data, num=64, features=f"critic:{critic}", out=str(tmp_path / "audit-m"))
    clean = audit(fresh, data, num=64, features=f"critic:{critic}", out=str(tmp_path / "audit-f"))
    assert copied["copy_share"] >= 0.9, copied["spaces"]
    assert clean["copy_share"] <= 0.1, clean["spaces"]
    # Generators train on mirror images too: one that draws its training images mirrored is copying as well.
    pixels = np.stack([real_pixels(r["image"], 16) for r in train])
    mirrored = audit(_memorised_generator(tmp_path / "mirrored", pixels[:, :, ::-1].copy()), data, num=64,
                     features=f"critic:{critic}")
    assert mirrored["copy_share"] >= 0.9 and mirrored["closest"][0]["mirrored"], mirrored["spaces"]
    # A generator trained with data.augment=dihedral (the shipped vqvae config) also saw them turned a quarter
    turned = audit(_memorised_generator(tmp_path / "turned", np.rot90(pixels, 1, axes=(1, 2)).copy(), augment="dihedral"),
                   data, num=64, features=f"critic:{critic}")
    assert turned["copy_share"] >= 0.9 and turned["closest"][0]["view"] == "turned 90", turned["spaces"]
    print("audit copy shares: memorised", copied["spaces"], "fresh", clean["spaces"])
    assert copied["closest"][0]["train_id"] in {r["id"] for r in train}
    assert copied["val_images"] >= 20 and copied["train_images"] >= 90
    for name in ("summary.json", "histogram.png", "pairs.png"):
        assert (tmp_path / "audit-m" / name).stat().st_size > 0
    assert Image.open(tmp_path / "audit-m" / "histogram.png").size[0] >= 800

    text = _run(["audit", "--model", fresh, "--data", data, "--num", "16", "--features", f"critic:{critic}",
                 "--output", str(tmp_path / "audit-cli")])
    assert "samples are closer to a training image" in text

    # train_then_deploy's gate: the memorising generator is refused, the fresh one allowed
    ttd = _load_workflow("train_then_deploy")
    cfg = ttd.TrainThenDeployConfig(data=data, audit={"num_generated": 32, "features": f"critic:{critic}",
                                                      "max_copy_share": 0.2})
    assert not ttd.audit_gate(cfg, memorised, str(tmp_path / "gate-m"))["allowed"]
    assert ttd.audit_gate(cfg, fresh, str(tmp_path / "gate-f"))["allowed"]


def _load_workflow(name: str):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "workflows", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"workflow_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the configs' annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _rows(data: str) -> list[dict]:
    from genart.data.read import parquet_files

    return [row for shard in parquet_files(data) for row in pq.read_table(shard, columns=["id", "image", "split"]).to_pylist()]
