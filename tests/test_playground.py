"""The playground page driven in headless Chromium against the real app: generate, stylize, classify, find similar
artworks and recommend, API key.

Needs Debian's chromium at /usr/bin/chromium (`make browser` installs it); without it this test fails, never skips.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
from genart.runtime import free_port

KEY_ENV = "GENART_TEST_PLAYGROUND_KEY"
SCREENSHOT_DIR = Path(os.environ.get("GENART_SCREENSHOT_DIR", "")) if os.environ.get("GENART_SCREENSHOT_DIR") else None


@pytest.fixture(scope="module")
def page_app(ray_session, tmp_path_factory, search_index):
    """The app with a tiny model of every family (and a token model trained for guidance), a search index, and an API
    key the page has to ask for."""
    from ray import serve

    from genart.serve.app import build
    from genart.serve.run import start_http
    from genart.data.synth import GENRES
    from genart.models.tiny import serving_checkpoints, tiny_checkpoint

    root = str(tmp_path_factory.mktemp("playground-models"))
    models = serving_checkpoints(root, critic_steps=10)
    models["vq"] = tiny_checkpoint(f"{root}/vq", "vqvae", 16, list(GENRES), seed=6, conditional=True, label_dropout=0.2,
                                   guidance=1.5)
    host, port = start_http("127.0.0.1", free_port())
    name, key = "t-play", secrets.token_urlsafe(16)
    os.environ[KEY_ENV] = key
    try:
        serve.run(build({"models": models, "index": search_index["index"], "api_key_env": KEY_ENV,
                         "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2}}),
                  name=name, route_prefix=f"/{name}")
    finally:
        os.environ.pop(KEY_ENV, None)
    yield f"http://{host}:{port}/{name}/", key
    serve.delete(name)


def _natural_width(page, selector: str) -> int:
    return page.eval_on_selector(selector, "img => img.complete ? img.naturalWidth : 0")


def test_page_asks_for_the_key_then_generates_stylizes_and_classifies(page_app, browser, tmp_path):
    from genart.assets import PHOTOS

    url, key = page_app
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)

    # the server needs a key: the page shows the field, and the first API call was refused
    page.wait_for_selector("#auth:not([hidden])", timeout=30_000)
    page.fill("#api-key", key)
    page.click("#save-key")
    page.wait_for_selector("#auth", state="hidden", timeout=60_000)
    page.wait_for_function("document.querySelectorAll('#gen-model option').length >= 2", timeout=60_000)
    models = page.eval_on_selector_all("#gen-model option", "os => os.map(o => o.value)")
    assert models == ["dcgan", "vae", "vq"]
    assert page.eval_on_selector_all("#style-model option", "os => os.map(o => o.value)") == ["starry", "wave"]

    # generate a grid: a conditional model shows its class picker
    assert page.is_visible("#label-wrap")
    page.fill("#seed", "42")
    page.click("#generate")
    page.wait_for_function("document.getElementById('gen-img').complete && document.getElementById('gen-img').naturalWidth > 0",
                           timeout=60_000)
    assert _natural_width(page, "#gen-img") == 4 * 34 + 2  # 16 images, 4 per row
    assert "seeds 42" in page.inner_text("#gen-cap")

    # no guidance control for a model that takes none; for the token model trained for it, the slider starts at the
    # model's own scale and the request carries the chosen one
    assert page.is_hidden("#guidance-wrap")
    page.select_option("#gen-model", "vq")
    assert page.is_visible("#guidance-wrap") and page.input_value("#guidance") == "1.5"
    with page.expect_request("**/v1/generate") as request:  # the slider untouched: the model's own scale, not sent
        page.click("#generate")
    assert "guidance" not in request.value.post_data_json
    page.wait_for_function("!document.getElementById('generate').disabled", timeout=60_000)
    page.eval_on_selector("#guidance", "el => { el.value = '2.5'; el.dispatchEvent(new Event('input')); }")
    assert page.inner_text("#guid-out") == "2.50"
    with page.expect_request("**/v1/generate") as request:
        page.click("#generate")
    assert request.value.post_data_json["guidance"] == 2.5
    page.wait_for_function("document.getElementById('gen-cap').textContent.includes('guidance 2.50')", timeout=60_000)
    # the caption is set as the new picture starts loading (a blob URL loads asynchronously): wait for the picture
    page.wait_for_function(f"document.getElementById('gen-img').complete && "
                           f"document.getElementById('gen-img').naturalWidth === {4 * 18 + 2}", timeout=60_000)
    assert _natural_width(page, "#gen-img") == 4 * 18 + 2  # 16 px images
    page.select_option("#gen-model", "dcgan")

    # Generate and Interpolate draw into one picture: the last click wins, whichever answer comes last (a late walk
    # replaced the grid asked for after it). The page's fetch holds the walk's answer until the grid is shown.
    # A superseded walk's error (here a 504) is not shown over the grid either.
    page.evaluate("""() => {
        const realFetch = window.fetch;
        window.holdWalk = (fail) => {
            window.walkFails = fail;
            window.walkHeld = new Promise((resolve) => { window.releaseWalk = resolve; });
        };
        window.fetch = async (url, options) => {
            const response = await realFetch(url, options);
            if (!String(url).includes("v1/interpolate") || !window.walkHeld) return response;
            await window.walkHeld;
            return window.walkFails ? new Response('{"error": "timeout", "detail": "late"}', { status: 504 }) : response;
        };
    }""")
    for fail, seed in ((False, "7"), (True, "8")):
        page.evaluate(f"window.holdWalk({str(fail).lower()})")
        page.click("#interpolate")
        page.fill("#seed", seed)
        page.click("#generate")
        page.wait_for_function(f"document.getElementById('gen-cap').textContent.includes('seeds {seed}')", timeout=60_000)
        grid = page.get_attribute("#gen-img", "src")
        page.evaluate("window.releaseWalk()")
        page.wait_for_function("!document.getElementById('interpolate').disabled", timeout=60_000)
        assert f"seeds {seed}" in page.inner_text("#gen-cap") and page.get_attribute("#gen-img", "src") == grid
        assert page.is_hidden("#error"), page.inner_text("#error")
    page.evaluate("window.walkHeld = null")

    # the walk keeps the grid's chosen class; the sliders have names; the longer-side choices stop at the server's cap
    page.select_option("#gen-label", "circles")
    with page.expect_request("**/v1/interpolate") as request:
        page.click("#interpolate")
    assert request.value.post_data_json["label"] == "circles"
    page.wait_for_function("!document.getElementById('interpolate').disabled", timeout=60_000)
    page.select_option("#gen-label", "(by seed)")
    for name in ("Images", "Truncation"):
        assert page.get_by_role("slider", name=name).count() == 1, name
    assert page.eval_on_selector_all("#max-side option", "os => os.map(o => o.value)") == ["256", "512", "768", "1024"]

    # upload a photo, stylize it, ask the critic
    page.set_input_files("#photo", str(PHOTOS / "figures.jpg"))
    page.select_option("#max-side", "256")
    page.select_option("#style-model", "wave")
    page.click("#stylize")
    page.wait_for_function("document.getElementById('style-img').naturalWidth > 0", timeout=60_000)
    assert _natural_width(page, "#style-img") <= 256 and _natural_width(page, "#photo-img") > 0
    page.click("#classify")
    page.wait_for_selector("#labels li", timeout=60_000)
    labels = page.eval_on_selector_all("#labels li span:first-child", "ss => ss.map(s => s.textContent)")
    assert sorted(labels) == sorted(["stripes", "circles", "grid", "noise", "gradient"])
    # another photo: the first one's stylized picture and labels go (they stayed beside the new photo)
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 120, 40)).save(tmp_path / "other.png")
    page.set_input_files("#photo", str(tmp_path / "other.png"))
    assert page.get_attribute("#style-img", "src") is None and page.query_selector("#labels li") is None

    assert page.is_hidden("#error"), page.inner_text("#error")
    assert not errors, errors
    shot = (SCREENSHOT_DIR or tmp_path) / "playground.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.close()


def _enter_key(page, key: str) -> None:
    page.wait_for_selector("#auth:not([hidden])", timeout=30_000)
    page.fill("#api-key", key)
    page.click("#save-key")
    page.wait_for_selector("#auth", state="hidden", timeout=60_000)


def _loaded_thumbnails(page, selector: str) -> int:
    return page.eval_on_selector_all(selector + " img", "imgs => imgs.filter(i => i.complete && i.naturalWidth === 96).length")


def test_page_finds_similar_artworks_and_recommends_more(page_app, browser, search_index, tmp_path):
    from genart.search.query import SearchIndex
    from PIL import Image

    url, key = page_app
    idx = SearchIndex.open(search_index["index"])
    target = next(m for m in idx.metadata if m["label"] == "grid")
    query = tmp_path / "query.jpg"  # a resized, re-encoded copy of an indexed picture
    Image.open(target["source"]).convert("RGB").resize((64, 64), Image.Resampling.NEAREST).save(query, "JPEG", quality=90)

    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    _enter_key(page, key)
    page.wait_for_selector("#search-card:not([hidden])", timeout=30_000)
    assert page.is_disabled("#recommend")  # nothing chosen yet

    page.set_input_files("#search-photo", str(query))
    page.select_option("#search-k", "6")
    page.click("#find-similar")
    page.wait_for_function("document.querySelectorAll('#similar-results img').length === 6", timeout=60_000)
    page.wait_for_function("[...document.querySelectorAll('#similar-results img')].every(i => i.complete && "
                           "i.naturalWidth > 0)", timeout=60_000)
    assert _loaded_thumbnails(page, "#similar-results") == 6  # the index's 96 px thumbnails, fetched with the key
    ids = page.eval_on_selector_all("#similar-results .hit", "hs => hs.map(h => h.dataset.id)")
    assert ids[0] == target["id"]
    assert page.inner_text("#similar-results li:first-child .hit-label") == "grid"
    assert float(page.inner_text("#similar-results li:first-child .score")) > 0.99
    assert "of 40 indexed images" in page.inner_text("#search-cap")

    # choose two, recommend: neither comes back
    page.click("#similar-results li:nth-child(1) .hit")
    page.click("#similar-results li:nth-child(2) .hit")
    assert page.get_attribute("#similar-results li:nth-child(1) .hit", "aria-pressed") == "true"
    assert "2" in page.inner_text("#recommend")
    page.click("#recommend")
    page.wait_for_function("document.querySelectorAll('#recommend-results img').length === 6", timeout=60_000)
    page.wait_for_function("[...document.querySelectorAll('#recommend-results img')].every(i => i.complete && "
                           "i.naturalWidth > 0)", timeout=60_000)
    recommended = page.eval_on_selector_all("#recommend-results .hit", "hs => hs.map(h => h.dataset.id)")
    assert len(recommended) == 6 and not set(recommended) & set(ids[:2])
    assert "recommended from 2 chosen" in page.inner_text("#search-cap")

    # the choices can be cleared (they outlived every search, up to the API's cap, with no way back)
    assert page.is_visible("#clear-liked")
    page.click("#clear-liked")
    assert page.is_disabled("#recommend") and page.is_hidden("#clear-liked")
    assert page.get_attribute("#similar-results li:nth-child(1) .hit", "aria-pressed") == "false"
    # another image: the old image's results go, and a late answer for it would be dropped
    Image.new("RGB", (32, 32), (10, 200, 90)).save(tmp_path / "other.png")
    page.set_input_files("#search-photo", str(tmp_path / "other.png"))
    assert page.query_selector("#similar-results li") is None and page.is_hidden("#similar-results-title")

    assert page.is_hidden("#error"), page.inner_text("#error")
    assert not errors, errors
    shot = (SCREENSHOT_DIR or tmp_path) / "playground-search.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    page.close()


def test_page_reports_a_refused_key_and_server_errors(page_app, browser):
    url, _ = page_app
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#auth:not([hidden])", timeout=30_000)
    page.fill("#api-key", "not-the-key")
    page.click("#save-key")
    page.wait_for_function("document.getElementById('auth-msg').textContent.includes('refused')", timeout=30_000)
    assert "unauthorized" in page.inner_text("#error")
    page.close()


def test_api_docs_render_offline(page_app, browser):
    """/docs is Swagger UI from the installed fastapi-offline package: the page renders every endpoint and asks for
    nothing outside this server (FastAPI's default page loads it from a CDN, blank without internet)."""
    url, _ = page_app
    page = browser.new_page()
    requested: list[str] = []
    page.on("request", lambda req: requested.append(req.url))
    page.goto(url + "docs")
    page.wait_for_selector(".opblock-summary-path", timeout=30_000)
    paths = set(page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.dataset.path || e.textContent)"))
    assert {"/v1/generate", "/v1/stylize", "/v1/classify", "/v1/similar"} <= {p.strip() for p in paths}
    base = url.split("/", 3)[:3]
    assert requested and all(r.startswith("/".join(base) + "/") for r in requested), requested
    page.close()
