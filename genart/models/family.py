"""The Family protocol every model module implements, and `Loaded`: a model ready for inference.

    from genart.models.family import Family, Loaded
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Protocol, Sequence

import torch
from PIL import Image
from torch import nn

from genart.config import Section
from genart.errors import UserError
from genart.models.sampling import check_guidance, latents, parse_label, seed_labels, slerp, truncate
from genart.models.training import Precision


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
        return device_of(self.nets)

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def label_names(self) -> list[str]:
        return list(self.meta.get("label_names") or [])

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def to(self, device: str | torch.device | None) -> "Loaded":
        if device is None:  # e.g. an extractor without a device: stay where the nets are
            return self
        for net in self.nets.values():
            net.to(device)
        return self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} family={self.family} step={self.meta.get('step')} {self.checkpoint_hash[:12]}>"


class GenerativeLoaded(Loaded):
    """Shared by every generative family (dcgan, vae, and the token families): `.sample(seeds, labels, truncation,
    guidance)` and `.interpolate(seed_a, seed_b, steps)`.

    Subclasses set `latent_dim`, `conditional` and implement `_generate(z (N, D), labels (N,) | None) -> (N, 3, H, W) [-1, 1]`.
    """

    latent_dim: int = 0
    conditional: bool = False
    guidance_trained: bool = False  # can sample with classifier-free guidance above 1 (token models trained for it)

    def _generate(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _labels(self, seeds: list[int], labels: list[int | str] | None) -> torch.Tensor | None:
        if labels is None:  # a deterministic default: the class follows the seed
            if not self.conditional:
                return None
            labels = seed_labels(seeds, None, self.num_labels)
            return torch.tensor(labels, dtype=torch.long, device=self.device)
        if len(labels) != len(seeds):
            raise UserError(f"got {len(labels)} labels for {len(seeds)} seeds: pass one label per seed")
        index = [parse_label(label, self.label_names, self.conditional, "labels") for label in labels]
        return torch.tensor(index, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def sample(self, seeds: list[int], labels: list[int] | None = None, truncation: float = 1.0,
               guidance: float | None = None) -> torch.Tensor:
        """Images for `seeds`: (N, 3, H, W) in [0, 1]; the same seed (and label) always gives the same image.

        Class-conditional models take one label per seed; without labels, seed s gets `default_label(s, num_labels)` (s % num_labels).
        `guidance` is the token families' (None: the model's own); any other value is a UserError here.
        """
        check_guidance(guidance, self.family, self.guidance_trained)
        seeds = list(seeds)
        if not seeds:
            raise UserError("sample: give at least one seed")
        z = truncate(latents(seeds, self.latent_dim), truncation).to(self.device)  # (N, D)
        out = self._generate(z, self._labels(seeds, labels))
        return ((out.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def interpolate(self, seed_a: int, seed_b: int, steps: int, label: int | None = None) -> torch.Tensor:
        """A spherical walk from seed_a's latent to seed_b's: (steps, 3, H, W) in [0, 1]. A class-conditional model
        walks in one class, `label` or seed_a's own (the last frame is seed_b's image only when seed_b's own class
        is the same): a walk that changed class halfway would jump, not morph."""
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
    recent_batches: int  # how many of rank 0's latest training batches before_checkpoint receives (0: none)

    def build(self, cfg: Any, image_size: int, num_labels: int, inference: bool = False) -> dict[str, nn.Module]: ...

    def trainable(self) -> tuple[str, ...]: ...

    def optimizers(self, cfg: Any, nets: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]: ...

    def train_step(
        self, cfg: Any, nets: dict, opts: dict, batch: dict[str, torch.Tensor], step: int, precision: Precision | None = None
    ) -> dict[str, float]: ...

    def before_checkpoint(self, cfg: Any, nets: dict[str, nn.Module], recent: Sequence[dict] = ()) -> None:
        """Rank 0, before validation, sample grids and saving: bring inference-only state up to date. `recent`: the
        latest training batches (up to recent_batches of them), e.g. to re-measure BatchNorm statistics."""

    def evaluate(self, cfg: Any, nets: dict, batches: Iterable[dict]) -> dict[str, float]: ...

    def fixed_inputs(self, cfg: Any, image_size: int, num_labels: int, example_batch: dict) -> dict: ...

    def sample_images(self, cfg: Any, nets: dict, fixed: dict) -> Image.Image: ...

    def inference(self, cfg: Any, nets: dict, state: dict) -> Loaded: ...


def meta_from_state(state: dict) -> dict:
    """A checkpoint's state.json (+ "checkpoint" uri added by `load`) -> Loaded.meta."""
    keys = ("family", "config", "label_names", "image_size", "step", "checkpoint", "metrics", "net_info")
    return {k: state.get(k) for k in keys}


