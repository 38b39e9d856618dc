"""Serving over real HTTP on the session's Ray: every endpoint's success path and error status, a bounded flood,
a Serve config file deployed the way `serve deploy` does it, and the `genart serve` command."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from genart.errors import UserError
from genart.runtime import free_port

ROOT = Path(__file__).resolve().parents[1]
GENART = str(Path(sys.executable).parent / "genart")  # the installed console script
KEY_ENV = "GENART_TEST_SERVE_KEY"
NO_KEY_ENV = "GENART_TEST_SERVE_NO_KEY"
MAX_PIXELS = 200 * 200


# ---------------------------------------------------------------- helpers


def png(width: int, height: int, color=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def image_of(response) -> Image.Image:
    return Image.open(io.BytesIO(response.content))


def assert_error(response, status: int, contains: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    if contains:
        assert contains in (str(body["error"]) + " " + str(body["detail"])), body
    return body


def upload(base, path, data: bytes, **form):
    return requests.post(base + path, files={"image": ("upload.png", data, "image/png")}, data=form, timeout=60)


def deploy(name: str, args: dict) -> None:
    from genart.serve.run import deploy as deploy_app

    deploy_app(args, name=name, route_prefix=f"/{name}")


def wait_healthy(url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} never became healthy")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    from genart.models.tiny import serving_checkpoints

    return serving_checkpoints(str(tmp_path_factory.mktemp("serve-models")), critic_steps=10)


@pytest.fixture(scope="module")
def style_root(tmp_path_factory) -> str:
    """A folder of style checkpoints, one per sub-folder: styles served by name without being listed in `models`."""
    from genart.models.tiny import tiny_checkpoint

    root = tmp_path_factory.mktemp("style-root")
    tiny_checkpoint(str(root / "mosaic"), "style", 32, seed=7, channels=4, num_res_blocks=1)
    (root / "broken").mkdir()  # a folder that is not a checkpoint
    (root / "broken" / "state.json").write_text("{not json")
    (root / "README.md").write_text("styles for the demo")  # neither is listed: no checkpoint in them
    (root / "notes").mkdir()
    return str(root)


@pytest.fixture(scope="module")
def http(ray_session) -> str:
    """Serve's HTTP proxy on loopback (a free port unless another module already started Serve)."""
    from genart.serve.run import start_http

    host, port = start_http("127.0.0.1", free_port())
    return f"http://{host}:{port}"


@pytest.fixture(scope="module")
def app(http, tiny_models, style_root):
    """The main app: every family, small caps, short queues so a flood meets 503s."""
    from ray import serve

    name = "t-serve"
    deploy(name, {
        "models": tiny_models, "style_root": style_root, "max_upload_mb": 1, "max_pixels": MAX_PIXELS,
        "request_timeout_s": 60, "max_queued_requests": 4, "max_ongoing_requests": 4, "api_key_env": NO_KEY_ENV,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2},
        "ingress_max_ongoing_requests": 16,  # + 16 queued: the flood's 64 clients also meet Ray's proxy refusing
    })
    yield f"{http}/{name}"
    serve.delete(name)


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> str:
    """A DCGAN at 128 px in its default (large) config: 64 images take seconds on a CPU."""
    from genart.models.tiny import tiny_checkpoint

    return tiny_checkpoint(str(tmp_path_factory.mktemp("slow") / "big"), "dcgan", 128, seed=9, full_size=True)


@pytest.fixture(scope="module")
def strict(http, slow_model, tiny_models):
    """An app with an API key, a 0.5 s deadline and room for one request in flight plus one queued."""
    from ray import serve

    name, key = "t-strict", secrets.token_urlsafe(24)  # made per run: no key in the repo
    os.environ[KEY_ENV] = key
    try:
        deploy(name, {
            "models": {"big": slow_model, "starry": tiny_models["starry"]}, "api_key_env": KEY_ENV,
            "request_timeout_s": 0.5, "max_ongoing_requests": 1, "max_queued_requests": 1, "batching": False,
            "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 1},
        })
    finally:
        os.environ.pop(KEY_ENV, None)
    yield f"{http}/{name}", key
    serve.delete(name)


# ---------------------------------------------------------------- args (no Serve needed)


def test_args_schema_matches_the_cluster_serve_config():
    from genart.serve.config import parse_args

    doc = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
    args = next(a for a in doc["applications"] if a["import_path"] == "genart.serve.app:build")["args"]
    settings = parse_args(args)
    assert settings.autoscaling.max_replicas == args["autoscaling"]["max_replicas"]
    assert settings.index == args["index"]  # the search index is configured beside the models
    with pytest.raises(UserError, match="bogus: unknown key"):
        parse_args({**args, "bogus": 1})
    with pytest.raises(UserError, match="autoscaling"):
        parse_args({**args, "autoscaling": {"min_replicas": 3, "max_replicas": 1}})
    with pytest.raises(UserError, match="api_key_env"):
        parse_args({**args, "api_key_env": "sk-not a variable name"})
    with pytest.raises(UserError, match="models"):
        parse_args({"models": {"../evil": "/tmp/x"}})


