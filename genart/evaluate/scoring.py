"""Real-vs-generated comparison on features, and `score_checkpoint`: the small in-process evaluation training runs.

    metrics = score_checkpoint("runs/dcgan/step-000500", "data/prepared", cfg.eval)
    # {"fid1k_critic": ..., "kid1k_critic": ..., "kid1k_critic_std": ..., "pr1k_k3_critic_precision": ..., ...}
Metric names (genart.evaluate.registry) carry the sample count and the feature network: never plain "fid".
"""

from __future__ import annotations

import numpy as np

from genart.errors import UserError
from genart import models
from genart.models import generative_families
from genart.evaluate import metrics as M
from genart.evaluate import registry
from genart.evaluate.features import Extractor, build_extractor, parse_features
from genart.evaluate.labels import LabelPolicy, label_policy
from genart.evaluate.reference import Reference, get_local

GENERATIVE_FAMILIES = generative_families()
DEFAULT_SPLIT = "all"  # compare with the whole dataset, as StyleGAN's FID-vs-dataset does
GENERATE_BATCH = 32

_extractors: dict[str, Extractor] = {}  # one per feature spec per process: reused across checkpoints


def compare(ref: Reference, fake: np.ndarray, name: str, k: int = M.PR_K, kid_subsets: int = M.KID_SUBSETS) -> tuple[dict[str, float], dict]:
    """Reference statistics vs generated features (N, D) -> ({metric name: value}, details for the report).

    FID uses the full reference moments; KID the reference subset; precision/recall equally many real rows as
    generated ones. Names follow the registry's protocol for N = len(fake) on features `name` (precision/recall:
    the rows per side).
    """
    fake = np.asarray(fake, np.float64)
    if len(fake) < 2:
        raise UserError("evaluation needs at least 2 generated images; raise --num")
    if fake.shape[1] != len(ref.mean):
        raise ValueError(f"feature sizes differ: generated {fake.shape[1]}, reference {len(ref.mean)}")
    return registry.compute(ref, fake, registry.Protocol(name, len(fake), k, kid_subsets, num_real=len(ref.subset)))


def extractor_for(spec: str | None, inception_weights: str | None = None) -> Extractor:
    parsed = parse_features(spec, inception_weights)
    if parsed.text not in _extractors:
        _extractors[parsed.text] = build_extractor(parsed, metrics=True)
    return _extractors[parsed.text]


def generated_features(model, extractor: Extractor, seeds: list[int], batch: int = GENERATE_BATCH,
                       policy: LabelPolicy | None = None) -> np.ndarray:
    """Sample `seeds` from a generative model, each of the class `policy` draws for it (None: the model's default),
    and featurise them in this process: (N, D). The extractor quantises the float samples to uint8 first, as serving
    does (`preprocess.to_pixels`)."""
    policy = policy or LabelPolicy("none")
    out = [extractor(model.sample(chunk, labels=policy.labels(chunk)))
           for chunk in (seeds[i : i + batch] for i in range(0, len(seeds), batch))]
    return np.concatenate(out) if out else np.zeros((0, extractor.dim), np.float32)


def score_checkpoint(checkpoint_dir: str, data_uri: str, cfg) -> dict[str, float]:
    """Score one checkpoint against the dataset, in this process (e.g. rank 0 of a training run).

    `cfg` needs `num_generated` (generated images) and `features` ("inception", "inception:WEIGHTS" or "critic:CKPT";
    None = inception). The real side is the whole DEFAULT_SPLIT at the generator's resolution, never shrunk to N:
    its statistics are computed once and cached beside the dataset, so later checkpoints only generate. A
    class-conditional generator draws its classes in that split's label shares (`labels.label_policy`).
    Returns e.g. {"fid1k_critic": ..., ...} for num_generated=1000.
    """
    num = int(cfg.num_generated)
    if num < 2:
        raise UserError(f"eval.num_generated {num}: must be at least 2")
    extractor = extractor_for(getattr(cfg, "features", None))
    model = models.load(checkpoint_dir, family=models.GENERATIVE, command="evaluate").to(extractor_device(extractor))
    ref = get_local(data_uri, DEFAULT_SPLIT, extractor, resolution=model.image_size)
    fake = generated_features(model, extractor, list(range(num)), policy=label_policy(model, data_uri, DEFAULT_SPLIT))
    values, _ = compare(ref, fake, extractor.name)
    return {k: float(v) for k, v in values.items()}


def extractor_device(extractor: Extractor):
    return getattr(extractor, "device", None)
