"""The checkpoint folder: `model.safetensors` (every net), `optim.pt` (optimizers + torch RNG), `state.json`.

    save_checkpoint(dir, nets, optimizers, {"family": "dcgan", "step": 100, "config": cfg_dict, "image_size": 64,
                                            "label_names": [...], "metrics": {...}})
    tensors_by_net, optim_states, state = load_checkpoint(dir)      # or: state = restore_training(dir, nets, optimizers)
Nothing here unpickles code: weights are safetensors, optim.pt is read with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from genart import storage
from genart.errors import LINE_LIMIT, UserError, one_line
from genart.models.training import unwrap

WEIGHTS, OPTIM, STATE = "model.safetensors", "optim.pt", "state.json"
REQUIRED_STATE = ("family", "step", "config")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)) and np.ndim(value) == 0:
        return _jsonable(value.item())  # a NaN / inf scalar as well as a float one
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not np.isfinite(value):
        return None  # JSON has no NaN / inf
    return value


def rng_state() -> tuple[dict, dict]:
    """(JSON-able python + numpy RNG state, tensor torch RNG state): the CPU generator's, and on a GPU this process's
    own device's (a training worker draws on one device; a node's workers can all see every GPU of the node)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    as_json = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda_device"] = torch.cuda.get_rng_state()
    return as_json, tensors


def restore_rng(as_json: dict | None, tensors: dict | None) -> bool:
    """Put RNG states from `rng_state` back; True if every stream this process draws from was in them (on a GPU
    its device's too: a run saved on CPU and resumed on GPUs, or an old checkpoint, has none to give)."""
    if as_json:
        version, internal, gauss = as_json["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = as_json["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if tensors:
        torch.set_rng_state(tensors["torch"])
    if not torch.cuda.is_available():
        return bool(as_json and tensors)
    if tensors and "cuda_device" in tensors:
        torch.cuda.set_rng_state(tensors["cuda_device"])
        return bool(as_json)
    return False


def save_checkpoint(dir: str, nets: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], state: dict) -> str:
    """Write a checkpoint into the local folder `dir`; returns the sha256 of model.safetensors.

    `state` needs family, step and config (the model section, or the whole training config with a `model:` key);
    image_size and label_names should be there too. state.json is written last and records the other files' sizes:
    `incomplete` trusts a copy only when they match (Ray's upload copies files in any order, so state.json alone
    can arrive before the weights). `state["precision"]` (a Precision.state_dict(), if given) goes into optim.pt. Nets with
    `persist_in_checkpoint = False` (e.g. style's loss network) are rebuilt, not saved, but their
    `checkpoint_info()` is recorded under state["net_info"].
    """
    state = dict(state)
    missing = [k for k in REQUIRED_STATE if k not in state]
    if missing:
        raise ValueError(f"save_checkpoint: state is missing {missing}")
    folder = Path(dir)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, net_info = {}, dict(state.get("net_info") or {})
    for name, net in nets.items():
        net = unwrap(net)  # strip DDP's "module." / torch.compile's "_orig_mod." prefixes
        if hasattr(net, "checkpoint_info"):
            net_info[name] = net.checkpoint_info()
        if getattr(net, "persist_in_checkpoint", True):
            for key, value in net.state_dict().items():
                tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous().clone()  # clone: no shared storage
    _atomic(folder / WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt", "family": str(state["family"])}))
    rng_json, rng_tensors = rng_state()
    optim = {"optimizers": {name: opt.state_dict() for name, opt in optimizers.items()}, "rng": rng_tensors}
    if "precision" in state:  # GradScaler states (tensors and floats) belong with the optimizers
        optim["precision"] = state.pop("precision")
    ranks = state.pop("rng_ranks", None)  # [(json, tensors)] per training rank, from the loop's all-gather
    if ranks:
        state["rng_ranks"] = [j for j, _ in ranks]
        optim["rng_ranks"] = [t for _, t in ranks]
    _atomic(folder / OPTIM, lambda p: torch.save(optim, p))
    files = {name: (folder / name).stat().st_size for name in (WEIGHTS, OPTIM)}
    full = {**state, "net_info": net_info, "rng": state.get("rng") or rng_json, "nets": sorted(nets), "files": files}
    text = json.dumps(_jsonable(full), indent=1)
    _atomic(folder / STATE, lambda p: Path(p).write_text(text))
    return checkpoint_hash(str(folder))


def incomplete(dir: str, files: tuple[str, ...] | None = None) -> str | None:
    """Why the checkpoint folder `dir` (local or s3://) cannot be trusted, or None if it holds its state.json and
    `files` (None: every file the state lists; loading for inference asks for (WEIGHTS,) only) at the sizes written.
    Ray's upload copies a checkpoint's files in any order, so one cut short can have a state.json ahead of a missing
    or truncated weights file. Checkpoints saved before sizes were recorded need their weights file."""
    sizes = {storage.relative(dir, uri): size for uri, size in storage.find(dir)}
    if STATE not in sizes:
        return f"no {STATE}"
    try:
        state = json.loads(storage.read_text(storage.join(dir, STATE)))
    except (ValueError, UserError) as exc:  # half-copied, or removed since the listing
        return f"{STATE} is not valid JSON ({one_line(exc, with_type=False)})"
    if not isinstance(state, dict):
        return f"{STATE} is not a JSON object"
    recorded = state.get("files")
    if not isinstance(recorded, dict):
        recorded = {WEIGHTS: None}
    for name in recorded if files is None else files:
        if name not in sizes:
            return f"no {name}"
        if recorded.get(name) is not None and sizes[name] != recorded[name]:
            return f"{name} is {sizes[name]} bytes, {STATE} records {recorded[name]}"
    return None


def checkpoint_hash(dir: str) -> str:
    """sha256 hex of the checkpoint's model.safetensors (a local folder or s3:// prefix): what the API calls
    checkpoint_hash and what `genart generate`'s outputs record as model_hash."""
    try:
        return storage.sha256(storage.join(dir, WEIGHTS))
    except FileNotFoundError:
        raise UserError(f"corrupt checkpoint: {dir} has no {WEIGHTS}; use another checkpoint") from None


def read_state(dir: str) -> dict:
    path = Path(dir) / STATE
    if not path.is_file():
        raise UserError(f"not a checkpoint: {dir} has no {STATE}; give a checkpoint folder (step-*/) or a run folder")
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt checkpoint: {path} is not valid JSON ({exc}); use another checkpoint") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_STATE):
        raise UserError(f"corrupt checkpoint: {path} lacks {', '.join(REQUIRED_STATE)}; use another checkpoint")
    return state


def read_weights(dir: str) -> dict[str, dict[str, torch.Tensor]]:
    """model.safetensors -> {net name: its state_dict}."""
    path = Path(dir) / WEIGHTS
    if not path.is_file():
        raise UserError(f"corrupt checkpoint: {dir} has no {WEIGHTS}; use another checkpoint")
    try:
        flat = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = one_line(exc, with_type=False)
        raise UserError(f"corrupt checkpoint: {path} is not a readable safetensors file ({first})") from None
    by_net: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        net, _, param = key.partition(".")
        by_net.setdefault(net, {})[param] = value
    return by_net


def read_optim(dir: str) -> dict:
    """optim.pt -> {"optimizers": {name: state_dict}, "rng": {...}}; pickles that would run code are refused."""
    path = Path(dir) / OPTIM
    if not path.is_file():
        raise UserError(f"corrupt checkpoint: {dir} has no {OPTIM}; it cannot resume training")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the weights-only unpickler refuses anything but plain data
        first = one_line(exc, with_type=False)
        raise UserError(f"refused {path}: not a plain tensor file (loaded with weights_only=True): {first}") from None
    if not isinstance(data, dict) or not isinstance(data.get("optimizers"), dict):
        raise UserError(f"corrupt checkpoint: {path} does not hold optimizer states")
    return data


def load_checkpoint(dir: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """A local checkpoint folder -> (tensors_by_net, optim_states, state). Raises UserError if missing or corrupt."""
    state = read_state(dir)
    return read_weights(dir), read_optim(dir), state


def load_nets(nets: dict[str, nn.Module], tensors_by_net: dict[str, dict[str, torch.Tensor]], where: str) -> None:
    """Load each net's weights (strictly); a missing net or mismatched shapes is a UserError naming the checkpoint."""
    for name, net in nets.items():
        net = unwrap(net)
        if not getattr(net, "persist_in_checkpoint", True):
            continue
        if name not in tensors_by_net:
            raise UserError(f"checkpoint {where} has no weights for {name!r}; it was written by a different model")
        try:
            net.load_state_dict(tensors_by_net[name], strict=True)
        except RuntimeError as exc:  # torch's first line only says "Error(s) in loading state_dict": name the first
            detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), one_line(exc, with_type=False))
            raise UserError(f"checkpoint {where}: {name} weights do not match the model its config describes "
                            f"({detail[:LINE_LIMIT]})") from None


