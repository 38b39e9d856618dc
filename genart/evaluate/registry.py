"""The evaluation metrics by name: a plain dict filled here, as stylegan2-ada's metric_main.py keeps its metrics.

Names carry the protocol and the sample count, after metric_main's `fid50k_full`:
    fid1k_critic                                        FID of 1,000 generated images, on critic features
    kid1k_critic, kid1k_critic_std                      KID: mean over subsets, and the spread of one subset's value
    pr1k_k3_critic_precision, pr1k_k3_critic_recall     improved precision / recall with k=3 neighbours, 1,000 per side
The count reads in thousands when it is a multiple of 1000 ("1k", "50k"), else exactly ("256", "1500"). FID and KID
count generated images; precision/recall the rows per side, min(generated, real subset): 1,000 generated against 300
real rows is pr300. The real side is the whole chosen split (unless --max-real); the report says which and how many.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable, Literal

import numpy as np

from genart.evaluate import metrics as M
from genart.evaluate.reference import Reference


@dataclass(frozen=True)
class Protocol:
    """What a score depends on besides the weights and the data: only scores of equal protocols compare."""

    features: str  # extractor name: "inception" | "critic"
    num: int  # generated images
    k: int = M.PR_K  # precision/recall neighbourhood size
    kid_subsets: int = M.KID_SUBSETS
    num_real: int | None = None  # rows of the real subset (KID, precision/recall); None = at least `num`


@dataclass(frozen=True)
class Output:
    label: str  # what reports call it
    better: Literal["min", "max"] | None  # None: not a quality score (e.g. a spread); never picks a checkpoint


@dataclass(frozen=True)
class Metric:
    outputs: dict[str, Output]  # name suffix ("" for the main value) -> Output
    compute: Callable[[Reference, np.ndarray, Protocol], tuple[dict[str, float], dict]]  # -> ({suffix: value}, details)
    tag: Callable[[Protocol], str] = field(default=lambda p: "")  # protocol parameters after the count, e.g. "_k3"
    available: Callable[[Protocol], bool] = field(default=lambda p: True)
    count: Callable[[Protocol], int] = field(default=lambda p: p.num)  # the sample count its name carries
    uses: Callable[[Protocol], str] = field(default=lambda p: f"{p.num} generated")  # that count, for reports


def _fid(ref: Reference, fake: np.ndarray, p: Protocol) -> tuple[dict, dict]:
    value = M.frechet_distance(ref.mean, ref.cov, fake.mean(0), np.cov(fake, rowvar=False))
    n, dim = min(ref.count, len(fake)), fake.shape[1]
    details = {}
    if n <= dim:
        details["fid_note"] = (f"fewer images than feature dimensions ({n} <= {dim}): the covariances are rank-deficient, "
                               "so FID is biased upward and noisy; compare only scores made with the same N")
    return {"": value}, details


def _kid(ref: Reference, fake: np.ndarray, p: Protocol) -> tuple[dict, dict]:
    mean, std = M.kid(ref.subset, fake, num_subsets=p.kid_subsets)
    size = M.kid_subset_size(len(ref.subset), len(fake))
    return {"": mean, "_std": std}, {"kid": {
        "subsets": p.kid_subsets, "subset_size": size, "max_fraction": M.KID_MAX_FRACTION,
        "kernel": "(x.y/dim + 1)^3", "estimator": "unbiased MMD^2", "num_real_pool": len(ref.subset)}}


def _pr_rows(p: Protocol) -> int:
    # The k-NN radii depend on sample density, so both sides get equally many rows.
    return p.num if p.num_real is None else min(p.num, p.num_real)


def _pr(ref: Reference, fake: np.ndarray, p: Protocol) -> tuple[dict, dict]:
    n = _pr_rows(replace(p, num=len(fake), num_real=len(ref.subset)))
    details = {"k": p.k, "num_real": n, "num_generated": n}
    if n <= p.k:
        return {}, {"precision_recall": {**details, "skipped": f"needs more than k={p.k} images on each side"}}
    precision, recall = M.precision_recall(ref.subset[:n], fake[:n], k=p.k)
    return {"_precision": precision, "_recall": recall}, {"precision_recall": details}


METRICS: dict[str, Metric] = {
    "fid": Metric({"": Output("FID", "min")}, _fid),
    "kid": Metric({"": Output("KID", "min"), "_std": Output("KID std over subsets", None)}, _kid),
    "pr": Metric({"_precision": Output("precision", "max"), "_recall": Output("recall", "max")}, _pr,
                 tag=lambda p: f"_k{p.k}", available=lambda p: _pr_rows(p) > p.k, count=_pr_rows,
                 uses=lambda p: f"{_pr_rows(p)} generated vs {_pr_rows(p)} real"),
}


def count_tag(num: int) -> str:
    """A sample count as it appears in names: 1000 -> "1k", 50000 -> "50k", 256 -> "256", 1500 -> "1500"."""
    return f"{num // 1000}k" if num % 1000 == 0 else str(num)


def key(base: str, p: Protocol, suffix: str = "") -> str:
    return f"{base}{count_tag(METRICS[base].count(p))}{METRICS[base].tag(p)}_{p.features}{suffix}"


def specs(p: Protocol) -> dict[str, Output]:
    """Every key `compute` reports under protocol `p` -> its Output (label, which way is better)."""
    return {key(base, p, suffix): out for base, metric in METRICS.items() if metric.available(p)
            for suffix, out in metric.outputs.items()}


def better(name: str) -> Literal["min", "max"] | None:
    """Which way the metric `name` (e.g. fid1k_critic, pr300_k3_critic_recall) is better, read from its base and
    suffix; None for a spread (kid1k_critic_std) or a name that is no metric here."""
    base = re.match(r"[a-z]+", name)
    metric = METRICS.get(base.group()) if base else None
    if metric is None:
        return None
    suffix = max((s for s in metric.outputs if name.endswith(s)), key=len, default=None)  # "_std" before ""
    return None if suffix is None else metric.outputs[suffix].better


def uses(p: Protocol) -> dict[str, str]:
    """Every key `compute` reports under `p` -> the samples it compares, e.g. "300 generated vs 300 real"."""
    return {key(base, p, suffix): metric.uses(p) for base, metric in METRICS.items() if metric.available(p)
            for suffix in metric.outputs}


def metric_keys(features: str, num: int, k: int = M.PR_K, num_real: int | None = None) -> list[str]:
    """The metric names an evaluation of `num` generated images on `features` reports, e.g. fid1k_critic; against
    fewer than `num` real subset rows (`num_real`), precision/recall are named by that smaller count."""
    return list(specs(Protocol(features, int(num), k, num_real=None if num_real is None else int(num_real))))


def compute(ref: Reference, fake: np.ndarray, p: Protocol) -> tuple[dict[str, float], dict]:
    """Every registered metric: ({name: value}, details for the report), named by the rows `ref` and `fake` hold."""
    p = replace(p, num=len(fake), num_real=len(ref.subset))
    values, details = {}, {}
    for base, metric in METRICS.items():
        got, more = metric.compute(ref, fake, p)
        values.update({key(base, p, suffix): float(v) for suffix, v in got.items()})
        details.update(more)
    return values, details
