"""Procedural labelled abstract images in visually distinct genres, so demos and tests never need the network.

    genart datasets synth --out data/synth --num 500 --size 64
writes <out>/<genre>/<genre>-00000.png (a folder or s3:// prefix) for the genres below (ImageFolder layout, ready for
`genart prepare`).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from genart import storage

GENRES = ("stripes", "circles", "grid", "noise", "gradient")


def _color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(lo, hi, size=3))


def stripes(rng: np.random.Generator, size: int) -> Image.Image:
    """Parallel bands of two or three colours at a random angle and period."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(size / 8, size / 3)
    phase = (xx * np.cos(angle) + yy * np.sin(angle)) / period
    colors = np.array([_color(rng) for _ in range(int(rng.integers(2, 4)))], dtype=np.uint8)
    index = np.floor(phase).astype(np.int64) % len(colors)
    return Image.fromarray(colors[index], "RGB")


def circles(rng: np.random.Generator, size: int) -> Image.Image:
    """Overlapping filled discs on a plain light background."""
    img = Image.new("RGB", (size, size), _color(rng, 180, 256))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        r = rng.uniform(size / 10, size / 4)
        cx, cy = rng.uniform(0, size, size=2)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_color(rng, 0, 200), outline=(0, 0, 0))
    return img


def grid(rng: np.random.Generator, size: int) -> Image.Image:
    """Mondrian-like: thick black lines splitting white cells, a few filled with primaries."""
    img = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    primaries = [(220, 30, 30), (30, 60, 200), (250, 210, 20)]
    xs = sorted(rng.choice(np.arange(size // 8, size - size // 8), size=int(rng.integers(2, 4)), replace=False))
    ys = sorted(rng.choice(np.arange(size // 8, size - size // 8), size=int(rng.integers(2, 4)), replace=False))
    bounds_x, bounds_y = [0, *xs, size], [0, *ys, size]
    for i in range(len(bounds_x) - 1):
        for j in range(len(bounds_y) - 1):
            if rng.random() < 0.3:
                fill = primaries[int(rng.integers(0, 3))]
                draw.rectangle([bounds_x[i], bounds_y[j], bounds_x[i + 1], bounds_y[j + 1]], fill=fill)
    width = max(1, size // 20)
    for x in xs:
        draw.rectangle([x - width, 0, x + width, size], fill=(10, 10, 10))
    for y in ys:
        draw.rectangle([0, y - width, size, y + width], fill=(10, 10, 10))
    return img


def noise(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth colour noise field: coarse random values upsampled bicubically."""
    coarse = rng.integers(0, 256, size=(int(rng.integers(3, 7)),) * 2 + (3,), dtype=np.uint8)
    return Image.fromarray(coarse, "RGB").resize((size, size), Image.Resampling.BICUBIC)


def gradient(rng: np.random.Generator, size: int) -> Image.Image:
    """A linear blend between two colours in a random direction."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    angle = rng.uniform(0, 2 * np.pi)
    t = (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    a, b = np.array(_color(rng), np.float32), np.array(_color(rng), np.float32)
    return Image.fromarray((a + (b - a) * t[..., None]).astype(np.uint8), "RGB")


RENDERERS = {"stripes": stripes, "circles": circles, "grid": grid, "noise": noise, "gradient": gradient}


def render(genre: str, index: int, size: int, seed: int = 0) -> Image.Image:
    """One image, deterministic in (genre, index, size, seed)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, GENRES.index(genre), index]))
    return RENDERERS[genre](rng, size)


def make_synth(out_dir: str, num: int, size: int = 64, seed: int = 0, genres: tuple[str, ...] = GENRES) -> dict:
    """Write `num` images spread evenly over `genres` into <out_dir>/<genre>/; returns counts per genre."""
    counts = {}
    for g, genre in enumerate(genres):
        n = num // len(genres) + (1 if g < num % len(genres) else 0)
        for i in range(n):
            buf = io.BytesIO()
            render(genre, i, size, seed).save(buf, "PNG", compress_level=3)
            storage.write_bytes(storage.join(out_dir, genre, f"{genre}-{i:05d}.png"), buf.getvalue())  # or s3://
        counts[genre] = n
    return counts
