"""The HTTP side of the app: a FastAPI ingress deployment that validates requests and calls the model deployments.

Uploads are size-capped and decoded here (genart.data.images.decode_image), so model replicas only see clean
uint8 arrays; every error is JSON {"error": ..., "detail": ...}. The playground page is served from static/.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' signatures at runtime
import asyncio
import base64
import io
import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException

from genart import storage
from genart.data.images import Reject, cap_side, decode_image, encode_png
from genart.errors import UserError, one_line
from genart.models import generative_families, holds_model
from genart.models.autoregressive import completion_rows
from genart.models.sampling import MAX_GUIDANCE, check_guidance, parse_label
from genart.serve.config import MAX_N, ServeArgs
from genart.serve.guards import BearerAuth, BodyLimit, Deadline
from genart.serve.inference import GenerateJob

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
GENERATIVE = generative_families()
STYLE_LIST_TTL_S = 30.0
DEFAULT_MAX_SIDE = 512  # the longer side an uploaded image is brought to when a request names no max_side


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: Any = None, headers: dict | None = None):
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


class StrictBody(BaseModel):
    """A JSON request body: unknown fields are a 422, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class GenerateBody(StrictBody):
    model: str | None = None  # a generative model's name (default: the first one)
    n: int = Field(8, ge=1, le=MAX_N)  # images; seeds are seed .. seed + n - 1
    seed: int = Field(0, ge=0, le=2**32 - 1)
    truncation: float = Field(1.0, ge=0.0, le=1.0)  # 1.0 = off, 0.0 = the mean image
    label: StrictInt | str | None = None  # class index or name, for class-conditional models
    # classifier-free guidance of a token model trained for it (None = the model's own; 1 = off)
    guidance: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE)
    format: Literal["png", "json"] | None = None  # png grid (default) or JSON with base64 PNGs


class InterpolateBody(StrictBody):
    model: str | None = None
    seed_a: int = Field(0, ge=0, le=2**32 - 1)
    seed_b: int = Field(1, ge=0, le=2**32 - 1)
    steps: int = Field(8, ge=2, le=MAX_N)
    label: StrictInt | str | None = None
    format: Literal["png", "gif"] = "png"  # a strip of frames, or an animated GIF
    frame_ms: int = Field(100, ge=20, le=5000)  # GIF frame duration


def _styles_under(root: str) -> list[str]:
    """The served names under style_root: its folders that hold a checkpoint or a run (a README or a folder of
    notes is no style, and as the first name it would have been the default one)."""
    names = []
    for uri in storage.listdir(root):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if storage.is_safe_name(name, storage.MODEL_NAME_MAX) and storage.isdir(uri) and holds_model(uri):
            names.append(name)
    return sorted(names)


def _png_response(data: bytes, **headers: str) -> Response:
    return Response(data, media_type="image/png", headers=headers)


def _grid_png(frames: np.ndarray, nrow: int) -> bytes:
    return encode_png(_grid(frames, nrow))


def _rgb_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    from PIL import Image

    return encode_png(Image.fromarray(image, "RGB"))


def _grid(frames: np.ndarray, nrow: int):
    """(N, H, W, 3) uint8 -> one PIL image, `nrow` frames per row, 2 px white gaps."""
    from genart.models.sampling import make_grid
    import torch

    return make_grid(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0, nrow=nrow)


def _b64png(frame: np.ndarray) -> str:
    return base64.b64encode(_rgb_png(frame)).decode()