def check_size(family: str, image_size: int, supported: tuple[int, ...] | None) -> None:
    """The one image-size rule of fixed-size families; their build() calls it, so training and loading check alike."""
    if supported is not None and image_size not in supported:
        sizes = ", ".join(str(s) for s in supported)
        raise UserError(f"{family}: image_size {image_size} is not supported; use one of {sizes} (data.image_size)")


def device_of(nets: dict[str, nn.Module]) -> torch.device:
    """Where the nets' parameters live (the first parameter found); CPU for nets without parameters."""
    for net in nets.values():
        for p in net.parameters():
            return p.device
    return torch.device("cpu")


# Pixels per forward pass on a CPU. The activations of a narrow conv net (the style nets, the critic) for many
# large images overflow a CPU's caches, so one big stack runs slower per image than a few small ones (1 thread,
# this machine: style net 16x3 at 256x256 12.4 img/s at 1-2 images per pass, 9.5 at 8; default critic at 128x128
# 87-90 img/s at 4-8, 61 at 32-64). GPUs take the whole batch.
CPU_FORWARD_PIXELS = 2 * 256 * 256


def images_per_pass(device: torch.device, height: int, width: int, wanted: int) -> int:
    """How many (H, W) images go into one forward pass: all `wanted` on a GPU, a cache-sized share on a CPU.
    It depends on the image size and device only, never on a job's batch size."""
    if torch.device(device).type != "cpu":
        return wanted
    return max(1, min(wanted, CPU_FORWARD_PIXELS // max(1, height * width)))


def in_passes(forward, x: torch.Tensor, device: torch.device):
    """`forward` over (N, C, H, W) in `images_per_pass` chunks, concatenated (each tensor of a tuple output on its
    own): same result, faster on a CPU."""
    step = images_per_pass(device, x.shape[-2], x.shape[-1], len(x))
    if step >= len(x):
        return forward(x)
    outs = [forward(x[i:i + step]) for i in range(0, len(x), step)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


class InferenceSetup:
    """Where and how a loaded model runs its forward passes: written once for the batch actors
    (`genart.infer.stages.ModelActor`), the Serve replicas (`genart.serve.deployments`) and the critic feature
    extractor (`genart.evaluate.features.CriticExtractor`).

    On a GPU: cuDNN flags set for the whole process (autotuned kernels, or deterministic ones with
    `deterministic`), channels-last weights and inputs, and bf16 (fp16 where bf16 is missing) autocast unless
    `autocast=False`. On a CPU: fp32 unless `autocast=True` (bf16), no channels-last (measured: no gain, see
    bench/bench_stylize.py), and with `deterministic` torch's native convolutions instead of oneDNN's, whose
    algorithm depends on the batch size (seen: ~1e-7 apart, now and then one 8-bit level in a written pixel).
    """

    def __init__(self, use_gpu: bool = False, deterministic: bool = False, autocast: bool | None = None):
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.deterministic = deterministic
        on_gpu = self.device.type == "cuda"
        if on_gpu:  # process-wide: one model per actor / replica process
            torch.backends.cudnn.benchmark = not deterministic  # autotuned kernels: fastest, not bit-stable
            torch.backends.cudnn.deterministic = deterministic
        self.autocast_dtype = None
        if on_gpu if autocast is None else autocast:
            bf16 = not on_gpu or torch.cuda.is_bf16_supported()
            self.autocast_dtype = torch.bfloat16 if bf16 else torch.float16
        self.channels_last = on_gpu

    def place(self, model: Loaded) -> Loaded:
        """The model on this device, its weights in this memory format."""
        model.to(self.device)
        if self.channels_last:
            for net in model.nets.values():
                net.to(memory_format=torch.channels_last)
        return model

    def inference(self) -> contextlib.ExitStack:
        """The context every forward pass runs in: inference_mode, autocast, the deterministic CPU kernels.
        Autocast is per thread: enter it in the thread that runs the model."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
        if self.deterministic and self.device.type == "cpu":
            import warnings

            warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")  # flags() says it each time
            stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
        return stack

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) CPU tensor -> on this device, in the weights' memory format."""
        x = x.to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def describe(self) -> dict:
        """What a bench or a log line reports about it."""
        dtype = str(self.autocast_dtype).removeprefix("torch.") if self.autocast_dtype is not None else "float32"
        return {"device": self.device.type, "precision": dtype, "channels_last": self.channels_last,
                "cudnn_benchmark": self.device.type == "cuda" and not self.deterministic}
