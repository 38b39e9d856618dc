"""Stream a prepared dataset (local or s3://) as Ray Datasets of normalised tensors, for training and evaluation.

    ds = training_dataset("data/prepared", split="train", image_size=64)
    # columns: image float32 (3, H, W) in [-1, 1]; label int64 (-1 when unlabelled)

Reading is lazy and streamed block by block: memory stays bounded however large the dataset.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
from PIL import Image

from genart import runtime, storage
from genart.errors import UserError


def read_manifest(uri: str) -> dict:
    """The manifest of a prepared dataset; a clear error when `uri` is not one."""
    path = storage.join(uri, "manifest.json")
    if not storage.exists(path):
        raise UserError(f"{uri} is not a prepared dataset (no manifest.json); create one with `genart prepare`")
    return json.loads(storage.read_text(path))


def parquet_files(uri: str) -> list[str]:
    return [u for u in storage.listdir(uri) if u.rsplit("/", 1)[-1].startswith("part-") and u.endswith(".parquet")]


def _decode(png: bytes, size: int) -> np.ndarray:
    """PNG bytes -> (3, S, S) float32 in [-1, 1] through `images.model_input`, the crop + resize used everywhere."""
    from genart.data.images import model_input

    img = Image.open(io.BytesIO(png)).convert("RGB")
    if img.size == (size, size):
        return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return model_input(img, size) * 2.0 - 1.0


def training_dataset(uri: str, split: str | None = "train", image_size: int | None = None):
    """Ray Dataset of {"image": (3,S,S) float32 in [-1,1], "label": int64} rows for one split (None = all).

    No augmentation here: training augments batches on the workers (genart.train.augment), one implementation
    whether the split is cached or streamed.
    """
    manifest = read_manifest(uri)
    available = manifest["splits"].get(split, 0) if split else manifest["counts"]["written"]
    if available == 0:
        raise UserError(f"{uri}: the {split or 'whole'} split is empty ({manifest['splits']}); prepare more images or change --val-fraction")
    size = image_size or manifest.get("image_size")
    if not size:
        raise UserError(f"{uri} keeps original sizes; set data.image_size to train on it")

    def decode_batch(batch: pa.Table) -> dict:
        if split:
            batch = batch.filter(pa.compute.equal(batch.column("split"), split))
        pngs = batch.column("image").to_pylist()
        labels = batch.column("label").to_pylist()
        return {
            "image": np.stack([_decode(p, size) for p in pngs]) if pngs else np.zeros((0, 3, size, size), np.float32),
            "label": np.array([-1 if lab is None else lab for lab in labels], dtype=np.int64),
        }

    ds = parquet_dataset(uri, ["image", "label", "split"])
    # Output blocks of ~16 MB keep the stream fine-grained enough for Ray Data's memory budget to bite.
    rows_per_batch = max(1, min(256, (16 << 20) // (3 * size * size * 4)))
    return ds.map_batches(decode_batch, batch_format="pyarrow", batch_size=rows_per_batch)


def parquet_dataset(uri: str, columns: list[str]):
    """Ray Dataset of `columns` of the prepared dataset `uri`'s Parquet shards: one read task per shard, so no task
    holds more than one shard's bytes. Ray's own progress bars stay off (genart's lines count the images)."""
    import ray

    runtime.streaming_context()  # also picks Ray Data's V1 Parquet reader (see there why)
    fs, _ = storage.arrow_fs(uri)
    paths = [storage.arrow_fs(f)[1] for f in parquet_files(uri)]
    ctx = ray.data.DataContext.get_current()
    saved, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # the dataset copies the context as it is made
    try:
        return ray.data.read_parquet(paths, filesystem=fs, columns=columns, override_num_blocks=len(paths))
    finally:
        ctx.enable_progress_bars = saved


def num_labels(uri: str) -> int:
    return len(read_manifest(uri).get("labels") or {})


def label_names(uri_or_manifest: str | dict) -> list[str]:
    """Class names in label order, from a dataset's location or its manifest already read."""
    manifest = read_manifest(uri_or_manifest) if isinstance(uri_or_manifest, str) else uri_or_manifest
    labels = manifest.get("labels") or {}
    return [name for name, _ in sorted(labels.items(), key=lambda kv: kv[1])]
