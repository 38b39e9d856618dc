"""Model deployments: one per generative model (dcgan, vae, vqvae, autoregressive) or critic, ONE multiplexed
deployment for every style, and one for the search index.

Generators and critics are few and hot, so each gets its own replicas, autoscaling and batch queue (never a
cold load on the request path, batches never mix models). Styles are many and long-tailed: one deployment
loads them on demand by name (`@serve.multiplexed`, LRU-evicted), so a new style is a new checkpoint, not a
new deployment. Options (replicas, queues, CPUs) are set by `genart.serve.app.build` with `.options()`; batch
parameters arrive as user_config and are applied in `reconfigure`, as Ray's batching guide does. A request that
finds its replica idle skips the batch queue (`InFlight`): nothing could join its batch, so waiting is pure latency.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Awaitable, Callable, TypeVar

import numpy as np
from ray import serve

from genart import storage
from genart.errors import UserError
from genart.serve import inference
from genart.serve.config import ServeArgs
from genart.models.sampling import stoppable
from genart.serve.inference import GenerateJob

logger = logging.getLogger("ray.serve")
T = TypeVar("T")


def _setup(settings: ServeArgs):
    """The replica's device and precision: the batch actors' InferenceSetup (on a GPU: cuDNN flags for this
    replica's process, channels-last, bf16/fp16 autocast; on a CPU: fp32, as before)."""
    import torch

    from genart.models.family import InferenceSetup

    torch.set_num_threads(settings.threads)
    return InferenceSetup(use_gpu=settings.num_gpus_per_replica > 0)


def _load(uri: str, family: str | tuple[str, ...] | None, setup):
    from genart import models

    return setup.place(models.load(uri, family=family, command="this deployment"))


async def _run(setup, fn, *args):
    """fn(*args) in a worker thread (the replica keeps queueing meanwhile), inside the replica's inference context:
    autocast and inference_mode are per thread, so they are entered there.

    A thread cannot be cancelled. When the request is (Deadline's 504, a client gone), fn is told to stop at its
    next `stop_point` (token sampling checks one per token) and this call returns only once the thread is free,
    so the request stays counted in `InFlight` while its work still holds the CPU.
    """
    stop = threading.Event()

    def call():
        with setup.inference(), stoppable(stop):
            return fn(*args)

    work = asyncio.ensure_future(asyncio.to_thread(call))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait([work])  # (a second cancel leaves at once)
        if not work.cancelled():
            work.exception()  # retrieved: Stopped, or fn's own error, is not this cancelled request's answer
        raise


class SharedLoads:
    """Model loads by name that outlive the request that started them.

    `serve.multiplexed` awaits its load function inside the request; when the request is cancelled the load is
    thrown away, and a style slower to load than request_timeout_s could never be cached: every request would
    start it over. Here a load runs as its own task; a cancelled request leaves it running, and the next request
    for that name picks up the same task (a failed one is started again). A finished load that no request came
    back for is dropped after PARKED_S: it held a model outside the replica's LRU (max_styles_per_replica) for good.
    """

    PARKED_S = 120.0  # a client retrying a timed-out request comes back well within this

    def __init__(self, load: Callable[[str], Awaitable[T]]):
        self._load = load
        self._tasks: dict[str, asyncio.Task] = {}

    async def __call__(self, name: str) -> T:
        task = self._tasks.get(name)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._tasks[name] = asyncio.ensure_future(self._load(name))
            task.add_done_callback(lambda done: asyncio.get_running_loop().call_later(
                self.PARKED_S, self._forget, name, done))
        try:
            return await asyncio.shield(task)
        finally:
            if task.done() and self._tasks.get(name) is task:
                del self._tasks[name]  # the caller (multiplexed's cache) holds the model from here

    def _forget(self, name: str, task: asyncio.Task) -> None:
        if self._tasks.get(name) is task:
            del self._tasks[name]


class InFlight:
    """Requests in flight on this replica (one event loop: no lock needed).

    `@serve.batch` waits up to batch_wait_timeout_s for a batch to fill even when no other request exists, which
    is all of a lone request's queueing delay. A request that arrives to an idle replica runs at once, unbatched;
    one that arrives while others are in flight (computing or queued) joins the batch queue, so batches still form
    under load: the requests that pile up during one forward pass make the next batch.
    """

    def __init__(self, batching: bool = True) -> None:
        self.batching = batching  # ServeArgs.batching: False runs every request at once
        self.count = 0
        self.alone = 0  # requests that ran at once, unbatched
        self.queued = 0  # requests that went to the batch queue
        self.batches = 0  # batches the queue ran (counted by the batch methods)

    async def run(self, direct: Callable[[], Awaitable[T]], batched: Callable[[], Awaitable[T]]) -> T:
        """This request's result: `direct()` when it is alone on the replica (or batching is off), else
        `batched()`, the @serve.batch method's queue. Both are called, and awaited, only while it is counted."""
        self.count += 1
        alone = self.count == 1 or not self.batching
        if alone:
            self.alone += 1
        else:
            self.queued += 1
        try:
            return await (direct() if alone else batched())
        finally:
            self.count -= 1

    def stats(self) -> dict:
        return {"alone": self.alone, "queued": self.queued, "batches": self.batches}


async def _first(results: Awaitable[list]):
    """The one result of a one-item call of a batch function (a request run directly, unbatched)."""
    return (await results)[0]


def _images_in(jobs: list[GenerateJob]) -> int:
    return sum(job.size for job in jobs)


def _configure_batch(batch_method, user_config: dict) -> None:
    """Apply ServeArgs.batch_config() to a @serve.batch method: once per replica start and per config update,
    never per request (the method's queue is shared by every request in the replica)."""
    batch_method.set_max_batch_size(int(user_config["max_batch_size"]))
    batch_method.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))