def record_metrics(dir: str, metrics: dict) -> None:
    """Add metrics measured once the checkpoint was saved (evaluation scores load it) to its state.json row, so a
    resume can recover the whole row."""
    path = Path(dir) / STATE
    state = json.loads(path.read_text())
    state["metrics"] = {**state.get("metrics", {}), **metrics}
    text = json.dumps(_jsonable(state), indent=1)
    _atomic(path, lambda p: Path(p).write_text(text))


def restore_training(dir: str, nets: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], precision: Any = None,
                     rank: int = 0) -> dict:
    """Resume: load nets, optimizer states, GradScaler states and `rank`'s RNG states from a local checkpoint.

    Returns its state, with state["rng_restored"] saying whether this rank's own RNG streams were in it (a
    checkpoint from a run with fewer workers has none for the new ranks: the loop then seeds them afresh).
    """
    tensors, optim, state = load_checkpoint(dir)
    load_nets(nets, tensors, dir)
    for name, opt in optimizers.items():
        if name not in optim["optimizers"]:
            raise UserError(f"checkpoint {dir} has no optimizer state for {name!r}; it was written by a different model")
        opt.load_state_dict(optim["optimizers"][name])
    if precision is not None and optim.get("precision"):
        precision.load_state_dict(optim["precision"])
    json_ranks, tensor_ranks = state.get("rng_ranks") or [], optim.get("rng_ranks") or []
    if rank < min(len(json_ranks), len(tensor_ranks)):
        state["rng_restored"] = restore_rng(json_ranks[rank], tensor_ranks[rank])
    elif rank == 0:
        state["rng_restored"] = restore_rng(state.get("rng"), optim.get("rng"))
    else:
        state["rng_restored"] = False
    return state
