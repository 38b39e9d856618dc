"""Distribution metrics on feature vectors: FID, unbiased KID, k-NN precision/recall, and streaming moments.

    fid = frechet_distance(mu_r, cov_r, mu_g, cov_g)            # Heusel et al. 2017
    kid_mean, kid_std = kid(real, fake)                        # Binkowski et al. 2018, unbiased MMD^2
    precision, recall = precision_recall(real, fake, k=3)      # Kynkaanniemi et al. 2019
Pure NumPy/SciPy (plus torch for the chunked distances); no Ray, no models: the one implementation of each metric.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch

# KID defaults as in Binkowski et al. / StyleGAN2-ADA: 100 subsets of up to 1000 samples each...
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
# ...but at most this fraction of the smaller set: with N <= 1000 a subset of min(1000, N) rows drawn without
# replacement is the whole set every time, so all subsets agree and the std is 0. Half the rows keeps subsets
# different (two share ~1/4 of their rows) while each subset's MMD^2 stays unbiased, so the mean is too.
KID_MAX_FRACTION = 0.5
PR_K = 3
# Rows of the distance matrix computed at once in precision_recall: 1024 x N float32.
DISTANCE_CHUNK = 1024


class Moments:
    """Streaming mean and covariance of feature rows (Chan et al.'s pairwise update, in float64).

    m = Moments(); m.update(batch_a); m.update(batch_b); m.mean (D,), m.cov (D, D) with ddof=1 like np.cov.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None  # sum of outer products of deviations (D, D)

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or len(x) == 0:
            return
        n_b = len(x)
        mean_b = x.mean(axis=0)
        dev = x - mean_b
        m2_b = dev.T @ dev
        if self._mean is None:
            self.count, self._mean, self._m2 = n_b, mean_b, m2_b
            return
        n_a, total = self.count, self.count + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / total)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / total)
        self.count = total

    @property
    def mean(self) -> np.ndarray:
        if self._mean is None:
            raise ValueError("Moments: no rows seen")
        return self._mean

    @property
    def cov(self) -> np.ndarray:
        if self._m2 is None or self.count < 2:
            raise ValueError("Moments: a covariance needs at least 2 rows")
        return self._m2 / (self.count - 1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)): the Frechet distance of two Gaussians (FID on Inception features).

    sqrtm of a product of (often singular) covariances can come back non-finite or slightly complex: as pytorch-fid
    does, retry with eps on the diagonals, then keep the real part (warning if the imaginary part is not negligible).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"frechet_distance: shapes differ ({mu1.shape} vs {mu2.shape}, {sigma1.shape} vs {sigma2.shape})")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        # NaN / inf features (a diverged model): no score. max(0, nan) below gave 0.0, a perfect one that won
        # best.json, and sqrtm of a NaN covariance raised LinAlgError instead of a result
        return float("nan")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # singular covariances (N <= D) are expected with small N; callers report it
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if imag > 1e-3:
            warnings.warn(f"frechet_distance: sqrtm left an imaginary component of {imag:.3g}; too few samples for the feature size?")
        covmean = covmean.real
    # A distance: round-off in sqrtm can leave -1e-5 for identical sets, which a report would print as negative.
    return max(0.0, float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)))


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (N, D) and (M, D)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    return frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))


def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / D + 1)^3: the cubic polynomial kernel with gamma = 1/D, coef0 = 1 (KID's kernel)."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between samples x (m, D) and y (n, D) under the KID kernel (diagonals of Kxx, Kyy left out)."""
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError("mmd2_unbiased: each sample needs at least 2 rows")
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2.0 * kxy.mean()
    )


def kid_subset_size(num_real: int, num_fake: int, subset_size: int = KID_SUBSET_SIZE,
                    max_fraction: float = KID_MAX_FRACTION) -> int:
    """Rows per KID subset: min(subset_size, max_fraction * the smaller set), at least 2 when there are 2 rows."""
    smaller = min(num_real, num_fake)
    return min(subset_size, smaller, max(2, int(max_fraction * smaller)))


def kid(real: np.ndarray, fake: np.ndarray, num_subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = 0, max_fraction: float = KID_MAX_FRACTION) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of the unbiased MMD^2 over `num_subsets` random subsets.

    Each subset draws `kid_subset_size` rows (at most max_fraction of the smaller set) without replacement from
    each set. The std is the spread of one subset's estimate, a measure of the noise at that subset size (the mean
    over subsets is less noisy); max_fraction=1.0 with N <= subset_size gives one whole-set estimate and std 0.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    size = kid_subset_size(len(real), len(fake), subset_size, max_fraction)
    if size < 2:
        raise ValueError(f"kid: needs at least 2 real and 2 generated samples (got {len(real)}, {len(fake)})")
    rng = np.random.default_rng(seed)
    values = np.array([
        mmd2_unbiased(real[rng.choice(len(real), size, replace=False)], fake[rng.choice(len(fake), size, replace=False)])
        for _ in range(num_subsets)
    ])
    return float(values.mean()), float(values.std())


def _kth_neighbour_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of x (N, D) to its k-th nearest other row: (N,)."""
    radii = []
    for start in range(0, len(x), DISTANCE_CHUNK):
        d = torch.cdist(x[start : start + DISTANCE_CHUNK], x)  # (chunk, N), includes 0 to itself
        radii.append(torch.kthvalue(d, k + 1, dim=1).values)  # k+1: skip the point itself
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of `points` inside at least one ball (centre, radius): the manifold membership test."""
    inside = []
    for start in range(0, len(points), DISTANCE_CHUNK):
        d = torch.cdist(points[start : start + DISTANCE_CHUNK], centres)  # (chunk, M)
        inside.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).float().mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds.

    precision: share of generated samples inside the real manifold (union of balls reaching each real sample's
    k-th nearest real neighbour); recall: share of real samples inside the generated manifold.
    """
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision_recall: needs more than k={k} samples in each set (got {len(real)}, {len(fake)})")
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    precision = _coverage(f, r, _kth_neighbour_radii(r, k))
    recall = _coverage(r, f, _kth_neighbour_radii(f, k))
    return precision, recall