def _gif(frames: np.ndarray, frame_ms: int) -> bytes:
    from PIL import Image

    images = [Image.fromarray(f, "RGB") for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return buf.getvalue()


@serve.deployment
@serve.ingress()
class Ingress:
    """HTTP API + page. `cards` describe every configured model (genart.serve.app.model_card); handles reach replicas."""

    def __init__(self, settings: ServeArgs, api_key: str | None, cards: dict[str, dict],
                 generators: dict, critics: dict, styles=None, search_card: dict | None = None, search=None):
        self.settings = settings
        self.api_key = api_key or None
        self.cards = {name: {k: v for k, v in card.items() if k != "checkpoint"} for name, card in cards.items()}
        self.handles = {**generators, **critics}
        self.styles = styles
        # the index (genart.serve.app.index_card) and its SearchModel handle; its routes are in search_api.py
        self.search_card = {k: v for k, v in (search_card or {}).items() if k != "index"} or None
        self.search = search
        self._root_styles: tuple[float, list[str]] = (0.0, [])

    # ------------------------------------------------------------ wiring

    def __serve_build_asgi_app__(self) -> FastAPI:
        from genart.serve import search_api  # imports this module: so it is imported here, not at the top

        # FastAPI's own /docs and /redoc pages load their scripts from a CDN (blank without internet);
        # fastapi-offline serves the same pages with the files from its package, under /docs/assets.
        app = FastAPIOffline(title="genart", version="1", static_url="/docs/assets",
                             summary="Generate, interpolate, stylize and classify images; find similar ones in an index.")
        app.state.ingress = self  # what the handlers reach through current_ingress
        app.include_router(router)
        app.include_router(search_api.router)
        self._error_handlers(app)
        # last added = outermost: auth, then the body cap, then the deadline around everything else
        app.add_middleware(Deadline, timeout_s=self.settings.request_timeout_s)
        app.add_middleware(BodyLimit, max_bytes=self.settings.max_upload_bytes)
        app.add_middleware(BearerAuth, api_key=self.api_key)
        return app

    def _error_handlers(self, app: FastAPI) -> None:
        def reply(status: int, error: str, detail: Any, headers: dict | None = None) -> JSONResponse:
            return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)

        @app.exception_handler(ApiError)
        async def _api(_: Request, exc: ApiError):
            return reply(exc.status, exc.error, exc.detail, exc.headers)

        @app.exception_handler(RequestValidationError)
        async def _invalid(_: Request, exc: RequestValidationError):
            detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
            return reply(422, "invalid request", detail)

        @app.exception_handler(HTTPException)
        async def _http(_: Request, exc: HTTPException):
            return reply(exc.status_code, str(exc.detail).lower(), None, getattr(exc, "headers", None))

        @app.exception_handler(Exception)
        async def _crash(_: Request, exc: Exception):  # a bug: the traceback goes to the replica's log, not the client
            return reply(500, "internal error", f"{type(exc).__name__}; see the server log")

    # ------------------------------------------------------------ helpers

    async def await_model(self, response, name: str):
        """Await a model call; queue-full and unavailable become 503, a cancelled request cancels the call."""
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except BackPressureError:
            raise ApiError(503, "overloaded", f"model {name!r} has a full queue (max_queued_requests="
                           f"{self.settings.max_queued_requests}); retry shortly", {"Retry-After": "1"}) from None
        except DeploymentUnavailableError as exc:
            raise ApiError(503, "unavailable", f"model {name!r} is not available: {one_line(exc, with_type=False)}", {"Retry-After": "5"}) from None
        except RayActorError:  # the replica died under this request (node lost, OOM, killed); Serve starts another
            raise ApiError(503, "unavailable", f"model {name!r} lost the replica serving this request; retry shortly",
                           {"Retry-After": "1"}) from None
        except UserError as exc:  # requests are validated here first, so this is the model's side, e.g. a broken checkpoint
            cause = getattr(exc, "cause", None) or exc  # the original error inside Ray's RayTaskError wrapper
            # The reason names checkpoint paths, which the API never shows (model cards leave them out): logged only.
            logger.error("model %r failed: %s", name, one_line(cause, with_type=False))
            raise ApiError(500, "model error", f"model {name!r} could not load or run; the server log says why") from None

    async def style_names(self) -> list[str]:
        names = [n for n, card in self.cards.items() if card["family"] == "style"]
        root = self.settings.style_root
        if root:
            at, cached = self._root_styles
            if time.monotonic() - at > STYLE_LIST_TTL_S:
                cached = await asyncio.to_thread(_styles_under, root)
                self._root_styles = (time.monotonic(), cached)
            names += [n for n in cached if n not in names]
        return names

    async def resolve(self, name: str | None, families: tuple[str, ...], endpoint: str) -> dict:
        """The card of the model a request asks for (default: the first of a fitting family); 404 if unknown,
        422 if the wrong kind. Styles under style_root get a card of their own on first use."""
        if name is None:
            for card in self.cards.values():
                if card["family"] in families:
                    return card
            if "style" in families and (found := await self.style_names()):
                return self.root_card(found[0])
            raise ApiError(404, "model not found", f"no {' or '.join(families)} model is served; {endpoint} needs one")
        card = self.cards.get(name)
        if (card is None and "style" in families and storage.is_safe_name(name, storage.MODEL_NAME_MAX)
                and name in await self.style_names()):
            card = self.root_card(name)
        if card is None:
            known = ", ".join(sorted(self.cards)) or "none"
            raise ApiError(404, "model not found", f"no model named {name!r}; served models: {known} (see /v1/models)")
        if card["family"] not in families:
            raise ApiError(422, "wrong model kind",
                           f"{name!r} is a {card['family']} model; {endpoint} needs a {' or '.join(families)} model")
        return card

    @staticmethod
    def root_card(name: str) -> dict:
        """A style found under style_root: listed by name, loaded (and hashed) only by the replica that serves it."""
        return {"name": name, "family": "style", "checkpoint_hash": None, "step": None, "image_size": None,
                "labels": [], "conditional": False, "generative": False, "guidance_trained": False, "guidance": 1.0}

    @staticmethod
    def checked(card: dict, rule, *args):
        """`rule(*args)`: a model module's own request rule (it raises UserError), applied here so a bad request is
        a 422 naming the model before any replica is called."""
        try:
            return rule(*args)
        except UserError as exc:
            raise ApiError(422, "invalid request", f"model {card['name']!r}: {exc}") from None

    def label_index(self, card: dict, label: int | str | None) -> int | None:
        """The request's label (a class name or index) -> its index, by the one label rule; 422 when it is not one."""
        return self.checked(card, parse_label, label, card["labels"], card["conditional"], "label")

    async def read_image(self, upload: UploadFile, max_side: int | None) -> np.ndarray:
        """The uploaded file -> (H, W, 3) uint8, at most max_side px on its longer side (None: DEFAULT_MAX_SIDE, or
        the server's max_side_limit if that is lower); 400 if not a usable image."""
        if max_side is None:  # a request that names none must not be refused by a server that lowered the limit
            max_side = min(DEFAULT_MAX_SIDE, self.settings.max_side_limit)
        if not 16 <= max_side <= self.settings.max_side_limit:
            raise ApiError(422, "invalid request", f"max_side {max_side} must be within 16..{self.settings.max_side_limit}")
        return await self.decode_upload(upload, lambda img: np.asarray(cap_side(img, max_side), dtype=np.uint8))

    async def decode_upload(self, upload: UploadFile, prepare) -> np.ndarray:
        """The uploaded file decoded (pixel cap: max_pixels) and passed through `prepare` in a thread; 400 if it
        is not a usable image."""
        data = await upload.read()

        def decode() -> np.ndarray:
            return prepare(decode_image(data, max_pixels=self.settings.max_pixels))

        try:
            return await asyncio.to_thread(decode)
        except Reject as exc:
            raise ApiError(400, "bad image", exc.reason) from None


