"""genart.evaluate: metric math against plain NumPy/SciPy references, KID unbiasedness and spread, precision/recall
edge cases, the metric registry and its names, the one preprocessing path, the reference-statistics cache,
`score_checkpoint`, the `genart evaluate` CLI (Ray Data), the workflow's metric selection, and the Inception path."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner

from genart.errors import UserError
from genart.evaluate import metrics as M
from genart.evaluate import registry

IMAGE_SIZE = 16


# ---------------------------------------------------------------- plain reference implementations (independent)


def reference_fid(x: np.ndarray, y: np.ndarray) -> float:
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(cov_x.dot(cov_y)).real
    return float(np.sum((mu_x - mu_y) ** 2) + np.trace(cov_x) + np.trace(cov_y) - 2 * np.trace(root))


def reference_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b/d + 1)^3, written as the textbook double sums."""
    d = x.shape[1]

    def k(a, b):
        return (np.dot(a, b) / d + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return float(xx + yy - 2 * xy)


def reference_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    def radii(a):
        return np.sort(dist(a, a), axis=1)[:, k]  # column 0 is the point itself

    precision = np.mean([(dist(f[None], real)[0] <= radii(real)).any() for f in fake])
    recall = np.mean([(dist(r[None], fake)[0] <= radii(fake)).any() for r in real])
    return float(precision), float(recall)


# ---------------------------------------------------------------- metric math


def test_self_scores_zero_and_shift_scores_more():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((600, 16))
    shifted = rng.standard_normal((600, 16)) + 0.5
    assert abs(M.fid(a, a)) < 1e-6
    kid_self, _ = M.kid(a, a, num_subsets=5, max_fraction=1.0)  # one subset = the whole set, on both sides
    kid_shift, _ = M.kid(a, shifted, num_subsets=5)
    # A set against itself is not an independent sample: the unbiased estimate is then -2(mean diag - mean
    # off-diag of K)/m, small and negative. It must be tiny next to a real shift.
    kxx = M._poly_kernel(a, a)
    assert kid_self == pytest.approx(-2 * (np.diag(kxx).mean() - kxx[~np.eye(len(a), dtype=bool)].mean()) / len(a), rel=1e-6)
    assert abs(kid_self) < 0.05 * kid_shift
    assert M.fid(a, shifted) > 3.0  # ~ 16 * 0.5^2 = 4
    assert kid_shift > 0.1


def test_metrics_match_plain_numpy_scipy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 8))
    y = rng.standard_normal((50, 8)) * 1.3 + 0.2
    assert M.fid(x, y) == pytest.approx(reference_fid(x, y), rel=1e-3)
    moments = M.Moments()
    for chunk in np.array_split(y, 4):
        moments.update(chunk)
    assert M.frechet_distance(x.mean(0), np.cov(x, rowvar=False), moments.mean, moments.cov) == pytest.approx(reference_fid(x, y), rel=1e-3)
    assert M.mmd2_unbiased(x, y) == pytest.approx(reference_mmd2(x, y), rel=1e-3)
    wide = rng.standard_normal((20, 256))  # fewer samples than features: sqrtm's round-off once gave -3.6e-05
    assert M.fid(wide, wide) >= 0.0
    broken = y.copy()
    broken[3, 2] = np.nan  # a diverged model's features: FID was 0.0 (max(0, nan): a perfect score) or LinAlgError
    assert np.isnan(M.fid(x, broken)) and np.isnan(M.fid(x, y * np.inf))
    assert np.isnan(M.frechet_distance(np.full(8, np.nan), np.eye(8), np.zeros(8), np.eye(8)))  # was 0.0
    # one subset holding every row of each set: KID is then exactly the unbiased MMD^2 of the two sets
    kid_mean, kid_std = M.kid(x[:50], y, num_subsets=1, subset_size=50, max_fraction=1.0)
    assert kid_mean == pytest.approx(reference_mmd2(x[:50], y), rel=1e-3) and kid_std == 0.0
    for k in (1, 3, 5):
        far = y + 0.5
        assert M.precision_recall(x, far, k=k) == pytest.approx(reference_precision_recall(x, far, k), rel=1e-3)


