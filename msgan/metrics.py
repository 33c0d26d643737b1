"""Image quality metrics (SSIM, PSNR, MAE, MSE; 2D and 3D, optionally in a mask) and paired tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, stats


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    return x, y


def _masked_mean(v: np.ndarray, mask: np.ndarray | None) -> float:
    if mask is None:
        return float(v.mean())
    m = np.asarray(mask, dtype=bool)
    if m.shape != v.shape:
        raise ValueError(f"mask of shape {m.shape} does not match image shape {v.shape}")
    if not m.any():
        raise ValueError("mask is empty")
    return float(v[m].mean())


def mae(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    x, y = _pair(a, b)
    return _masked_mean(np.abs(x - y), mask)


def mse(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    x, y = _pair(a, b)
    return _masked_mean((x - y) ** 2, mask)


def psnr(a: np.ndarray, b: np.ndarray, data_range: float, mask: np.ndarray | None = None) -> float:
    e = mse(a, b, mask)
    return float("inf") if e == 0 else float(10.0 * np.log10(data_range**2 / e))


def ssim_map(
    a: np.ndarray, b: np.ndarray, data_range: float, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
) -> np.ndarray:
    """Local SSIM (Wang et al. 2004) with a Gaussian window of ``sigma`` voxels, truncated at 3.5 sigma."""
    x, y = _pair(a, b)

    def blur(v: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(v, sigma, mode="reflect", truncate=3.5)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float, mask: np.ndarray | None = None, sigma: float = 1.5) -> float:
    """Mean SSIM; without a mask the border of half a window is left out (as scikit-image does)."""
    s = ssim_map(a, b, data_range, sigma)
    if mask is not None:
        return _masked_mean(s, mask)
    pad = int(3.5 * sigma + 0.5)
    inner = tuple(slice(pad, n - pad) if n > 2 * pad else slice(None) for n in s.shape)
    return float(s[inner].mean())


@dataclass(frozen=True)
class Scores:
    ssim: float
    mae: float
    mse: float
    psnr: float


def score(pred: np.ndarray, truth: np.ndarray, data_range: float = 2.0, mask: np.ndarray | None = None) -> Scores:
    """All metrics of ``pred`` against ``truth`` (both in the same units, e.g. window units [-1, 1])."""
    return Scores(
        ssim=ssim(pred, truth, data_range, mask),
        mae=mae(pred, truth, mask),
        mse=mse(pred, truth, mask),
        psnr=psnr(pred, truth, data_range, mask),
    )


@dataclass(frozen=True)
class PairedTest:
    mean_difference: float  # mean of a - b
    t: float
    p: float
    n: int


def paired_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Paired t-test of per-volume scores ``a`` against ``b`` (same volumes, same order)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples need equal 1-D lengths, got {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {len(x)}")
    res = stats.ttest_rel(x, y)
    return PairedTest(float(np.mean(x - y)), float(res.statistic), float(res.pvalue), len(x))
