"""Distances between sets of image features: Fréchet distance (FID) and kernel distance (KID).

Both work on features from any network (Inception-v3 pool3 for FID proper, or the small offline classifier in
`ddpm_eqx.classifier`) and run on the host in float64 numpy: they are O(d^3) / O(m^2 d) once per evaluation,
and float32 loses the small differences that matter near FD = 0.

References:
    Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"
    (FID, Eq. 6). Binkowski et al. 2018, "Demystifying MMD GANs" (KID, Sec. 4 / Appendix A).
"""

import numpy as np
from jaxtyping import Float, Shaped



def feature_statistics(features: Shaped[np.ndarray, "n d"]) -> tuple[Float[np.ndarray, " d"], Float[np.ndarray, "d d"]]:
    """Mean and covariance (ddof=1, as pytorch-fid and TTUR) of `features`, in float64."""
    if features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows for a covariance, got {features.shape[0]}")
    x = np.asarray(features, dtype=np.float64)
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _psd_sqrt(sigma: Float[np.ndarray, "d d"]) -> Float[np.ndarray, "d d"]:
    """Symmetric square root of a symmetric PSD matrix; round-off negatives in the spectrum clipped to 0."""
    eigvals, eigvecs = np.linalg.eigh(sigma)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def trace_sqrt_product(sigma1: Float[np.ndarray, "d d"], sigma2: Float[np.ndarray, "d d"]) -> float:
    """tr sqrtm(sigma1 @ sigma2) for symmetric PSD sigma1, sigma2.

    sigma1 @ sigma2 is similar to the symmetric PSD matrix sqrt(sigma1) sigma2 sqrt(sigma1), so both have the same
    (real, non-negative) eigenvalues; taking them from the symmetric form with `eigvalsh` avoids the complex
    round-off and the occasional non-convergence of a general `sqrtm` on a near-singular product.
    """
    s1 = np.asarray(sigma1, dtype=np.float64)
    s2 = np.asarray(sigma2, dtype=np.float64)
    root1 = _psd_sqrt((s1 + s1.T) / 2)
    middle = root1 @ s2 @ root1
    eigvals = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(eigvals, 0.0, None)).sum())


def frechet_distance(
    mu1: Float[np.ndarray, " d"],
    sigma1: Float[np.ndarray, "d d"],
    mu2: Float[np.ndarray, " d"],
    sigma2: Float[np.ndarray, "d d"],
) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, Eq. 6):

        ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)).

    Computed in float64; the result is clipped at 0 (exact duplicates give 0, not -1e-12).
    """
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = np.asarray(mu1, dtype=np.float64) - np.asarray(mu2, dtype=np.float64)
    traces = np.trace(sigma1.astype(np.float64)) + np.trace(sigma2.astype(np.float64))
    distance = float(diff @ diff + traces - 2.0 * trace_sqrt_product(sigma1, sigma2))
    return max(distance, 0.0)


def _polynomial_kernel(x: Float[np.ndarray, "m d"], y: Float[np.ndarray, "m d"]) -> Float[np.ndarray, "m m"]:
    """k(x, y) = (x.y / d + 1)^3, the KID kernel (Binkowski et al. 2018, Sec. 4)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: Float[np.ndarray, "m d"], y: Float[np.ndarray, "m d"]) -> float:
    """Unbiased MMD^2 estimate with the cubic polynomial kernel on two equal-size samples.

    Within-set terms drop the diagonal (i != j, divided by m(m-1)); the cross term keeps all m^2 pairs, as in
    Binkowski et al. 2018 and torch-fidelity.
    """
    m = x.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    features1: Shaped[np.ndarray, "n d"],
    features2: Shaped[np.ndarray, "m d"],
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int,
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): mean and std of unbiased MMD^2 over `num_subsets` random subsets.

    Each subset draws min(subset_size, n1, n2) rows from each set without replacement; the std is over subsets
    (ddof=0), as torch-fidelity reports it. Values may be slightly negative: the estimator is unbiased.
    """
    if features1.shape[1] != features2.shape[1]:
        raise ValueError(f"feature dims differ: {features1.shape[1]} vs {features2.shape[1]}")
    m = min(subset_size, features1.shape[0], features2.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 rows per set, got subset size {m}")
    f1 = np.asarray(features1, dtype=np.float64)
    f2 = np.asarray(features2, dtype=np.float64)
    rng = np.random.default_rng(seed)
    mmds = np.empty(num_subsets)
    for i in range(num_subsets):
        x = f1[rng.choice(f1.shape[0], m, replace=False)]
        y = f2[rng.choice(f2.shape[0], m, replace=False)]
        mmds[i] = mmd2_unbiased(x, y)
    return float(mmds.mean()), float(mmds.std())
