"""`genart audit`: does a generator copy its training images? Nearest training image of each sample, calibrated.

    genart audit --model results/runs/dcgan --data data/synth --num 500 --features critic:results/runs/critic --output audit/dcgan

Each sample's nearest training image, in any view the generator trained on (as it is or mirrored; also turned a
quarter, with data.augment=dihedral), is found in embedding space
(features centred on the training mean, unit length) and in pixel space (the generator's resolution). Distances
are relative, the nearest one over the mean of the next RELATIVE_K (Carlini et al. 2023): a flat picture near many
training images scores ~1, a copy ~0. What is "too close" is calibrated on the dataset's own val split, which the
generator never saw: the val images' nearest-training-image similarities are the baseline (Somepalli et al., CVPR
2023, "Diffusion Art or Digital Forgery?"). A sample closer to a training image than the `quantile` of that
baseline, in either space, counts as a copy; `copy_share` is their share of the samples.
Writes summary.json, histogram.png (samples vs the val baseline) and pairs.png (the closest sample/training pairs).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genart import storage
from genart.data.read import parquet_files, read_manifest
from genart.errors import UserError
from genart.evaluate.preprocess import real_pixels
from genart.search.index import normalize

SAMPLE_BATCH = 64
MAX_REAL = 20_000  # training images compared per split (a stable random subset: the smallest ids, ids are hashes)
PAIRS_SHOWN = 16
RELATIVE_K = 10  # neighbours behind the nearest that the pixel distance is measured against
BLOCK = 4096  # rows searched at once (x 49,152 floats at 128 px: 0.8 GB)


def _real(data: str, split: str, resolution: int, limit: int) -> tuple[list[str], np.ndarray]:
    """(ids, uint8 (N, R, R, 3)) of one split, at the generator's resolution (the evaluation's real-image path)."""
    fs, _ = storage.arrow_fs(data)
    rows: list[tuple[str, bytes]] = []
    for shard in parquet_files(data):
        table = pq.read_table(storage.arrow_fs(shard)[1], filesystem=fs, columns=["id", "image", "split"])
        table = table.filter(pa.compute.equal(table.column("split"), split))
        rows.extend(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))
        rows = sorted(rows)[:limit]  # bounded memory: keep only the `limit` smallest ids seen so far
    if len(rows) < 2:
        raise UserError(f"{data}: the {split} split has {len(rows)} images; audit needs >= 2 (prepare with --val-fraction)")
    return [r[0] for r in rows], np.stack([real_pixels(png, resolution) for _, png in rows])


def _views(augment: str | None) -> list[tuple[str, int, bool]]:
    """The views of a training image a generator trained with `augment` saw: (name, quarter turns, mirrored). Every
    generative family flips by default; "dihedral" adds the quarter turns (train.augment.augment_batch)."""
    turns = range(4) if augment == "dihedral" else range(1)
    return [(" and ".join([f"turned {90 * k}"] * bool(k) + ["mirrored"] * flip) or "as is", k, flip)
            for flip in (False, True) for k in turns]


def _view(pixels: np.ndarray, turns: int, mirrored: bool) -> np.ndarray:
    """(N, R, R, 3) turned `turns` quarters, then mirrored (the order augment_batch applies them)."""
    pixels = np.rot90(pixels, turns, axes=(1, 2)) if turns else pixels
    return pixels[:, :, ::-1] if mirrored else pixels


def _features(extractor, pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([extractor(pixels[i:i + SAMPLE_BATCH]) for i in range(0, len(pixels), SAMPLE_BATCH)])


def _centered(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    # ReLU features are non-negative, so their raw directions crowd together; centred on the training mean they spread out.
    return normalize(x - mean)


def _rows(x: np.ndarray) -> np.ndarray:
    """Rows to search: features as they are; uint8 pixels (N, R, R, 3) flattened to float32 in [0, 1]."""
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float32) / 255.0
    return np.ascontiguousarray(x, dtype=np.float32)


def _nearest(query: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(relative distance, row, RMS distance) of each query row's nearest base row, found exactly.

    relative = the RMS distance to the nearest over the mean RMS distance to the next RELATIVE_K (Carlini et al. 2023).
    Pixels stay uint8 and are searched BLOCK rows at a time on each side: as one float32 faiss index, 20,000
    training images and their mirrors at 128 px took ~16 GB before the search began.
    """
    import faiss

    k = min(len(base), RELATIVE_K + 1)
    squared = np.empty((len(query), k), np.float32)
    rows = np.empty((len(query), k), np.int64)
    for q0 in range(0, len(query), BLOCK):
        q = _rows(query[q0:q0 + BLOCK])
        found = [(d, i + b0) for b0 in range(0, len(base), BLOCK)
                 for d, i in [faiss.knn(q, _rows(base[b0:b0 + BLOCK]), min(k, len(base) - b0))]]
        d, i = np.concatenate([f[0] for f in found], 1), np.concatenate([f[1] for f in found], 1)
        best = np.argsort(d, axis=1, kind="stable")[:, :k]  # the k nearest over every block
        squared[q0:q0 + BLOCK], rows[q0:q0 + BLOCK] = np.take_along_axis(d, best, 1), np.take_along_axis(i, best, 1)
    rms = np.sqrt(np.maximum(squared, 0) / int(np.prod(base.shape[1:])))  # squared L2 sums -> RMS per value, (N, k)
    relative = rms[:, 0] / np.maximum(rms[:, 1:].mean(axis=1), 1e-6) if k > 1 else rms[:, 0]
    return relative, rows[:, 0], rms[:, 0]


