"""Real-vs-generated comparison on features, and `score_checkpoint`: the small in-process evaluation training runs.

    metrics = score_checkpoint("runs/dcgan/step-000500", "data/prepared", cfg.eval)
    # {"fid_critic": ..., "kid_critic": ..., "kid_std_critic": ..., "precision_critic": ..., "recall_critic": ...}
Metric keys end in the feature network's name: a score on critic features is never called plain FID.
"""

from __future__ import annotations

import numpy as np

from genart.errors import UserError
from genart.evaluate import metrics as M
from genart.evaluate.features import Extractor, build_extractor, parse_features
from genart.evaluate.reference import Reference, get_local

GENERATIVE_FAMILIES = ("dcgan", "vae")
DEFAULT_SPLIT = "all"  # compare with the whole dataset, as StyleGAN's FID-vs-dataset does
GENERATE_BATCH = 32

_extractors: dict[str, Extractor] = {}  # one per feature spec per process: reused across checkpoints


def metric_keys(name: str) -> list[str]:
    return [f"{m}_{name}" for m in ("fid", "kid", "kid_std", "precision", "recall")]


def compare(ref: Reference, fake: np.ndarray, name: str, k: int = M.PR_K, kid_subsets: int = M.KID_SUBSETS) -> tuple[dict[str, float], dict]:
    """Reference statistics vs generated features (N, D) -> (metrics keyed by `name`, details for the report).

    FID uses the full reference moments; KID the reference subset; precision/recall equally many real rows as
    generated ones (the k-NN radii depend on sample density, so the two sets must be the same size).
    """
    fake = np.asarray(fake, np.float64)
    if len(fake) < 2:
        raise UserError("evaluation needs at least 2 generated images; raise --num")
    if fake.shape[1] != len(ref.mean):
        raise ValueError(f"feature sizes differ: generated {fake.shape[1]}, reference {len(ref.mean)}")
    fid = M.frechet_distance(ref.mean, ref.cov, fake.mean(0), np.cov(fake, rowvar=False))
    kid_mean, kid_std = M.kid(ref.subset, fake, num_subsets=kid_subsets)
    pr_n = min(len(ref.subset), len(fake))
    out = {f"fid_{name}": fid, f"kid_{name}": kid_mean, f"kid_std_{name}": kid_std}
    details = {
        "kid": {"subsets": kid_subsets, "subset_size": min(M.KID_SUBSET_SIZE, len(ref.subset), len(fake)),
                "kernel": "(x.y/dim + 1)^3", "estimator": "unbiased MMD^2"},
        "precision_recall": {"k": k, "num_real": pr_n, "num_generated": pr_n},
    }
    dim = fake.shape[1]
    if min(ref.count, len(fake)) <= dim:
        details["fid_note"] = (f"fewer images than feature dimensions ({min(ref.count, len(fake))} <= {dim}): the covariances are "
                               "rank-deficient, so FID is biased upward and noisy; compare only scores made with the same N")
    if pr_n > k:
        precision, recall = M.precision_recall(ref.subset[:pr_n], fake[:pr_n], k=k)
        out.update({f"precision_{name}": precision, f"recall_{name}": recall})
    else:
        details["precision_recall"]["skipped"] = f"needs more than k={k} images on each side"
    return out, details


def extractor_for(spec: str | None, inception_weights: str | None = None) -> Extractor:
    parsed = parse_features(spec, inception_weights)
    if parsed.text not in _extractors:
        _extractors[parsed.text] = build_extractor(parsed)
    return _extractors[parsed.text]


def load_generator(uri: str, device=None):
    """A dcgan / vae checkpoint for sampling; other families are a UserError."""
    from genart import models

    model = models.load(uri)
    if model.family not in GENERATIVE_FAMILIES:
        raise UserError(f"{uri} is a {model.family} checkpoint; evaluate needs a generative model ({', '.join(GENERATIVE_FAMILIES)})")
    return model.to(device) if device is not None else model


def generated_features(model, extractor: Extractor, seeds: list[int], batch: int = GENERATE_BATCH) -> np.ndarray:
    """Sample `seeds` from a generative model and featurise them in this process: (N, D)."""
    out = [extractor(model.sample(seeds[i : i + batch])) for i in range(0, len(seeds), batch)]
    return np.concatenate(out) if out else np.zeros((0, extractor.dim), np.float32)


def score_checkpoint(checkpoint_dir: str, data_uri: str, cfg) -> dict[str, float]:
    """Score one checkpoint against the dataset, in this process (e.g. rank 0 of a training run), small N.

    `cfg` needs `num_samples` (generated images, also the number of real ones) and `features` ("inception",
    "inception:WEIGHTS" or "critic:CKPT"; None = inception). Reference statistics are cached beside the dataset,
    so after the first checkpoint only the generated side is computed. Returns e.g. {"fid_critic": ..., ...}.
    """
    num = int(cfg.num_samples)
    if num < 2:
        raise UserError(f"eval.num_samples {num}: must be at least 2")
    extractor = extractor_for(getattr(cfg, "features", None))
    model = load_generator(checkpoint_dir, extractor_device(extractor))
    ref = get_local(data_uri, DEFAULT_SPLIT, extractor, limit=num)
    fake = generated_features(model, extractor, list(range(num)))
    values, _ = compare(ref, fake, extractor.name)
    return {k: float(v) for k, v in values.items()}


def extractor_device(extractor: Extractor):
    return getattr(extractor, "device", None)
