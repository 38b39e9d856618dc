"""`genart index`: embed every image of a dataset, folder, archive or s3:// prefix into a searchable index folder.

    genart index --input data/synth --features critic:results/runs/critic --output indexes/synth
    genart index --input s3://bucket/art --features inception:inception_v3.pth --output s3://bucket/idx

read (tasks) -> decode, crop + resize to the feature input, thumbnail (tasks) -> embed (actor pool) -> write a
vector shard (tasks). The driver then merges the shards into vectors.npy, metadata.parquet, thumbnails.parquet and
faiss.index, and writes index.json last. Shards are kept: a rerun embeds only inputs no shard holds (incremental
after adding images, and resumable after a crash); a bad input goes to errors.jsonl and the rest goes on.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genart import storage
from genart.data import images, sources
from genart.errors import UserError, one_line
from genart.infer import naming, output, stages

INDEX_VERSION = 1
THUMB_SIDE = 96  # px, square thumbnails for contact sheets and serving
FLAT_MAX = 50_000  # nn="auto": exact search below this many vectors, HNSW above (see bench/bench_index.py)
# efSearch 512: recall@10 0.95-0.98 at 100k 128-d clustered random vectors (a hard case), p50 < 1 ms (bench_index.py)
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 512
SHARDS = "shards"

WORK_SCHEMA = pa.schema([
    ("source", pa.string()),  # where the image came from (path, s3 URI, "archive!member", "file#row")
    ("key", pa.string()),  # = source: the shard key that makes a rerun skip it
    ("error", pa.string()),
    ("id", pa.string()),  # first 16 hex of the decoded pixels' sha256 (a prepared dataset's own id)
    ("label", pa.string()),  # folder or dataset label name, else null
    ("width", pa.int32()),  # of the decoded image
    ("height", pa.int32()),
    ("pixels", pa.binary()),  # uint8 (S, S, 3): the feature network's input, already cropped and resized
    ("thumbnail", pa.binary()),  # JPEG, THUMB_SIDE square
])
SHARD_SCHEMA = pa.schema([f for f in WORK_SCHEMA if f.name not in ("error", "pixels")]
                         + [pa.field("vector", pa.list_(pa.float32()))])
METADATA_COLUMNS = ["id", "source", "label", "width", "height"]


def square_pixels(img, size: int) -> np.ndarray:
    """A decoded image -> uint8 (S, S, 3) through `images.model_input`: the one crop + resize, for index and query."""
    x = images.model_input(img, size)  # (3, S, S) float32, exact multiples of 1/255 (8-bit Lanczos)
    return (x.transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)


def thumbnail(img) -> bytes:
    return images.encode(images.resize_square(img, THUMB_SIDE), "jpeg", quality=85)


def decode_batch(batch: pa.Table, size: int, skip_ref, max_pixels: int) -> pa.Table:
    """RAW records -> WORK rows; inputs already in a shard (`skip_ref`, Parquet inputs read whole) are dropped."""
    skip = stages.get_cached(skip_ref) if skip_ref is not None else ()
    rows = []
    for rec in batch.to_pylist():
        if rec["source"] in skip:
            continue
        row = {"source": rec["source"], "key": rec["source"], "error": rec["error"], "label": rec["label_name"]}
        if not row["error"]:
            try:
                img = images.decode_image(rec["data"], max_pixels)
                row.update(id=images.pixel_sha256(img)[:16], width=img.width, height=img.height,
                           pixels=square_pixels(img, size).tobytes(), thumbnail=thumbnail(img))
            except Exception as exc:  # noqa: BLE001 - one odd image must never stop the job
                row["error"] = stages.decode_error(exc)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


class Embedder:
    """WORK rows -> shard rows with an L2-normalised feature vector; the extractor is built once per actor."""

    def __init__(self, features: str, size: int, threads: int = 1, use_gpu: bool = False):
        import torch

        from genart.evaluate.features import build_extractor

        torch.set_num_threads(max(1, threads))
        self.size = size
        self.extractor = build_extractor(features, device="cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        good = [r for r in rows if not r["error"]]
        if good:
            pixels = np.stack([np.frombuffer(r["pixels"], np.uint8).reshape(self.size, self.size, 3) for r in good])
            try:
                vectors = normalize(self.extractor(pixels))  # (N, D)
                for row, vec in zip(good, vectors):
                    row["vector"] = vec.tolist()
            except Exception as exc:  # noqa: BLE001 - reported per row, the job goes on
                for row in good:
                    row["error"] = f"embed failed: {one_line(exc)}"
        for row in rows:
            row.pop("pixels")
        schema = SHARD_SCHEMA.append(pa.field("error", pa.string()))
        return pa.Table.from_pylist(rows, schema=schema)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows to unit length, so inner product = cosine similarity (a zero vector stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def write_batch(batch: pa.Table, out: str) -> pa.Table:
    """Good rows -> one complete Parquet shard under out/shards; returns the statuses."""
    errors = batch.column("error").to_pylist()
    good = [i for i, e in enumerate(errors) if e is None]
    if good:
        try:
            output.write_shard(storage.join(out, SHARDS), batch.take(good).drop_columns(["error"]))
        except Exception as exc:  # noqa: BLE001 - the rows stay missing; a rerun retries them
            for i in good:
                errors[i] = f"write failed: {one_line(exc)}"
    return pa.table({"source": batch.column("source"), "key": batch.column("key"), "error": errors},
                    schema=stages.STATUS_SCHEMA)


# ---------------------------------------------------------------- the nearest-neighbour index


def build_nn(vectors: np.ndarray, kind: str = "auto"):
    """A faiss index over unit vectors (inner product): exact (flat) or HNSW; row i of `vectors` is faiss id i."""
    import faiss

    if kind not in ("auto", "flat", "hnsw"):
        raise UserError(f"--nn {kind}: use auto, flat or hnsw")
    dim = vectors.shape[1]
    if kind == "flat" or (kind == "auto" and len(vectors) <= FLAT_MAX):
        nn = faiss.IndexFlatIP(dim)
    else:
        nn = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        nn.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        nn.hnsw.efSearch = HNSW_EF_SEARCH
    nn.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return nn


def nn_bytes(nn) -> bytes:
    import faiss

    return faiss.serialize_index(nn).tobytes()


def nn_from_bytes(data: bytes):
    import faiss

    nn = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    if hasattr(nn, "hnsw"):
        nn.hnsw.efSearch = HNSW_EF_SEARCH  # not serialised: a search-time setting
    return nn


def _npy_bytes(x: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


# ---------------------------------------------------------------- the job


def _start(out: str, run: dict, overwrite: bool) -> None:
    """Record the run; a rerun must use the same features (vectors of two models never mix in one index)."""
    run_uri = storage.join(out, "run.json")
    ours = (SHARDS, "run.json", "index.json", "faiss.index", "vectors.npy", "metadata.parquet", "thumbnails.parquet",
            "errors.jsonl")
    has_run = storage.exists(run_uri)
    if has_run and overwrite:  # only an index's own files, and only in a folder that is an index
        for name in ours:
            storage.remove(storage.join(out, name))
    elif has_run:
        stored = json.loads(storage.read_text(run_uri))
        if stored != run:
            diff = output.first_difference(stored, run)
            raise UserError(f"{out} is an index of another input or feature model ({diff}); "
                            "pass --overwrite to rebuild it, or choose another --output")
    # a folder that was an index keeps what else is in it (a --sheet PNG, notes) through an --overwrite rebuild
    if not has_run and storage.exists(out) and storage.find(out):
        raise UserError(f"{out} holds files that are not a genart index; choose an empty --output")
    storage.check_writable(out)
    storage.remove(storage.join(out, "index.json"))  # incomplete until this run finishes
    storage.write_text(run_uri, json.dumps(run, indent=2, sort_keys=True) + "\n")


def _done_sources(out: str) -> set[str]:
    shard_dir = storage.join(out, SHARDS)
    done: set[str] = set()
    for uri in output.shards(shard_dir):
        done.update(output.read_shard(uri, ["key"]).column("key").to_pylist())
    return done


def build_index(src: str, out: str, features: str = "inception", inception_weights: str | None = None,
                nn: str = "auto", max_pixels: int = images.DEFAULT_MAX_PIXELS, run=None) -> dict:
    """Embed every image under `src` (what is not embedded yet) and (re)build the index at `out`."""
    from genart.evaluate.features import build_extractor, parse_features
    from genart.infer import RunOptions
    from genart.infer.pipeline import drain, pipeline_context

    run = run or RunOptions(batch_size=32)
    build_nn(np.zeros((1, 1), np.float32), nn)  # a bad --nn fails before any work
    started = time.time()
    spec = parse_features(features, inception_weights)
    extractor = build_extractor(spec, device="cpu")
    described = extractor.describe()
    size = extractor.input_size
    del extractor
    output.check_outside(src, out)
    plan = sources.plan([src])  # a bad --input fails here, before run.json records it
    planned = {source for source, _ in sources.input_names(plan)}
    _start(out, {"input": src, "features": described["identity"], "nn": nn}, run.overwrite)
    done = _done_sources(out) & planned
    todo = naming.prune_plan(plan, lambda s, r: s not in done) if done else plan
    tally = output.Tally()
    with pipeline_context():
        import ray

        if todo.units or todo.failures:
            skip_ref = ray.put(done) if done and any(u.kind == "parquet" for u in todo.units) else None
            raw, _ = sources.read_images([src], max_bytes=images.file_byte_cap(max_pixels), the_plan=todo)
            ds = raw.map_batches(decode_batch, batch_size=run.batch_size, batch_format="pyarrow",
                                 fn_kwargs=dict(size=size, skip_ref=skip_ref, max_pixels=max_pixels))
            ds = ds.map_batches(Embedder, **run.model_stage(features=spec.text, size=size, threads=run.threads,
                                                            use_gpu=run.gpus_per_worker > 0))
            ds = ds.map_batches(write_batch, batch_size=256, batch_format="pyarrow", fn_kwargs={"out": out})
            drain(ds, tally, output.Progress("index", len(planned) - len(done), run.progress), run.stall_timeout_s,
                  "what is embedded is kept: run the same command again to embed the rest (if one batch can take "
                  "that long, with a longer --stall-timeout)")
    embedded = len(done) + tally.written
    if embedded + tally.errors != plan.num_inputs:
        raise RuntimeError(f"index lost track of inputs: {plan.num_inputs} planned, {embedded} embedded, {tally.errors} errors")
    merged = _merge(out, planned, nn)
    seconds = time.time() - started
    manifest = {
        "version": INDEX_VERSION, "input": src, "output": out, "features": {**described, "spec": spec.text}, "nn": merged["nn"],
        "dim": merged["dim"], "size": merged["size"],
        "counts": {"inputs": plan.num_inputs, "embedded": embedded, "errors": tally.errors, "already_embedded": len(done),
                   "embedded_this_run": tally.written, "duplicates": merged["duplicates"],
                   "removed": merged["removed"]},
        "error_reasons": dict(tally.reasons), "seconds": round(seconds, 2),
        "images_per_second": round((tally.written + tally.errors) / seconds, 2) if seconds else 0.0,
    }
    storage.write_text(storage.join(out, "errors.jsonl"), tally.errors_jsonl())
    storage.write_text(storage.join(out, "index.json"), json.dumps(manifest, indent=2) + "\n")
    return manifest


def _merge(out: str, planned: set[str], nn_kind: str) -> dict:
    """All shards -> the index files, rows sorted by source; one row per id (identical pictures are kept once)."""
    shard_dir = storage.join(out, SHARDS)
    output.dedupe_shards(shard_dir)
    tables = [output.read_shard(u) for u in output.shards(shard_dir)]
    table = pa.concat_tables(tables) if tables else SHARD_SCHEMA.empty_table()
    before = table.num_rows
    table = table.filter(pa.compute.is_in(table.column("source"), value_set=pa.array(sorted(planned), pa.string())))
    removed = before - table.num_rows  # inputs gone from the source since they were embedded
    table = table.take(pa.compute.sort_indices(table, [("source", "ascending")]))
    seen: set[str] = set()
    keep = []
    for i, image_id in enumerate(table.column("id").to_pylist()):
        if image_id not in seen:
            seen.add(image_id)
            keep.append(i)
    duplicates = table.num_rows - len(keep)
    table = table.take(keep)
    if table.num_rows == 0:
        raise UserError(f"no image could be embedded (see {storage.join(out, 'errors.jsonl')})")
    vectors = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)  # (N, D)
    nn = build_nn(vectors, nn_kind)
    storage.write_bytes(storage.join(out, "vectors.npy"), _npy_bytes(vectors))
    storage.write_bytes(storage.join(out, "metadata.parquet"), _table_bytes(table.select(METADATA_COLUMNS)))
    storage.write_bytes(storage.join(out, "thumbnails.parquet"), _table_bytes(table.select(["id", "thumbnail"])))
    storage.write_bytes(storage.join(out, "faiss.index"), nn_bytes(nn))
    return {"nn": "hnsw" if hasattr(nn, "hnsw") else "flat", "dim": int(vectors.shape[1]), "size": int(len(vectors)),
            "duplicates": duplicates, "removed": removed}


def summary(manifest: dict) -> str:
    c = manifest["counts"]
    lines = [f"index: {manifest['size']} vectors ({manifest['dim']}-d {manifest['features']['name']}, {manifest['nn']}) "
             f"from {c['inputs']} inputs, {c['errors']} errors, in {manifest['seconds']:.1f}s",
             f"  embedded now: {c['embedded_this_run']}, already embedded: {c['already_embedded']}, "
             f"identical pictures kept once: {c['duplicates']}"]
    for reason, n in sorted(manifest.get("error_reasons", {}).items(), key=lambda kv: -kv[1]):
        lines.append(f"  - {n} x {reason}")
    lines.append(f"  index: {manifest['output']} (index.json, errors.jsonl)")
    return "\n".join(lines)
