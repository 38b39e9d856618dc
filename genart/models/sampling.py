"""Seeded latents, the label rule, truncation, spherical interpolation and sample grids: how every generator family
turns seeds (and labels) into images.

    from genart.models.sampling import latents, make_grid
    z = latents([0, 1, 2], 128)            # (3, 128), the same numbers for the same seeds on every machine
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn

from genart.errors import UserError

_STOP: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("genart_stop", default=None)


class Stopped(Exception):
    """The caller gave up on this call (a Serve request cancelled at its deadline): raised at a `stop_point`."""


@contextlib.contextmanager
def stoppable(event: threading.Event) -> Iterator[None]:
    """Within this block (one thread: a context variable), `stop_point()` raises Stopped once `event` is set.
    A thread cannot be cancelled from outside, so a long loop run for a cancelled request would otherwise
    compute to its end, beside the requests that came after it."""
    token = _STOP.set(event)
    try:
        yield
    finally:
        _STOP.reset(token)


def stop_point() -> None:
    """Raise Stopped if the enclosing `stoppable` block's event is set; a no-op outside one. Called between the
    steps of long loops (one per token in autoregressive sampling)."""
    event = _STOP.get()
    if event is not None and event.is_set():
        raise Stopped


def latent(seed: int, dim: int) -> np.ndarray:
    """The standard-normal latent for `seed`: float32 (dim,), from numpy's SeedSequence, so stable across machines."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed {seed!r}: seeds must be integers >= 0")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed)]))
    return rng.standard_normal(dim, dtype=np.float32)


def latents(seeds: Iterable[int], dim: int) -> torch.Tensor:
    """Batched `latent`: float32 (N, dim) on the CPU."""
    return torch.from_numpy(np.stack([latent(s, dim) for s in seeds]))


def truncate(z: torch.Tensor, truncation: float) -> torch.Tensor:
    """Truncation trick, psi style: scale z toward the mean (0) by `truncation`; 1.0 = off, 0.0 = the mean image.

    Scaling (not BigGAN's resampling of |z| > t) keeps a seed's latent a pure function of (seed, truncation).
    """
    check_truncation(truncation)
    return z * float(truncation)


def check_truncation(truncation: float, what: str = "truncation") -> None:
    """The one truncation rule (jobs check it before starting Ray; /v1/generate's schema states the same range)."""
    if not 0.0 <= float(truncation) <= 1.0:
        raise UserError(f"{what} {truncation!r}: must be between 0.0 (the mean image) and 1.0 (off)")


GUIDED_FAMILIES = ("autoregressive", "vqvae")  # token models: classifier-free guidance mixes two logits
MAX_GUIDANCE = 10.0


def trained_for_guidance(conditional: bool | None, label_dropout: float | None) -> bool:
    """Whether a token model learnt a "no class" start token, so it can sample with guidance above 1: conditional, and
    trained with some labels dropped. The one rule that configs, loaded nets and Serve's model cards apply."""
    return bool(conditional) and float(label_dropout or 0) > 0


def check_guidance(guidance: float | None, family: str, trained: bool, what: str = "guidance") -> float | None:
    """The one rule for a per-request guidance scale (None = the model's own): token families only, and above 1
    only for a model trained for it (model.label_dropout > 0). Jobs check it before starting Ray, Serve before a
    replica is called."""
    if guidance is None:
        return None
    scale = float(guidance)
    if not 0.0 <= scale <= MAX_GUIDANCE:
        raise UserError(f"{what} {guidance!r}: must be between 0 and {MAX_GUIDANCE:g} (1 = off)")
    if family not in GUIDED_FAMILIES:
        raise UserError(f"{what}: a {family} model takes no guidance; the {' and '.join(GUIDED_FAMILIES)} families do")
    if scale != 1 and not trained:
        raise UserError(f"{what} {scale:g} needs a model trained with model.label_dropout > 0 (and conditional); this one was not")
    return scale


def default_label(seed: int, num_labels: int) -> int:
    """The class a class-conditional model draws for `seed` when no label is given: the class follows the seed."""
    return int(seed) % num_labels


def seed_labels(seeds: list[int], label: int | None, num_labels: int) -> list[int]:
    """One class per seed for a class-conditional model: the given `label` (an index) for every seed, else each
    seed's `default_label`. Batch generation and its images.jsonl both take their labels from here."""
    return [default_label(s, num_labels) if label is None else int(label) for s in seeds]


