"""Training-step helpers every family's train_step uses: seeding, DDP unwrapping, EMA, BatchNorm recalibration, mixed precision.

    from genart.models.training import Precision, update_ema
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from genart.errors import UserError


def group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the most groups up to `max_groups` that divide `channels` (any width a config allows; widths
    that 8 divides, and those under 8, keep the grouping they always had, so saved checkpoints load the same)."""
    groups = next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


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
        with torch.no_grad():  # statistics only: no autograd graph for nets whose weights still require grad
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


def amp_dtype(amp: bool | str, device: str | torch.device) -> torch.dtype | None:
    """What `train.amp` means on `device`: None (fp32) on a CPU or with amp false; on a GPU with amp true or "auto",
    bfloat16 where the GPU has it (no loss scaling needed), else float16."""
    if amp not in (True, "auto") or torch.device(device).type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Precision:
    """fp32 by default; with `amp` (true or "auto") on a GPU, bf16 autocast, or fp16 autocast + one GradScaler per
    optimizer where bf16 is missing (`amp_dtype`).

    The training loop builds one and passes it to `train_step(..., precision=...)`; on a CPU amp is always off,
    so CPU training is the same computation whatever `train.amp` says.
    """

    def __init__(self, amp: bool | str = False, device: str | torch.device = "cpu"):
        self.dtype = amp_dtype(amp, device)
        self.enabled = self.dtype is not None
        self.scaled = self.dtype == torch.float16  # bf16 has fp32's exponent range: no loss scaling
        self.scalers: dict[str, torch.amp.GradScaler] = {}

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=self.dtype) if self.enabled else contextlib.nullcontext()

    def step(self, name: str, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """backward + optimizer step (scaled under amp); `name` picks the scaler (one per optimizer)."""
        if not self.scaled:
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
            if self.scaled:  # a run resumed on a GPU without bf16 keeps its loss scale
                self.scalers.setdefault(name, torch.amp.GradScaler("cuda")).load_state_dict(s)


def finite(metrics: dict[str, float], where: str) -> dict[str, float]:
    """Pass metrics through, raising if training diverged (a NaN loss should stop the run, not be logged)."""
    for key, value in metrics.items():
        if not np.isfinite(value):
            raise FloatingPointError(f"{where}: {key} is {value}; lower the learning rate or enable spectral_norm")
    return metrics


def check_conditional(needed: bool, num_labels: int, setting: str = "model.conditional=true",
                      instead: str = "model.conditional=false") -> None:
    """A setting that needs labels (a class-conditional model, a per-genre prior) needs at least 2 classes in the
    data: else one clear line naming the setting and what to use `instead`."""
    if needed and num_labels < 2:
        raise UserError(f"{setting} needs a labelled dataset with at least 2 classes (one folder per class); "
                        f"for unlabelled images use --set {instead}")


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
