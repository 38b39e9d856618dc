"""Queries on an index folder (`genart index`): images similar to an upload, and recommendations from liked ids.

    idx = SearchIndex.open("indexes/synth")                      # local or s3://
    hits = idx.similar(open("query.png", "rb").read(), k=12)      # [{"id", "score", "label", "source", ...}]
    recs = idx.recommend(["3f2a...", "9c01..."], k=12, diversity=0.3)
Recommendations rank by maximal marginal relevance (Carbonell & Goldstein 1998): closeness to the liked images'
mean vector, minus `diversity` x the closeness to what is already picked; liked ids are never returned.
"""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pyarrow.parquet as pq

from genart import storage
from genart.data import images
from genart.errors import UserError
from genart.search import index as index_files

MAX_K = 100
MMR_POOL = 200  # candidates MMR re-ranks (the nearest to the liked mean)


class SearchIndex:
    """An index folder loaded for queries: vectors (N, D), metadata rows, the faiss index, and the feature model."""

    def __init__(self, uri: str, manifest: dict, vectors: np.ndarray, metadata: list[dict], nn, device=None):
        self.uri = uri
        self.device = device  # where the feature model runs; None = a GPU if there is one
        self.manifest = manifest
        self.vectors = vectors
        self.metadata = metadata
        self.nn = nn
        self.row_of = {m["id"]: i for i, m in enumerate(metadata)}
        self._extractor = None
        self._thumbnails: dict[str, bytes] | None = None
        self._thumbnails_lock = threading.Lock()  # concurrent first requests read thumbnails.parquet once

    @classmethod
    def open(cls, uri: str, device=None) -> "SearchIndex":
        manifest_uri = storage.join(uri, "index.json")
        if not storage.exists(manifest_uri):
            raise UserError(f"{uri} is not a finished index (no index.json); build it with `genart index`")
        manifest = json.loads(storage.read_text(manifest_uri))
        vectors = np.load(io.BytesIO(storage.read_bytes(storage.join(uri, "vectors.npy"))), allow_pickle=False)
        metadata = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(uri, "metadata.parquet")))).to_pylist()
        nn = index_files.nn_from_bytes(storage.read_bytes(storage.join(uri, "faiss.index")))
        if not (len(vectors) == len(metadata) == nn.ntotal):
            raise UserError(f"{uri}: vectors, metadata and faiss.index disagree in length; rebuild with `genart index --overwrite`")
        return cls(uri, manifest, vectors, metadata, nn, device)

    @property
    def size(self) -> int:
        return len(self.metadata)

    @property
    def extractor(self):
        if self._extractor is None:  # only `similar` needs the feature model
            from genart.evaluate.features import build_extractor

            extractor = build_extractor(self.manifest["features"]["spec"], device=self.device)
            if extractor.identity != self.manifest["features"]["identity"]:  # kept only once checked: every call says so
                raise UserError(f"the feature model {self.manifest['features']['spec']} changed since {self.uri} was "
                                "built; rebuild the index with `genart index --overwrite`")
            self._extractor = extractor
        return self._extractor

    def load_thumbnails(self) -> None:
        """Read thumbnails.parquet (once): a server does it at start, beside the vectors, so its thumbnails are the
        ones of the index it opened."""
        with self._thumbnails_lock:
            if self._thumbnails is None:
                table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(self.uri, "thumbnails.parquet"))))
                self._thumbnails = dict(zip(table.column("id").to_pylist(), table.column("thumbnail").to_pylist()))

    def thumbnail(self, image_id: str) -> bytes | None:
        self.load_thumbnails()
        return self._thumbnails.get(image_id)

    @property
    def input_size(self) -> int:
        """The feature network's square input side (px), from index.json: known without loading the network."""
        return int(self.manifest["features"]["input_size"])

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3), cropped and resized by `index.square_pixels` to `input_size` -> unit vectors (N, D).
        The server crops uploads where they arrive and embeds them here, in batches."""
        return index_files.normalize(self.extractor(pixels))

    def embed(self, data: bytes, max_pixels: int = images.DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Image bytes -> unit vector (D,), preprocessed exactly as the indexed images were."""
        img = images.decode_image(data, max_pixels)  # images.Reject for a bad upload
        return self.embed_pixels(index_files.square_pixels(img, self.input_size)[None])[0]

    def _hit(self, row: int, score: float) -> dict:
        return {**self.metadata[row], "score": round(float(score), 6)}

    def search(self, vector: np.ndarray, k: int, exclude: set[int] = frozenset()) -> list[dict]:
        k = _check_k(k)
        want = min(self.size, k + len(exclude))
        scores, rows = self.nn.search(np.asarray(vector, np.float32)[None], want)
        hits = [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0 and int(r) not in exclude]
        return [self._hit(r, s) for r, s in hits[:k]]

    def similar(self, data: bytes, k: int = 12) -> list[dict]:
        return self.search(self.embed(data), k)

    def rows_of(self, ids: list[str]) -> list[int]:
        missing = [i for i in ids if i not in self.row_of]
        if missing:
            raise UserError(f"unknown id {missing[0]!r} in this index ({len(missing)} unknown); ids come from "
                            "metadata.parquet or a `similar` result")
        return [self.row_of[i] for i in ids]

    def recommend(self, liked: list[str], k: int = 12, diversity: float = 0.3) -> list[dict]:
        """MMR over the nearest candidates to the liked images' mean vector, never returning a liked id."""
        k = _check_k(k)
        if not liked:
            raise UserError("--liked: give at least one id")
        if not 0.0 <= diversity <= 1.0:
            raise UserError(f"--diversity {diversity}: must be between 0 (closest only) and 1 (most varied)")
        rows = self.rows_of(list(dict.fromkeys(liked)))  # a repeated id counts once (as the API's recommend)
        query = index_files.normalize(self.vectors[rows].mean(axis=0, keepdims=True))[0]
        liked_rows = set(rows)
        pool = min(self.size, max(MMR_POOL, 4 * k) + len(liked_rows))
        scores, found = self.nn.search(query[None], pool)
        candidates = [(int(r), float(s)) for r, s in zip(found[0], scores[0]) if r >= 0 and int(r) not in liked_rows]
        if not candidates:
            return []
        cand_rows = np.array([r for r, _ in candidates])
        relevance = np.array([s for _, s in candidates])
        vecs = self.vectors[cand_rows]  # (C, D)
        redundancy = np.full(len(candidates), -np.inf)
        picked: list[int] = []
        for _ in range(min(k, len(candidates))):
            mmr = (1 - diversity) * relevance - diversity * np.where(np.isinf(redundancy), 0.0, redundancy)
            mmr[picked] = -np.inf
            best = int(np.argmax(mmr))
            picked.append(best)
            redundancy = np.maximum(redundancy, vecs @ vecs[best])
        return [self._hit(int(cand_rows[i]), relevance[i]) for i in picked]


