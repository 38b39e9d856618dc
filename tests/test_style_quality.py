"""genart.evaluate.style_quality on synthetic arrays: holes, blotches, edge correlation, colour pull (fast, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genart.evaluate.style_quality import blotch_share, blowout_share, colour_pull, edge_correlation, hole_share


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


def _dark_hill(size: int = 48) -> np.ndarray:
    """(1, 3, S, S): a light sky (0.8) over a dark hill (0.2, the lower half) with faint stripes, like a dark painted hill."""
    img = np.full((1, 3, size, size), 0.8)
    img[..., size // 2 :, :] = 0.2 + 0.03 * (np.arange(size) % 4 == 0)  # (S/2, S) broadcast over rows
    return img


def test_dark_blob_on_a_dark_hill_is_a_blotch_but_no_hole():
    content = _dark_hill()
    blotched = content.copy()
    blotched[..., 28:44, 10:34] = 0.07  # brown-black patch on the hill: luma > HOLE_DARK_OUT, content not > 0.25
    assert hole_share(content, blotched) == 0.0  # the hole metric cannot see it (the content was dark)
    share = blotch_share(content, blotched)
    assert 0.5 * 384 / 48**2 < share <= 384 / 48**2  # most of the patch (the 9x9 window shaves its rim)
    assert blotch_share(content, content) == 0.0


def test_shifts_that_are_no_blotch():
    content = _dark_hill()
    bluer_sky = content.copy()
    bluer_sky[:, :, :24] = np.array([0.45, 0.6, 0.9])[:, None, None]  # cream sky repainted blue: luma 0.8 -> 0.6
    assert blotch_share(content, bluer_sky) == 0.0
    dimmer = content * 0.85  # the whole picture a little darker: every local drop is under BLOTCH_DROP
    assert blotch_share(content, dimmer) == 0.0
    dark = np.full((1, 3, 24, 24), 0.04)
    assert blotch_share(dark, dark * 0.3) == 0.0  # near-black content made blacker: the drop is too small to see
    hill = np.full((1, 3, 24, 24), 0.11)  # a dark hill's luma (Sargent's near Grasse) turned black is a blotch
    assert blotch_share(hill, hill * 0.1) == 1.0


def test_blotch_share_is_pixel_weighted_over_images():
    content = np.concatenate([_dark_hill(), _dark_hill()])
    output = content.copy()
    output[0, :, 28:44, 10:34] = 0.07
    one = blotch_share(content[:1], output[:1])
    assert blotch_share(content, output) == pytest.approx(one / 2)
    assert blotch_share(torch.from_numpy(content), torch.from_numpy(output)) == pytest.approx(one / 2)


def test_identity_output_keeps_every_edge_and_colour():
    content = np.concatenate([_scene(0), _scene(1)])
    style = np.random.default_rng(2).uniform(0, 1, size=(3, 24, 20))  # any size
    assert edge_correlation(content, content) == pytest.approx(1.0)
    assert colour_pull(content, content, style) == pytest.approx(0.0, abs=1e-9)
    assert hole_share(content, content) == 0.0
    assert blotch_share(content, content) == 0.0


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