def test_kid_is_unbiased_against_analytic_mmd2():
    """In 1-D (gamma = 1) with x ~ N(a, s^2): E k(x, x') = m3^2 + 3 m2^2 + 3 m1^2 + 1 from the raw moments, so
    MMD^2 = (m3x - m3y)^2 + 3 (m2x - m2y)^2 + 3 (m1x - m1y)^2. Many independent trials must average to it."""
    rng = np.random.default_rng(2)

    def moments(mu, s):
        return mu, mu**2 + s**2, mu**3 + 3 * mu * s**2

    def analytic(px, py):
        (a1, a2, a3), (b1, b2, b3) = moments(*px), moments(*py)
        return (a3 - b3) ** 2 + 3 * (a2 - b2) ** 2 + 3 * (a1 - b1) ** 2

    trials, n = 300, 200
    tolerances = []
    for px, py in [((0.0, 1.0), (0.0, 1.0)), ((0.0, 1.0), (0.5, 1.0))]:
        values = np.array([
            M.kid(rng.normal(*px, size=(n, 1)), rng.normal(*py, size=(n, 1)), num_subsets=1, subset_size=n, max_fraction=1.0)[0]
            for _ in range(trials)
        ])
        truth = analytic(px, py)
        tolerance = 4 * values.std(ddof=1) / np.sqrt(trials)
        tolerances.append(tolerance)
        assert abs(values.mean() - truth) < tolerance, (px, py, values.mean(), truth, tolerance)
    # The test has power: the biased estimator (diagonals kept, V-statistic) misses by ~ 2 (28 - 4) / n = 0.24
    biased = np.mean([
        (lambda x, y: M._poly_kernel(x, x).mean() + M._poly_kernel(y, y).mean() - 2 * M._poly_kernel(x, y).mean())(
            rng.normal(size=(n, 1)), rng.normal(size=(n, 1)))
        for _ in range(trials)
    ])
    assert biased > 3 * tolerances[0]  # the same-distribution case, where the truth is 0


def test_kid_std_is_not_zero_for_small_n_and_mean_stays_unbiased():
    """With N <= 1000 every subset of min(1000, N) rows was the whole set: std 0 whatever the data. Subsets are now at
    most half the smaller set, so they differ; each one's MMD^2 is unbiased, so the mean over them is too."""
    assert M.kid_subset_size(500, 500) == 250 and M.kid_subset_size(10_000, 1000) == 500
    assert M.kid_subset_size(5000, 5000) == M.KID_SUBSET_SIZE and M.kid_subset_size(3, 2) == 2
    rng = np.random.default_rng(4)
    mean, std = M.kid(rng.standard_normal((500, 16)), rng.standard_normal((500, 16)))
    assert std > 0 and abs(mean) < 2 * std, (mean, std)
    # Same distribution, many independent draws: the means average to 0 within their own standard error...
    means = np.array([M.kid(rng.standard_normal((500, 16)), rng.standard_normal((500, 16)), num_subsets=10)[0]
                      for _ in range(30)])
    assert abs(means.mean()) < 4 * means.std(ddof=1) / np.sqrt(len(means)), means
    # ...and a real difference stands far above that noise.
    shifted, _ = M.kid(rng.standard_normal((500, 16)), rng.standard_normal((500, 16)) + 0.3, num_subsets=10)
    assert shifted > 10 * means.std(ddof=1), (shifted, means.std(ddof=1))


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((200, 12))
    assert M.precision_recall(a, a.copy(), k=3) == (1.0, 1.0)
    assert M.precision_recall(a, a + 1000.0, k=3) == (0.0, 0.0)
    with pytest.raises(ValueError):
        M.precision_recall(a[:3], a[:3], k=3)


# ---------------------------------------------------------------- the metric registry and its names


def test_metric_names_carry_sample_count_and_protocol():
    assert [registry.count_tag(n) for n in (1000, 50_000, 256, 1500, 24)] == ["1k", "50k", "256", "1500", "24"]
    assert registry.metric_keys("critic", 1000) == [
        "fid1k_critic", "kid1k_critic", "kid1k_critic_std", "pr1k_k3_critic_precision", "pr1k_k3_critic_recall"]
    assert registry.metric_keys("inception", 256, k=5)[-1] == "pr256_k5_inception_recall"
    assert registry.metric_keys("critic", 3) == ["fid3_critic", "kid3_critic", "kid3_critic_std"]  # pr needs N > k
    better = {name: out.better for name, out in registry.specs(registry.Protocol("critic", 1000)).items()}
    assert better == {"fid1k_critic": "min", "kid1k_critic": "min", "kid1k_critic_std": None,
                      "pr1k_k3_critic_precision": "max", "pr1k_k3_critic_recall": "max"}


