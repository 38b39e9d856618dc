"""Train-time augmentation, on the workers, one implementation for cached and streamed splits.

    images = augment_batch(batch["image"], "flip", generator)        # (B, 3, S, S) -> (B, 3, S, S)
    images = degrade(images, noise=0.1, blur_px=1.0)                  # a critic's robustness to generated pictures
Generative families default to "flip": a zoom-and-crop would teach the generator zoomed, softened pictures and
then be scored against un-augmented ones. Classifiers and style content default to "crop_flip".
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn import functional as F

Augment = Literal["none", "flip", "crop", "crop_flip", "dihedral"]
# Random crops are taken from the batch upscaled by this factor.
CROP_SCALE = 1.125


def augment_batch(images: torch.Tensor, mode: str, gen: torch.Generator, crop_size: int | None = None) -> torch.Tensor:
    """Random crop from a CROP_SCALE upscale ("crop"), horizontal flip of half the images ("flip"), both, or none;
    "dihedral": a random one of the eight quarter turns and mirror images of each (square) image, for data whose
    look does not change with them (textures, the synthetic genres), never for photos or paintings.

    crop_size: random crop_size x crop_size windows at the images' own scale instead (no zoom), before any
    flip: a style net trained on small windows of large images learns at the pixel scale it will stylize at. A
    crop_size of the images' own size is whole images, never zoomed.
    """
    b, _, s, _ = images.shape
    if crop_size is not None:
        if crop_size < s:
            ys, xs = torch.randint(0, s - crop_size + 1, (2, b), generator=gen).tolist()
            images = torch.stack([images[i, :, ys[i] : ys[i] + crop_size, xs[i] : xs[i] + crop_size] for i in range(b)])
            s = crop_size
    elif "crop" in mode:
        big = max(s + 1, int(round(s * CROP_SCALE)))
        up = torch.nn.functional.interpolate(images, size=(big, big), mode="bilinear", antialias=True, align_corners=False)
        xs, ys = torch.randint(0, big - s + 1, (2, b), generator=gen).tolist()
        images = torch.stack([up[i, :, ys[i] : ys[i] + s, xs[i] : xs[i] + s] for i in range(b)])  # (B, 3, S, S)
    if mode == "dihedral":  # a quarter turn k in 0..3 per image; the flip below makes the mirror images
        turns = torch.randint(0, 4, (b,), generator=gen).tolist()
        images = torch.stack([img.rot90(k, (1, 2)) if k else img for img, k in zip(images, turns)])
    if "flip" in mode or mode == "dihedral":
        flip = (torch.rand(b, generator=gen) < 0.5).to(images.device)[:, None, None, None]
        images = torch.where(flip, images.flip(-1), images)
    return images


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of each image (B, 3, H, W) with its own sigma (B,) in pixels (0 = unchanged), 5-tap, reflected."""
    b, c, h, w = x.shape
    taps = torch.arange(-2, 3, dtype=x.dtype, device=x.device)  # (5,)
    kernel = torch.exp(-taps[None] ** 2 / (2 * sigma.to(x).clamp(min=1e-3)[:, None] ** 2))  # (B, 5)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B * 3, 5)
    flat = F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=b * c)  # along H
    return F.conv2d(flat, kernel[:, None, None, :], groups=b * c).reshape(b, c, h, w)  # along W


def degrade(images: torch.Tensor, noise: float, blur_px: float) -> torch.Tensor:
    """Pixel noise of a random strength (sigma ~ U(0, noise) in [0, 1] pixel units) and then a Gaussian blur of a
    random strength (sigma ~ U(0, blur_px) px at 32 px, the same share of the side at other sizes) on each image of
    (B, 3, S, S) in [-1, 1]: the grain and softness every generator's samples have and clean training pictures lack."""
    b, device = len(images), images.device
    if noise > 0:
        sigma = torch.rand(b, 1, 1, 1, device=device) * (2 * noise)  # [0, 1] units -> [-1, 1] units
        images = (images + sigma * torch.randn_like(images)).clamp(-1, 1)
    if blur_px > 0:
        images = blur(images, torch.rand(b, device=device) * blur_px * images.shape[-1] / 32)
    return images


# ---------------------------------------------------------------- differentiable augmentation (GAN discriminators)

DIFF_AUGMENT = ("color", "translation", "cutout")


def diff_augment(x: torch.Tensor, policy: tuple[str, ...]) -> torch.Tensor:
    """DiffAugment (Zhao et al., NeurIPS 2020): the same random, differentiable transforms on real AND generated
    images before D sees them, so a small dataset does not let D memorise it, while G is still taught the
    un-augmented pictures (the transforms never reach what G is compared with). x: (B, 3, H, W) in [-1, 1]."""
    b, _, h, w = x.shape
    dev = x.device
    if "color" in policy:
        x = x + (torch.rand(b, 1, 1, 1, device=dev) - 0.5)  # brightness
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (torch.rand(b, 1, 1, 1, device=dev) * 2) + mean  # saturation
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (torch.rand(b, 1, 1, 1, device=dev) + 0.5) + mean  # contrast
    if "translation" in policy:  # shift by up to 1/8 of the side, zero-padded
        sh, sw = h // 8, w // 8
        dy = torch.randint(-sh, sh + 1, (b, 1, 1), device=dev)
        dx = torch.randint(-sw, sw + 1, (b, 1, 1), device=dev)
        gy, gx = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
        yy = (gy[None] + dy + 1).clamp(0, h + 1)  # (B, H, W) into the 1-px zero-padded image
        xx = (gx[None] + dx + 1).clamp(0, w + 1)
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
        x = padded.permute(0, 2, 3, 1)[torch.arange(b, device=dev)[:, None, None], yy, xx].permute(0, 3, 1, 2)
    if "cutout" in policy:  # one zeroed square of half the side, centred anywhere in the image
        ch, cw = h // 2, w // 2
        top = torch.randint(0, h, (b, 1, 1), device=dev) - ch // 2
        left = torch.randint(0, w, (b, 1, 1), device=dev) - cw // 2
        gy, gx = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
        inside = (gy[None] >= top) & (gy[None] < top + ch) & (gx[None] >= left) & (gx[None] < left + cw)  # (B, H, W)
        x = x * (~inside)[:, None].to(x.dtype)
    return x