@serve.deployment
class GenerativeModel:
    """A generative checkpoint (dcgan, vae, vqvae, autoregressive): generate (batched by image count), interpolate,
    reconstruct (vae, vqvae), complete (autoregressive, vqvae)."""

    def __init__(self, checkpoint: str, settings: ServeArgs):
        from genart.models import GENERATIVE

        self.setup = _setup(settings)
        self.model = _load(checkpoint, GENERATIVE, self.setup)
        self.in_flight = InFlight(settings.batching)

    def reconfigure(self, user_config: dict) -> None:
        """ServeArgs.batch_config(): here max_batch_size counts images (batch_size_fn), not requests. (Serve
        then warns once that it exceeds max_ongoing_requests; it compares images with requests.)"""
        self._generate_batch.set_max_batch_size(int(user_config["max_batch_images"]))
        self._generate_batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    def batch_stats(self) -> dict:
        """How this replica's requests ran: alone (idle replica), queued for a batch, and the batches run."""
        return self.in_flight.stats()

    async def generate(self, job: GenerateJob) -> np.ndarray:
        """(n, H, W, 3) uint8 for one request."""
        return await self.in_flight.run(
            direct=lambda: _first(_run(self.setup, inference.generate, self.model, [job])),
            batched=lambda: self._generate_batch(job))

    # max_batch_size counts images (batch_size_fn); both values are replaced in reconfigure()
    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.01, batch_size_fn=_images_in)
    async def _generate_batch(self, jobs: list[GenerateJob]) -> list[np.ndarray]:
        self.in_flight.batches += 1
        # in a thread: the replica keeps queueing the next batch while this one computes
        return await _run(self.setup, inference.generate, self.model, jobs)

    async def interpolate(self, seed_a: int, seed_b: int, steps: int, label: int | None) -> np.ndarray:
        return await _run(self.setup, inference.interpolate, self.model, seed_a, seed_b, steps, label)

    async def reconstruct(self, image: np.ndarray) -> np.ndarray:
        return await _run(self.setup, inference.reconstruct, self.model, image)

    async def complete(self, image: np.ndarray, seed: int, label: int | None, rows: int | None) -> np.ndarray:
        return await _run(self.setup, inference.complete, self.model, image, seed, label, rows)


@serve.deployment
class CriticModel:
    """A critic checkpoint: class probabilities for an uploaded image, batched across requests."""

    def __init__(self, checkpoint: str, settings: ServeArgs):
        self.setup = _setup(settings)
        self.model = _load(checkpoint, "critic", self.setup)
        self.in_flight = InFlight(settings.batching)

    def reconfigure(self, user_config: dict) -> None:
        _configure_batch(self._classify_batch, user_config)

    async def classify(self, image: np.ndarray) -> list[float]:
        """(H, W, 3) uint8 -> K probabilities, in label_names order."""
        x = inference.critic_input(image, self.model.image_size)  # (3, S, S): same shape for every request
        return await self.in_flight.run(
            direct=lambda: _first(_run(self.setup, inference.classify, self.model, [x])),
            batched=lambda: self._classify_batch(x))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _classify_batch(self, inputs: list[np.ndarray]) -> list[list[float]]:
        self.in_flight.batches += 1
        return await _run(self.setup, inference.classify, self.model, inputs)


