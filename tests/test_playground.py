"""The playground page driven in headless Chromium against the real app: generate, stylize, classify, API key.

Needs Debian's chromium at /usr/bin/chromium (`make browser` installs it); without it this test fails, never skips.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
from helpers import free_port

KEY_ENV = "GENART_TEST_PLAYGROUND_KEY"
SCREENSHOT_DIR = Path(os.environ.get("GENART_SCREENSHOT_DIR", "")) if os.environ.get("GENART_SCREENSHOT_DIR") else None


@pytest.fixture(scope="module")
def page_app(ray_session, tmp_path_factory):
    """The app with a tiny model of every family and an API key the page has to ask for."""
    from ray import serve

    from genart.serve.app import build
    from genart.serve.run import start_http
    from genart.serve.tiny import make_tiny_checkpoints

    models = make_tiny_checkpoints(str(tmp_path_factory.mktemp("playground-models")), critic_steps=10)
    host, port = start_http("127.0.0.1", free_port())
    name, key = "t-play", secrets.token_urlsafe(16)
    os.environ[KEY_ENV] = key
    try:
        serve.run(build({"models": models, "api_key_env": KEY_ENV,
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
    assert models == ["dcgan", "vae"]
    assert page.eval_on_selector_all("#style-model option", "os => os.map(o => o.value)") == ["starry", "wave"]

    # generate a grid: a conditional model shows its class picker
    assert page.is_visible("#label-wrap")
    page.fill("#seed", "42")
    page.click("#generate")
    page.wait_for_function("document.getElementById('gen-img').complete && document.getElementById('gen-img').naturalWidth > 0",
                           timeout=60_000)
    assert _natural_width(page, "#gen-img") == 4 * 34 + 2  # 16 images, 4 per row
    assert "seeds 42" in page.inner_text("#gen-cap")

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

    assert page.is_hidden("#error"), page.inner_text("#error")
    assert not errors, errors
    shot = (SCREENSHOT_DIR or tmp_path) / "playground.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
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
