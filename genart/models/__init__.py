"""Model families (dcgan, vae, vqvae, autoregressive, critic, style), their registry, and `load` for inference from any checkpoint.

    model = genart.models.load("runs/dcgan-demo")                 # best checkpoint of a run (local or s3://)
    images = model.sample([0, 1, 2])                              # (3, 3, H, W) in [0, 1]
    critic = genart.models.load("s3://bucket/runs/critic/step-000400", family="critic", command="genart score")
    gen = genart.models.load("runs/vae-demo", family=genart.models.GENERATIVE, command="genart evaluate")
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Annotated, Union

from pydantic import Field

from genart import storage
from genart.config import validate
from genart.errors import UserError
from genart.models import autoregressive, critic, dcgan, style, vae, vqvae
from genart.models.checkpoint import STATE, WEIGHTS, checkpoint_hash, incomplete, load_nets, read_state, read_weights
from genart.models.family import Family, Loaded
from genart.models.autoregressive import AutoregressiveConfig
from genart.models.critic import CriticConfig
from genart.models.dcgan import DCGANConfig
from genart.models.style import StyleConfig
from genart.models.vae import VAEConfig
from genart.models.vqvae import VQVAEConfig

REGISTRY: dict[str, Family] = {
    "dcgan": dcgan.FAMILY,
    "vae": vae.FAMILY,
    "vqvae": vqvae.FAMILY,
    "autoregressive": autoregressive.FAMILY,
    "critic": critic.FAMILY,
    "style": style.FAMILY,
}

# The training config's `model:` section: the `family` key picks the class.
ModelConfig = Annotated[Union[DCGANConfig, VAEConfig, VQVAEConfig, AutoregressiveConfig, CriticConfig, StyleConfig], Field(discriminator="family")]

_STEP = re.compile(r"^step-(\d+)$")


# `load(family=GENERATIVE)`: any registered family whose `generative` property is set (see `generative_families`).
GENERATIVE = "generative"


def generative_families() -> tuple[str, ...]:
    """The registered families that generate images from seeds (`.sample`): what generate, evaluate and serving take."""
    return tuple(name for name, fam in REGISTRY.items() if fam.generative)


def get_family(name: str) -> Family:
    """The registered family called `name`, or a UserError listing the known ones."""
    if name not in REGISTRY:
        raise UserError(f"unknown model family {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def model_section(config: dict) -> dict:
    """The model section of a saved config: `config["model"]` for a whole training config, else config itself."""
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        return config["model"]
    return config


def takes_labels(cfg) -> bool:
    """Whether a model config's samples take a class label: a conditional generator, or a VAE whose genre prior
    draws each genre's codes (VAEConfig.takes_labels)."""
    return bool(getattr(cfg, "takes_labels", getattr(cfg, "conditional", False)))


def trains_on_labels(cfg) -> bool:
    """Whether a model config trains on the labels, its nets shaped by them: a classifier family (the critic), or a
    generator whose samples take a label (`takes_labels`)."""
    return REGISTRY[cfg.family].needs_labels or takes_labels(cfg)


def holds_model(uri: str) -> bool:
    """Whether the folder `uri` is a checkpoint folder or a run folder (a state.json, best.json or step-* inside), by
    its listing alone: nothing is read, so a broken checkpoint still counts (loading it says what is wrong)."""
    names = {child.rstrip("/").rsplit("/", 1)[-1] for child in storage.listdir(uri)}
    return bool({STATE, "best.json"} & names) or any(_STEP.match(n) for n in names)


def _checked_name(name: str, where: str) -> str:
    if not storage.is_safe_name(name):  # a checkpoint folder name, never a path
        raise UserError(f"{where}: {name!r} is not a checkpoint folder name (expected e.g. step-000100)")
    return name


