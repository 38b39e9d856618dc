"""`genart evaluate`: FID, KID and precision/recall of a generative checkpoint against a prepared dataset, as Ray Data jobs.

    genart evaluate --model results/runs/dcgan --data data/prepared --num 5000 --features critic:results/runs/critic
Real images (on a cache miss) and generated ones (sampled inside the actors from seed indices) are featurised by
actor pools via `map_batches`, so both sides scale with the cluster; the driver only folds feature rows together.
Both sides take the one path of `preprocess` (uint8 at the generator's resolution, center crop, Lanczos).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa

from genart import models, storage
from genart.data.read import parquet_dataset
from genart.errors import UserError
from genart.evaluate import reference as R
from genart.evaluate import registry
from genart.evaluate.features import TF_FID_NOTE, FeatureSpec, build_extractor, parse_features
from genart.evaluate.labels import LabelPolicy, label_policy
from genart.evaluate.metrics import PR_K
from genart.evaluate.preprocess import DESCRIPTION, PREPROCESS_VERSION
from genart.evaluate.scoring import DEFAULT_SPLIT, compare
from genart.infer.output import Progress
from genart.infer.pipeline import job_batches

REAL_BATCH = 32  # images per actor call: 32 x (3, 299, 299) float32 = 34 MB at Inception size
GENERATE_BATCH = 32


class RealFeatures:
    """Ray Data callable class: shard rows {id, image PNG, split} -> {id, features (B, D)} for the kept rows, each
    image cropped and resized to `resolution` (the generator's) first.

    Decoding happens here, next to the network: prepared images are small PNGs, and a (B, 3, 299, 299) float batch
    would be far larger to ship between operators than the bytes it came from.
    """

    def __init__(self, spec: FeatureSpec, split_value: str | None, ids: set[str] | None, resolution: int):
        self.extractor = build_extractor(spec, metrics=True)
        self.split_value, self.ids, self.resolution = split_value, ids, resolution

    def __call__(self, batch: pa.Table) -> dict:
        batch = R.select_rows(batch, self.split_value, self.ids)
        if not batch.num_rows:
            return {"id": np.zeros(0, dtype="<U32"), "features": np.zeros((0, self.extractor.dim), np.float32)}
        return {"id": np.array(batch.column("id").to_pylist()), "features": self.extractor(R.decode_rows(batch, self.resolution))}


class GeneratedFeatures:
    """Ray Data callable class: seed indices {id} -> {id, features}: each actor loads the generator and extractor once;
    each seed's class (conditional models) is the one `policy` draws for it."""

    def __init__(self, model_uri: str, spec: FeatureSpec, policy: LabelPolicy):
        self.extractor = build_extractor(spec, metrics=True)
        self.model = models.load(model_uri, family=models.GENERATIVE, command="evaluate").to(getattr(self.extractor, "device", None))
        self.policy = policy

    def __call__(self, batch: dict) -> dict:
        seeds = [int(s) for s in batch["id"]]
        return {"id": batch["id"], "features": self.extractor(self.model.sample(seeds, labels=self.policy.labels(seeds)))}


def _actor_args(max_actors: int | None) -> dict:
    """An autoscaling actor pool: one GPU per actor on GPU clusters, else one CPU (at most half the cluster's)."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    size = max_actors or (gpus if gpus else max(1, min(8, cpus // 2)))
    args = {"compute": ray.data.ActorPoolStrategy(min_size=1, max_size=size)}
    args.update({"num_gpus": 1} if gpus else {"num_cpus": 1})
    return args


def _spec_for_actors(spec: FeatureSpec) -> FeatureSpec:
    return FeatureSpec(spec.kind, None if spec.uri is None else storage.absolute(spec.uri))


def _drain(ds, progress: Progress):
    """The job's output batches, each counted on the live line (a failed row fails the job: 0 errors until then);
    JobStalled when none comes for the default stall timeout (pipeline.stall_limit: on a cluster only)."""
    then = "run it again (the real images' statistics are cached once computed)"
    try:
        with job_batches(ds, "numpy", None, progress.command, then) as batches:
            for batch in batches:
                progress.advance(len(batch["id"]))
                yield batch
    finally:
        progress.close()


def real_reference(data: str, split: str, spec: FeatureSpec, extractor, max_real: int | None, max_actors: int | None,
                   resolution: int, progress: bool = True) -> R.Reference:
    """Cached reference statistics, or a Ray Data job over the dataset's shards on a miss."""
    key = R.cache_key(data, extractor.stats_key, split, max_real, resolution)
    ref = R.load_cached(data, extractor.name, key)
    if ref is not None:
        return ref
    split_value = R.check_split(data, split)
    ids = R.chosen_ids(data, split_value, max_real)
    ds = parquet_dataset(data, ["id", "image", "split"])
    ds = ds.map_batches(RealFeatures, fn_constructor_args=(_spec_for_actors(spec), split_value, ids, resolution),
                        batch_size=REAL_BATCH, batch_format="pyarrow", **_actor_args(max_actors))
    acc = R.Accumulator()
    total = len(ids) if ids is not None else R.split_size(data, split)
    for batch in _drain(ds, Progress("evaluate (real)", total, progress)):
        acc.update(batch["id"], batch["features"])
    ref = acc.result(key)
    ref.path = R.save(data, extractor.name, ref)
    return ref


def generated(model: str, num: int, spec: FeatureSpec, max_actors: int | None, progress: bool = True,
              policy: LabelPolicy = LabelPolicy("none")) -> np.ndarray:
    """Features of images for seeds 0..num-1 (classes drawn by `policy`), generated and featurised by an actor pool:
    (num, D), in seed order."""
    import ray

    blocks = max(1, min(200, num // GENERATE_BATCH))
    ds = ray.data.range(num, override_num_blocks=blocks)
    ds = ds.map_batches(GeneratedFeatures, fn_constructor_args=(storage.absolute(model), _spec_for_actors(spec), policy),
                        batch_size=GENERATE_BATCH, batch_format="numpy", **_actor_args(max_actors))
    seeds, feats = [], []
    for batch in _drain(ds, Progress("evaluate (generated)", num, progress)):
        seeds.append(np.asarray(batch["id"]))
        feats.append(np.asarray(batch["features"], np.float32))
    order = np.argsort(np.concatenate(seeds))  # blocks arrive in any order; KID's subsets need a fixed one
    return np.concatenate(feats)[order]


def run(model: str, data: str, num: int = 1000, features: str | None = None, split: str = DEFAULT_SPLIT,
        inception_weights: str | None = None, k: int = PR_K, max_real: int | None = None,
        max_actors: int | None = None, output: str | None = None, progress: bool = True) -> dict:
    """The whole evaluation: returns the report (and writes it as JSON to `output`). `progress`: a live line per
    Ray Data job on a terminal (real images on a cache miss, then generated ones)."""
    started = time.time()
    if num < 2:
        raise UserError(f"--num {num}: must be at least 2")
    if k < 1:
        raise UserError(f"--k {k}: must be at least 1")
    if max_actors is not None and max_actors < 1:
        raise UserError(f"--concurrency {max_actors}: must be at least 1")
    if max_real is not None and max_real < 2:
        raise UserError(f"--max-real {max_real}: must be at least 2")
    spec = parse_features(features, inception_weights)
    R.check_split(data, split)
    generator = models.load(model, family=models.GENERATIVE, command="evaluate").to("cpu")  # fail fast on a wrong checkpoint, and read its metadata
    extractor = build_extractor(spec, device="cpu", metrics=True)  # ditto for missing weights; gives identity and dim
    if output:
        storage.check_writable(os.path.dirname(os.path.abspath(output)) if not storage.is_s3(output) else output.rsplit("/", 1)[0])

    policy = label_policy(generator, data, split)
    ref = real_reference(data, split, spec, extractor, max_real, max_actors, generator.image_size, progress)
    fake = generated(model, num, spec, max_actors, progress, policy)
    seconds = time.time() - started
    featurised = len(fake) + (0 if ref.hit else ref.count)
    values, details = compare(ref, fake, extractor.name, k=k)
    protocol = registry.Protocol(extractor.name, len(fake), k, num_real=len(ref.subset))
    outputs, uses = registry.specs(protocol), registry.uses(protocol)
    report = {
        "metrics": values,
        "labels": {key: f"{outputs[key].label} ({extractor.label}; {uses[key]})" for key in values},
        "model": {"uri": model, "family": generator.family, "step": generator.meta.get("step"),
                  "checkpoint_hash": generator.checkpoint_hash},
        "data": {"uri": data, "split": split, "dataset_hash": R.dataset_hash(data), "num_real": ref.count,
                 "num_real_subset": len(ref.subset)},
        "num_generated": len(fake),
        "seeds": f"0..{len(fake) - 1}",
        "label_policy": policy.describe(),  # which class each seed was drawn as (conditional models)
        "features": {**extractor.describe(), "spec": spec.text},
        "preprocess": {"version": PREPROCESS_VERSION, "resolution": generator.image_size, "steps": DESCRIPTION},
        **details,
        "cache": {"hit": ref.hit, "path": ref.path, "key": ref.key},
        "note": TF_FID_NOTE if extractor.name == "inception" else "critic features: comparable only between runs scored by the same critic checkpoint",
        "seconds": round(seconds, 2),
        "throughput": {"real_featurised": 0 if ref.hit else ref.count, "generated": len(fake),
                       "images_per_second": round(featurised / max(seconds, 1e-9), 2)},
    }
    if output:
        storage.write_text(output, json.dumps(report, indent=2) + "\n")
    return report


def summary(report: dict) -> str:
    """A few lines for humans: the values, N, features, resize filter, cache, time."""
    m, f, labels = report["metrics"], report["features"], report["labels"]
    kid, pr = report["kid"], report["precision_recall"]
    lines = []
    for name, value in m.items():
        if name.endswith("_std"):
            continue  # shown beside its mean
        line = f"{name} = {labels[name]}: {value:.5g}"
        if f"{name}_std" in m:
            line += f" +- {m[f'{name}_std']:.5g} ({kid['subsets']} subsets of {kid['subset_size']})"
        elif name.endswith(("_precision", "_recall")):
            line += f" (k={pr['k']}, {pr['num_real']} per side)"
        lines.append(line)
    cache, pre = report["cache"], report["preprocess"]
    lines += [
        f"N: {report['num_generated']} generated vs {report['data']['num_real']} real ({report['data']['split']} split)",
        f"features: {f['label']} (dim {f['dim']}); images at {pre['resolution']} px, then {f['resize']}",
        f"reference cache: {'hit' if cache['hit'] else 'miss'}{' (' + cache['path'] + ')' if cache['path'] else ''}",
        f"time: {report['seconds']:.1f}s",
    ]
    if "throughput" in report:  # reports written before it had one
        t = report["throughput"]
        lines[-1] += (f" ({t['real_featurised']} real + {t['generated']} generated images featurised, "
                      f"{t['images_per_second']:.1f} images/s)")
    policy = report.get("label_policy") or {}  # reports written before it had one
    if policy.get("rule") == "dataset":
        shares = ", ".join(f"{name} {share:.0%}" for name, share in policy["shares"].items())
        lines.append(f"classes: drawn per seed in the real split's shares ({shares})")
    elif policy.get("rule") == "seed":
        lines.append(f"classes: {policy['note']}")
    if report.get("fid_note"):
        lines.append(f"note: {report['fid_note']}")
    return "\n".join(lines)