@pytest.mark.parametrize("base", sorted(registry.METRICS))
def test_every_registered_metric_reports_exactly_its_names(base):
    """Registered means tested: compute gives finite values under exactly the names `metric_keys` promises."""
    from genart.evaluate.reference import Reference

    rng = np.random.default_rng(5)
    real, fake = rng.standard_normal((120, 8)), rng.standard_normal((40, 8)) + 0.2
    ref = Reference(real.mean(0), np.cov(real, rowvar=False), len(real), real.astype(np.float32), "key")
    protocol = registry.Protocol("critic", len(fake))
    values, details = registry.METRICS[base].compute(ref, fake, protocol)
    names = {registry.key(base, protocol, suffix) for suffix in values}
    assert names == {n for n in registry.metric_keys("critic", len(fake)) if n.startswith(base + "40")}
    assert all(np.isfinite(v) for v in values.values()) and isinstance(details, dict)
    all_values, _ = registry.compute(ref, fake, protocol)
    assert list(all_values) == registry.metric_keys("critic", len(fake))


def test_precision_recall_is_named_by_the_rows_it_uses():
    """P/R compares equally many rows per side, min(real subset, generated): the name and the label carry that
    count, not the generated count (300 real rows vs 1000 generated is pr300, as stylegan2-ada names by N)."""
    from genart.evaluate.reference import Reference

    rng = np.random.default_rng(7)
    real, fake = rng.standard_normal((300, 8)), rng.standard_normal((1000, 8))
    ref = Reference(real.mean(0), np.cov(real, rowvar=False), len(real), real.astype(np.float32), "key")
    protocol = registry.Protocol("critic", len(fake), num_real=len(ref.subset))
    values, details = registry.compute(ref, fake, protocol)
    assert list(values) == ["fid1k_critic", "kid1k_critic", "kid1k_critic_std",
                            "pr300_k3_critic_precision", "pr300_k3_critic_recall"]
    assert details["precision_recall"]["num_real"] == details["precision_recall"]["num_generated"] == 300
    assert list(values) == registry.metric_keys("critic", 1000, num_real=300)
    assert registry.uses(protocol)["pr300_k3_critic_recall"] == "300 generated vs 300 real"
    assert registry.uses(protocol)["fid1k_critic"] == "1000 generated"
    assert registry.metric_keys("critic", 1000) == registry.metric_keys("critic", 1000, num_real=5000)  # enough real rows


def test_trainer_and_workflow_name_precision_recall_as_the_evaluation_will(tmp_path, monkeypatch):
    """Named by the rows per side, a pr metric on a small dataset is pr<rows>: a best_metric or selection.metric
    checked against pr<num_generated> alone was never found (best.json silently never written)."""
    from genart.evaluate.reference import subset_rows
    from genart.train.config import load_config
    from genart.train.trainer import _check_eval

    data = _prepared(tmp_path / "data", None, [(f"{i:016x}", "val" if i < 30 else "train", None) for i in range(300)])
    assert subset_rows(data, "all") == 300 and subset_rows(data, "val") == 30 and subset_rows(data, "all", 50) == 50
    assert subset_rows(str(tmp_path / "not-prepared"), "all") is None
    import genart.evaluate

    monkeypatch.setattr(genart.evaluate, "check_features", genart.evaluate.parse_features)  # no Inception weights here
    base = ["model.family=dcgan", f"data.path={data}", "eval.every_checkpoints=1", "eval.num_generated=1000"]
    _check_eval(load_config(None, [*base, "eval.best_metric=pr300_k3_inception_recall"]))
    with pytest.raises(UserError, match="pr300_k3_inception_recall"):
        _check_eval(load_config(None, [*base, "eval.best_metric=pr1k_k3_inception_recall"]))
    # The direction comes from the metric: with best_mode's old default "min", a recall best_metric ranked the worst
    # checkpoint best, and Ray kept the worst train.keep_last and deleted the rest; a spread was accepted as a score.
    from genart.train.loop import best_metric

    assert best_metric(load_config(None, [*base, "eval.best_metric=pr300_k3_inception_recall"]))[1] == "max"
    assert best_metric(load_config(None, [*base, "eval.best_metric=kid1k_inception"]))[1] == "min"
    with pytest.raises(UserError, match="higher pr300_k3_inception_recall is better; leave eval.best_mode unset"):
        _check_eval(load_config(None, [*base, "eval.best_metric=pr300_k3_inception_recall", "eval.best_mode=min"]))
    _check_eval(load_config(None, [*base, "eval.best_metric=fid1k_inception", "eval.best_mode=min"]))  # agrees
    with pytest.raises(UserError, match="'kid1k_inception_std' is a spread, not a score; use one of fid1k_inception"):
        _check_eval(load_config(None, [*base, "eval.best_metric=kid1k_inception_std"]))

    ttd = _workflow_module()
    picked = {"metric": "pr30_k3_inception_recall", "features": "inception", "split": "val"}
    ttd.check_selection(ttd.TrainThenDeployConfig(data=data, selection=picked))  # 1,000 generated vs 30 val rows
    with pytest.raises(UserError, match="reports .*pr30_k3_inception_recall"):
        ttd.check_selection(ttd.TrainThenDeployConfig(data=data, selection={**picked, "metric": "pr1k_k3_inception_recall"}))
    with pytest.raises(ValueError, match="fid1k_inception"):  # more rows than generated images: no such name
        ttd.Selection(**{**picked, "metric": "pr2k_k3_inception_recall"})


