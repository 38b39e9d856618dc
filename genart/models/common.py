"""Pieces every model family shares: seeded latents, truncation, sample grids, EMA, mixed precision, the Family protocol.

    from genart.models.common import latent, latents, make_grid
    z = latents([0, 1, 2], 128)            # (3, 128), the same numbers for the same seeds on every machine
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterable, Iterator, Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn

from genart.config import Section
from genart.errors import UserError


# ---------------------------------------------------------------- latents


def latent(seed: int, dim: int) -> np.ndarray:
    """The standard-normal latent for `seed`: float32 (dim,), from numpy's SeedSequence, so stable across machines."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed {seed!r}: seeds must be integers >= 0")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed)]))
    return rng.standard_normal(dim, dtype=np.float32)


def latents(seeds: Iterable[int], dim: int) -> torch.Tensor:
    """Batched `latent`: float32 (N, dim) on the CPU."""
    return torch.from_numpy(np.stack([latent(s, dim) for s in seeds]))


def truncate(z: torch.Tensor, truncation: float) -> torch.Tensor:
    """Truncation trick, psi style: scale z toward the mean (0) by `truncation`; 1.0 = off, 0.0 = the mean image.

    Scaling (not BigGAN's resampling of |z| > t) keeps a seed's latent a pure function of (seed, truncation).
    """
    if not 0.0 <= float(truncation) <= 1.0:
        raise UserError(f"truncation {truncation!r}: must be between 0.0 (the mean image) and 1.0 (off)")
    return z * float(truncation)


def slerp(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """Spherical interpolation between two latents (D,) -> (steps, D); the path stays at Gaussian-typical norms."""
    if steps < 2:
        raise UserError(f"steps {steps}: an interpolation needs at least 2 steps")
    t = torch.linspace(0.0, 1.0, steps, dtype=a.dtype)[:, None]  # (steps, 1)
    cos = torch.clamp((a / a.norm()) @ (b / b.norm()), -1.0, 1.0)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-4:  # nearly parallel: plain lerp is exact enough
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


# ---------------------------------------------------------------- images


def make_grid(images01: torch.Tensor, nrow: int = 8, padding: int = 2) -> Image.Image:
    """(N, 3, H, W) in [0, 1] -> one PIL image with `nrow` images per row."""
    from torchvision.utils import make_grid as tv_grid

    grid = tv_grid(images01.detach().float().cpu().clamp(0, 1), nrow=max(1, nrow), padding=padding, pad_value=1.0)
    arr = (grid.numpy().transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)  # (H, W, 3)
    return Image.fromarray(arr, "RGB")


def check_images01(x: Any, what: str = "images") -> torch.Tensor:
    """Validate an inference input: a float tensor (N, 3, H, W); anything else is a UserError."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise UserError(f"{what}: expected a float tensor (N, 3, H, W) with values in [0, 1], got {shape}")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise UserError(f"{what}: empty batch or image ({tuple(x.shape)})")
    return x


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size): center-crop to a square, then antialiased bilinear (a no-op at that size).

    Cropping, never squashing, as training data and serving do; uint8 callers use `images.model_input` (Lanczos).
    """
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[..., top : top + side, left : left + side]
    if side == size:
        return x
    return nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


# ---------------------------------------------------------------- training helpers


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap(net: nn.Module) -> nn.Module:
    """The plain module inside DDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(net, nn.parallel.DistributedDataParallel):
            net = net.module
        elif hasattr(net, "_orig_mod"):
            net = net._orig_mod
        else:
            return net


@torch.no_grad()
def update_ema(ema_net: nn.Module, net: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net, for parameters only.

    Buffers are left alone: BatchNorm statistics of the raw net describe the raw net's activations, not the
    averaged weights'. `recalibrate_batchnorm` measures the EMA net's own before it is used.
    """
    net = unwrap(net)
    for p_ema, p in zip(ema_net.parameters(), net.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - decay)


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, inputs: Iterable[tuple]) -> None:
    """Re-measure every BatchNorm's running mean/var as the exact average over `inputs` (each a tuple of forward
    args), in train mode, then restore the net's mode: the stats then belong to these very weights (as
    torch.optim.swa_utils.update_bn does for SWA). Deterministic given the inputs."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calls below
    was_training = net.training
    net.train()
    try:
        for args in inputs:
            net(*args)
    finally:
        for m in norms:
            m.momentum = momenta[m]
        net.train(was_training)


@contextlib.contextmanager
def eval_mode(*nets: nn.Module) -> Iterator[None]:
    """Put nets in eval mode under no_grad, restoring each one's previous mode afterwards."""
    modes = [n.training for n in nets]
    try:
        for n in nets:
            n.eval()
        with torch.no_grad():
            yield
    finally:
        for n, m in zip(nets, modes):
            n.train(m)


