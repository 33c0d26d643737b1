"""Image quality metrics (SSIM, PSNR, MAE, MSE; 2D and 3D, optionally in a mask), the metrics the CT
field reads (HU errors per tissue, noise, emphysema index, vessel and nodule contrast, a hallucination
volume), paired t-tests with Holm's correction, and the hold-out scoring of a translation against its truth
(demo and training job)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage, stats

from msgan.config import Config
from msgan.preview import save_columns
from msgan.pyramid import window


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


def body_mask(gt_windowed: np.ndarray, threshold: float = -0.8) -> np.ndarray:
    return gt_windowed > threshold


def score_against_truth(
    cfg: Config, image: np.ndarray, ours: np.ndarray, truth: np.ndarray, spacing: Sequence[float], png: Path
) -> tuple[Scores, Scores]:
    """The one hold-out scoring (demo and job): input and ours against the truth, in window units inside the
    body, and a preview PNG of (input, ours, truth) at the volume's aspect ratio."""
    w = {k: window(v, cfg.intensity) for k, v in (("input", image), ("ours", ours), ("truth", truth))}
    mask = body_mask(w["truth"])
    s_in, s_ours = score(w["input"], w["truth"], mask=mask), score(w["ours"], w["truth"], mask=mask)
    save_columns(png, {"input": w["input"], "ours": w["ours"], "truth": w["truth"]}, spacing, (-1.0, 1.0))
    return s_in, s_ours


@dataclass(frozen=True)
class PairScores:
    """A translation against a pair's target, without phantom labels: SSIM and PSNR in the model's window
    (window units), MAE and RMSE in the image's own units (HU for CT), all inside the target's body and the
    pair's valid voxels (``voxels`` of them)."""

    ssim: float
    psnr: float
    mae: float
    rmse: float
    voxels: int