def _workflow_module():
    path = Path(__file__).resolve().parents[1] / "workflows" / "train_then_deploy.py"
    spec = importlib.util.spec_from_file_location("workflow_train_then_deploy", path)
    ttd = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ttd  # pydantic resolves the configs' annotations through sys.modules
    spec.loader.exec_module(ttd)
    return ttd


# ---------------------------------------------------------------- which classes and which real rows are compared


def _prepared(root: Path, label_counts: dict | None, rows: list[tuple[str, str, int | None]] = ()) -> str:
    """A stand-in prepared dataset: manifest.json (with `label_counts` unless None) and, given `rows` of
    (id, split, label index), one shard of those columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = list(label_counts or {}) or sorted({"common", "rare"})
    manifest = {"labels": {name: i for i, name in enumerate(names)}, "counts": {"written": len(rows)},
                "splits": {s: sum(1 for r in rows if r[1] == s) for s in ("train", "val")}}
    if label_counts is not None:
        manifest["label_counts"] = label_counts
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(manifest))
    if rows:
        ids, splits, labels = zip(*rows)
        pq.write_table(pa.table({"id": list(ids), "split": list(splits), "label": pa.array(labels, pa.int32())}),
                       root / "part-00000.parquet")
    return str(root)


class _Generator:
    """A stand-in generative model that records the label it is asked to draw for each seed."""

    image_size = 4

    def __init__(self, label_names: list[str], conditional: bool = True):
        self.label_names, self.conditional, self.asked = label_names, conditional, []

    def sample(self, seeds, labels=None):
        self.asked.extend([None] * len(seeds) if labels is None else labels)
        return torch.zeros(len(seeds), 3, 4, 4)


class _Features:
    dim = 2

    def __call__(self, images):
        return np.zeros((len(images), self.dim), np.float32)


def test_conditional_generators_draw_the_evaluated_splits_label_mix(tmp_path):
    """Seed s used to get class s % C: equal shares, against real statistics of a 90/10 dataset. Each seed now draws
    its class from the evaluated split's label shares, the same way in-process and in the Ray actors."""
    from genart.evaluate import job, labels, scoring

    data = _prepared(tmp_path / "data", {"common": {"train": 850, "val": 50}, "rare": {"train": 50, "val": 50}})
    seeds = list(range(2000))
    model = _Generator(["common", "rare"])
    policy = labels.label_policy(model, data, "all")
    assert policy.describe()["rule"] == "dataset" and policy.describe()["shares"] == {"common": 0.9, "rare": 0.1}
    scoring.generated_features(model, _Features(), seeds, policy=policy)
    assert abs(np.mean(np.array(model.asked) == 1) - 0.1) < 0.02  # seed % 2 gave 0.5
    actor = object.__new__(job.GeneratedFeatures)  # the Ray Data path: same labels for the same seeds
    actor.model, actor.extractor, actor.policy = _Generator(["common", "rare"]), _Features(), policy
    for start in range(0, len(seeds), 32):
        actor({"id": np.array(seeds[start:start + 32])})
    assert actor.model.asked == model.asked

    val = labels.label_policy(model, data, "val")  # the split evaluated, not the training mix
    assert val.describe()["shares"] == {"common": 0.5, "rare": 0.5}
    balanced = _prepared(tmp_path / "synth", {g: {"train": 40, "val": 10} for g in "abcde"})  # the quickstart's genres
    drawn = labels.label_policy(_Generator(list("abcde")), balanced, "all").labels(seeds)
    assert np.abs(np.bincount(drawn, minlength=5) / len(seeds) - 0.2).max() < 0.03
    plain = labels.label_policy(_Generator([], conditional=False), data, "all")
    assert plain.labels(seeds) is None and plain.describe()["rule"] == "none"