@serve.deployment
class StyleModels:
    """Every style model behind one deployment: the request's multiplexed model id names the style.

    Styles come from `models` entries of family style, or from sub-folders of `style_root` (names checked
    against storage.SAFE_NAME, so a request cannot reach outside it). Up to `max_styles_per_replica` stay loaded.
    """

    def __init__(self, styles: dict[str, str], settings: ServeArgs):
        self.styles = dict(styles)
        self.settings = settings
        self.setup = _setup(settings)
        self.in_flight = InFlight(settings.batching)

        async def read_style(name: str):
            logger.info("loading style %r", name)
            return await asyncio.to_thread(_load, self.uri_of(name), "style", self.setup)

        shared = SharedLoads(read_style)

        async def load_style(name: str):
            return await shared(name)

        # wired at init (not as a class decorator) so the LRU size comes from the args; Serve takes a plain
        # function here (it keeps its model cache as an attribute of the function it wraps)
        self._get_model = serve.multiplexed(max_num_models_per_replica=settings.max_styles_per_replica)(load_style)

    def reconfigure(self, user_config: dict) -> None:
        _configure_batch(self._stylize_batch, user_config)

    def uri_of(self, name: str) -> str:
        if name in self.styles:
            return self.styles[name]
        if self.settings.style_root and storage.is_safe_name(name, storage.MODEL_NAME_MAX):
            return storage.join(self.settings.style_root, name)
        raise UserError(f"no style named {name!r}")

    async def stylize(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> stylized (H, W, 3) uint8 with the style named by the multiplexed model id."""
        async def direct() -> np.ndarray:
            model = await self._get_model(serve.get_multiplexed_model_id())
            return (await _run(self.setup, inference.stylize, model, [image]))[0]

        return await self.in_flight.run(direct, batched=lambda: self._stylize_batch(image))

    # Serve splits batches by multiplexed model id, so one batch is always one style.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _stylize_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        self.in_flight.batches += 1
        model = await self._get_model(serve.get_multiplexed_model_id())
        return await _run(self.setup, inference.stylize, model, images)


@serve.deployment
class SearchModel:
    """A `genart index` folder (genart.search.query.SearchIndex): uploads embedded by the index's own feature model
    (batched across requests), nearest neighbours, recommendations, thumbnails."""

    def __init__(self, index_uri: str, settings: ServeArgs):
        from genart.search.query import SearchIndex

        # the replica's device, as for the model deployments; the critic extractor runs in its InferenceSetup
        self.index = SearchIndex.open(index_uri, device=_setup(settings).device)
        self.index.extractor  # noqa: B018 - load (and check) the feature model now, not on the first request
        self.index.load_thumbnails()  # and the thumbnails: those of the index just opened, read once
        self.in_flight = InFlight(settings.batching)

    def reconfigure(self, user_config: dict) -> None:
        _configure_batch(self._embed_batch, user_config)

    def batch_stats(self) -> dict:
        return self.in_flight.stats()

    async def similar(self, pixels: np.ndarray, k: int) -> list[dict]:
        """uint8 (S, S, 3) from genart.search.index.square_pixels -> the k nearest indexed images, closest first."""
        vector = await self.in_flight.run(
            direct=lambda: _first(asyncio.to_thread(self.index.embed_pixels, pixels[None])),
            batched=lambda: self._embed_batch(pixels))
        return await asyncio.to_thread(self.index.search, vector, k)  # exact: ~40 ms at 100k vectors (bench_index.py)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _embed_batch(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        self.in_flight.batches += 1
        return list(await asyncio.to_thread(self.index.embed_pixels, np.stack(pixels)))  # (N, D) -> N vectors

    async def recommend(self, liked: list[str], k: int, diversity: float) -> dict:
        """{"results": [...]} never holding a liked id, or {"unknown": [ids]} when some liked id is not indexed."""
        unknown = [i for i in liked if i not in self.index.row_of]
        if unknown:
            return {"unknown": unknown}
        return {"results": await asyncio.to_thread(self.index.recommend, liked, k, diversity)}

    async def thumbnail(self, image_id: str) -> bytes | None:
        """The JPEG thumbnail the index stored for `image_id`, or None (thumbnails.parquet is read at start)."""
        return await asyncio.to_thread(self.index.thumbnail, image_id)