def find_checkpoint(uri: str, which: str = "best") -> str:
    """A checkpoint folder -> itself; a run folder -> best.json's checkpoint (which="best", if present) or the
    latest complete `step-*` folder (which="latest", or no best.json); which="step-000100" picks that one. A checkpoint
    whose upload was cut short (`checkpoint.incomplete`) is never picked, and naming one is an error."""
    uri = str(uri).rstrip("/") or "/"
    if storage.exists(storage.join(uri, STATE)):
        reason = incomplete(uri, (WEIGHTS,))
        if reason:
            raise UserError(f"corrupt checkpoint: {uri}: {reason}; use another checkpoint")
        return uri
    if not storage.isdir(uri):
        raise UserError(f"checkpoint not found: {uri}; give a run folder or a checkpoint folder (step-*/)")
    if which not in ("best", "latest"):
        target = storage.join(uri, _checked_name(which, f"checkpoint {which!r}"))
        reason = incomplete(target, (WEIGHTS,))
        if reason == f"no {STATE}":
            raise UserError(f"checkpoint {which} not found in {uri}")
        if reason:
            raise UserError(f"corrupt checkpoint: {target}: {reason}; use another checkpoint")
        return target
    best = storage.join(uri, "best.json")
    if which == "best" and storage.exists(best):
        try:
            name = json.loads(storage.read_text(best))["checkpoint"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"corrupt {best}: expected {{\"checkpoint\": \"step-...\"}}; fix or delete it") from None
        target = storage.join(uri, _checked_name(name, best))
        if incomplete(target, (WEIGHTS,)):
            raise UserError(f"{best} names {name}, which is not a complete checkpoint; use which='latest'")
        return target
    candidates = []
    for child in storage.listdir(uri):
        name = child.rstrip("/").rsplit("/", 1)[-1]
        match = _STEP.match(name)
        if match and incomplete(child, (WEIGHTS,)) is None:
            candidates.append((int(match.group(1)), child))
    if not candidates:
        raise UserError(f"no checkpoint in {uri}: expected step-*/state.json folders (has training saved one yet?)")
    return max(candidates)[1]


def _fetch(ckpt: str, tmp: str) -> str:
    """A local folder with the checkpoint's state.json and weights (only those two: optim.pt is not needed)."""
    if not storage.is_s3(ckpt):
        return storage.fsspec_fs(ckpt)[1]
    for name in (STATE, WEIGHTS):
        uri = storage.join(ckpt, name)
        if storage.exists(uri):
            Path(tmp, name).write_bytes(storage.read_bytes(uri))
    return tmp


def _wanted(family: str | tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """(the accepted family names, how an error names them) for `load(family=...)`."""
    if family == GENERATIVE:
        names = generative_families()
        return names, f"generative model ({', '.join(names)})"
    names = (family,) if isinstance(family, str) else tuple(family)
    return names, f"{' or '.join(names)} model"


def load(uri: str, which: str = "best", family: str | tuple[str, ...] | None = None, command: str = "this command") -> Loaded:
    """Load a model for inference from a run folder or checkpoint folder (local or s3://).

    `family` is the family (or families, or GENERATIVE) the caller accepts; any other is a UserError naming
    `command`, raised before any net is built. This is the one loader: every job, deployment and metric uses it.
    Raises UserError for a missing, corrupt or wrong-family checkpoint.
    """
    ckpt = find_checkpoint(uri, which)
    with tempfile.TemporaryDirectory(prefix="genart-ckpt-") as tmp:
        local = _fetch(ckpt, tmp)
        state = read_state(local)
        name = state["family"]
        if family:
            accepted, wanted = _wanted(family)
            if name not in accepted:
                raise UserError(f"{ckpt} is a {name!r} checkpoint; {command} needs a {wanted}")
        fam = get_family(name)
        cfg = validate(fam.config_cls, model_section(state["config"]), source=f"{ckpt}/{STATE} config")
        image_size = state.get("image_size") or (state["config"].get("data") or {}).get("image_size")
        if not isinstance(image_size, int):
            raise UserError(f"corrupt checkpoint: {ckpt}/{STATE} has no image_size")
        label_names = list(state.get("label_names") or [])
        if fam.needs_labels and not label_names:
            raise UserError(f"corrupt checkpoint: {ckpt}/{STATE} has no label_names, which a {name} model needs")
        nets = fam.build(cfg, image_size, len(label_names), inference=True)
        load_nets(nets, read_weights(local), ckpt)
        digest = checkpoint_hash(local)
    state = {**state, "image_size": image_size, "label_names": label_names, "checkpoint": ckpt, "checkpoint_hash": digest}
    return fam.inference(cfg, nets, state)


__all__ = ["GENERATIVE", "REGISTRY", "ModelConfig", "Loaded", "Family", "load", "find_checkpoint", "get_family", "generative_families", "model_section", "takes_labels",
           "holds_model"]
