"""genart.evaluate.style_quality on synthetic arrays: holes, edge correlation, colour pull (fast, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genart.evaluate.style_quality import blowout_share, colour_pull, edge_correlation, hole_share


def _scene(seed: int = 0, size: int = 32) -> np.ndarray:
    """(1, 3, S, S) in [0, 1]: a smooth gradient with a few bright and dark rectangles, so it has edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.3 + 0.4 * xx, 0.3 + 0.4 * yy, 0.5 * np.ones_like(xx)])
    for _ in range(4):
        top, left = rng.integers(0, size - 8, size=2)
        img[:, top : top + 8, left : left + 8] = rng.uniform(0.1, 0.9, size=(3, 1, 1))
    return img[None]


def test_black_blob_in_grey_is_a_hole_of_its_area():
    content = np.full((2, 3, 40, 40), 0.5)
    output = content.copy()
    output[0, :, 5:15, 10:30] = 0.0  # 200 px
    output[1, :, 0:10, 0:10] = 1.0  # a white blob is a hole too (content 0.5 < 0.75): 100 px
    assert hole_share(content, output) == pytest.approx(300 / (2 * 40 * 40))
    assert hole_share(content[:1], output[:1]) == pytest.approx(200 / 1600)


def test_saturated_blue_blob_is_a_blowout_not_a_hole():
    content = np.full((1, 3, 20, 20), 0.5)
    output = content.copy()
    output[0, :, 0:5, 0:8] = np.array([0.0, 0.0, 1.0])[:, None, None]  # luma 0.11: not black, but detail gone
    assert hole_share(content, output) == 0.0
    assert blowout_share(content, output) == pytest.approx(40 / 400)
    assert blowout_share(content, content) == 0.0


def test_dark_content_that_stays_dark_is_no_hole():
    content = np.full((1, 3, 16, 16), 0.2)  # already dark: darkening it further is not destroying detail
    assert hole_share(content, np.zeros_like(content)) == 0.0
    assert hole_share(content, content) == 0.0


def test_identity_output_keeps_every_edge_and_colour():
    content = np.concatenate([_scene(0), _scene(1)])
    style = np.random.default_rng(2).uniform(0, 1, size=(3, 24, 20))  # any size
    assert edge_correlation(content, content) == pytest.approx(1.0)
    assert colour_pull(content, content, style) == pytest.approx(0.0, abs=1e-9)
    assert hole_share(content, content) == 0.0


def test_edges_lost_and_colours_pulled():
    content = _scene(0)
    flat = np.full_like(content, 0.5)
    flat[..., 0, 0] = 0.6  # not perfectly flat, so the correlation is defined
    assert abs(edge_correlation(content, flat)) < 0.2
    style = np.zeros((3, 8, 8))
    style[0] = 0.9  # a red style image
    redder = content.copy()
    redder[:, 0] = 0.5 * redder[:, 0] + 0.45
    redder[:, 1:] *= 0.5
    assert colour_pull(content, redder, style) > 0.2
    assert colour_pull(content, 1.0 - redder, style) < 0  # pushed away


def test_torch_and_lists_of_different_sizes():
    a, b = _scene(0, 32), _scene(1, 24)
    same = [torch.from_numpy(a[0]), torch.from_numpy(b[0])]
    assert edge_correlation(same, same) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in size"):
        edge_correlation([a[0]], [b[0]])
