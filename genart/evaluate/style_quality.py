"""Style-transfer quality without a reference network: holes and blotches in the picture, edges kept, colours pulled.

    holes = hole_share(content, stylized)             # 0 is best; share of pixels blown to black/white
    blobs = blowout_share(content, stylized)          # 0 is best; share of pixels with a channel clipped (e.g. pure blue)
    blotches = blotch_share(content, stylized)        # 0 is best; share of pixels in dark patches the content did not have
    edges = edge_correlation(content, stylized)       # 1 = the content's edges exactly; goal >= 0.35
    pull = colour_pull(content, stylized, style)      # > 0 = RGB statistics moved toward the style image's
Images are (N, 3, H, W) (or a list of (3, H, W), sizes may differ between images) in [0, 1], NumPy or torch.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import scipy.ndimage

from genart.evaluate.metrics import frechet_distance

Images = Union[np.ndarray, Sequence[np.ndarray], "torch.Tensor"]  # noqa: F821 - torch is optional here

# Rec. 601 luma weights: luminance of an RGB pixel in [0, 1].
LUMA = np.array([0.299, 0.587, 0.114])
# A "hole": the output went near-black (< 0.06) where the content was not dark (> 0.25), or near-white (> 0.94)
# where the content was not bright (< 0.75). The gaps (0.06 vs 0.25, 0.94 vs 0.75) keep a darkened shadow or a
# brightened sky from counting: only detail that was destroyed, not shifted, does.
HOLE_DARK_OUT, HOLE_DARK_CONTENT = 0.06, 0.25
HOLE_BRIGHT_OUT, HOLE_BRIGHT_CONTENT = 0.94, 0.75
# A "blow-out": some output channel clipped (< 0.02 or > 0.98) where every content channel was mid-range
# (0.1 .. 0.9). Catches saturated colour blobs (pure blue has luma 0.11: no hole, but the detail is gone).
BLOWOUT_OUT, BLOWOUT_CONTENT = 0.02, 0.1
# A "blotch": a dark patch a person sees even where no pixel is near-black, e.g. a dark hill painted brown-black.
# The output's local luma (BLOTCH_WINDOW x BLOTCH_WINDOW mean) is both BLOTCH_DROP below the content's and under
# BLOTCH_RATIO times it. The drop alone also flags a cream sky repainted blue (0.85 -> 0.65: a colour change,
# not a blotch); the ratio alone flags tiny shifts of near-black content (0.04 -> 0.01) that nobody sees. The
# drop is small because dark hills are dark: Grasse's is luma 0.08-0.13, and its blotches are 0.0.
BLOTCH_WINDOW, BLOTCH_DROP, BLOTCH_RATIO = 9, 0.06, 0.5
EDGE_CORRELATION_GOAL = 0.35


def _image_list(x: Images, what: str) -> list[np.ndarray]:
    """(N, 3, H, W) array/tensor or a sequence of (3, H, W) / (1, 3, H, W) -> list of float64 (3, H, W)."""
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().float().cpu().numpy()
    if isinstance(x, np.ndarray):
        items = list(x) if x.ndim == 4 else [x]  # a batch, or one image
    else:
        items = list(x)
    out = []
    for item in items:
        if hasattr(item, "detach"):
            item = item.detach().float().cpu().numpy()
        arr = np.asarray(item, dtype=np.float64)
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 3 or arr.shape[0] != 3:
            raise ValueError(f"{what}: expected images of shape (3, H, W), got {arr.shape}")
        out.append(arr)
    if not out:
        raise ValueError(f"{what}: no images")
    return out


def _pairs(content: Images, output: Images) -> list[tuple[np.ndarray, np.ndarray]]:
    contents, outputs = _image_list(content, "content"), _image_list(output, "output")
    if len(contents) != len(outputs):
        raise ValueError(f"{len(contents)} content images but {len(outputs)} outputs")
    for c, o in zip(contents, outputs):
        if c.shape != o.shape:
            raise ValueError(f"content {c.shape} and output {o.shape} differ in size; compare same-size pairs")
    return list(zip(contents, outputs))


def luminance(image: np.ndarray) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W) Rec. 601 luma."""
    return np.tensordot(LUMA, image, axes=1)


