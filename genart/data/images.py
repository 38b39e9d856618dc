"""Decode, validate and normalise one image; the single gate every image passes (prepare, inference, serving).

`decode_image` fully decodes (not just the header), recognises the format from the content, applies EXIF
orientation, converts every mode to 8-bit RGB (alpha composited onto white) and refuses decompression bombs.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from genart.errors import one_line

# Pillow's own bomb guard is global and raises only past 2x its limit; genart checks the header size against
# its own per-call cap before decoding instead, so the global guard is switched off here.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default limit (~ a 9459 x 9459 image)


def file_byte_cap(max_pixels: int | None) -> int | None:
    """The largest file that can hold an image within `max_pixels`: its raw 16-bit RGBA pixels (8 bytes each) plus
    1 MiB of headers and metadata. Readers reject bigger files and archive members unread, so a small zip cannot
    unpack gigabytes into a worker's memory before the pixel cap sees them."""
    return 8 * max_pixels + (1 << 20) if max_pixels else None


# Formats that decode in pure Pillow and read only their header in Image.open, so the pixel cap below runs before
# any decoding; never EPS/PS (Ghostscript) or other formats that shell out, nor ICO (Pillow decodes an ICO's embedded
# PNG inside open(), whatever size it holds: a 10 MB upload could ask for gigabytes).
Image.init()
SAFE_FORMATS = tuple(
    f for f in ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PPM", "TGA", "QOI") if f in Image.OPEN
)
WHITE = (255, 255, 255)


class Reject(Exception):
    """An input that cannot be used; `reason` is a short, stable, human-readable string."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """bytes -> fully decoded 8-bit RGB PIL image, or raise Reject with the reason."""
    if not data:
        raise Reject("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=SAFE_FORMATS)
    except UnidentifiedImageError:
        raise Reject("not an image (unrecognised format)") from None
    except Exception as exc:  # noqa: BLE001 - a header Pillow cannot parse is a bad input, never a crash
        raise Reject(f"corrupt image header: {one_line(exc, with_type=False)}") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise Reject("image has no pixels")
    if max_pixels and width * height > max_pixels:
        raise Reject(f"too many pixels: {width}x{height} = {width * height} > cap {max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if img.format == "PNG":
                # Pillow stops reading at the last pixel row; verify() walks every chunk to IEND and checks CRCs.
                Image.open(io.BytesIO(data), formats=("PNG",)).verify()
            img.load()  # the full decode: truncated or corrupt data fails here
            white = declared_white(img)  # before exif_transpose: its copy keeps neither the format nor TIFF tags
            img = ImageOps.exif_transpose(img)
            return to_rgb(img, white)
    except Exception as exc:  # noqa: BLE001
        raise Reject(f"corrupt or truncated image: {one_line(exc, with_type=False)}") from None


def declared_white(img: Image.Image) -> float | None:
    """The value of white in a 16/32-bit integer image ("I;16*", "I"), from the depth its file declares; None for
    other modes. Never from the pixels: a dark 16-bit picture holds only small values, not 8-bit ones."""
    if not (img.mode.startswith("I;16") or img.mode == "I"):
        return None
    tags = getattr(img, "tag_v2", None)
    if img.format == "TIFF" and tags is not None:
        # A TIFF says its depth: Pillow opens 10-, 12- and 14-bit samples (scanners, cameras, microscopes) as I;16
        # holding 0..1023, 0..4095 or 0..16383, so 65535 would make their white nearly black.
        container = 16 if img.mode.startswith("I;16") else 32
        bits, sample_format = tags.get(258, container), tags.get(339, 1)  # BitsPerSample, SampleFormat (2: signed)
        bits = bits[0] if isinstance(bits, tuple) else bits
        signed = (sample_format[0] if isinstance(sample_format, tuple) else sample_format) == 2
        if isinstance(bits, int) and 1 + signed <= bits <= container:  # else a broken tag: the container's depth
            return 2.0 ** (bits - signed) - 1
        return 2.0 ** container - 1
    return 65535.0  # PGM/PPM and PNG: Pillow widens any maxval above 255 (and 16-bit PNG) to 0..65535


def to_rgb(img: Image.Image, white: float | None = None) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Alpha is composited onto white; 16/32-bit integer images are scaled by `white`
    (their file's depth: `declared_white`; 65535 if not given), float ones as described below."""
    mode = img.mode
    if mode in ("RGB", "L") and "transparency" in img.info:  # a colour key: that colour is see-through
        img, mode = img.convert("RGBA"), "RGBA"
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            # A float image declares no range, so its values must tell: [0, 1] is the usual one (what float TIFFs
            # from imaging tools hold, and what scaling by 255 turned black); past 1 they are 8- or 16-bit levels.
            top = arr.max(initial=0)
            white = 1.0 if top <= 1.0 else 255.0 if top <= 255 else 65535.0
        arr = np.clip(arr / (white or 65535.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV, RGBX


def pixel_sha256(img: Image.Image) -> str:
    """Hash of the decoded pixels and size: equal for the same picture in any encoding."""
    h = hashlib.sha256()
    h.update(f"{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def resize_square(img: Image.Image, size: int, mode: str = "crop") -> Image.Image:
    """Center-crop (default) or pad to a square, then resize to size x size with Lanczos (a good downsampling filter)."""
    if mode == "crop":
        side = min(img.size)
        left, top = (img.width - side) / 2, (img.height - side) / 2
        box = (left, top, left + side, top + side)
        return img.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    if mode == "pad":
        return ImageOps.pad(img, (size, size), method=Image.Resampling.LANCZOS, color=WHITE)
    raise ValueError(f"resize mode must be 'crop' or 'pad', not {mode!r}")


def model_input(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
    """The one way an image becomes a square model input everywhere (training data, batch jobs, serving, metrics):
    (H, W, 3) uint8 or a PIL image -> center-crop to a square, Lanczos to size x size -> float32 (3, S, S) in [0, 1]."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image), "RGB")
    return to_array(resize_square(img.convert("RGB"), size, "crop"))


def cap_side(img: Image.Image, max_side: int | None) -> Image.Image:
    """Downscale so the longer side is at most max_side, keeping the aspect ratio."""
    if not max_side or max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode(img: Image.Image, fmt: str = "png", quality: int = 92) -> bytes:
    """Encode an RGB image: png (lossless, fast compression), jpeg or webp."""
    buf = io.BytesIO()
    fmt = fmt.lower()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=3)
    elif fmt in ("jpeg", "jpg"):
        img.save(buf, format="JPEG", quality=quality, subsampling=0)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


def encode_png(img: Image.Image) -> bytes:
    return encode(img, "png")


def to_array(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 (3, H, W) in [0, 1]."""
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0


def to_tensor01(imgs: list[Image.Image]):
    """Same-size RGB images -> torch float32 (N, 3, H, W) in [0, 1]."""
    import torch

    return torch.from_numpy(np.stack([to_array(im) for im in imgs]))


def from_tensor01(batch) -> list[Image.Image]:
    """torch or numpy (N, 3, H, W) in [0, 1] -> RGB PIL images (values clipped, rounded)."""
    arr = batch.detach().cpu().numpy() if hasattr(batch, "detach") else np.asarray(batch)
    arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)
    return [Image.fromarray(a, "RGB") for a in arr]