@contextlib.contextmanager
def frozen(net: nn.Module) -> Iterator[None]:
    """Skip gradients for `net`'s parameters (and, if DDP-wrapped, its gradient sync) inside the block.

    Used for D during the generator step: grads flow *through* D to G without touching D's weights.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    no_sync = net.no_sync() if isinstance(net, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()
    try:
        for p in params:
            p.requires_grad_(False)
        with no_sync:
            yield
    finally:
        for p in params:
            p.requires_grad_(True)


class Precision:
    """fp32 by default; `Precision(amp=True, device="cuda")` = float16 autocast + one GradScaler per optimizer.

    The training loop builds one and passes it to `train_step(..., precision=...)`; on a CPU amp is always off.
    """

    def __init__(self, amp: bool = False, device: str | torch.device = "cpu"):
        self.enabled = bool(amp) and torch.device(device).type == "cuda"
        self.scalers: dict[str, torch.amp.GradScaler] = {}

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.float16) if self.enabled else contextlib.nullcontext()

    def step(self, name: str, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """backward + optimizer step (scaled under amp); `name` picks the scaler (one per optimizer)."""
        if not self.enabled:
            loss.backward()
            optimizer.step()
            return
        scaler = self.scalers.setdefault(name, torch.amp.GradScaler("cuda"))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def state_dict(self) -> dict:
        return {name: s.state_dict() for name, s in self.scalers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, s in state.items():
            if self.enabled:
                self.scalers.setdefault(name, torch.amp.GradScaler("cuda")).load_state_dict(s)


def finite(metrics: dict[str, float], where: str) -> dict[str, float]:
    """Pass metrics through, raising if training diverged (a NaN loss should stop the run, not be logged)."""
    for key, value in metrics.items():
        if not np.isfinite(value):
            raise FloatingPointError(f"{where}: {key} is {value}; lower the learning rate or enable spectral_norm")
    return metrics


def check_conditional(conditional: bool, num_labels: int) -> None:
    """A class-conditional model needs at least 2 labels in its data: else one clear line saying what to do."""
    if conditional and num_labels < 2:
        raise UserError("model.conditional=true needs a labelled dataset with at least 2 classes (one folder per class); "
                        "for unlabelled images use --set model.conditional=false")


def labels_of(batch: dict[str, torch.Tensor], required: bool) -> torch.Tensor | None:
    """batch["label"] (B,) int64, or None if absent; a -1 (unlabelled) where labels are required is a UserError."""
    if not required:
        return None
    label = batch.get("label")
    if label is None:
        raise UserError("this model needs labelled images (e.g. one sub-folder per class); the data has no labels")
    if bool((label < 0).any()):
        raise UserError("this model needs labelled images, but some have label -1; use a dataset with one folder per class")
    return label.long()


# ---------------------------------------------------------------- loaded models and the Family protocol


class Loaded:
    """A model ready for inference: nets in eval mode without gradients, plus where it came from.

    `.family`, `.meta` (config, label_names, image_size, step, checkpoint, ...), `.checkpoint_hash`, `.to(device)`.
    """

    family: str = ""

    def __init__(self, nets: dict[str, nn.Module], meta: dict, checkpoint_hash: str = ""):
        self.nets = nets
        self.meta = meta
        self.checkpoint_hash = checkpoint_hash
        for net in nets.values():
            net.eval()
            net.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        for net in self.nets.values():
            for p in net.parameters():
                return p.device
        return torch.device("cpu")

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def label_names(self) -> list[str]:
        return list(self.meta.get("label_names") or [])

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def to(self, device: str | torch.device) -> "Loaded":
        for net in self.nets.values():
            net.to(device)
        return self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} family={self.family} step={self.meta.get('step')} {self.checkpoint_hash[:12]}>"


class GenerativeLoaded(Loaded):
    """Shared by dcgan and vae: `.sample(seeds, labels, truncation)` and `.interpolate(seed_a, seed_b, steps)`.

    Subclasses set `latent_dim`, `conditional` and implement `_generate(z (N, D), labels (N,) | None) -> (N, 3, H, W) [-1, 1]`.
    """

    latent_dim: int = 0
    conditional: bool = False

    def _generate(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _labels(self, seeds: list[int], labels: list[int] | None) -> torch.Tensor | None:
        if not self.conditional:
            if labels is not None:
                raise UserError(f"this {self.family} model is not class-conditional: leave labels out")
            return None
        if labels is None:  # a deterministic default: the class follows the seed
            labels = [int(s) % self.num_labels for s in seeds]
        if len(labels) != len(seeds):
            raise UserError(f"got {len(labels)} labels for {len(seeds)} seeds: pass one label per seed")
        for label in labels:
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < self.num_labels:
                raise UserError(f"label {label!r}: must be an integer in 0..{self.num_labels - 1} ({', '.join(self.label_names)})")
        return torch.tensor([int(v) for v in labels], dtype=torch.long, device=self.device)

    @torch.no_grad()
    def sample(self, seeds: list[int], labels: list[int] | None = None, truncation: float = 1.0) -> torch.Tensor:
        """Images for `seeds`: (N, 3, H, W) in [0, 1]; the same seed (and label) always gives the same image.

        Class-conditional models take one label per seed; without labels, seed s gets class s % num_labels.
        """
        seeds = list(seeds)
        if not seeds:
            raise UserError("sample: give at least one seed")
        z = truncate(latents(seeds, self.latent_dim), truncation).to(self.device)  # (N, D)
        out = self._generate(z, self._labels(seeds, labels))
        return ((out.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def interpolate(self, seed_a: int, seed_b: int, steps: int, label: int | None = None) -> torch.Tensor:
        """A spherical walk from seed_a's image to seed_b's: (steps, 3, H, W) in [0, 1]."""
        z = slerp(latents([seed_a], self.latent_dim)[0], latents([seed_b], self.latent_dim)[0], int(steps))
        labels = self._labels([seed_a] * len(z), None if label is None else [label] * len(z))
        out = self._generate(z.to(self.device), labels)
        return ((out.float() + 1) / 2).clamp(0, 1)


class Family(Protocol):
    """What the generic training loop, checkpointing and `load` need from a model family (see genart/models/*.py)."""

    name: str
    config_cls: type[Section]
    supported_sizes: tuple[int, ...] | None  # None = any size
    needs_labels: bool  # always needs labelled data (critic); a conditional dcgan checks num_labels in build()
    generative: bool  # images from seeds: its Loaded has .sample(seeds, labels, truncation) and .interpolate
    best_metric: tuple[str, str]  # (metric from evaluate(), "min" | "max") that picks best.json
    default_augment: str  # data.augment when the config leaves it null (genart.train.augment)

    def build(self, cfg: Any, image_size: int, num_labels: int, inference: bool = False) -> dict[str, nn.Module]: ...

    def trainable(self) -> tuple[str, ...]: ...

    def optimizers(self, cfg: Any, nets: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]: ...

    def train_step(
        self, cfg: Any, nets: dict, opts: dict, batch: dict[str, torch.Tensor], step: int, precision: Precision | None = None
    ) -> dict[str, float]: ...

    def before_checkpoint(self, cfg: Any, nets: dict[str, nn.Module]) -> None:
        """Rank 0, before validation, sample grids and saving: bring inference-only state up to date."""

    def evaluate(self, cfg: Any, nets: dict, batches: Iterable[dict]) -> dict[str, float]: ...

    def fixed_inputs(self, cfg: Any, image_size: int, num_labels: int, example_batch: dict) -> dict: ...

    def sample_images(self, cfg: Any, nets: dict, fixed: dict) -> Image.Image: ...

    def inference(self, cfg: Any, nets: dict, state: dict) -> Loaded: ...


def meta_from_state(state: dict) -> dict:
    """A checkpoint's state.json (+ "checkpoint" uri added by `load`) -> Loaded.meta."""
    keys = ("family", "config", "label_names", "image_size", "step", "checkpoint", "metrics", "net_info")
    return {k: state.get(k) for k in keys}


def check_size(family: str, image_size: int, supported: tuple[int, ...] | None) -> None:
    if supported is not None and image_size not in supported:
        sizes = ", ".join(str(s) for s in supported)
        raise UserError(f"{family}: image_size {image_size} is not supported; use one of {sizes} (data.image_size)")


def device_of(nets: dict[str, nn.Module]) -> torch.device:
    for net in nets.values():
        for p in net.parameters():
            return p.device
    return torch.device("cpu")