def test_autoscaling_follows_rays_guidance_and_batches_come_from_user_config():
    """Model replicas: target = max_batch_size (batches fill before a peer is added), max in flight 25 % above it;
    the ingress sizes its own target; batch parameters travel as user_config (applied in reconfigure)."""
    from genart.serve.config import parse_args

    settings = parse_args({"models": {"a": "x"}, "max_batch_size": 8, "batch_wait_timeout_s": 0.005})
    assert settings.model_autoscaling()["target_ongoing_requests"] == 8 and settings.model_max_ongoing == 10
    assert settings.ingress_autoscaling()["target_ongoing_requests"] == 0.8 * settings.ingress_max_ongoing_requests
    assert settings.batch_config() == {"max_batch_size": 8, "max_batch_images": 256, "batch_wait_timeout_s": 0.005}
    explicit = parse_args({"models": {"a": "x"}, "autoscaling": {"target_ongoing_requests": 4}, "max_ongoing_requests": 6})
    assert explicit.model_target == 4 and explicit.model_max_ongoing == 6
    with pytest.raises(UserError, match="max_ongoing_requests"):
        parse_args({"models": {"a": "x"}, "autoscaling": {"target_ongoing_requests": 8}, "max_ongoing_requests": 4})
    with pytest.raises(UserError, match="max_ongoing_requests"):  # against the default target, max_batch_size
        parse_args({"models": {"a": "x"}, "max_batch_size": 16, "max_ongoing_requests": 4})
    from genart.serve.deployments import CriticModel, GenerativeModel, StyleModels

    for deployment in (GenerativeModel, CriticModel, StyleModels):
        assert callable(getattr(deployment.func_or_class, "reconfigure", None)), deployment.name


def test_cli_settings_from_model_flags_and_serve_config(tmp_path):
    from genart.serve.run import settings_from

    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"name": "genart", "import_path": "genart.serve.app:build",
                                                         "args": {"models": {"a": "/ckpt/a"}, "max_upload_mb": 3}}]}))
    settings = settings_from(str(config), ("b=/ckpt/b",), ("max_pixels=1000",))
    assert settings.models == {"a": "/ckpt/a", "b": "/ckpt/b"}
    assert (settings.max_upload_mb, settings.max_pixels) == (3, 1000)
    with pytest.raises(UserError, match="NAME=CHECKPOINT"):
        settings_from(None, ("no-equals-sign",))
    assert settings_from(str(config), index="indexes/art").index == "indexes/art"  # genart serve --index
    assert settings_from(None, index="indexes/art").models == {}  # an index alone is something to serve
    with pytest.raises(UserError, match="index"):
        settings_from(None, overrides=("index=  ",))
    # Hand-written files a user gets wrong are one-line errors, not a TypeError or AttributeError.
    (tmp_path / "empty_models.yaml").write_text("models:\nstyle_root: runs\n")
    assert settings_from(str(tmp_path / "empty_models.yaml"), ("a=/ckpt/a",)).models == {"a": "/ckpt/a"}
    (tmp_path / "list_models.yaml").write_text("models: [a, b]\n")
    with pytest.raises(UserError, match="models must map names"):
        settings_from(str(tmp_path / "list_models.yaml"))
    (tmp_path / "bare_apps.yaml").write_text("applications:\n  - genart\n")
    with pytest.raises(UserError, match="no application with import_path"):
        settings_from(str(tmp_path / "bare_apps.yaml"))