def audit(model: str, data: str, num: int = 256, features: str | None = "inception", inception_weights: str | None = None,
          quantile: float = 0.99, out: str | None = None, max_real: int = MAX_REAL) -> dict:
    """Sample `num` images (seeds 0..num-1) and measure how close each is to the training set; see the module doc."""
    from genart.evaluate.features import build_extractor
    from genart import models
    from genart.serve.inference import to_uint8

    if num < 1:
        raise UserError(f"--num {num}: must be >= 1")
    if not 0.5 <= quantile < 1.0:
        raise UserError(f"--quantile {quantile}: must be in [0.5, 1)")
    read_manifest(data)
    gen = models.load(model, family=models.GENERATIVE, command="audit")
    size = gen.image_size
    samples = np.concatenate([to_uint8(gen.sample(list(range(i, min(num, i + SAMPLE_BATCH)))))
                              for i in range(0, num, SAMPLE_BATCH)])  # (N, R, R, 3)
    train_ids, train = _real(data, "train", size, max_real)
    _, val = _real(data, "val", size, max_real)
    # Every generative family trains on mirror images too (flip augmentation, the default), so a memorised picture
    # can come out mirrored (and turned, with dihedral augmentation): samples and the val baseline alike are
    # compared with every view the generator saw.
    views = _views(((gen.meta.get("config") or {}).get("data") or {}).get("augment"))
    seen = np.concatenate([_view(train, turns, mirrored) for _, turns, mirrored in views])
    extractor = build_extractor(features, inception_weights)
    seen_f = _features(extractor, seen)
    mean = seen_f.mean(axis=0)
    spaces = {
        "embedding": (_centered(_features(extractor, samples), mean), _centered(_features(extractor, val), mean),
                      _centered(seen_f, mean)),
        "pixel": (samples, val, seen),  # uint8: searched in blocks
    }
    report = {"model": gen.meta.get("checkpoint"), "model_hash": gen.checkpoint_hash, "data": data, "num": num,
              "features": extractor.describe(), "quantile": quantile, "train_images": len(train),
              "val_images": len(val), "resolution": size, "spaces": {}}
    copied = np.zeros(num, bool)
    nearest = {}
    for name, (sample_x, val_x, train_x) in spaces.items():
        sample_v, sample_row, sample_raw = _nearest(sample_x, train_x)
        val_v, _, _ = _nearest(val_x, train_x)
        threshold = float(np.quantile(val_v, 1 - quantile))  # lower = closer
        flags = sample_v < threshold
        copied |= flags
        nearest[name] = (sample_v, sample_row, val_v, threshold, sample_raw)
        report["spaces"][name] = {
            "metric": f"{'feature (centred, unit length)' if name == 'embedding' else 'RMS pixel'} distance to the "
                      f"nearest training image / mean distance to the next {RELATIVE_K}",
            "threshold": round(threshold, 6), "copy_share": round(float(flags.mean()), 4),
            "samples_median": round(float(np.median(sample_v)), 6), "val_median": round(float(np.median(val_v)), 6),
        }
    report["copy_share"] = round(float(copied.mean()), 4)
    order = np.argsort(nearest["pixel"][0])[:PAIRS_SHOWN]  # the closest pairs in pixels: what a viewer calls a copy
    report["closest"] = [{"seed": int(i), "train_id": train_ids[int(nearest["pixel"][1][i]) % len(train)],
                          "view": views[int(nearest["pixel"][1][i]) // len(train)][0],
                          "mirrored": views[int(nearest["pixel"][1][i]) // len(train)][2],
                          "pixel_relative": round(float(nearest["pixel"][0][i]), 6),
                          "pixel_rms": round(float(nearest["pixel"][4][i]), 6),
                          "embedding_relative": round(float(nearest["embedding"][0][i]), 6), "copy": bool(copied[i])}
                         for i in order]
    if out:
        storage.write_bytes(storage.join(out, "histogram.png"), _histogram(nearest, quantile))
        storage.write_bytes(storage.join(out, "pairs.png"), _pairs(samples, seen, nearest["pixel"], order))
        storage.write_text(storage.join(out, "summary.json"), json.dumps(report, indent=2) + "\n")
        report["output"] = out
    return report


def _histogram(nearest: dict, quantile: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (name, (sample_v, _, val_v, threshold, _)) in zip(axes, nearest.items()):
        bins = np.histogram_bin_edges(np.concatenate([sample_v, val_v]), bins=30)
        ax.hist(val_v, bins=bins, alpha=0.6, density=True, label="val -> train (baseline)")
        ax.hist(sample_v, bins=bins, alpha=0.6, density=True, label="samples -> train")
        ax.axvline(threshold, color="red", linestyle="--", label=f"threshold (q={quantile})")
        ax.set_xlabel("nearest training image: " + ("relative feature distance" if name == "embedding" else "relative pixel distance"))
        ax.set_title(f"{name} space")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _pairs(samples: np.ndarray, train: np.ndarray, pixel: tuple, order: np.ndarray, side: int = 64) -> bytes:
    """Columns of (sample above, its nearest training image below), closest first."""
    from PIL import Image, ImageDraw

    values, rows = pixel[4], pixel[1]  # RMS distances: what the eye compares
    sheet = Image.new("RGB", (len(order) * (side + 6) + 6, 2 * side + 34), "white")
    draw = ImageDraw.Draw(sheet)
    for col, i in enumerate(order):
        x = 6 + col * (side + 6)
        sheet.paste(Image.fromarray(samples[i]).resize((side, side), Image.Resampling.NEAREST), (x, 4))
        sheet.paste(Image.fromarray(train[rows[i]]).resize((side, side), Image.Resampling.NEAREST), (x, side + 8))
        draw.text((x, 2 * side + 12), f"{values[i]:.3f}", fill="black")
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    return buf.getvalue()


def summary(report: dict) -> str:
    lines = [f"audit: {report['copy_share']:.1%} of {report['num']} samples are closer to a training image than "
             f"{report['quantile']:.0%} of val images are ({report['train_images']} train, {report['val_images']} val)"]
    for name, s in report["spaces"].items():
        lines.append(f"  {name}: {s['copy_share']:.1%} over the threshold {s['threshold']:.4g} ({s['metric']}; "
                     f"median samples {s['samples_median']:.4g}, val {s['val_median']:.4g})")
    if report.get("output"):
        lines.append(f"  report: {report['output']} (summary.json, histogram.png, pairs.png)")
    return "\n".join(lines)
