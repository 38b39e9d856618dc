"""Run an image-to-image net on an image of any size in overlapping tiles, blended with cosine ramps (no seams).

Two things make tiles disagree, and both are handled here:
- context: a pixel near a tile edge lacks the neighbours it sees in the whole image. Tiles overlap by at least
  twice the net's receptive-field radius (measured once, `receptive_radius`), and inside each overlap the two
  tiles' weights fall and rise as 0.5 - 0.5 cos, so each pixel is mostly taken from the tile it is deep inside.
  Tile offsets sit on a 16-px grid: a strided conv net is only shift-equivariant for shifts on its stride grid.
- statistics: InstanceNorm normalises by per-image mean and variance; per tile those would differ and every
  tile would get its own colours. The statistics are taken once from the whole image (shrunk to the area of
  one batch of tiles if larger), then frozen for every tile (`frozen_norm_stats`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

Fn = Callable[[torch.Tensor], torch.Tensor]  # (N, 3, h, w) in [0, 1] -> (N, 3, h, w)


ALIGN = 16  # tile offsets are multiples of this: a net that downsamples by 2**k (k <= 4) sees the same pixel grid


def tile_side(tile: int) -> int:
    """The side of the tiles `tiled` cuts for `tile` px: rounded down to the ALIGN grid (--tile 40 -> 32)."""
    return max(ALIGN, tile // ALIGN * ALIGN)


def starts(length: int, tile: int, overlap: int, align: int = ALIGN) -> list[int]:
    """Tile start offsets covering [0, length) with tiles of `tile` px overlapping by at least `overlap` px.

    With `length` and `tile` multiples of `align`, every offset is too (so strided convs stay in phase)."""
    if length <= tile:
        return [0]
    stride = max(align, tile - overlap - align)  # room for rounding the offsets to the grid
    count = math.ceil((length - tile) / stride) + 1
    # Spread the tiles evenly, so every overlap is about the same width (>= overlap).
    return [round(i * (length - tile) / (count - 1) / align) * align for i in range(count)]


def _ramp(n: int) -> torch.Tensor:
    """n weights rising from ~0 to ~1 (cosine); `_ramp(n) + _ramp(n).flip(0) == 1`."""
    k = torch.arange(n, dtype=torch.float32) + 0.5
    return 0.5 - 0.5 * torch.cos(math.pi * k / n)


def _window(offsets: list[int], index: int, size: int) -> torch.Tensor:
    """1-D weights (size,) for tile `index` along one axis: ramps where it overlaps its neighbours, else 1."""
    w = torch.ones(size)
    if index > 0:
        left = offsets[index - 1] + size - offsets[index]  # px shared with the previous tile
        w[:left] *= _ramp(left)
    if index < len(offsets) - 1:
        right = offsets[index] + size - offsets[index + 1]
        w[size - right :] *= _ramp(right).flip(0)  # multiplied: stays smooth even where the two ramps meet
    return w


# ---------------------------------------------------------------- whole-image normalisation statistics


def norm_layers(nets: dict[str, nn.Module] | nn.Module) -> list[nn.Module]:
    """The InstanceNorm layers of a net (or a Loaded's `.nets`): the layers whose statistics span the whole image."""
    modules = nets.values() if isinstance(nets, dict) else [nets]
    return [m for net in modules for m in net.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm)]


def capture_norm_stats(fn: Fn, x: torch.Tensor, layers: list[nn.Module]) -> dict[nn.Module, tuple]:
    """Run fn(x) once and record each norm layer's input mean and variance per channel ((N, C, 1, 1) each)."""
    stats: dict[nn.Module, tuple] = {}

    def record(module, inputs, output):
        v = inputs[0]
        stats[module] = (v.mean((2, 3), keepdim=True), v.var((2, 3), unbiased=False, keepdim=True))

    handles = [m.register_forward_hook(record) for m in layers]
    try:
        fn(x)
    finally:
        for h in handles:
            h.remove()
    return stats


