"""Reference statistics of a real dataset (feature mean, covariance, a random subset for KID / precision-recall),
cached beside the dataset as `<data>/_genart_cache/ref-*.npz` and reused until the dataset or the extractor changes.

The cache key hashes the dataset (manifest.json + shard names and sizes), the extractor (network, weights hash,
input size, resize filter, precision), the resolution real images are brought to (the generator's), the preprocessing
version, the split and the row limit. A read-only dataset location falls back to $GENART_CACHE_DIR
(default ~/.cache/genart/reference).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genart import storage
from genart.data.read import parquet_files, read_manifest
from genart.errors import UserError
from genart.evaluate.metrics import Moments
from genart.evaluate.preprocess import PREPROCESS_VERSION, real_pixels

CACHE_FORMAT = 2  # 2: subsets ordered by subset_rank (1 kept the smallest ids: the val split)
CACHE_DIR_NAME = "_genart_cache"
# Real feature rows kept for KID and precision/recall: the SUBSET_CAP rows first by `subset_rank`, a uniformly random
# subset stable across runs and machines. Not the smallest ids: prepare puts the smallest ids in val (split_of).
SUBSET_CAP = 10_000
SPLITS = ("train", "val", "all")
BATCH_ROWS = 32


@dataclass
class Reference:
    mean: np.ndarray  # (D,) float64
    cov: np.ndarray  # (D, D) float64
    count: int  # real images the moments cover
    subset: np.ndarray  # (M, D) float32, M <= SUBSET_CAP, random order (by subset_rank)
    key: str
    path: str = ""  # where it was found or written
    hit: bool = False


def check_split(uri: str, split: str) -> str | None:
    """"train" | "val" | "all" -> the value of the shards' split column to keep (None = every row)."""
    if split not in SPLITS:
        raise UserError(f"--split {split!r}: use one of {', '.join(SPLITS)}")
    available = split_size(uri, split)
    if available < 2:
        raise UserError(f"{uri}: the {split} split has {available} images; evaluation needs at least 2 (try --split all)")
    return None if split == "all" else split


def split_size(uri: str, split: str) -> int:
    """Images in a prepared dataset's split, from its manifest ("all": every written image)."""
    manifest = read_manifest(uri)
    return manifest["counts"]["written"] if split == "all" else manifest["splits"].get(split, 0)


def dataset_hash(uri: str) -> str:
    """sha256 of manifest.json plus the shard names and sizes: changes whenever the dataset is re-prepared."""
    h = hashlib.sha256(storage.read_bytes(storage.join(uri, "manifest.json")))
    fs, path = storage.fsspec_fs(uri)
    shards = sorted(
        (info["name"].rsplit("/", 1)[-1], int(info.get("size") or 0))
        for info in fs.ls(path, detail=True)
        if info["name"].rsplit("/", 1)[-1].startswith("part-") and info["name"].endswith(".parquet")
    )
    h.update(json.dumps(shards).encode())
    return h.hexdigest()