def score_pair(
    cfg: Config,
    image: np.ndarray,
    ours: np.ndarray,
    truth: np.ndarray,
    valid: np.ndarray | None,
    spacing: Sequence[float],
    png: Path,
) -> tuple[PairScores, PairScores]:
    """The input and ours against a pair's target (all three in the same units, on the same grid), inside
    the target's body (:func:`body_mask` of the windowed target) and ``valid``; a preview PNG of (input,
    ours, target). A pair with no scorable voxel scores NaN."""
    w = {k: window(v, cfg.intensity) for k, v in (("input", image), ("ours", ours), ("truth", truth))}
    mask = body_mask(w["truth"])
    if valid is not None:  # outside the valid voxels every image holds the target's value: SSIM's windows
        inside = np.asarray(valid, dtype=bool)  # that reach across the overlap's edge see nothing from there
        mask &= inside
        for k in ("input", "ours"):
            w[k] = np.where(inside, w[k], w["truth"])
    n = int(mask.sum())

    def one(pred: np.ndarray, pred_w: np.ndarray) -> PairScores:
        if n == 0:
            return PairScores(float("nan"), float("nan"), float("nan"), float("nan"), 0)
        err = mse(pred, truth, mask)
        return PairScores(ssim(pred_w, w["truth"], 2.0, mask), psnr(pred_w, w["truth"], 2.0, mask),
                          mae(pred, truth, mask), float(np.sqrt(err)), n)  # fmt: skip

    save_columns(png, {"input": w["input"], "ours": w["ours"], "target": w["truth"]}, spacing, (-1.0, 1.0))
    return one(np.asarray(image, np.float32), w["input"]), one(np.asarray(ours, np.float32), w["ours"])


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


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given; NaN stays NaN and is not counted)."""
    p = np.asarray(pvalues, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(p))
    out = np.full(p.shape, np.nan)
    m = len(valid)
    running = 0.0
    for rank, i in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return [float(v) for v in out]


# ----------------------------------------------------------------------------- the field's CT metrics

HALLUCINATION_HU = 100.0  # |output - noiseless target| above this ...
HALLUCINATION_VOXELS = 10  # ... in a 26-connected region of at least this many voxels counts
EMPHYSEMA_HU = -950.0


def window_units(hu: np.ndarray, low: float = -1024.0, high: float = 1024.0) -> np.ndarray:
    """HU mapped linearly onto [-1, 1], clipped (the project's intensity window)."""
    return np.clip((np.asarray(hu, dtype=np.float64) - low) * (2.0 / (high - low)) - 1.0, -1.0, 1.0)


def body_outline(hu: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """The body with everything it encloses (lungs, airways), for images without labels: voxels above
    ``threshold`` HU, holes filled slice by slice along the first axis, largest component kept."""
    x = np.asarray(hu) > threshold
    filled = np.stack([ndimage.binary_fill_holes(sl) for sl in x]) if x.ndim == 3 else ndimage.binary_fill_holes(x)
    lab, n = ndimage.label(filled)
    if n == 0:
        raise ValueError(f"no voxel above {threshold} HU: no body to measure in")
    sizes = np.bincount(lab.ravel())[1:]
    return np.asarray(lab == 1 + int(np.argmax(sizes)))


def hallucination_ml(
    output: np.ndarray,
    noiseless: np.ndarray,
    spacing: Sequence[float],
    mask: np.ndarray | None = None,
    threshold_hu: float = HALLUCINATION_HU,
    min_voxels: int = HALLUCINATION_VOXELS,
) -> float:
    """Total volume (mL) of the connected regions (26-connectivity in 3D, 8 in 2D) of at least
    ``min_voxels`` voxels where ``output`` differs from the *noiseless* target by more than
    ``threshold_hu`` (inside ``mask`` when given): anatomy invented or lost, not noise."""
    x, y = _pair(output, noiseless)
    if len(spacing) != x.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match the {x.ndim}D images")
    bad = np.abs(x - y) > threshold_hu
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != bad.shape:
            raise ValueError(f"mask of shape {m.shape} does not match image shape {bad.shape}")
        bad &= m
    lab, n = ndimage.label(bad, structure=np.ones((3,) * x.ndim, dtype=bool))
    if n == 0:
        return 0.0
    sizes = np.bincount(lab.ravel())[1:]
    voxels = int(sizes[sizes >= min_voxels].sum())
    return voxels * float(np.prod(spacing)) / 1000.0


def emphysema_index(hu: np.ndarray, lung: np.ndarray, threshold_hu: float = EMPHYSEMA_HU) -> float:
    """Percent of lung voxels below ``threshold_hu`` (the LAA-950 emphysema index)."""
    m = np.asarray(lung, dtype=bool)
    if not m.any():
        raise ValueError("lung mask is empty: no emphysema index")
    return 100.0 * float(np.mean(np.asarray(hu)[m] < threshold_hu))


def contrast_hu(hu: np.ndarray, inside: np.ndarray, around: np.ndarray) -> float:
    """Mean HU inside a structure minus the mean of its surroundings; NaN when either is empty."""
    a, b = np.asarray(inside, bool), np.asarray(around, bool)
    if not a.any() or not b.any():
        return float("nan")
    x = np.asarray(hu, dtype=np.float64)
    return float(x[a].mean() - x[b].mean())


def _shell(structure: np.ndarray, within: np.ndarray, width: int = 2) -> np.ndarray:
    return ndimage.binary_dilation(structure, iterations=width) & ~structure & within


def _eroded(m: np.ndarray, most: int = 2) -> np.ndarray:
    """``m`` eroded by up to ``most`` voxels, less where that would leave nothing (tiny volumes)."""
    for k in range(most, 0, -1):
        e = ndimage.binary_erosion(m, iterations=k)
        if e.sum() >= 8:
            return np.asarray(e)
    return m


def tissue_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """``body`` (inside the body outline, lungs and airways included) and one mask per tissue class of
    :data:`msgan.data.phantom.TISSUES` (lung, soft, bone, blood) from a phantom's labels."""
    from msgan.data.phantom import TISSUES, Label

    lab = np.asarray(labels)
    masks = {"body": lab != Label.OUTSIDE}
    masks.update({name: np.isin(lab, codes) for name, codes in TISSUES.items()})
    return masks


def ct_metrics(
    output: np.ndarray,
    target: np.ndarray,
    noiseless: np.ndarray,
    labels: np.ndarray,
    spacing: Sequence[float],
    window: tuple[float, float] = (-1024.0, 1024.0),
) -> dict[str, float]:
    """Every metric of one translated volume (HU) against its target, all inside the body outline.

    ``ssim``, ``psnr``: window units [-1, 1], data range 2. ``mae_hu``, ``rmse_hu`` (+ ``_<tissue>``
    for lung, soft, bone, blood). ``noise_hu`` / ``noise_target_hu``: standard deviation in
    homogeneous soft tissue (the body wall and mediastinum, 2 voxels from any border).
    ``emphysema_index`` (% lung < -950 HU), ``emphysema_error`` (output minus target).
    ``vessel_contrast_error`` / ``nodule_contrast_error``: contrast against a 2-voxel shell of lung,
    output minus noiseless target (HU). ``hallucination_ml``: see :func:`hallucination_ml`.
    """
    from msgan.data.phantom import Label

    out, tgt = _pair(output, target)
    clean = np.asarray(noiseless, dtype=np.float64)
    lab = np.asarray(labels)
    if clean.shape != out.shape or lab.shape != out.shape:
        raise ValueError(f"noiseless {clean.shape} / labels {lab.shape} do not match the output {out.shape}")
    masks = tissue_masks(lab)
    body = masks["body"]
    w_out, w_tgt = window_units(out, *window), window_units(tgt, *window)
    r: dict[str, float] = {
        "ssim": ssim(w_out, w_tgt, 2.0, body),
        "psnr": psnr(w_out, w_tgt, 2.0, body),
        "mae_hu": mae(out, tgt, body),
        "rmse_hu": float(np.sqrt(mse(out, tgt, body))),
    }
    for name in ("lung", "soft", "bone", "blood"):
        m = masks[name]
        r[f"mae_hu_{name}"] = mae(out, tgt, m) if m.any() else float("nan")
        r[f"rmse_hu_{name}"] = float(np.sqrt(mse(out, tgt, m))) if m.any() else float("nan")
    flat = _eroded(lab == Label.SOFT)
    r["noise_hu"] = float(out[flat].std())
    r["noise_target_hu"] = float(tgt[flat].std())
    r["noise_error_hu"] = r["noise_hu"] - r["noise_target_hu"]
    lung = masks["lung"]
    if lung.any():
        r["emphysema_index"] = emphysema_index(out, lung)
        r["emphysema_index_target"] = emphysema_index(tgt, lung)
        r["emphysema_error"] = r["emphysema_index"] - r["emphysema_index_target"]
    parenchyma = lab == Label.LUNG
    for name, code in (("vessel", Label.LUNG_VESSEL), ("nodule", Label.NODULE)):
        inside = lab == code
        around = _shell(inside, parenchyma)
        r[f"{name}_contrast_error"] = contrast_hu(out, inside, around) - contrast_hu(clean, inside, around)
    r["hallucination_ml"] = hallucination_ml(out, clean, spacing, body)
    return r
