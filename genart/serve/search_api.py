"""The ingress's search endpoints: /v1/similar (an upload's nearest indexed images), /v1/recommend, and thumbnails.

Uploads are decoded and cropped to the feature network's input here, exactly as `genart index` prepared the indexed
images (genart.search.index.square_pixels); the SearchModel deployment embeds them in batches and searches.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' signatures at runtime
import re
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response
from pydantic import Field, StringConstraints

from genart.search.index import square_pixels
from genart.search.query import MAX_K
from genart.serve.config import MAX_LIKED
from genart.serve.ingress import ApiError, CurrentIngress, StrictBody

# An image id: the first 16 hex digits of its pixels' sha256 (genart index, genart prepare). Thumbnails are looked up
# by id in thumbnails.parquet, never on a filesystem; the strict pattern also keeps odd names out of logs and caches.
ID_PATTERN = r"^[0-9a-f]{16}$"
THUMBNAIL_RE = re.compile(r"^([0-9a-f]{16})\.jpg$")
ImageId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
# What a result says; `source` (a path or s3:// URI on the server) stays private, as the checkpoint paths do.
RESULT_FIELDS = ("id", "score", "label", "width", "height")


class RecommendBody(StrictBody):
    liked: list[ImageId] = Field(min_length=1, max_length=MAX_LIKED)  # ids from /v1/similar or an earlier /v1/recommend
    k: int = Field(12, ge=1, le=MAX_K)
    diversity: float = Field(0.3, ge=0.0, le=1.0)  # maximal marginal relevance: 0 = closest only, 1 = most varied


router = APIRouter()  # included by Ingress.__serve_build_asgi_app__


def index_card(ingress) -> dict:
    """The served index's card; 404 when this server has no index."""
    if ingress.search is None:
        raise ApiError(404, "index not found", "this server has no search index; serve one with "
                       "`genart serve --index IDX` (args: index)")
    return ingress.search_card


def results(request: Request, hits: list[dict]) -> list[dict]:
    root = request.scope.get("root_path", "").rstrip("/")  # Serve's route_prefix: URLs the client can follow
    return [{**{key: hit.get(key) for key in RESULT_FIELDS},
             "thumbnail_url": f"{root}/v1/index/thumbnails/{hit['id']}.jpg"} for hit in hits]


@router.post("/v1/similar", summary="The k indexed images closest to the uploaded one (cosine similarity of the "
             "index's features), closest first")
async def similar(request: Request, image: UploadFile = File(...), k: int = Form(12, ge=1, le=MAX_K),
                  ingress=CurrentIngress):
    card = index_card(ingress)
    pixels = await ingress.decode_upload(image, lambda img: square_pixels(img, card["input_size"]))  # (S, S, 3) uint8
    hits = await ingress.await_model(ingress.search.similar.remote(pixels, k), "search")
    return {"index_size": card["size"], "features": card["features"], "k": k, "results": results(request, hits)}


@router.post("/v1/recommend", summary="Indexed images like the liked ones, never those, re-ranked for variety "
             "(maximal marginal relevance)")
async def recommend(body: RecommendBody, request: Request, ingress=CurrentIngress):
    card = index_card(ingress)
    liked = list(dict.fromkeys(body.liked))  # order kept, repeats dropped
    out = await ingress.await_model(ingress.search.recommend.remote(liked, body.k, body.diversity), "search")
    if "unknown" in out:
        unknown = out["unknown"]
        raise ApiError(404, "image not found", f"unknown id {unknown[0]!r} ({len(unknown)} of {len(liked)} liked "
                       "ids are not in the index); ids come from /v1/similar or /v1/recommend results")
    return {"index_size": card["size"], "liked": liked, "k": body.k, "diversity": body.diversity,
            "results": results(request, out["results"])}


@router.get("/v1/index/thumbnails/{name}", summary="An indexed image's thumbnail (JPEG, 96 px square)",
            responses={200: {"content": {"image/jpeg": {}}}})
async def thumbnail(name: str, ingress=CurrentIngress):
    index_card(ingress)
    match = THUMBNAIL_RE.match(name)
    if match is None:
        raise ApiError(404, "not found", "thumbnails are /v1/index/thumbnails/<id>.jpg, an id being 16 hex digits")
    data = await ingress.await_model(ingress.search.thumbnail.remote(match[1]), "search")
    if data is None:
        raise ApiError(404, "image not found", f"no image {match[1]!r} in the index")
    # ids are content hashes: a thumbnail never changes; private, since it may sit behind the API key
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400, immutable"})