# ---------------------------------------------------------------- routes: plain handlers, in the order of the API


def current_ingress(request: Request):
    """The Ingress replica serving this request (set on the app in Ingress.__serve_build_asgi_app__)."""
    return request.app.state.ingress


CurrentIngress = Depends(current_ingress)
router = APIRouter()


@router.get("/", include_in_schema=False)
async def page(request: Request):
    if not request.url.path.endswith("/"):  # under a route prefix: keep the page's relative URLs right
        return RedirectResponse(request.url.path + "/")
    return FileResponse(STATIC / "index.html")


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str):
    path = STATIC / name
    if "/" in name or name.startswith(".") or not path.is_file():
        raise ApiError(404, "not found", f"no static file {name!r}")
    return FileResponse(path)


@router.get("/healthz", summary="Liveness: 200 while the ingress answers")
async def healthz(api=CurrentIngress):
    return {"status": "ok", "auth_required": api.api_key is not None}


@router.get("/v1/models", summary="Served models: name, family, checkpoint hash, image size, labels")
async def list_models(api=CurrentIngress):
    out = list(api.cards.values())
    out += [api.root_card(name) for name in await api.style_names() if name not in api.cards]
    return {"models": out, "search": api.search_card,  # None: no index, /v1/similar and /v1/recommend 404
            "limits": {"max_n": MAX_N, "max_upload_mb": api.settings.max_upload_mb,
                       "max_pixels": api.settings.max_pixels, "max_side": api.settings.max_side_limit}}


@router.post("/v1/generate", summary="A grid of images from seeds (PNG), or JSON with base64 PNGs",
             responses={200: {"content": {"image/png": {}, "application/json": {}}}})
