"""Search over real HTTP: /v1/similar, /v1/recommend and thumbnails from a Serve app over a real `genart index`
(conftest's search_index), with the API's limits and error statuses."""

from __future__ import annotations

import io
import os
import secrets
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from genart.search.query import SearchIndex
from genart.runtime import free_port
from test_serve import assert_error, png

KEY_ENV = "GENART_TEST_SEARCH_KEY"


@pytest.fixture(scope="module")
def search(ray_session, search_index):
    """An app serving only the index, behind an API key, with small caps and a short queue so a flood meets 503s."""
    from ray import serve

    from genart.serve.app import build
    from genart.serve.run import start_http

    host, port = start_http("127.0.0.1", free_port())
    name, key = "t-search", secrets.token_urlsafe(16)
    os.environ[KEY_ENV] = key
    try:
        serve.run(build({"index": search_index["index"], "api_key_env": KEY_ENV, "max_upload_mb": 0.5,
                         "max_pixels": 200 * 200, "max_ongoing_requests": 2, "max_queued_requests": 2,
                         "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2}}),
                  name=name, route_prefix=f"/{name}")
    finally:
        os.environ.pop(KEY_ENV, None)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {key}"
    yield f"http://{host}:{port}/{name}", session, SearchIndex.open(search_index["index"])
    session.close()
    serve.delete(name)


def near_copy(path: str) -> bytes:
    """The image at 2x (nearest), JPEG re-encoded: not the indexed bytes, and not the indexed pixels."""
    buf = io.BytesIO()
    Image.open(path).convert("RGB").resize((64, 64), Image.Resampling.NEAREST).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def similar(url, session, data: bytes, **form):
    return session.post(url + "/v1/similar", files={"image": ("query.jpg", data, "image/jpeg")}, data=form, timeout=60)


def test_similar_finds_a_resized_reencoded_copy_first_as_genart_similar_does(search):
    url, session, idx = search
    targets = [m for m in idx.metadata if m["label"] in ("stripes", "grid", "noise")][::7][:4]
    assert len({t["label"] for t in targets}) >= 2
    for target in targets:
        query = near_copy(target["source"])
        r = similar(url, session, query, k="5")
        assert r.status_code == 200, r.text
        body = r.json()
        hits = body["results"]
        assert len(hits) == 5 and body["index_size"] == idx.size == 40
        assert hits[0]["id"] == target["id"] and hits[0]["label"] == target["label"], (target, hits[:2])
        assert set(hits[0]) == {"id", "score", "label", "width", "height", "thumbnail_url"}  # no server paths
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        # the same embedding as `genart similar` (SearchIndex.similar on the bytes): same ids, same scores
        local = idx.similar(query, 5)
        assert [h["id"] for h in hits] == [h["id"] for h in local]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(hits, local)) < 1e-4

    thumb = session.get(url.rsplit("/", 1)[0] + hits[0]["thumbnail_url"])  # an absolute path under the route prefix
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (96, 96)
    assert len(similar(url, session, near_copy(targets[0]["source"])).json()["results"]) == 12  # the default k

    # concurrent uploads share embedding batches; each still gets its own answer
    queries = [near_copy(t["source"]) for t in targets] * 2
    with ThreadPoolExecutor(max_workers=2) as pool:  # 2 = the replica's max_ongoing_requests: no 503 here
        together = list(pool.map(lambda q: similar(url, session, q, k="3").json()["results"][0]["id"], queries))
    assert together == [t["id"] for t in targets] * 2


def test_recommend_never_returns_the_liked_ids(search):
    url, session, idx = search
    liked = [idx.metadata[0]["id"], idx.metadata[1]["id"]]
    r = session.post(url + "/v1/recommend", json={"liked": liked + liked[:1], "k": 10, "diversity": 0.5})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [h["id"] for h in body["results"]]
    assert body["liked"] == liked and len(ids) == 10 == len(set(ids)) and not set(ids) & set(liked)
    assert ids == [h["id"] for h in idx.recommend(liked, 10, 0.5)]  # the same ranking as `genart recommend`
    every = session.post(url + "/v1/recommend", json={"liked": liked, "k": 100}).json()["results"]
    assert len(every) == idx.size - 2 and not {h["id"] for h in every} & set(liked)


def test_models_reports_the_index(search):
    url, session, idx = search
    body = session.get(url + "/v1/models").json()
    assert body["models"] == []
    assert body["search"]["size"] == 40 and body["search"]["dim"] == 128 and body["search"]["features"] == "critic"
    assert "index" not in body["search"]  # where the index lives stays on the server
    spec = session.get(url + "/openapi.json").json()
    assert {"/v1/similar", "/v1/recommend", "/v1/index/thumbnails/{name}"} <= set(spec["paths"])


def test_search_error_statuses(search):
    url, session, idx = search
    some_id = idx.metadata[0]["id"]
    good = png(40, 30)
    assert_error(similar(url, session, b"\0" * (600 * 1024)), 413, "max_upload_mb")
    assert_error(similar(url, session, b"hello, not an image"), 400, "not an image")
    assert_error(similar(url, session, good[: len(good) // 2]), 400, "bad image")
    assert_error(similar(url, session, png(300, 300)), 400, "too many pixels")
    assert_error(similar(url, session, b""), 400, "empty")
    for k in ("0", "101", "many"):
        assert_error(similar(url, session, good, k=k), 422)
    assert_error(session.post(url + "/v1/similar", data={"k": "3"}), 422)  # no image part
    for body in ({"liked": []}, {"liked": [some_id], "k": 0}, {"liked": [some_id], "k": 101},
                 {"liked": [some_id], "diversity": 1.5}, {"liked": ["../../etc/passwd"]}, {"liked": [some_id.upper()]},
                 {"liked": [some_id] * 101}, {"liked": [some_id], "unknown_field": 1}, {"liked": some_id}):
        assert_error(session.post(url + "/v1/recommend", json=body), 422)
    assert_error(session.post(url + "/v1/recommend", json={"liked": [some_id, "0123456789abcdef"]}), 404,
                 "0123456789abcdef")

    thumbs = url + "/v1/index/thumbnails/"
    assert session.get(thumbs + f"{some_id}.jpg").status_code == 200
    for name in ("0123456789abcdef.jpg", f"{some_id}.png", f"{some_id.upper()}.jpg", "..%2Findex.json",
                 "..%2F..%2F..%2Fetc%2Fpasswd", f"{some_id}.jpg%00.png", "thumbnails.parquet", ".jpg"):
        assert_error(session.get(thumbs + name), 404)
    assert_error(session.get(url + "/v1/index/thumbnails/../../index.json"), 404)
    assert_error(session.get(url + "/v1/index/nothing"), 404)
    assert_error(session.get(thumbs + f"{some_id}.jpg", headers={"Authorization": ""}), 401)  # thumbnails are data

    for call in (lambda: requests.post(url + "/v1/similar", files={"image": ("q.png", good)}),
                 lambda: requests.post(url + "/v1/recommend", json={"liked": [some_id]},
                                       headers={"Authorization": "Bearer wrong"})):
        assert_error(call(), 401)


def test_a_flood_of_searches_gets_only_200_and_503(search):
    url, session, idx = search
    query = near_copy(idx.metadata[5]["source"])

    def one(_):
        with requests.Session() as s:
            s.headers.update(session.headers)
            return similar(url, s, query, k="100").status_code

    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = list(pool.map(one, range(160)))
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert statuses.count(200) > 0 and statuses.count(503) > 0, {s: statuses.count(s) for s in set(statuses)}
    assert similar(url, session, query).status_code == 200
