"""The app builder: `genart.serve.app:build(args)` turns the serving args into a Serve application.

    serve deploy cluster/serve.yaml          # import_path: genart.serve.app:build, args: {...} (see ServeArgs)
    serve.run(build({"models": {"dcgan": "runs/dcgan", "starry": "runs/style-starry"}}))
The graph: Ingress (FastAPI) -> one GenerativeModel / CriticModel deployment per model, one StyleModels for all styles,
and one SearchModel for the `index` (if given).
"""

from __future__ import annotations

import json
import logging
import os

from ray.serve import Application

from genart.errors import UserError
from genart.models import REGISTRY, generative_families
from genart.serve.config import ServeArgs, parse_args
from genart.serve.deployments import CriticModel, GenerativeModel, SearchModel, StyleModels
from genart.serve.ingress import Ingress

logger = logging.getLogger(__name__)
FAMILIES = tuple(REGISTRY)


def model_card(name: str, uri: str) -> dict:
    """What /v1/models says about a model, read from its checkpoint's state.json and weights file (no weights loaded).

    A run folder is resolved to one checkpoint folder here, and the replicas load exactly that folder, so the
    card and the served weights agree even while training keeps writing new checkpoints into the run.
    """
    from genart import storage
    from genart.config import validate
    from genart.models import find_checkpoint, get_family, model_section, takes_labels
    from genart.models.checkpoint import STATE, checkpoint_hash
    from genart.models.sampling import trained_for_guidance

    checkpoint = find_checkpoint(uri)
    try:
        state = json.loads(storage.read_text(storage.join(checkpoint, STATE)))
        family = state["family"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"corrupt checkpoint: {checkpoint}/{STATE} has no family; use another checkpoint") from None
    if family not in FAMILIES:
        raise UserError(f"{uri}: a {family!r} checkpoint cannot be served; expected one of {', '.join(FAMILIES)}")
    digest = checkpoint_hash(checkpoint)
    config = model_section(state.get("config") or {})
    try:  # the config as the replicas load it (defaults filled in): e.g. a genre-prior VAE takes labels
        model_cfg = validate(get_family(family).config_cls, config, source=f"{checkpoint}/{STATE} config")
    except UserError:
        model_cfg = None  # loading will say what is wrong; the card goes by the stored keys
    labelled = takes_labels(model_cfg) if model_cfg else bool(config.get("conditional"))
    return {
        "name": name,
        "family": family,
        "checkpoint": checkpoint,
        "checkpoint_hash": digest,
        "step": state.get("step"),
        "image_size": state.get("image_size"),
        "labels": list(state.get("label_names") or []),
        "conditional": labelled,  # a sample's label picks its class (generators only)
        # token models trained with a "no class" start token: /v1/generate takes guidance above 1
        "guidance_trained": trained_for_guidance(config.get("conditional"), config.get("label_dropout")),
        "guidance": float(config.get("guidance", 1.0)),  # the model's own scale: what a request without one gets
        "generative": family in generative_families(),  # makes images from seeds: /v1/generate, /v1/interpolate
    }


def index_card(uri: str) -> dict:
    """What /v1/models says about the search index, read from its index.json (no vectors, no torch)."""
    from genart import storage

    manifest_uri = storage.join(uri, "index.json")
    if not storage.exists(manifest_uri):
        raise UserError(f"index {uri}: not a finished index (no index.json); build it with `genart index`")
    try:
        manifest = json.loads(storage.read_text(manifest_uri))
        features = manifest["features"]
        card = {"size": int(manifest["size"]), "dim": int(manifest["dim"]), "nn": manifest["nn"],
                "features": features["name"], "feature_identity": features["identity"],
                "input_size": int(features["input_size"])}
    except (ValueError, KeyError, TypeError):
        raise UserError(f"index {uri}: corrupt index.json; rebuild it with `genart index --overwrite`") from None
    return {"index": uri, **card}


def api_key_from_env(settings: ServeArgs) -> str | None:
    """The key, read where the app is built (the driver for `genart serve`, a cluster worker for `serve deploy`)."""
    key = os.environ.get(settings.api_key_env, "").strip()
    if not key:
        logger.warning("genart serve: $%s is not set: the API needs no key", settings.api_key_env)
    return key or None


def build(args: dict) -> Application:
    """Serve's app builder: validated args (unknown keys rejected) -> the bound application graph."""
    settings = parse_args(args)
    cards = {name: model_card(name, uri) for name, uri in settings.models.items()}
    actor = {"num_cpus": settings.num_cpus_per_replica}
    model_actor = {**actor, "num_gpus": settings.num_gpus_per_replica} if settings.num_gpus_per_replica else actor
    logging_config = {"enable_access_log": settings.access_log}
    model_options = dict(
        ray_actor_options=model_actor,
        logging_config=logging_config,
        autoscaling_config=settings.model_autoscaling(),
        max_ongoing_requests=settings.model_max_ongoing,
        max_queued_requests=settings.max_queued_requests,
        user_config=settings.batch_config(),  # applied in each deployment's reconfigure()
    )
    generators, critics, styles = {}, {}, {}
    for name, card in cards.items():
        if card["family"] in generative_families():
            deployment = GenerativeModel.options(name=f"generator-{name}", **model_options)
            generators[name] = deployment.bind(card["checkpoint"], settings)
        elif card["family"] == "critic":
            critics[name] = CriticModel.options(name=f"critic-{name}", **model_options).bind(card["checkpoint"], settings)
        else:
            styles[name] = card["checkpoint"]
    style_app = None
    if styles or settings.style_root:
        style_app = StyleModels.options(name="styles", **model_options).bind(styles, settings)
    search_card = search_app = None
    if settings.index:
        search_card = index_card(settings.index)
        search_app = SearchModel.options(name="search", **model_options).bind(settings.index, settings)
    ingress = Ingress.options(
        name="ingress",
        ray_actor_options=actor,
        logging_config=logging_config,
        autoscaling_config=settings.ingress_autoscaling(),
        max_ongoing_requests=settings.ingress_max_ongoing_requests,
        max_queued_requests=settings.ingress_max_ongoing_requests,
        # Beyond that queue Ray's proxy answers 503 itself, before the ingress (its body is Ray's text, not genart's
        # JSON): with Retry-After, as genart's own 503s, so a client's retry loop treats both alike.
        backpressure_config={"retry_after_s": 1},
    )
    return ingress.bind(settings, api_key_from_env(settings), cards, generators, critics, style_app,
                        search_card, search_app)
