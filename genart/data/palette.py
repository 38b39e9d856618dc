"""Colour palettes for token models: k-means on a sample of a dataset's pixels (a Ray Data job), the palette file,
and pixels <-> palette tokens (what the autoregressive family trains on, computed on the fly from the images).

    genart palette --data data/synth --colors 16           # -> data/synth/palette-16.json
"""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import torch

from genart import storage
from genart.errors import UserError

MIN_COLORS, MAX_COLORS = 2, 512


def palette_path(data: str, colors: int) -> str:
    """Where `genart palette` writes a dataset's K-colour palette, and where training looks for it."""
    return storage.join(data, f"palette-{int(colors)}.json")


def grid_palette(colors: int) -> torch.Tensor:
    """(K, 3) in [0, 1]: K colours spread evenly over an RGB lattice; the palette when no dataset was fitted."""
    levels = max(2, math.ceil(colors ** (1 / 3)))
    axis = torch.linspace(0, 1, levels)
    cube = torch.cartesian_prod(axis, axis, axis)  # (levels^3, 3)
    pick = torch.linspace(0, len(cube) - 1, colors).round().long()
    return cube[pick].contiguous()


def kmeans(pixels: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Lloyd's k-means with k-means++ seeding on (N, 3) pixels -> (centers (k, 3), mean squared error per pixel).

    Vectorised torch, one fixed-seed generator: the same pixels always give the same palette. A cluster that
    empties is moved onto the pixel worst served by the others."""
    pixels = pixels.float()
    n = len(pixels)
    if n < k:
        raise UserError(f"{n} sampled pixels cannot make {k} colours; sample more pixels or use fewer --colors")
    g = torch.Generator().manual_seed(seed)
    centers = pixels[torch.randint(n, (1,), generator=g)]  # (1, 3)
    nearest = torch.cdist(pixels, centers).squeeze(1) ** 2  # (N,) squared distance to the closest chosen center
    for _ in range(1, k):  # k-means++: each new center drawn with probability ~ squared distance
        weights = nearest if float(nearest.sum()) > 0 else torch.ones_like(nearest)
        pick = torch.multinomial(weights, 1, generator=g)
        centers = torch.cat([centers, pixels[pick]])
        nearest = torch.minimum(nearest, ((pixels - pixels[pick]) ** 2).sum(1))
    for _ in range(iters):
        dist = torch.cdist(pixels, centers) ** 2  # (N, k)
        best, assign = dist.min(1)
        counts = torch.bincount(assign, minlength=k).float()  # (k,)
        sums = torch.zeros_like(centers).index_add_(0, assign, pixels)
        moved = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centers)
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            worst = int(best.argmax())
            moved[empty] = pixels[worst]
            best[worst] = 0
        if torch.allclose(moved, centers, atol=1e-6):
            centers = moved
            break
        centers = moved
    error = float((torch.cdist(pixels, centers) ** 2).min(1).values.mean())
    return centers.clamp(0, 1), error


def to_tokens(images01: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, H*W) int64: the nearest palette colour of every pixel, in raster order."""
    flat = images01.float().permute(0, 2, 3, 1).reshape(len(images01), -1, 3)  # (B, L, 3)
    pal = palette.float().to(flat.device)  # (K, 3)
    # |x - p|^2 = |x|^2 - 2 x.p + |p|^2; |x|^2 is the same for every p
    dist = (pal * pal).sum(1) - 2 * flat @ pal.T  # (B, L, K)
    return dist.argmin(-1)


def from_tokens(tokens: torch.Tensor, palette: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size*size) tokens -> (B, 3, size, size) images in [0, 1]."""
    return palette[tokens].view(len(tokens), size, size, 3).permute(0, 3, 1, 2).contiguous()


def read_palette(uri: str, colors: int | None = None) -> torch.Tensor:
    """A palette file -> (K, 3) float in [0, 1]; a missing or malformed file, or K != colors, is a UserError."""
    if not storage.exists(uri):
        raise UserError(f"palette {uri} not found; make it with `genart palette --data DATASET --colors K`")
    try:
        raw = json.loads(storage.read_text(uri))
        rgb = np.asarray(raw["colors"], dtype=np.float64)
    except (ValueError, KeyError, TypeError):
        raise UserError(f"palette {uri} is not a genart palette file (JSON with \"colors\": [[r, g, b], ...])") from None
    if rgb.ndim != 2 or rgb.shape[1] != 3 or not MIN_COLORS <= len(rgb) <= MAX_COLORS or rgb.min() < 0 or rgb.max() > 255:
        raise UserError(f"palette {uri}: expected {MIN_COLORS}-{MAX_COLORS} colours of 3 values in 0..255, got shape {rgb.shape}")
    if colors is not None and len(rgb) != colors:
        raise UserError(f"palette {uri} has {len(rgb)} colours, but model.colors is {colors}; use a palette-{colors}.json")
    return torch.from_numpy(rgb / 255.0).float()


def _sample_pixels(per_image: int, seed: int):
    def sample(batch: dict) -> dict:
        images = (np.asarray(batch["image"]) + 1.0) / 2.0  # (B, 3, S, S) in [0, 1]
        out = []
        for image in images:
            flat = image.reshape(3, -1).T  # (S*S, 3)
            # the image's own content picks its pixels: the sample does not depend on how Ray blocks the rows
            rng = np.random.default_rng([seed, zlib.crc32(np.round(flat * 255).astype(np.uint8).tobytes())])
            out.append(flat[rng.choice(len(flat), size=min(per_image, len(flat)), replace=False)])
        return {"pixel": np.concatenate(out).astype(np.float32) if out else np.zeros((0, 3), np.float32)}

    return sample


def fit_palette(data: str, colors: int, out: str | None = None, sample_pixels: int = 200_000, seed: int = 0,
                split: str = "train", iters: int = 25) -> dict:
    """Sample pixels from a prepared dataset (Ray Data), fit a `colors`-colour k-means palette, write it.

    Returns the summary that is also written into the file (without the colours)."""
    from genart.data.read import read_manifest, training_dataset

    if not MIN_COLORS <= colors <= MAX_COLORS:
        raise UserError(f"--colors {colors}: must be between {MIN_COLORS} and {MAX_COLORS}")
    if sample_pixels < colors:
        raise UserError(f"--sample-pixels {sample_pixels}: must be at least --colors ({colors})")
    manifest = read_manifest(data)
    images = int((manifest.get("splits") or {}).get(split, 0))
    if images == 0:
        raise UserError(f"{data}: the {split} split is empty; prepare a dataset with images in it")
    size = int(manifest.get("image_size") or 64)
    per_image = max(1, min(size * size, math.ceil(sample_pixels / images)))
    ds = training_dataset(data, split, size).map_batches(_sample_pixels(per_image, seed), batch_format="numpy")
    parts = [b["pixel"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
    pixels = np.concatenate(parts) if parts else np.zeros((0, 3), np.float32)
    pixels = pixels[np.lexsort(pixels.T[::-1])]  # a fixed order: the k-means seed then sees the same list every run
    centers, error = kmeans(torch.from_numpy(pixels), colors, iters=iters, seed=seed)
    rgb = (centers * 255).round().int()
    order = torch.argsort(rgb[:, 0] * 65536 + rgb[:, 1] * 256 + rgb[:, 2])  # stable token ids: sorted colours
    path = out or palette_path(data, colors)
    summary = {"palette": path, "colors": colors, "dataset": data, "split": split, "pixels_sampled": int(len(pixels)),
               "image_size": size, "seed": seed, "rmse_255": round(math.sqrt(error) * 255, 3)}
    storage.write_text(path, json.dumps({**summary, "colors": rgb[order].tolist()}, indent=None) + "\n")
    return summary