def test_cli_bad_checkpoint_is_one_line_exit_2(tmp_path):
    result = subprocess.run([GENART, "serve", "--model", f"x={tmp_path}/missing"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "checkpoint not found" in result.stderr


def test_a_model_card_says_a_genre_prior_vae_takes_labels_as_the_loaded_model_does(tmp_path):
    """The card read only `conditional`, so a VAE with `prior: genre` (labels pick the genre, as `genart generate
    --label` does) refused `label` with 422 and the playground hid its class picker."""
    from genart import models
    from genart.models.tiny import tiny_checkpoint
    from genart.serve.app import model_card

    for name, overrides in (("genre", {"prior": "genre"}), ("plain", {"prior": "standard"})):
        run = tiny_checkpoint(str(tmp_path / name), "vae", 16, ("a", "b"), seed=1, **overrides)
        assert model_card(name, run)["conditional"] == models.load(run).conditional == (name == "genre")


def test_cli_bad_index_is_one_line_exit_2(tmp_path):
    result = subprocess.run([GENART, "serve", "--index", str(tmp_path)], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "not a finished index" in result.stderr


# ---------------------------------------------------------------- success paths


def test_health_page_and_docs(app):
    assert requests.get(app + "/healthz").json() == {"status": "ok", "auth_required": False}
    page = requests.get(app + "/")
    assert page.status_code == 200 and "genart playground" in page.text
    script = requests.get(app + "/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    for text in (page.text, script.text, requests.get(app + "/static/style.css").text):  # nothing from a CDN
        assert 'src="http' not in text and 'href="http' not in text and "url(http" not in text and "//cdn" not in text
    spec = requests.get(app + "/openapi.json").json()
    assert {"/v1/generate", "/v1/interpolate", "/v1/reconstruct", "/v1/stylize", "/v1/classify", "/v1/models"} <= set(spec["paths"])
    docs = requests.get(app + "/docs")
    assert docs.status_code == 200 and "//cdn" not in docs.text and "docs/assets/swagger-ui-bundle.js" in docs.text
    bundle = requests.get(app + "/docs/assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and "javascript" in bundle.headers["content-type"] and len(bundle.content) > 100_000
    assert requests.get(app + "/docs/assets/..%2F..%2F__init__.py").status_code == 404  # the asset folder only


def test_models_lists_every_model_with_its_checkpoint_hash(app, tiny_models):
    body = requests.get(app + "/v1/models").json()
    by_name = {m["name"]: m for m in body["models"]}
    assert {n: by_name[n]["family"] for n in tiny_models} == {
        "dcgan": "dcgan", "vae": "vae", "critic": "critic", "starry": "style", "wave": "style"}
    for name, run in tiny_models.items():
        weights = next(Path(run).glob("step-*/model.safetensors"))
        assert by_name[name]["checkpoint_hash"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert by_name[name]["image_size"] == 32
    assert by_name["critic"]["labels"] == ["stripes", "circles", "grid", "noise", "gradient"]
    assert by_name["mosaic"]["family"] == "style"  # found in style_root
    assert "README.md" not in by_name and "notes" not in by_name  # sorted first, the README was the default style
    assert body["limits"]["max_n"] == 64


def test_generate_png_grid_and_json(app):
    r = requests.post(app + "/v1/generate", json={"model": "dcgan", "n": 5, "seed": 7})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert image_of(r).size == (3 * 34 + 2, 2 * 34 + 2)  # 3 per row, 32 px + 2 px gaps
    as_json = requests.post(app + "/v1/generate", json={"model": "dcgan", "n": 3, "seed": 7},
                            headers={"Accept": "application/json"}).json()
    assert as_json["seeds"] == [7, 8, 9] and len(as_json["images"]) == 3
    again = requests.post(app + "/v1/generate", json={"model": "dcgan", "n": 3, "seed": 7, "format": "json"}).json()
    assert again["images"] == as_json["images"]  # a seed always gives the same image
    first = Image.open(io.BytesIO(base64.b64decode(as_json["images"][0])))
    assert first.size == (32, 32)
    assert as_json["images"][0] != as_json["images"][1]
    by_name = requests.post(app + "/v1/generate", json={"n": 2, "label": "grid", "format": "json"}).json()
    by_index = requests.post(app + "/v1/generate", json={"n": 2, "label": 2, "format": "json"}).json()
    assert by_name["images"] == by_index["images"] and by_name["label"] == 2
    vae = requests.post(app + "/v1/generate", json={"model": "vae", "n": 1})
    assert vae.status_code == 200 and image_of(vae).size == (32, 32)  # one image: no grid border


def test_concurrent_requests_batched_together_get_their_own_images(app):
    """Requests with different n, seeds, labels and truncation share batches; each must get exactly what it would
    get alone (the batch is split back by image count, grouped by truncation and label use)."""
    bodies = [{"n": 1 + i % 3, "seed": 10 * i, "truncation": [1.0, 0.5][i % 2], "format": "json",
               **({"label": i % 5} if i % 3 == 0 else {})} for i in range(6)]
    def pixels(body) -> list:
        for _ in range(5):  # the app's queues are short (4): a client retries a 503 after Retry-After, as documented
            response = requests.post(app + "/v1/generate", json=body)
            if response.status_code != 503:
                break
            time.sleep(float(response.headers["Retry-After"]))
        assert response.status_code == 200, (response.status_code, response.text[:300])
        return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)
                for b64 in response.json()["images"]]

    alone = [pixels(b) for b in bodies]
    before = generator_stats(app)
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(pixels, bodies * 2))
    for got, want in zip(together, alone * 2):
        assert len(got) == len(want)
        for g, w in zip(got, want):  # equal up to float rounding of a different batch size (1/255)
            assert g.shape == w.shape and np.abs(g - w).max() <= 1
    # a request to an idle replica runs at once (no batch wait); under concurrency requests still meet in batches
    after = generator_stats(app)
    queued, batches = after["queued"] - before["queued"], after["batches"] - before["batches"]
    assert after["alone"] > before["alone"] and queued > 0 and 0 < batches < queued, (before, after)


def generator_stats(base: str) -> dict:
    """InFlight counters summed over the app's generator deployments (one replica each here)."""
    from ray import serve

    name = base.rsplit("/", 1)[-1]
    total = {"alone": 0, "queued": 0, "batches": 0}
    for deployment in serve.status().applications[name].deployments:
        if deployment.startswith("generator-"):
            stats = serve.get_deployment_handle(deployment, app_name=name).batch_stats.remote().result()
            total = {k: total[k] + stats[k] for k in total}
    return total


def test_interpolate_strip_and_gif(app):
    strip = requests.post(app + "/v1/interpolate", json={"model": "dcgan", "seed_a": 1, "seed_b": 2, "steps": 5})
    assert strip.status_code == 200 and image_of(strip).size == (5 * 34 + 2, 36)
    gif = requests.post(app + "/v1/interpolate", json={"model": "vae", "steps": 6, "format": "gif"})
    assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"
    frames = image_of(gif)
    assert frames.format == "GIF" and frames.n_frames >= 2  # Pillow merges identical neighbouring frames


def test_reconstruct_keeps_the_size(app):
    r = upload(app, "/v1/reconstruct", png(40, 30), model="vae")
    assert r.status_code == 200 and image_of(r).size == (40, 30)


def test_stylize_keeps_aspect_ratio_and_serves_styles_on_demand(app, style_root):
    r = upload(app, "/v1/stylize", png(90, 60), model="wave", max_side="45")
    assert r.status_code == 200 and image_of(r).size == (45, 30)
    assert image_of(upload(app, "/v1/stylize", png(90, 60), model="starry")).size == (90, 60)  # never upscaled
    from_root = upload(app, "/v1/stylize", png(20, 50), model="mosaic")  # loaded from style_root on first use
    assert from_root.status_code == 200 and image_of(from_root).size == (20, 50)
    # a style folder that does not load is the server's problem: a JSON 500 naming it (not its path, which the
    # API never shows; the server log has the reason), and the app stays up
    body = assert_error(upload(app, "/v1/stylize", png(20, 50), model="broken"), 500, "'broken' could not load or run")
    assert "state.json" not in str(body) and style_root not in str(body)
    assert upload(app, "/v1/stylize", png(20, 50), model="mosaic").status_code == 200


def test_served_outputs_on_a_cpu_are_bit_identical_to_plain_fp32_no_grad(app, tiny_models):
    """Replicas run in the batch actors' InferenceSetup; on a CPU that must be exactly the fp32 `no_grad` path they
    had before: same pixels as the loaded model called directly."""
    import torch

    from genart import models
    from genart.serve import inference

    noise = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise, "RGB").save(buf, "PNG")
    served = np.asarray(image_of(upload(app, "/v1/stylize", buf.getvalue(), model="wave")))
    body = requests.post(app + "/v1/generate", json={"model": "dcgan", "n": 3, "seed": 11, "format": "json"}).json()
    generated = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))) for b64 in body["images"]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each replica runs (ServeArgs.threads)
    try:
        with torch.no_grad():
            style = inference.stylize(models.load(tiny_models["wave"]), [noise])[0]
            frames = inference.generate(models.load(tiny_models["dcgan"]), [inference.GenerateJob((11, 12, 13))])[0]
    finally:
        torch.set_num_threads(threads)
    assert served.shape == style.shape == (30, 40, 3) and np.array_equal(served, style)
    assert len(generated) == 3 and all(np.array_equal(g, f) for g, f in zip(generated, frames))


