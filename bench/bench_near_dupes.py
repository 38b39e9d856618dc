"""How `genart prepare`'s near-duplicate hash separates copies from distinct pictures; prints JSON. No Ray.

    .venv/bin/python bench/bench_near_dupes.py --paintings ../shared/data

For each threshold: (a) false pairs, the pairs of distinct pictures within it, among synthetic genre images
(genart/data/synth.py, --synth per size at 32, 64 and 128 px) and among the paintings and photos under
--paintings (every image, longer side capped at 512 px); (b) the share of each kind of copy of those paintings
caught: JPEG quality 70, half and double size, crops of 2 % and 5 % (centred; off one side; off two sides, i.e. a
corner crop), and a 5 % crop that is then halved and re-encoded. The default threshold is the largest one with no
false pair here.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os

from PIL import Image

from genart.data import images, near_dupes
from genart.data.synth import GENRES, render


def _jpeg(img: Image.Image, quality: int = 70) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def copies(img: Image.Image) -> dict[str, Image.Image]:
    """The near copies a prepare should catch, by kind."""
    w, h = img.size
    out = {"jpeg70": _jpeg(img), "half": img.resize((w // 2, h // 2), Image.Resampling.LANCZOS),
           "double": img.resize((w * 2, h * 2), Image.Resampling.BICUBIC)}
    for p in (2, 5):
        dx, dy = w * p / 100, h * p / 100
        out[f"crop{p}_centred"] = img.crop((round(dx / 2), round(dy / 2), w - round(dx / 2), h - round(dy / 2)))
        out[f"crop{p}_one_side"] = img.crop((round(dx), 0, w, h))
        out[f"crop{p}_corner"] = img.crop((round(dx), round(dy), w, h))
    out["crop5_half_jpeg70"] = _jpeg(out["crop5_centred"].resize((w // 2, h // 2), Image.Resampling.LANCZOS))
    return out


def false_pairs(hashes: list[int], thresholds: list[int]) -> dict:
    dists = [near_dupes.distance(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]]
    return {"closest_distinct": min(dists), **{str(t): sum(d <= t for d in dists) for t in thresholds}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paintings", default=os.path.join(os.path.dirname(__file__), "..", "genart", "assets"))
    parser.add_argument("--synth", type=int, default=500, help="synthetic images per size")
    parser.add_argument("--thresholds", default="16,24,28,32,36,40")
    args = parser.parse_args()
    thresholds = [int(t) for t in args.thresholds.split(",")]

    def h(img):
        return int(near_dupes.perceptual_hash(img), 16)

    result = {"hash_bits": near_dupes.HASH_BITS, "default_threshold": near_dupes.DEFAULT_THRESHOLD, "false_pairs": {}}
    for size in (32, 64, 128):
        synth = [h(render(GENRES[i % len(GENRES)], i // len(GENRES), size)) for i in range(args.synth)]
        result["false_pairs"][f"synth{size}_x{args.synth}"] = false_pairs(synth, thresholds)
    paths = sorted(p for p in glob.glob(os.path.join(args.paintings, "**", "*"), recursive=True)
                   if p.lower().endswith((".jpg", ".jpeg", ".png")))
    paintings = [images.cap_side(images.decode_image(open(p, "rb").read()), 512) for p in paths]
    hashes = [h(img) for img in paintings]
    result["false_pairs"][f"paintings_x{len(paintings)}"] = false_pairs(hashes, thresholds)
    caught: dict[str, list[int]] = {}
    for img, value in zip(paintings, hashes):
        for kind, copy in copies(img).items():
            caught.setdefault(kind, []).append(near_dupes.distance(h(copy), value))
    result["copies_caught"] = {kind: {t: round(sum(d <= t for d in ds) / len(ds), 3) for t in thresholds}
                               for kind, ds in caught.items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