def test_label_mix_of_an_older_manifest_is_counted_from_the_shards(tmp_path):
    """A manifest from before `label_counts`: the shares come from the shards' label column; with no labels there
    either, the seed's class (s % C) stays, and the policy says so."""
    from genart.evaluate import labels

    rows = [(f"{i:016x}", "val" if i % 4 == 0 else "train", 1 if i % 5 == 0 else 0) for i in range(100)]
    old = _prepared(tmp_path / "old", None, rows)
    policy = labels.label_policy(_Generator(["common", "rare"]), old, "train")
    assert policy.describe()["shares"] == {"common": 0.8, "rare": 0.2} and "shard" in policy.describe()["source"]
    bare = _prepared(tmp_path / "bare", None, [(r[0], r[1], None) for r in rows])
    fallback = labels.label_policy(_Generator(["common", "rare"]), bare, "all")
    assert fallback.describe()["rule"] == "seed" and "seed % 2" in fallback.describe()["note"]
    assert fallback.labels([0, 1, 2]) is None  # the model's own default: seed % C


def test_real_subsets_are_not_the_val_split(tmp_path, monkeypatch):
    """prepare puts an image in val when its id's first 8 hex digits are small, so "the smallest ids" were the val
    images: under split=all the KID / precision-recall rows and --max-real picked val only. The subset order hashes
    the id again, independent of the split."""
    import hashlib

    from genart.data.prepare import split_of
    from genart.evaluate import reference

    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:16] for i in range(1000)]
    split = {i: split_of(i, 0.2) for i in ids}
    data = _prepared(tmp_path / "data", {}, [(i, split[i], None) for i in ids])
    chosen = reference.chosen_ids(data, None, 100)
    assert 0.1 < np.mean([split[i] == "val" for i in chosen]) < 0.3  # was 1.0

    monkeypatch.setattr(reference, "SUBSET_CAP", 100)
    acc = reference.Accumulator()
    for start in range(0, len(ids), 64):
        acc.update(ids[start:start + 64], np.zeros((len(ids[start:start + 64]), 2), np.float32))
    assert 0.1 < np.mean([split[i] == "val" for i in acc.ids]) < 0.3
    assert set(acc.ids) == chosen  # one order for both: --max-real 100 keeps the rows the subset keeps
    assert reference.CACHE_FORMAT >= 2  # subsets cached in the old order are not reused


# ---------------------------------------------------------------- tiny checkpoints and datasets


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from genart.data.synth import GENRES
    from genart.models.tiny import tiny_checkpoint

    root = tmp_path_factory.mktemp("eval-ckpts")
    dcgan_run = tiny_checkpoint(root / "dcgan", "dcgan", IMAGE_SIZE, latent_dim=8, base_channels=4, max_channels=16)
    critic = tiny_checkpoint(root / "critic", "critic", IMAGE_SIZE, GENRES, base_channels=4, num_stages=2, embed_dim=16)
    return {"dcgan": f"{dcgan_run}/step-000000", "dcgan_run": dcgan_run, "critic": critic}


def prepare_dataset(src: str, dest: str) -> str:
    from genart.data.prepare import PrepareOptions, prepare

    prepare([src], dest, PrepareOptions(size=IMAGE_SIZE, val_fraction=0.2), progress=False)
    return dest


@pytest.fixture(scope="module")
def dataset(ray_session, synth_dir, tmp_path_factory):
    return prepare_dataset(synth_dir, str(tmp_path_factory.mktemp("eval-data") / "prepared"))


# ---------------------------------------------------------------- one preprocessing path for real and generated


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_real_and_generated_images_take_one_path(checkpoints):
    """A real picture stored wider than square, and the same picture as a generator's float output, must give the
    same features: the real one is center-cropped (not squashed), the generated one quantised like serving does."""
    import pyarrow as pa

    from genart.data.images import model_input
    from genart.evaluate import reference
    from genart.evaluate.features import build_extractor
    from genart.serve.inference import to_uint8

    rng = np.random.default_rng(6)
    square = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)  # (H, W, 3)
    border = np.zeros((IMAGE_SIZE, 4, 3), np.uint8)
    border[..., 0] = 255  # red bars left and right: a squash would mix them in, a center crop drops them
    stored = png_bytes(np.concatenate([border, square, border], axis=1))  # 16 x 24, as a dataset keeping sizes
    table = pa.table({"image": [stored]})
    real = reference.decode_rows(table, IMAGE_SIZE)
    np.testing.assert_array_equal(real[0], square)

    # The generator's float output for that picture, off by less than half a level: quantises back to `square`.
    generated = torch.from_numpy(square).permute(2, 0, 1)[None].float() / 255 + 0.4 / 255  # (1, 3, 16, 16)
    extractor = build_extractor(f"critic:{checkpoints['critic']}", device="cpu")
    np.testing.assert_array_equal(extractor(generated), extractor(real))

    # Quantisation is serving's round-half-up: (k + 0.5) / 255 -> k + 1, and float input equals its uint8 pixels.
    from genart.evaluate.preprocess import network_input, to_pixels

    halves = torch.full((1, 3, 4, 4), 100.5 / 255)
    assert to_pixels(halves)[0].max() == 101
    floats = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_array_equal(np.stack(to_pixels(floats)), to_uint8(floats))
    np.testing.assert_array_equal(extractor(floats), extractor(to_uint8(floats)))
    # The crop + resize is images.model_input, the one used by training data, batch scoring and serving.
    wide = rng.integers(0, 256, (20, 36, 3), dtype=np.uint8)
    np.testing.assert_array_equal(network_input([wide], 8).numpy(), model_input(wide, 8)[None])
    # A real image stored bigger than the generator is brought to the generator's resolution first.
    big = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(reference.decode_rows(pa.table({"image": [png_bytes(big)]}), IMAGE_SIZE)[0],
                                  to_uint8(torch.from_numpy(model_input(big, IMAGE_SIZE))[None])[0])


