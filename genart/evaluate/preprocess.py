"""The one preprocessing path of the evaluation: real and generated images become the same kind of pixels.

    real:      PNG -> 8-bit RGB -> center crop + Lanczos to the generator's resolution R (images.model_input) -> uint8
    generated: model.sample, float (N, 3, R, R) in [0, 1] -> uint8, round half up (serve.inference.to_uint8)
    both:      uint8 (R, R, 3) -> images.model_input(., network input size S) -> float32 (N, 3, S, S) in [0, 1]
Squares are cropped, never squashed. PREPROCESS_VERSION is in the reference-cache key: bump it when any step changes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from genart.data import images
from genart.serve.inference import to_uint8  # the pixels users get from serving and `genart generate`

# 1: float images squash-resized by the feature network's own filter (torch bilinear), real ones at stored size.
# 2: both sides uint8 at the generator's resolution, then center crop + Lanczos (images.model_input).
PREPROCESS_VERSION = 2
DESCRIPTION = ("real: center crop + Lanczos to the generator's resolution, uint8; generated: uint8 (round half up); "
               "both: center crop + Lanczos to the network input (genart.data.images.model_input)")


def to_pixels(batch: torch.Tensor | np.ndarray | Sequence) -> list[np.ndarray]:
    """Images -> list of uint8 (H, W, 3). uint8 input is (N, H, W, 3) or a list of (H, W, 3) and kept as is; float
    input is (N, 3, H, W) or a list of (3, H, W) in [0, 1] (torch or numpy) and quantised as serving does."""
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        if _is_uint8(batch):
            return list(np.asarray(batch))
        return list(to_uint8(torch.as_tensor(batch)))
    out = []
    for image in batch:  # a list: sizes may differ
        if _is_uint8(image):
            out.append(np.asarray(image))
        else:
            out.append(to_uint8(torch.as_tensor(image)[None])[0])
    return out


def _is_uint8(x) -> bool:
    return x.dtype == torch.uint8 if isinstance(x, torch.Tensor) else np.asarray(x).dtype == np.uint8


def real_pixels(png: bytes, resolution: int) -> np.ndarray:
    """A dataset row's PNG -> uint8 (R, R, 3): what a generator of resolution R is trained to match.

    model_input's Lanczos output is already k/255 (Pillow resizes 8-bit images in 8 bits), so re-quantising is exact.
    """
    square = images.model_input(images.decode_image(png), resolution)  # (3, R, R) float32
    return to_uint8(torch.from_numpy(square)[None])[0]


def network_input(batch, size: int) -> torch.Tensor:
    """Images (anything `to_pixels` takes) -> the feature network's input, float32 (N, 3, size, size) in [0, 1]."""
    pixels = to_pixels(batch)
    if not pixels:
        return torch.zeros(0, 3, size, size)
    return torch.from_numpy(np.stack([images.model_input(p, size) for p in pixels]))