def test_classify_ranks_the_critics_labels(app):
    from genart.data.synth import render

    buf = io.BytesIO()
    render("stripes", 3, 64).save(buf, "PNG")
    body = upload(app, "/v1/classify", buf.getvalue()).json()
    probs = [item["probability"] for item in body["labels"]]
    assert sorted(item["label"] for item in body["labels"]) == sorted(["stripes", "circles", "grid", "noise", "gradient"])
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-3
    assert len(upload(app, "/v1/classify", buf.getvalue(), model="critic", top_k="2").json()["labels"]) == 2


# ---------------------------------------------------------------- error statuses


def test_413_declared_content_length(app):
    assert_error(upload(app, "/v1/stylize", b"\0" * (1024 * 1024 + 100), model="starry"), 413, "max_upload_mb")


def _multipart_chunks(boundary: str, size: int, chunk: int = 64 * 1024):
    yield (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
           f"Content-Type: image/png\r\n\r\n").encode()
    for _ in range(size // chunk):
        yield b"\x89" * chunk
    yield f"\r\n--{boundary}--\r\n".encode()


def test_413_chunked_upload_without_content_length(app):
    boundary = uuid.uuid4().hex
    r = requests.post(app + "/v1/classify", data=_multipart_chunks(boundary, 3 * 1024 * 1024), timeout=60,
                      headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error(r, 413, "max_upload_mb")


def test_lying_content_length_cannot_smuggle_a_large_body(app):
    """A client that declares 1000 bytes and sends 2 MB: the server reads 1000 (a broken upload), never the rest."""
    boundary = uuid.uuid4().hex
    body = b"".join(_multipart_chunks(boundary, 2 * 1024 * 1024))
    host, port = app.split("//")[1].split("/")[0].split(":")
    prefix = "/" + app.split("/", 3)[3]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall((f"POST {prefix}/v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode())
        try:
            sock.sendall(body)
            reply = sock.recv(4096)
        except OSError:
            reply = b""  # the server may close the connection on the garbage after the declared body
    assert not reply.startswith(b"HTTP/1.1 200"), reply[:300]
    if reply:
        assert int(reply.split(b" ", 2)[1]) in (400, 413, 422), reply[:300]
    assert requests.get(app + "/healthz").status_code == 200


def test_400_for_bad_images(app):
    good = png(30, 20)
    assert_error(upload(app, "/v1/classify", b"hello, not an image"), 400, "not an image")
    assert_error(upload(app, "/v1/stylize", good[: len(good) // 2], model="starry"), 400, "bad image")
    assert_error(upload(app, "/v1/stylize", png(300, 300), model="starry"), 400, "too many pixels")
    assert_error(upload(app, "/v1/reconstruct", b""), 400, "empty")


@pytest.mark.parametrize("path, body", [
    ("/v1/generate", {"n": 0}),
    ("/v1/generate", {"n": 65}),
    ("/v1/generate", {"seed": -1}),
    ("/v1/generate", {"truncation": 1.5}),
    ("/v1/generate", {"label": 99}),
    ("/v1/generate", {"label": "cubism"}),
    ("/v1/generate", {"model": "vae", "label": 0}),
    ("/v1/generate", {"unknown_field": 1}),
    ("/v1/generate", {"n": "many"}),
    ("/v1/interpolate", {"steps": 1}),
    ("/v1/interpolate", {"format": "webm"}),
])
def test_422_for_parameters_out_of_range(app, path, body):
    assert_error(requests.post(app + path, json=body), 422)


def test_the_deadline_answers_504_for_its_own_timeout_only():
    """A TimeoutError of the app's own (a socket, an S3 listing) was answered 504 "took longer than 30 s", at once."""
    import asyncio

    from genart.serve.guards import Deadline

    async def own_timeout(scope, receive, send):
        raise TimeoutError("S3 read timed out")

    async def slow(scope, receive, send):
        await asyncio.sleep(5)

    sent = []

    async def send(message):
        sent.append(message)

    with pytest.raises(TimeoutError, match="S3 read timed out"):
        asyncio.run(Deadline(own_timeout, 1.0)({"type": "http"}, None, send))
    assert sent == []
    asyncio.run(Deadline(slow, 0.1)({"type": "http"}, None, send))
    assert sent[0]["status"] == 504


def test_a_cancelled_request_stops_its_thread_and_stays_counted_until_it_has():
    """A request cancelled at its deadline dropped out of InFlight at once while its thread computed to the end,
    beside the requests that came after it."""
    import asyncio
    import threading

    from genart.models.family import InferenceSetup
    from genart.models.sampling import stop_point
    from genart.serve.deployments import InFlight, _run

    steps, ended = [], threading.Event()

    def long_loop():
        try:
            for i in range(200):  # 10 s unless stopped
                stop_point()
                steps.append(i)
                time.sleep(0.05)
        finally:
            ended.set()

    async def main():
        in_flight = InFlight()
        request = asyncio.ensure_future(in_flight.run(direct=lambda: _run(InferenceSetup(), long_loop),
                                                      batched=lambda: None))
        await asyncio.sleep(0.3)
        steps_at_cancel = len(steps)
        request.cancel()
        await asyncio.sleep(0)
        counted_after_cancel = in_flight.count
        with pytest.raises(asyncio.CancelledError):
            await request
        return steps_at_cancel, counted_after_cancel, ended.is_set(), in_flight.count

    steps_at_cancel, counted_after_cancel, ended_before_return, count = asyncio.run(main())
    assert counted_after_cancel == 1 and ended_before_return and count == 0
    # stopped within a few steps of the cancel (one may be under way, and a loaded machine may pause the event loop
    # between the cancel and its stop.set() while the thread goes on: 20 steps is a second of that), not run on to
    # the end, 200 steps
    assert len(steps) <= steps_at_cancel + 20 and len(steps) < 200, f"{len(steps)} steps, {steps_at_cancel} at cancel"


def test_a_style_load_outlives_the_request_that_started_it():
    """A style slower to load than request_timeout_s was thrown away with each cancelled request: never cached."""
    import asyncio

    from genart.serve.deployments import SharedLoads

    loads = []

    async def read(name):
        loads.append(name)
        await asyncio.sleep(0.3)
        if name == "broken":
            raise OSError("S3 read failed")
        return f"model {name}"

    async def main():
        shared = SharedLoads(read)
        first = asyncio.ensure_future(shared("starry"))
        await asyncio.sleep(0.1)
        first.cancel()  # the request's deadline
        with pytest.raises(asyncio.CancelledError):
            await first
        second = await shared("starry")  # picks up the running load
        for _ in range(2):
            with pytest.raises(OSError):
                await shared("broken")  # a failed load is started again, not handed out for ever
        return second

    assert asyncio.run(main()) == "model starry"
    assert loads == ["starry", "broken", "broken"]

    async def abandoned():  # a load whose request was cancelled and never retried: it held its model for good
        shared = SharedLoads(read)
        shared.PARKED_S = 0.2
        first = asyncio.ensure_future(shared("wave"))
        await asyncio.sleep(0.1)
        first.cancel()
        await asyncio.sleep(0.3)  # the load finishes, parked for a retry
        parked = dict(shared._tasks)
        await asyncio.sleep(0.3)
        return parked, shared._tasks

    parked, left = asyncio.run(abandoned())
    assert list(parked) == ["wave"] and left == {}


def test_token_sampling_stops_at_a_set_stop_event():
    import threading

    import torch

    from genart.models.autoregressive import sample_tokens
    from genart.models.sampling import Stopped, stoppable

    calls = []

    class Net:
        null_label = None

        def step(self, token, t, labels, state, n):
            calls.append(t)
            return torch.zeros(n, 4), state

    stop = threading.Event()
    assert sample_tokens(Net(), torch.rand(2, 5), None, 1.0, 0).shape == (2, 5)  # outside a stoppable block: no-op
    with stoppable(stop):
        sample_tokens(Net(), torch.rand(2, 5), None, 1.0, 0)
        stop.set()
        with pytest.raises(Stopped):
            sample_tokens(Net(), torch.rand(2, 5), None, 1.0, 0)
    assert len(calls) == 10


def test_a_json_true_is_no_label(app):
    """pydantic's lax int took `"label": true` for class 1."""
    assert_error(requests.post(app + "/v1/generate", json={"model": "dcgan", "n": 1, "label": True}), 422)


def test_422_for_form_fields_and_wrong_model_kinds(app):
    assert_error(upload(app, "/v1/stylize", png(30, 20), model="starry", max_side="5"), 422, "max_side")
    assert_error(upload(app, "/v1/stylize", png(30, 20), model="dcgan"), 422, "needs a style model")
    assert_error(upload(app, "/v1/reconstruct", png(30, 20), model="dcgan"), 422, "vae")
    assert_error(requests.post(app + "/v1/generate", json={"model": "critic"}), 422, "dcgan or vae")
    assert_error(requests.post(app + "/v1/stylize", data={"model": "starry"}), 422)  # no image part


def test_404_for_unknown_models_and_routes(app):
    assert_error(requests.post(app + "/v1/generate", json={"model": "nope"}), 404, "nope")
    assert_error(requests.post(app + "/v1/interpolate", json={"model": "nope"}), 404)
    assert_error(upload(app, "/v1/stylize", png(30, 20), model="nope"), 404)
    assert_error(upload(app, "/v1/stylize", png(30, 20), model="../starry"), 404)  # no way out of style_root
    assert_error(upload(app, "/v1/classify", png(30, 20), model="nope"), 404)
    assert_error(requests.get(app + "/v1/nothing-here"), 404)
    assert_error(requests.get(app + "/v1/generate"), 405)


def test_search_is_404_on_a_server_without_an_index(app):
    """Search itself is tested over a real index in test_serve_search.py."""
    assert requests.get(app + "/v1/models").json()["search"] is None
    assert_error(upload(app, "/v1/similar", png(30, 20)), 404, "genart serve --index")
    assert_error(requests.post(app + "/v1/recommend", json={"liked": ["0123456789abcdef"]}), 404, "index")
    assert_error(requests.get(app + "/v1/index/thumbnails/0123456789abcdef.jpg"), 404, "index")


def test_bounded_flood_gets_only_200_and_503_and_the_app_recovers(app):
    """300 requests from 64 concurrent loopback clients against queues of 4: overload is refused, never fatal. Every
    503 says when to retry: the model's full queue (genart's JSON) and the ingress's (Ray's proxy, which sent none)."""
    def one(i):
        with requests.Session() as session:
            response = session.post(app + "/v1/generate", json={"n": 2, "seed": i}, timeout=60)
            return response.status_code, response.headers.get("Retry-After"), response.text[:40]

    with ThreadPoolExecutor(max_workers=64) as pool:  # (pytest-timeout bounds the whole test)
        answers = list(pool.map(one, range(300)))
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert statuses.count(200) > 0 and statuses.count(503) > 0, {s: statuses.count(s) for s in set(statuses)}
    refused = [(retry, body) for status, retry, body in answers if status == 503]
    assert all(retry for retry, _ in refused), [body for retry, body in refused if not retry][:3]
    assert requests.get(app + "/healthz").status_code == 200
    assert requests.post(app + "/v1/generate", json={"n": 1}).status_code == 200


def _replicas(app_name: str, deployment: str) -> tuple[list[str], int]:
    """Names of the deployment's replica actors (Serve's named actors, public ray.util API; the state API needs the
    dashboard, which the embedded Ray leaves out) and how many serve.status() counts RUNNING."""
    import ray
    from ray import serve

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{app_name}#{deployment}#")]
    states = serve.status().applications[app_name].deployments[deployment].replica_states
    return names, int(states.get("RUNNING", 0))


def test_replica_killed_during_a_flood_gets_only_200_and_503_and_the_app_recovers(http, tiny_models):
    """A model deployment of 2 replicas loses one (ray.kill, as a lost node or an OOM kill would) while 24 clients
    flood it: requests on the dead replica get 503 + Retry-After, the survivor serves, Serve starts a replacement."""
    import ray
    from ray import serve

    name, deployment = "t-kill", "generator-dcgan"
    deploy(name, {
        "models": {"dcgan": tiny_models["dcgan"]}, "max_queued_requests": 8, "max_ongoing_requests": 4,
        "api_key_env": NO_KEY_ENV, "autoscaling": {"min_replicas": 2, "max_replicas": 2, "target_ongoing_requests": 2},
    })
    url = f"{http}/{name}"
    try:
        before, running = _replicas(name, deployment)
        assert len(before) == 2 and running == 2, (before, running)
        done: list[int] = []
        killed: list[str] = []
        lock = threading.Lock()  # answers of one batch come back together: count and kill as one step, once

        def one(i):
            with requests.Session() as session:
                code = session.post(url + "/v1/generate", json={"n": 2, "seed": i}, timeout=60).status_code
            with lock:
                done.append(code)
                if len(done) >= 40 and not killed:  # mid-flood: 40 answered, 200 still to come
                    killed.append(before[0])
                    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
            return code

        with ThreadPoolExecutor(max_workers=24) as pool:
            statuses = list(pool.map(one, range(240)))
        counts = {s: statuses.count(s) for s in set(statuses)}
        print(f"replica killed after 40 answers: {counts}")
        assert killed, "the replica was not killed"
        assert set(statuses) <= {200, 503}, counts
        assert statuses[120:].count(200) > 0, f"the survivor kept serving after the kill: {counts}"

        deadline = time.monotonic() + 180
        while True:
            names, running = _replicas(name, deployment)
            if running == 2 and killed[0] not in names and len(names) == 2:
                break
            assert time.monotonic() < deadline, f"the app never got its 2 replicas back: {names}, {running} running"
            time.sleep(1)
        assert serve.status().applications[name].status == "RUNNING"
        assert requests.post(url + "/v1/generate", json={"n": 1}, timeout=60).status_code == 200
    finally:
        serve.delete(name)


def test_401_without_or_with_a_wrong_key(strict):
    url, key = strict
    body = assert_error(requests.get(url + "/v1/models"), 401, "Authorization")
    assert "key" in body["detail"]
    assert requests.get(url + "/v1/models").headers["www-authenticate"].startswith("Bearer")
    assert_error(requests.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "wrong API key")
    assert_error(requests.get(url + "/v1/models", headers={"Authorization": key}), 401)  # no Bearer scheme
    assert requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    health = requests.get(url + "/healthz")  # open, and tells the page a key is needed
    assert health.status_code == 200 and health.json()["auth_required"] is True
    assert requests.get(url + "/").status_code == 200


def test_504_when_a_request_runs_past_its_deadline(strict):
    url, key = strict
    r = requests.post(url + "/v1/generate", json={"model": "big", "n": 64}, headers={"Authorization": f"Bearer {key}"},
                      timeout=60)
    assert_error(r, 504, "request_timeout_s")


def test_503_when_the_queue_is_full(strict):
    url, key = strict
    headers = {"Authorization": f"Bearer {key}"}

    def one(i):
        return requests.post(url + "/v1/generate", json={"model": "big", "n": 32, "seed": i}, headers=headers,
                             timeout=60)

    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(one, range(12)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {503, 504}, codes  # one runs (and times out), one waits, the rest are refused
    assert codes.count(503) >= 1, codes
    overloaded = next(r for r in responses if r.status_code == 503)
    assert_error(overloaded, 503, "max_queued_requests")
    assert overloaded.headers.get("retry-after") == "1"
    assert requests.get(url + "/healthz").status_code == 200


# ---------------------------------------------------------------- deployment paths


def test_serve_config_file_deploys_like_serve_deploy(http, tiny_models):
    """cluster/serve.yaml with our checkpoints, validated as a ServeDeploySchema and applied through the Serve
    controller's declarative path (what `serve deploy` / the dashboard's PUT /api/serve/applications/ call;
    the session Ray has no dashboard to take that HTTP request)."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
    app_cfg = next(a for a in doc["applications"] if a["import_path"] == "genart.serve.app:build")
    app_cfg.update(name="t-config", route_prefix="/t-config")
    app_cfg["args"].update(models={"dcgan": tiny_models["dcgan"], "starry": tiny_models["starry"]}, index=None,
                           api_key_env=NO_KEY_ENV,  # search is tested over a real index in test_serve_search.py
                           num_gpus_per_replica=0,  # the file's GPU share, on a machine without GPUs
                           max_side_limit=256)  # below the 512 a request naming no max_side gets: it was a 422
    doc["applications"] = [app_cfg]
    schema = ServeDeploySchema.model_validate(doc)
    _get_global_client().deploy_apps(schema)
    try:
        wait_healthy(f"{http}/t-config")
        r = requests.post(f"{http}/t-config/v1/generate", json={"model": "dcgan", "n": 4})
        assert r.status_code == 200 and image_of(r).size == (70, 70)
        styled = upload(f"{http}/t-config", "/v1/stylize", png(600, 400), model="starry")
        assert styled.status_code == 200 and image_of(styled).size == (256, 171), styled.text[:300]
    finally:
        serve.delete("t-config")


def test_weights_that_do_not_load_fail_the_deploy_with_the_replicas_reason(http, tmp_path):
    """Before deploying, a checkpoint's state.json is read, not its weights: weights that do not fit its config
    fail in the replicas, where Serve's own error ("Failed to update the deployments [...]") names no reason and
    `genart serve` printed a traceback. The deploy is a UserError (one line, exit 2) with the replicas' reason."""
    import json

    from ray import serve

    from genart.models.tiny import tiny_checkpoint

    run = tiny_checkpoint(str(tmp_path / "vae"), "vae", 32, seed=1)
    state_file = next(Path(run).glob("step-*/state.json"))
    state = json.loads(state_file.read_text())
    model = state["config"].get("model", state["config"])
    model["latent_dim"] += 3
    state_file.write_text(json.dumps(state))
    try:
        with pytest.raises(UserError, match=r"^deployment generator-bad failed to start: checkpoint .*step-000000: "
                                            r"vae weights do not match .*\(size mismatch for "):
            deploy("t-bad", {"models": {"bad": run}, "api_key_env": NO_KEY_ENV})
    finally:
        serve.delete("t-bad")


@pytest.mark.slow
def test_genart_serve_command_runs_until_ctrl_c(tiny_models, tmp_path):
    """The CLI end to end: its own embedded Ray, prints the URL, serves, stops cleanly on SIGINT."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [GENART, "serve", "--model", f"dcgan={tiny_models['dcgan']}", "--port", str(port),
         "--set", f"api_key_env={NO_KEY_ENV}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "genart serve exited early:\n" + "".join(lines)
            lines.append(line)
            if "genart is serving" in line:
                break
        assert f"http://127.0.0.1:{port}/" in lines[-1]
        r = requests.post(f"http://127.0.0.1:{port}/v1/generate", json={"n": 1}, timeout=60)
        assert r.status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