def test_cache_key_holds_resolution_and_preprocessing_version(dataset, checkpoints, monkeypatch):
    from genart.evaluate import reference
    from genart.evaluate.features import build_extractor

    extractor = build_extractor(f"critic:{checkpoints['critic']}", device="cpu")
    key16 = reference.cache_key(dataset, extractor.stats_key, "all", None, 16)
    assert reference.cache_key(dataset, extractor.stats_key, "all", None, 8) != key16
    monkeypatch.setattr(reference, "PREPROCESS_VERSION", reference.PREPROCESS_VERSION + 1)
    assert reference.cache_key(dataset, extractor.stats_key, "all", None, 16) != key16
    monkeypatch.undo()
    # statistics made at another resolution are another file, never the 16 px one reused
    at16 = reference.get_local(dataset, "all", extractor, resolution=16, limit=10)
    at8 = reference.get_local(dataset, "all", extractor, resolution=8, limit=10)
    assert at16.path != at8.path and not np.allclose(at16.mean, at8.mean)


def test_critic_features_run_in_the_inference_setup_and_stay_fp32_on_cpu(checkpoints):
    """The critic extractor (genart index / evaluate / audit, Serve's SearchModel) runs its passes in the
    InferenceSetup the batch actors and replicas use: on a CPU that is plain fp32, bit-identical to
    Loaded.embed; with autocast on (what a GPU gets) the forward passes really run in bf16."""
    from genart.evaluate.features import build_extractor
    from genart.evaluate.preprocess import network_input
    from genart.models.family import InferenceSetup

    extractor = build_extractor(f"critic:{checkpoints['critic']}", device="cpu")
    assert extractor.setup.describe()["precision"] == "float32" and not extractor.setup.channels_last
    pixels = np.random.default_rng(3).integers(0, 256, (5, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    with torch.no_grad():
        plain = extractor.model.embed(network_input(pixels, IMAGE_SIZE)).numpy()
    features = extractor(pixels)
    assert features.dtype == np.float32
    np.testing.assert_array_equal(features, plain)

    fp32_key = extractor.stats_key
    extractor.setup = InferenceSetup(autocast=True)  # bf16 autocast on the CPU, as a GPU setup enters it
    assert extractor.stats_key != fp32_key  # bf16 features get reference statistics of their own
    low = extractor(pixels)
    assert low.dtype == np.float32 and not np.array_equal(low, plain)
    np.testing.assert_allclose(low, plain, atol=0.05 * float(np.abs(plain).max()) + 1e-3)
    assert build_extractor(f"critic:{checkpoints['critic']}", device="cpu", metrics=True).exact


def test_metric_features_turn_tf32_off_on_cuda_and_restore_it():
    """The switch a GPU's metric passes go through (the settings exist without a GPU; the passes do not run here)."""
    from genart.evaluate.features import exact_fp32

    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    try:
        conv.fp32_precision = matmul.fp32_precision = "tf32"
        with exact_fp32(torch.device("cuda")):
            assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
        with exact_fp32(torch.device("cpu")):  # nothing to change on a CPU
            assert conv.fp32_precision == "tf32"
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


# ---------------------------------------------------------------- cache, score_checkpoint, CLI (real Ray Data)


@pytest.mark.slow  # five Ray Data jobs and two prepares: 1-3 min on a busy 2-core machine
def test_reference_cache_hit_then_invalidated_when_dataset_changes(ray_session, synth_dir, checkpoints, tmp_path):
    from genart.data.synth import make_synth
    from genart.evaluate import job

    data = prepare_dataset(synth_dir, str(tmp_path / "prepared"))
    features = f"critic:{checkpoints['critic']}"
    first = job.run(checkpoints["dcgan"], data, num=12, features=features, max_actors=1)
    assert first["cache"]["hit"] is False
    assert first["cache"]["path"].startswith(os.path.join(data, "_genart_cache"))
    second = job.run(checkpoints["dcgan"], data, num=12, features=features, max_actors=1)
    assert second["cache"]["hit"] is True and second["cache"]["key"] == first["cache"]["key"]
    assert second["metrics"] == pytest.approx(first["metrics"], rel=1e-6)  # same seeds, same reference

    # The dataset changes: new content prepared and put in its place (manifest and shards), cache folder kept.
    other_src = tmp_path / "other-src"
    make_synth(str(other_src), num=40, size=24, seed=7)
    other = prepare_dataset(str(other_src), str(tmp_path / "other"))
    for name in os.listdir(data):
        if name.startswith("part-") or name in ("manifest.json", "rejected.jsonl", "duplicates.jsonl"):
            os.remove(os.path.join(data, name))
    for name in os.listdir(other):
        shutil.copy(os.path.join(other, name), data)
    third = job.run(checkpoints["dcgan"], data, num=12, features=features, max_actors=1)
    assert third["cache"]["hit"] is False and third["cache"]["key"] != first["cache"]["key"]
    assert third["data"]["num_real"] == 40


def test_reference_cache_on_s3_and_fallback_when_dataset_location_unwritable(ray_session, s3_bucket, synth_dir, dataset,
                                                                             checkpoints, tmp_path, monkeypatch):
    from genart.evaluate import reference
    from genart.evaluate.features import build_extractor

    extractor = build_extractor(f"critic:{checkpoints['critic']}", device="cpu")
    data = prepare_dataset(synth_dir, f"s3://{s3_bucket}/prepared")
    first = reference.get_local(data, "train", extractor, IMAGE_SIZE, limit=20)
    assert not first.hit and first.path.startswith(f"s3://{s3_bucket}/prepared/_genart_cache/ref-critic-")
    assert first.count == 20 and first.subset.shape == (20, 16)
    second = reference.get_local(data, "train", extractor, IMAGE_SIZE, limit=20)
    assert second.hit and second.path == first.path
    np.testing.assert_array_equal(second.subset, first.subset)

    # A dataset folder that cannot take the cache folder (here: a file is in its way) -> $GENART_CACHE_DIR.
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns("_genart_cache"))
    (copy / "_genart_cache").write_text("not a folder")
    monkeypatch.setenv("GENART_CACHE_DIR", str(tmp_path / "cache"))
    local = reference.get_local(str(copy), "all", extractor, IMAGE_SIZE, limit=10)
    assert not local.hit and local.path.startswith(str(tmp_path / "cache"))
    assert reference.get_local(str(copy), "all", extractor, IMAGE_SIZE, limit=10).hit


def test_score_checkpoint_in_process(dataset, checkpoints):
    from genart.evaluate import metric_keys, reference, score_checkpoint
    from genart.evaluate.scoring import extractor_for
    from genart.train.config import EvalSection

    assert EvalSection().num_generated == 1000  # FID on 256 samples is mostly bias and noise
    cfg = EvalSection(every_checkpoints=1, num_generated=16, features=f"critic:{checkpoints['critic']}")
    started = time.time()
    scores = score_checkpoint(checkpoints["dcgan"], dataset, cfg)
    assert list(scores) == metric_keys("critic", 16) and "fid16_critic" in scores
    assert all(isinstance(v, float) and np.isfinite(v) for v in scores.values())
    assert scores["fid16_critic"] > 0 and 0.0 <= scores["pr16_k3_critic_precision"] <= 1.0
    assert scores["kid16_critic_std"] > 0
    # The real side is the whole split (100 images), not shrunk to the 16 generated ones, and it is cached.
    ref = reference.get_local(dataset, "all", extractor_for(cfg.features), resolution=IMAGE_SIZE)
    assert ref.hit and ref.count == 100
    # the second checkpoint reuses the cached real side and, with the same weights, gives the same scores
    assert score_checkpoint(checkpoints["dcgan_run"], dataset, cfg) == pytest.approx(scores, rel=1e-6)
    print(f"score_checkpoint x2: {time.time() - started:.1f}s")


def test_cli_evaluate_end_to_end(dataset, checkpoints, tmp_path):
    from genart.cli import main

    out = tmp_path / "report.json"
    result = CliRunner().invoke(main, [
        "evaluate", "--model", checkpoints["dcgan_run"], "--data", dataset, "--num", "20",
        "--features", f"critic:{checkpoints['critic']}", "--split", "all", "--output", str(out),
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert list(report["metrics"]) == registry.metric_keys("critic", 20) and "fid20_critic" in report["metrics"]
    assert report["labels"]["fid20_critic"].startswith("FID (critic features: ")
    assert report["preprocess"]["resolution"] == IMAGE_SIZE and report["kid"]["subset_size"] == 10
    assert report["num_generated"] == 20 and report["data"]["num_real"] == 100
    assert report["features"]["name"] == "critic" and report["features"]["dim"] == 16
    assert {"hit", "path", "key"} <= set(report["cache"]) and report["model"]["family"] == "dcgan"
    assert report["label_policy"] == {"rule": "none"}  # unconditional: no class to draw
    assert report["labels"]["pr20_k3_critic_recall"].endswith("; 20 generated vs 20 real)")
    assert "fid20_critic = FID (critic features:" in result.output and "reference cache:" in result.output
    assert "generated images featurised" in result.output and "images/s" in result.output  # the final summary

    bad = CliRunner().invoke(main, ["evaluate", "--model", checkpoints["critic"], "--data", dataset, "--features",
                                    f"critic:{checkpoints['critic']}"])
    assert bad.exit_code == 2 and "generative model" in bad.output


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_evaluate_shows_a_live_line_per_job_on_a_terminal(dataset, checkpoints, monkeypatch):
    """Real images (a cache miss: max_real 30 is a new key) and generated ones each get images done / total,
    images/s, ETA and errors; the summary counts what was featurised."""
    from genart.evaluate import job

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    report = job.run(checkpoints["dcgan"], dataset, num=12, features=f"critic:{checkpoints['critic']}", max_real=30,
                     max_actors=1)
    text = terminal.getvalue()
    for line in ("evaluate (real): 30/30", "evaluate (generated): 12/12"):
        assert line in text, text
    assert "0 errors" in text and "img/s" in text and "ETA" in text
    assert report["throughput"]["real_featurised"] == 30 and report["throughput"]["generated"] == 12
    assert "30 real + 12 generated images featurised" in job.summary(report)


def test_workflow_selects_by_registry_names():
    """train_then_deploy's selection.metric is a `genart evaluate` name, checked against num_generated and features."""
    from genart import config

    path = Path(__file__).resolve().parents[1] / "workflows" / "train_then_deploy.py"
    ttd = _workflow_module()

    shipped = config.load(ttd.TrainThenDeployConfig, path.with_suffix(".yaml"))
    assert shipped.selection.metric == "fid1k_critic" and shipped.selection.better == "min"
    recall = ttd.Selection(metric="pr24_k3_critic_recall", features="critic:x", num_generated=24)
    assert recall.better == "max"
    for stale in ("fid", "kid1k_critic", "kid24_critic_std"):  # old name, wrong N, not a quality score
        with pytest.raises(ValueError, match="fid24_critic"):
            ttd.Selection(metric=stale, features="critic:x", num_generated=24)


# ---------------------------------------------------------------- feature specs and the Inception path


class NotWeights:
    """An arbitrary object: a weights file holding one must be refused by the weights-only loader."""


def test_feature_specs():
    from genart.evaluate.features import parse_features

    assert parse_features(None).text == "inception"
    assert parse_features("inception", "w.pth").uri == "w.pth"
    assert parse_features("critic:runs/critic").uri == "runs/critic"
    for bad in ("critic", "vgg", "critic:x --inception-weights"):
        with pytest.raises(UserError):
            parse_features(bad, "w.pth" if "weights" in bad else None)


def test_inception_features_from_weights_file_and_missing_weights(tmp_path, monkeypatch):
    from torchvision.models import inception_v3

    from genart.evaluate.features import InceptionExtractor, build_extractor

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty torchvision cache
    with pytest.raises(UserError, match="--inception-weights"):
        build_extractor("inception", device="cpu")

    started = time.time()
    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict(), weights)
    extractor = InceptionExtractor(str(weights), device="cpu")
    images = [torch.rand(3, 16, 16), torch.rand(3, 16, 16), torch.rand(3, 24, 20)]  # mixed sizes are resized each
    feats = extractor(images)
    assert feats.shape == (3, 2048) and extractor.dim == 2048 and np.isfinite(feats).all()
    assert extractor.identity.startswith("inception_v3:") and "Lanczos" in extractor.resize
    print(f"inception build + save + load + 3 images: {time.time() - started:.1f}s")

    evil = tmp_path / "evil.pth"  # a pickle that is not plain tensors must be refused, never run
    torch.save({"x": NotWeights()}, evil)
    with pytest.raises(UserError, match="plain state_dict"):
        InceptionExtractor(str(evil), device="cpu")