def parse_label(label: int | str | None, names: list[str], conditional: bool = True, what: str = "label") -> int | None:
    """The one label rule: a class name, or its index (an int, or digits as CLI flags and form fields give it) ->
    the class index in `names`; None stays None (the caller then uses `default_label`). `what` names the parameter."""
    if label is None:
        return None
    if not conditional:
        raise UserError(f"{what}: this model is not class-conditional; leave {what} out")
    if isinstance(label, str) and label in names:
        return names.index(label)
    # ASCII digits only, and few: str.isdigit() also takes '²' (int() refuses it) and ints have a digit limit.
    digits = isinstance(label, str) and label.isascii() and label.isdigit() and len(label) <= 9
    index = int(label) if digits else label
    if isinstance(index, (int, np.integer)) and not isinstance(index, bool) and 0 <= index < len(names):
        return int(index)
    raise UserError(f"{what} {label!r}: not a class of this model; use one of {', '.join(names)} "
                    f"(or its index 0..{len(names) - 1})")


def slerp(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """Spherical interpolation between two latents (D,) -> (steps, D); the path stays at Gaussian-typical norms."""
    if steps < 2:
        raise UserError(f"steps {steps}: an interpolation needs at least 2 steps")
    t = torch.linspace(0.0, 1.0, steps, dtype=a.dtype)[:, None]  # (steps, 1)
    cos = torch.clamp((a / a.norm()) @ (b / b.norm()), -1.0, 1.0)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-4:  # nearly parallel: plain lerp is exact enough
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


# ---------------------------------------------------------------- images


def make_grid(images01: torch.Tensor, nrow: int = 8, padding: int = 2) -> Image.Image:
    """(N, 3, H, W) in [0, 1] -> one PIL image with `nrow` images per row."""
    from torchvision.utils import make_grid as tv_grid

    grid = tv_grid(images01.detach().float().cpu().clamp(0, 1), nrow=max(1, nrow), padding=padding, pad_value=1.0)
    arr = (grid.numpy().transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)  # (H, W, 3)
    return Image.fromarray(arr, "RGB")


def reconstruction_grid(real: torch.Tensor, recon: torch.Tensor, samples: torch.Tensor) -> Image.Image:
    """The checkpoint grid of a family that reconstructs (vae, vqvae), all (N, 3, S, S) in [-1, 1]: pairs of real /
    reconstruction fill the top rows (an even number of columns keeps each pair on one row), then, after a gap of
    half a tile, the samples start a row of their own, so a reader can tell the two apart."""
    ncol = int(math.ceil(math.sqrt(len(real) + len(samples))))
    ncol += ncol % 2
    pairs = torch.stack([real, recon], dim=1).flatten(0, 1)  # (2n, 3, S, S): real, recon, real, recon, ...
    blocks = [make_grid((x.float() + 1) / 2, nrow=ncol) for x in (pairs, samples) if len(x)]
    gap = real.shape[-2] // 2
    sheet = Image.new("RGB", (max(b.width for b in blocks), sum(b.height for b in blocks) + gap * (len(blocks) - 1)), "white")
    y = 0
    for block in blocks:
        sheet.paste(block, (0, y))
        y += block.height + gap
    return sheet


def check_images01(x: Any, what: str = "images") -> torch.Tensor:
    """Validate an inference input: a float tensor (N, 3, H, W); anything else is a UserError."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise UserError(f"{what}: expected a float tensor (N, 3, H, W) with values in [0, 1], got {shape}")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise UserError(f"{what}: empty batch or image ({tuple(x.shape)})")
    return x


def through_square(x01: torch.Tensor, size: int, forward) -> torch.Tensor:
    """`forward` ((N, 3, size, size) in [-1, 1] -> same) on the whole pictures (N, 3, H, W) in [0, 1], squashed to the
    model's square and stretched back: a reconstruction keeps the frame it was given, not a crop. [0, 1] out."""
    h, w = x01.shape[-2:]
    small = nn.functional.interpolate(x01.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = (forward(small * 2 - 1).float() + 1) / 2
    if (h, w) != out.shape[-2:]:
        out = nn.functional.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
    return out.clamp(0, 1)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size): center-crop to a square, then antialiased bilinear (a no-op at that size).

    Cropping, never squashing, as training data and serving do; uint8 callers use `images.model_input` (Lanczos).
    """
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[..., top : top + side, left : left + side]
    if side == size:
        return x
    return nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