async def generate(body: GenerateBody, request: Request, api=CurrentIngress):
    card = await api.resolve(body.model, GENERATIVE, "/v1/generate")
    name, label = card["name"], api.label_index(card, body.label)
    guidance = api.checked(card, check_guidance, body.guidance, card["family"], card["guidance_trained"])
    seeds = tuple(range(body.seed, body.seed + body.n))
    job = GenerateJob(seeds, None if label is None else (label,) * body.n, body.truncation, guidance)
    frames = await api.await_model(api.handles[name].generate.remote(job), name)  # (n, H, W, 3)
    accepts_json = "application/json" in request.headers.get("accept", "")
    if body.format == "json" or (body.format is None and accepts_json):
        images = await asyncio.to_thread(lambda: [_b64png(f) for f in frames])
        return {"model": name, "family": card["family"], "checkpoint_hash": card["checkpoint_hash"],
                "seeds": list(seeds), "label": label, "truncation": body.truncation, "guidance": guidance, "images": images}
    grid = await asyncio.to_thread(_grid_png, frames, math.ceil(math.sqrt(body.n)))
    return _png_response(grid, **{"X-Genart-Model": name, "X-Genart-Seeds": f"{seeds[0]}-{seeds[-1]}"})


@router.post("/v1/interpolate", summary="A walk between two seeds: PNG strip or animated GIF",
             responses={200: {"content": {"image/png": {}, "image/gif": {}}}})
async def interpolate(body: InterpolateBody, api=CurrentIngress):
    card = await api.resolve(body.model, GENERATIVE, "/v1/interpolate")
    name, label = card["name"], api.label_index(card, body.label)
    call = api.handles[name].interpolate.remote(body.seed_a, body.seed_b, body.steps, label)
    frames = await api.await_model(call, name)  # (steps, H, W, 3)
    if body.format == "gif":
        return Response(await asyncio.to_thread(_gif, frames, body.frame_ms), media_type="image/gif")
    return _png_response(await asyncio.to_thread(_grid_png, frames, body.steps), **{"X-Genart-Model": name})


@router.post("/v1/reconstruct", summary="A VAE's or VQ-VAE's reconstruction of the uploaded image (PNG)",
             responses={200: {"content": {"image/png": {}}}})
async def reconstruct(image: UploadFile = File(...), model: str | None = Form(None), max_side: int | None = Form(None),
                      api=CurrentIngress):
    name = (await api.resolve(model, ("vae", "vqvae"), "/v1/reconstruct"))["name"]
    arr = await api.read_image(image, max_side)
    out = await api.await_model(api.handles[name].reconstruct.remote(arr), name)
    return _png_response(await asyncio.to_thread(_rgb_png, out), **{"X-Genart-Model": name})


@router.post("/v1/complete", summary="An autoregressive (or vqvae) model's completion of the uploaded image: its top rows "
             "kept (default: half), the rest sampled (PNG at the model's size)",
             responses={200: {"content": {"image/png": {}}}})
async def complete(image: UploadFile = File(...), model: str | None = Form(None), seed: int = Form(0),
                   label: int | str | None = Form(None), rows: int | None = Form(None), max_side: int | None = Form(None),
                   api=CurrentIngress):
    card = await api.resolve(model, ("autoregressive", "vqvae"), "/v1/complete")
    name = card["name"]
    if not 0 <= seed <= 2**32 - 1:
        raise ApiError(422, "invalid request", f"seed {seed} must be within 0..2**32-1")
    api.checked(card, completion_rows, rows, card["image_size"])
    label = api.label_index(card, label)
    arr = await api.read_image(image, max_side)
    out = await api.await_model(api.handles[name].complete.remote(arr, seed, label, rows), name)
    return _png_response(await asyncio.to_thread(_rgb_png, out), **{"X-Genart-Model": name})


@router.post("/v1/stylize", summary="The uploaded image in a style (PNG, same aspect ratio)",
             responses={200: {"content": {"image/png": {}}}})
async def stylize(image: UploadFile = File(...), model: str | None = Form(None), max_side: int | None = Form(None),
                  api=CurrentIngress):
    name = (await api.resolve(model, ("style",), "/v1/stylize"))["name"]
    arr = await api.read_image(image, max_side)
    out = await api.await_model(api.styles.options(multiplexed_model_id=name).stylize.remote(arr), name)
    return _png_response(await asyncio.to_thread(_rgb_png, out), **{"X-Genart-Model": name})


@router.post("/v1/classify", summary="The critic's labels for the uploaded image, most likely first")
async def classify(image: UploadFile = File(...), model: str | None = Form(None),
                   top_k: int | None = Form(None, ge=1), api=CurrentIngress):
    card = await api.resolve(model, ("critic",), "/v1/classify")
    name = card["name"]
    arr = await api.read_image(image, None)  # the critic sees <= 128 px anyway
    probs = await api.await_model(api.handles[name].classify.remote(arr), name)
    ranked = sorted(zip(card["labels"], probs), key=lambda lp: -lp[1])[: top_k or None]
    return {"model": name, "checkpoint_hash": card["checkpoint_hash"],
            "labels": [{"label": label, "probability": round(float(p), 6)} for label, p in ranked]}