def hole_share(content: Images, output: Images) -> float:
    """Share of all pixels (over every image, pixel-weighted) that the output turned into holes (see HOLE_*)."""
    holes = pixels = 0
    for c, o in _pairs(content, output):
        lc, lo = luminance(c), luminance(o)
        hole = ((lo < HOLE_DARK_OUT) & (lc > HOLE_DARK_CONTENT)) | ((lo > HOLE_BRIGHT_OUT) & (lc < HOLE_BRIGHT_CONTENT))
        holes += int(hole.sum())
        pixels += hole.size
    return holes / pixels


def blowout_share(content: Images, output: Images) -> float:
    """Share of all pixels (pixel-weighted) where the output clipped a channel the content had mid-range (BLOWOUT_*)."""
    hits = pixels = 0
    for c, o in _pairs(content, output):
        mid = ((c > BLOWOUT_CONTENT) & (c < 1 - BLOWOUT_CONTENT)).all(axis=0)
        clipped = ((o < BLOWOUT_OUT) | (o > 1 - BLOWOUT_OUT)).any(axis=0)
        hits += int((mid & clipped).sum())
        pixels += mid.size
    return hits / pixels


def blotch_mask(content: np.ndarray, output: np.ndarray) -> np.ndarray:
    """(3, H, W) content and output -> (H, W) bool: pixels inside a blotch (see BLOTCH_*)."""
    local_content = scipy.ndimage.uniform_filter(luminance(content), BLOTCH_WINDOW, mode="reflect")
    local_output = scipy.ndimage.uniform_filter(luminance(output), BLOTCH_WINDOW, mode="reflect")
    return (local_content - local_output > BLOTCH_DROP) & (local_output < BLOTCH_RATIO * local_content)


def blotch_share(content: Images, output: Images) -> float:
    """Share of all pixels (pixel-weighted) inside dark patches the output added over the content (`blotch_mask`)."""
    hits = pixels = 0
    for c, o in _pairs(content, output):
        mask = blotch_mask(c, o)
        hits += int(mask.sum())
        pixels += mask.size
    return hits / pixels


def sobel_magnitude(gray: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W) gradient magnitude of the 3x3 Sobel filters (reflected borders)."""
    return np.hypot(scipy.ndimage.sobel(gray, axis=0, mode="reflect"), scipy.ndimage.sobel(gray, axis=1, mode="reflect"))


def edge_correlation(content: Images, output: Images) -> float:
    """Mean over images of the Pearson correlation between content and output Sobel edge magnitude (of luminance).

    Images where either edge map is flat (correlation undefined) are skipped; NaN if every image is.
    """
    values = []
    for c, o in _pairs(content, output):
        ec, eo = sobel_magnitude(luminance(c)).ravel(), sobel_magnitude(luminance(o)).ravel()
        if ec.std() < 1e-12 or eo.std() < 1e-12:
            continue
        values.append(float(np.corrcoef(ec, eo)[0, 1]))
    return float(np.mean(values)) if values else float("nan")


def _rgb_moments(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pixels = image.reshape(3, -1)  # (3, H*W)
    return pixels.mean(axis=1), np.cov(pixels)


def colour_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two images' RGB pixels (mean (3,) and covariance (3, 3))."""
    return frechet_distance(*_rgb_moments(a), *_rgb_moments(b))


def colour_pull(content: Images, output: Images, style: Images) -> float:
    """Mean over images of 1 - d(output, style) / d(content, style), d = `colour_distance` in RGB.

    0 = colours unchanged (identity), 1 = the output's RGB mean/covariance equal the style image's, negative =
    pushed away from the style. Images whose colours already match the style (d(content, style) ~ 0) are skipped.
    """
    styles = _image_list(style, "style")
    if len(styles) != 1:
        raise ValueError(f"style: expected one style image, got {len(styles)}")
    values = []
    for c, o in _pairs(content, output):
        before = colour_distance(c, styles[0])
        if before < 1e-9:
            continue
        values.append(1.0 - colour_distance(o, styles[0]) / before)
    return float(np.mean(values)) if values else float("nan")


def style_quality(content: Images, output: Images, style: Images) -> dict[str, float]:
    """All the metrics at once."""
    return {"hole_share": hole_share(content, output), "blowout_share": blowout_share(content, output),
            "blotch_share": blotch_share(content, output),
            "edge_correlation": edge_correlation(content, output), "colour_pull": colour_pull(content, output, style)}


__all__ = ["hole_share", "blowout_share", "blotch_share", "blotch_mask", "edge_correlation", "colour_pull", "colour_distance", "style_quality", "luminance",
           "sobel_magnitude", "EDGE_CORRELATION_GOAL"]