def cache_key(uri: str, identity: str, split: str, limit: int | None, resolution: int) -> str:
    """Everything the statistics depend on; `resolution`: the side real images are cropped and resized to first."""
    parts = {"format": CACHE_FORMAT, "dataset": dataset_hash(uri), "features": identity, "split": split,
             "limit": limit, "subset_cap": SUBSET_CAP, "resolution": int(resolution), "preprocess": PREPROCESS_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def fallback_cache_dir() -> str:
    return os.environ.get("GENART_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "genart", "reference")


def cache_paths(uri: str, name: str, key: str) -> list[str]:
    """Beside the dataset first, then the local fallback folder."""
    filename = f"ref-{name}-{key}.npz"
    return [storage.join(uri, CACHE_DIR_NAME, filename), os.path.join(fallback_cache_dir(), filename)]


def load_cached(uri: str, name: str, key: str) -> Reference | None:
    for path in cache_paths(uri, name, key):
        try:
            if not storage.exists(path):
                continue
            with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as npz:
                ref = Reference(npz["mean"], npz["cov"], int(npz["count"]), npz["subset"], key, path, hit=True)
            if ref.cov.shape != (len(ref.mean), len(ref.mean)) or ref.subset.shape[1:] != ref.mean.shape:
                raise ValueError("inconsistent shapes")
            return ref
        except Exception as exc:  # noqa: BLE001 - a damaged cache file is recomputed, never trusted
            warnings.warn(f"ignoring unreadable reference cache {path}: {type(exc).__name__}: {exc}")
    return None


def save(uri: str, name: str, ref: Reference) -> str:
    """Write the npz beside the dataset, or in the fallback folder if that fails; returns where it went."""
    buf = io.BytesIO()
    np.savez(buf, mean=ref.mean, cov=ref.cov, count=np.int64(ref.count), subset=ref.subset.astype(np.float32))
    errors = []
    for path in cache_paths(uri, name, ref.key):
        try:
            storage.write_bytes(path, buf.getvalue())
            return path
        except Exception as exc:  # noqa: BLE001 - read-only dataset location: try the next place
            errors.append(f"{path}: {type(exc).__name__}")
    warnings.warn(f"reference statistics not cached ({'; '.join(errors)})")
    return ""


def subset_rank(image_id: str) -> str:
    """The order real rows join a subset in: a hash of the id, independent of the split (which the id's own leading
    digits decide), so any prefix of this order is a uniform sample of every split it draws from."""
    return hashlib.sha256(b"subset:" + str(image_id).encode()).hexdigest()


def subset_rows(uri: str, split: str, max_real: int | None = None) -> int | None:
    """How many real rows the subset of `split` will hold (precision/recall and KID use it), from the manifest's
    split counts, before any feature is computed: metric names carry it (registry.Protocol.num_real). None when
    `uri` is not a prepared dataset."""
    try:
        splits = read_manifest(uri).get("splits") or {}
    except UserError:
        return None
    rows = sum(int(splits.get(s, 0)) for s in (("train", "val") if split == "all" else (split,)))
    return min(rows, SUBSET_CAP, max_real or rows)


class Accumulator:
    """Streams (ids, features) batches into moments plus the SUBSET_CAP rows first by `subset_rank`."""

    def __init__(self) -> None:
        self.moments = Moments()
        self.ids = np.zeros(0, dtype="<U32")
        self.ranks = np.zeros(0, dtype="<U64")
        self.rows: np.ndarray | None = None

    def update(self, ids, features: np.ndarray) -> None:
        if len(features) == 0:
            return
        self.moments.update(features)
        ids = np.asarray(ids).astype(str)
        self.ids = np.concatenate([self.ids, ids])
        self.ranks = np.concatenate([self.ranks, np.array([subset_rank(i) for i in ids], dtype="<U64")])
        feats = np.asarray(features, np.float32)
        self.rows = feats if self.rows is None else np.concatenate([self.rows, feats])
        if len(self.ids) > 2 * SUBSET_CAP:
            self._prune()

    def _prune(self) -> None:
        order = np.argsort(self.ranks, kind="stable")[:SUBSET_CAP]
        self.ids, self.ranks, self.rows = self.ids[order], self.ranks[order], self.rows[order]

    def result(self, key: str) -> Reference:
        if self.moments.count < 2:
            raise UserError("evaluation needs at least 2 real images; the dataset split has fewer")
        self._prune()
        return Reference(self.moments.mean, self.moments.cov, self.moments.count, self.rows, key)


def chosen_ids(uri: str, split_value: str | None, limit: int | None) -> set[str] | None:
    """The ids of `limit` random rows of the split (first by `subset_rank`), or None for every row."""
    if limit is None:
        return None
    fs, _ = storage.arrow_fs(uri)
    ids: list[str] = []
    for shard in parquet_files(uri):
        table = pq.read_table(storage.arrow_fs(shard)[1], filesystem=fs, columns=["id", "split"])
        if split_value:
            table = table.filter(pc.equal(table.column("split"), split_value))
        ids.extend(table.column("id").to_pylist())
    return set(sorted(ids, key=subset_rank)[:limit])


def select_rows(batch: pa.Table, split_value: str | None, ids: set[str] | None) -> pa.Table:
    """Keep the rows of the wanted split (and of the chosen ids when limited)."""
    if split_value:
        batch = batch.filter(pc.equal(batch.column("split"), split_value))
    if ids is not None and batch.num_rows:
        batch = batch.filter(pa.array([i in ids for i in batch.column("id").to_pylist()]))
    return batch


def decode_rows(batch: pa.Table, resolution: int) -> np.ndarray:
    """PNG bytes (any stored size, square or not) -> uint8 (B, R, R, 3): `preprocess.real_pixels` of each row."""
    return np.stack([real_pixels(png, resolution) for png in batch.column("image").to_pylist()])


def compute_local(uri: str, split: str, extractor, limit: int | None, key: str, resolution: int) -> Reference:
    """Featurise the real images in this process (no Ray): for `score_checkpoint` inside a training worker."""
    split_value = check_split(uri, split)
    ids = chosen_ids(uri, split_value, limit)
    acc = Accumulator()
    fs, _ = storage.arrow_fs(uri)
    for shard in parquet_files(uri):
        with fs.open_input_file(storage.arrow_fs(shard)[1]) as f:
            for record_batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=["id", "image", "split"]):
                batch = select_rows(pa.Table.from_batches([record_batch]), split_value, ids)
                if batch.num_rows:
                    acc.update(batch.column("id").to_pylist(), extractor(decode_rows(batch, resolution)))
    return acc.result(key)


def get_local(uri: str, split: str, extractor, resolution: int, limit: int | None = None) -> Reference:
    """Cached reference statistics of the split (every row unless `limit`), computed in-process on a miss."""
    key = cache_key(uri, extractor.stats_key, split, limit, resolution)
    ref = load_cached(uri, extractor.name, key)
    if ref is None:
        ref = compute_local(uri, split, extractor, limit, key, resolution)
        ref.path = save(uri, extractor.name, ref)
    return ref