def _check_k(k: int) -> int:
    if not 1 <= int(k) <= MAX_K:
        raise UserError(f"-k {k}: must be between 1 and {MAX_K}")
    return int(k)


def contact_sheet(idx: SearchIndex, query: list, hits: list[dict], title: str = "") -> bytes:
    """PNG: the query image(s) (bytes or ids) on the left, then the results with their scores and labels."""
    from PIL import Image, ImageDraw

    side, pad, caption = index_files.THUMB_SIDE, 6, 26
    tiles = []
    for q in query:
        if isinstance(q, bytes):
            tiles.append(images.resize_square(images.decode_image(q), side))
        else:
            tiles.append(_thumb_image(idx, q))
    per_row = max(1, min(len(hits), 6))
    columns = len(tiles) + 1 + per_row  # a blank column between the query and the results
    rows = max(1, -(-len(hits) // per_row))
    width = columns * (side + pad) + pad
    height = rows * (side + caption + pad) + pad + 18
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 3), title or "query | results", fill="black")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (pad + i * (side + pad), 18 + pad))
        draw.text((pad + i * (side + pad), 18 + pad + side + 2), "query" if i == 0 else "", fill="black")
    first = len(tiles) + 1
    for j, hit in enumerate(hits):
        col, row = first + j % per_row, j // per_row
        x, y = pad + col * (side + pad), 18 + pad + row * (side + caption + pad)
        sheet.paste(_thumb_image(idx, hit["id"]), (x, y))
        draw.text((x, y + side + 1), f"{hit['score']:.3f}", fill="black")
        draw.text((x, y + side + 12), str(hit.get("label") or "")[:14], fill="gray")
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    return buf.getvalue()


def _thumb_image(idx: SearchIndex, image_id: str):
    from PIL import Image

    data = idx.thumbnail(image_id)
    if data is None:
        return Image.new("RGB", (index_files.THUMB_SIDE, index_files.THUMB_SIDE), "lightgray")
    return images.decode_image(data)
