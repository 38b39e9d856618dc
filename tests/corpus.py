"""A corpus of odd and broken image files, generated on the fly, with the verdict prepare must reach for each."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile

import numpy as np
from PIL import Image


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _picture(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")


def _exif_rotated() -> bytes:
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW on display -> 20 x 40 once applied
    return _save(img, "JPEG", exif=exif.tobytes(), quality=95)


def _bomb(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of side x side (400 MP at 20000) that is ~50 KB on disk, built chunk by chunk."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte + packed bits
    raw = zlib.compress(row * side, 9)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _ico(png: bytes) -> bytes:
    """An ICO file whose one directory entry says 256 x 256 and holds `png` (Pillow decodes it inside open())."""
    import struct

    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


def files() -> dict[str, tuple[bytes, str | None]]:
    """relative path -> (bytes, expected reject reason prefix, or None when the file must be kept)."""
    good_jpeg = _save(_picture(1), "JPEG", quality=90)
    dup_source = _picture(2)
    palette = Image.new("P", (16, 16))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    sixteen = Image.fromarray((np.arange(32 * 24, dtype=np.uint16).reshape(24, 32) * 80))  # mode I;16
    return {
        "cats/good.jpg": (good_jpeg, None),
        "cats/deeper/nested.png": (_png(_picture(3)), None),  # belongs to label "cats"
        "cats/rgba.png": (_png(Image.new("RGBA", (20, 20), (0, 0, 255, 0))), None),
        "cats/palette_transparent.png": (_png(palette, transparency=0), None),
        "dogs/gray.png": (_png(Image.new("L", (20, 20), 128)), None),
        "dogs/onebit.png": (_png(Image.fromarray(np.indices((20, 22)).sum(0) % 2 == 0)), None),  # 1-bit checkerboard
        "dogs/sixteen.png": (_png(sixteen), None),
        "dogs/cmyk.jpg": (_save(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"), None),
        "dogs/rotated.jpg": (_exif_rotated(), None),
        "dogs/really_a_png.jpg": (_png(_picture(4)), None),  # extension lies; content decides
        "dogs/pic.webp": (_save(_picture(5), "WEBP", lossless=True), None),
        "dogs/pic.gif": (_save(_picture(6).convert("P"), "GIF"), None),
        "dogs/pic.tiff": (_save(_picture(7), "TIFF"), None),
        "birds/dup_a.png": (_png(dup_source), None),
        "birds/dup_b.bmp": (_save(dup_source, "BMP"), "duplicate"),  # same pixels, other encoding
        "birds/empty.png": (b"", "empty file"),
        "birds/notes.png": (b"this is not an image at all\n", "not an image"),
        "birds/truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "corrupt or truncated image"),
        "birds/truncated.png": (_png(_picture(8))[:-40], "corrupt or truncated image"),
        "birds/bomb.png": (_bomb(), "too many pixels"),
        "birds/bomb.ico": (_ico(_bomb()), "not an image"),  # ICO is no accepted format: its bomb would decode in open()
    }


def write_folder(root: str) -> dict:
    corpus = files()
    for rel, (data, _) in corpus.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return corpus


def write_zip(path: str, top: str = "corpus") -> dict:
    corpus = files()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, (data, _) in corpus.items():
            zf.writestr(f"{top}/{rel}", data)
    return corpus


def write_tar(path: str) -> dict:
    corpus = files()
    with tarfile.open(path, "w:gz") as tf:
        for rel, (data, _) in corpus.items():
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return corpus


def corrupt_zip_member(path: str, member_suffix: str) -> None:
    """Flip bytes inside one member's compressed data so reading it fails its CRC check."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 5)
        chunk = bytearray(f.read(16))
        f.seek(-16, 1)
        f.write(bytes(b ^ 0xFF for b in chunk))
