"""The model work behind each endpoint, as plain functions over loaded models (no Serve, no HTTP).

The Serve deployments call these, batched or not, inside their `models.family.InferenceSetup` context (device,
precision, inference_mode); bench/bench_serve.py calls them directly, in the same context, as the bare baseline.
Images cross this boundary as uint8 arrays: (H, W, 3) in, (N, H, W, 3) out.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from genart.data.images import model_input


@dataclass(frozen=True)
class GenerateJob:
    """One /v1/generate request: images for `seeds` (labels one per seed, or None for the model's default)."""

    seeds: tuple[int, ...]
    labels: tuple[int, ...] | None = None
    truncation: float = 1.0
    guidance: float | None = None  # token models only (checked by the ingress); None = the model's own

    @property
    def size(self) -> int:
        return len(self.seeds)


def to_uint8(images01: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] -> (N, H, W, 3) uint8."""
    arr = images01.detach().float().cpu().clamp(0, 1).mul(255).add(0.5).to(torch.uint8)
    return arr.permute(0, 2, 3, 1).contiguous().numpy()


def to_batch01(images: list[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
    """Same-size (H, W, 3) uint8 arrays -> (N, 3, H, W) float32 in [0, 1]."""
    arr = np.stack(images).astype(np.float32) / 255.0  # (N, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(device)


def generate(model, jobs: list[GenerateJob]) -> list[np.ndarray]:
    """Many requests in as few forward passes as possible: one per distinct (truncation, guidance, labels given?) group."""
    out: list[np.ndarray | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[(job.truncation, job.guidance, job.labels is None)].append(i)
    for (truncation, guidance, no_labels), members in groups.items():
        seeds = [s for i in members for s in jobs[i].seeds]
        labels = None if no_labels else [v for i in members for v in jobs[i].labels]
        images = to_uint8(model.sample(seeds, labels=labels, truncation=truncation, guidance=guidance))  # (sum n, H, W, 3)
        start = 0
        for i in members:
            out[i] = images[start:start + jobs[i].size]
            start += jobs[i].size
    return out  # type: ignore[return-value]


def interpolate(model, seed_a: int, seed_b: int, steps: int, label: int | None = None) -> np.ndarray:
    """(steps, H, W, 3) uint8 frames walking from seed_a's image to seed_b's."""
    return to_uint8(model.interpolate(seed_a, seed_b, steps, label=label))


def reconstruct(model, image: np.ndarray) -> np.ndarray:
    """The VAE's reconstruction of one (H, W, 3) image, same size."""
    return to_uint8(model.reconstruct(to_batch01([image], model.device)))[0]


def complete(model, image: np.ndarray, seed: int, label: int | None, rows: int | None) -> np.ndarray:
    """An autoregressive model's completion of one (H, W, 3) image: its top rows kept, the rest sampled; (S, S, 3)."""
    labels = None if label is None else [label]
    return to_uint8(model.complete(to_batch01([image], model.device), seeds=[seed], labels=labels, rows=rows))[0]


def stylize(model, images: list[np.ndarray]) -> list[np.ndarray]:
    """Stylize images of any sizes; same-size images share a forward pass (results equal one-by-one calls)."""
    out: list[np.ndarray | None] = [None] * len(images)
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        by_shape[image.shape].append(i)
    for members in by_shape.values():
        result = to_uint8(model.stylize(to_batch01([images[i] for i in members], model.device)))
        for j, i in enumerate(members):
            out[i] = result[j]
    return out  # type: ignore[return-value]


def critic_input(image: np.ndarray, image_size: int) -> np.ndarray:
    """One upload as the critic's square input (`images.model_input`, as batch jobs do), so requests batch: (3, S, S)."""
    return model_input(image, image_size)


def classify(model, inputs: list[np.ndarray]) -> list[list[float]]:
    """Class probabilities for (3, S, S) float inputs from `critic_input`: one list of K floats per input."""
    batch = torch.from_numpy(np.stack(inputs)).to(model.device)  # (N, 3, S, S)
    return model.predict(batch).float().cpu().tolist()