@contextlib.contextmanager
def frozen_norm_stats(layers: list[nn.Module], stats: dict[nn.Module, tuple]) -> Iterator[None]:
    """Inside the block, each norm layer normalises with the given statistics instead of its input's own."""

    def replace(module, inputs, output):
        mean, var = stats[module]
        y = (inputs[0] - mean[:1]) * torch.rsqrt(var[:1] + module.eps)  # stats of one image, broadcast over the tiles
        if module.affine:
            y = y * module.weight[None, :, None, None] + module.bias[None, :, None, None]
        return y

    handles = [m.register_forward_hook(replace) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def receptive_radius(fn: Fn, layers: list[nn.Module], device: torch.device | str = "cpu", probe: int = 256) -> int:
    """How far (px) one input pixel's influence reaches in fn's output, with norm statistics frozen; `probe // 2`
    if it reaches the edge of the probe image."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, probe, probe, generator=gen).to(device)
    c = probe // 2
    poked = x.clone()
    poked[:, :, c, c] = 1.0 - poked[:, :, c, c]
    with frozen_norm_stats(layers, capture_norm_stats(fn, x, layers)):
        changed = (fn(x) - fn(poked)).abs().amax(dim=(0, 1)) > 1e-6  # (probe, probe)
    ys, xs = torch.nonzero(changed.cpu(), as_tuple=True)
    if len(ys) == 0:
        return 0
    return int(max((ys - c).abs().max(), (xs - c).abs().max()))


def default_overlap(tile: int, radius: int) -> int:
    """Overlap for `tile`: tile / 8, but at least twice the receptive-field radius (and at most half a tile)."""
    return max(1, min(tile // 2, max(tile // 8, 2 * radius + 8)))


# ---------------------------------------------------------------- tiled application


def tiled(fn: Fn, x: torch.Tensor, tile: int, overlap: int, batch_size: int = 4,
          layers: list[nn.Module] | None = None) -> torch.Tensor:
    """fn applied to one image x (3, H, W) in overlapping tiles -> (3, H, W) float32 on the CPU.

    Images no larger than `tile` go through fn whole. Tiles of one image run `batch_size` at a time, so the
    result depends only on the image and these arguments (never on what else is in a batch).
    """
    _, height, width = x.shape
    if height <= tile and width <= tile:
        return fn(x[None])[0].float().cpu()
    if not 0 < overlap < tile:
        raise ValueError(f"overlap {overlap} must be between 1 and tile - 1 ({tile - 1})")
    tile = tile_side(tile)
    stats = {}
    if layers:
        # The statistics pass costs what one batch of tiles costs: the image shrunk to batch_size tiles' area.
        scale = min(1.0, math.sqrt(batch_size * tile * tile / (height * width)))
        small = x[None] if scale == 1.0 else F.interpolate(
            x[None], size=(max(1, round(height * scale)), max(1, round(width * scale))), mode="bilinear",
            antialias=True, align_corners=False)
        stats = capture_norm_stats(fn, small, layers)
    x = _pad_to(x, ALIGN)  # (3, H', W') with H', W' multiples of ALIGN
    th, tw = min(tile, x.shape[1]), min(tile, x.shape[2])
    ys, xs = starts(x.shape[1], th, overlap), starts(x.shape[2], tw, overlap)
    boxes = [(iy, ix) for iy in range(len(ys)) for ix in range(len(xs))]
    out = torch.zeros(3, x.shape[1], x.shape[2], dtype=torch.float32)
    weight = torch.zeros(1, x.shape[1], x.shape[2], dtype=torch.float32)
    with frozen_norm_stats(layers or [], stats):
        for i in range(0, len(boxes), batch_size):
            chunk = boxes[i : i + batch_size]
            tiles = torch.stack([x[:, ys[iy] : ys[iy] + th, xs[ix] : xs[ix] + tw] for iy, ix in chunk])  # (n, 3, th, tw)
            result = fn(tiles).float().cpu()
            for (iy, ix), res in zip(chunk, result):
                w = _window(ys, iy, th)[:, None] * _window(xs, ix, tw)[None, :]  # (th, tw)
                out[:, ys[iy] : ys[iy] + th, xs[ix] : xs[ix] + tw] += res * w
                weight[:, ys[iy] : ys[iy] + th, xs[ix] : xs[ix] + tw] += w
    return (out / weight)[:, :height, :width]


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """(3, H, W) -> padded on the bottom/right to multiples of `multiple` (reflect, or replicate for tiny sides)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not ph and not pw:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x[None], (0, pw, 0, ph), mode=mode)[0]
