"""Near-duplicate pictures for `genart prepare`: a perceptual hash per image and a multi-index search for close pairs.

The hash is colour-aware: imagehash's pHash (DCT, 64 bits) of each RGB channel of a 32 x 32 thumbnail, plus a
thermometer code of the mean colour. Re-encoded, resized and slightly cropped copies land a few bits apart;
tuned in bench/bench_near_dupes.py (threshold, false positives on synthetic genres and on the shipped paintings).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image

HASH_SIDE = 32  # px: pHash's own working size (8 x 8 low frequencies of a 32 x 32 DCT)
MEAN_LEVELS = 32  # mean colour per channel in 32 steps of 8 intensity units; its thermometer code has 31 bits
MEAN_BITS = 3 * (MEAN_LEVELS - 1)  # the low bits of the hash
HASH_BITS = 3 * 64 + MEAN_BITS  # 285
WORDS = (HASH_BITS + 63) // 64  # uint64 words of one hash
# Hamming distance at or below which two pictures are near duplicates. Measured (bench/bench_near_dupes.py):
# JPEG, resized and 2 % cropped copies all caught, 5 % crops mostly; no false pair among 1,500 synthetic genre
# images (the first appears at 36, at 32 px) nor among 180 paintings and photos.
DEFAULT_THRESHOLD = 32
CHUNK_BITS = 16  # width of one multi-index table key


def perceptual_hash(img: Image.Image) -> str:
    """An RGB image -> HASH_BITS-bit hash as hex. Equal-looking pictures get hashes a few bits apart.

    Per-channel pHash keeps structure that grey pHash loses (two layouts in different colours); the mean-colour
    code separates flat or nearly flat pictures, whose pHash bits are all alike whatever their colour.
    """
    import imagehash

    # One Lanczos resize of the whole picture, so a 6000 px scan costs one reduction, not three.
    small = img.convert("RGB").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    value = 0
    for channel in small.split():
        bits = imagehash.phash(channel, hash_size=8, highfreq_factor=HASH_SIDE // 8).hash.flatten()
        value = (value << 64) | int("".join("1" if b else "0" for b in bits), 2)
    for mean in np.asarray(small, dtype=np.float64).mean(axis=(0, 1)):
        level = min(MEAN_LEVELS - 1, int(mean * MEAN_LEVELS / 256.0))
        value = (value << (MEAN_LEVELS - 1)) | ((1 << level) - 1)  # `level` ones: Hamming = |level difference|
    return format(value, f"0{(HASH_BITS + 3) // 4}x")


def distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@dataclass(frozen=True)
class Pair:
    kept: int  # positions in the list given to `find`
    duplicate: int
    distance: int


def _flip_masks(width: int, radius: int) -> list[int]:
    """Every `width`-bit mask with at most `radius` bits set."""
    return [sum(1 << i for i in flips) for r in range(radius + 1) for flips in itertools.combinations(range(width), r)]


def close_pairs(values: list[int], threshold: int) -> np.ndarray:
    """All pairs within `threshold`, as rows (earlier, later, distance) of an int64 array, by multi-index hashing
    (Norouzi et al., CVPR 2012), vectorised with numpy.

    The pHash bits are cut into m = 12 chunks of CHUNK_BITS. Two hashes within distance t have, by pigeonhole, one
    chunk within floor(t / m) bits of each other, so each chunk is probed at every key within that radius (at t = 32
    the radius is 2: 137 keys a chunk, 1,644 in all) in a table of the chunk's 2**16 keys, and only the
    hashes found there are compared. The mean-colour bits are left out of the chunks (nearly equal across a
    dataset, they would make every picture a candidate of every other) but count in the distance compared.

    Cost: m * probes * O(n) table look-ups plus the candidates found. For spread-out hashes a key holds
    n / 2**CHUNK_BITS of them, so there are ~n**2 * 1644 / 65536 / 2 candidates, 1/40 of the n**2 / 2 pairs of a
    brute-force scan, and each is 5 popcounts in numpy; clusters of similar pictures cost more, as they must.
    """
    n = len(values)
    words = np.array([[(v >> (64 * w)) & (2**64 - 1) for w in range(WORDS)] for v in values], dtype=np.uint64).reshape(n, WORDS)
    starts = range(MEAN_BITS, HASH_BITS, CHUNK_BITS)
    chunks = np.array([[(v >> lo) & (2**CHUNK_BITS - 1) for lo in starts] for v in values], dtype=np.int64).reshape(n, len(starts))
    masks = _flip_masks(CHUNK_BITS, threshold // len(starts))
    found = [np.zeros((0, 3), np.int64)]
    for column in chunks.T:
        order = np.argsort(column, kind="stable")  # positions grouped by key; a key's group starts at first[key]
        size = np.bincount(column, minlength=2**CHUNK_BITS)
        first = np.cumsum(size) - size
        for mask in masks:
            probe = column ^ mask
            lo, counts = first[probe], size[probe]
            total = int(counts.sum())
            if not total:
                continue
            later = np.repeat(np.arange(n), counts)
            offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
            earlier = order[np.repeat(lo, counts) + offsets]
            keep = earlier < later  # each pair once; a hash is no pair of itself
            earlier, later = earlier[keep], later[keep]
            dist = np.bitwise_count(words[earlier] ^ words[later]).sum(axis=1, dtype=np.int64)
            near = dist <= threshold
            found.append(np.stack([earlier[near], later[near], dist[near]], axis=1))
    return np.unique(np.concatenate(found), axis=0)


def find(hashes: list[str], threshold: int = DEFAULT_THRESHOLD) -> list[Pair]:
    """Near-duplicate pairs among `hashes` (hex), given in the dataset's stable order.

    Greedy and deterministic: walking that order, a picture within `threshold` of one already kept is a near
    duplicate of the closest such one (the earliest on ties); otherwise it is kept. Dropping every `duplicate`
    therefore leaves no two kept pictures within the threshold, and the same input always gives the same pairs.
    """
    pairs = close_pairs([int(h, 16) for h in hashes], threshold)
    pairs = pairs[np.lexsort((pairs[:, 0], pairs[:, 2], pairs[:, 1]))]  # by later, then distance, then earlier
    kept = np.ones(len(hashes), dtype=bool)
    out = []
    for earlier, later, dist in pairs.tolist():
        if kept[later] and kept[earlier]:  # the first kept one in this order is the closest
            kept[later] = False
            out.append(Pair(kept=earlier, duplicate=later, distance=dist))
    return out
