"""A target -> source degradation fitted from two unpaired sets of images (issue 22: training without pairs).

Training without pairs synthesises the source image a target-domain patch would have had: the forward model
``D`` maps a target image to the source domain, ``source = H * target + n``, with ``H`` a radially symmetric
transfer function (a reconstruction-kernel change is one) and ``n`` coloured noise: the part of the source's
noise power spectrum (NPS) that the filtered target noise does not explain (a lower dose is one). Nothing in
it is per task; it is fitted from a set of source images and a set of target images of different subjects.

Mean power spectra alone cannot tell signal from noise (a sharp kernel's noise and its edges both live at high
frequency), so each set's NPS is estimated separately from the images themselves, from the spectra of
mean-removed patches in homogeneous regions (the standard CT NPS measurement, made on anatomy instead of a
water phantom). Per radial band of ``|f|`` (cycles/voxel):

- ``S = P - NPS``: signal power (mean power spectrum less noise), clipped at a small floor;
- ``|H| = sqrt(S_src / S_tgt)``, held from the neighbouring bands where either set's signal is not measurable
  (signal below :data:`MIN_SIGNAL_FRACTION` of its power), so a band of pure noise cannot blow the gain up;
- ``noise = max(NPS_src - |H|^2 NPS_tgt, 0)``: the noise to add.

A linear forward model cannot remove noise: where the filtered target noise already exceeds the source's
(a sharp target degraded towards a soft source), the synthesized source is noisier than a real one.

All images are in window units (the intensity window mapped onto [-1, 1]) on one pyramid scale's grid; spectra
are binned on ``|f|`` in cycles/voxel, so images of different shapes pool. Numpy/scipy only (no torch): the
trainer's data loaders and the ``linear`` baseline call it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

MIN_SIGNAL_FRACTION = 0.1  # a band's signal is measurable when S >= this fraction of its total power P
SIGNAL_FLOOR = 1e-12  # S is clipped at this (window units squared): never a zero or negative signal power
MARGIN_CAP = 16  # voxels: the most context per side :meth:`ForwardModel.margin` asks for
TAIL = 1e-3  # the margin covers the impulse response down to this fraction of its peak
MIN_PATCHES = 8  # noise_power refuses an image with fewer homogeneous patches than this


# ----------------------------------------------------------------------------- spectra on |f|


def band_edges(dims: int, bands: int) -> np.ndarray:
    """``bands`` equal bands of ``|f|`` from 0 to just beyond the corner frequency ``sqrt(dims) / 2``."""
    return np.linspace(0.0, math.sqrt(dims) / 2 + 1e-6, bands + 1)


def _radial(shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``|f|`` (cycles/voxel) on the ``rfftn`` grid of ``shape``, and each coefficient's weight in a sum over
    the full spectrum (2 for the half-spectrum columns that stand for a conjugate pair)."""
    axes = [sfft.fftfreq(n) for n in shape[:-1]] + [sfft.rfftfreq(shape[-1])]
    f2 = sum(np.meshgrid(*[a**2 for a in axes], indexing="ij", sparse=True))
    w = np.full(len(axes[-1]), 2.0)
    w[0] = 1.0
    if shape[-1] % 2 == 0:
        w[-1] = 1.0
    return np.sqrt(np.asarray(f2, dtype=np.float64)), np.broadcast_to(w, np.shape(f2))


def _band(f: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.clip(np.searchsorted(edges, f, side="right") - 1, 0, len(edges) - 2)


def _centres(edges: np.ndarray) -> np.ndarray:
    return (edges[:-1] + edges[1:]) / 2


def _response(f: np.ndarray, edges: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per-band ``values`` at frequencies ``f``: linear between band centres, held beyond the end ones
    (smoother than steps, so the filter's impulse response is shorter)."""
    e = np.asarray(edges, dtype=np.float64)
    return np.interp(f, _centres(e), np.asarray(values, dtype=np.float64))


def _fill(values: np.ndarray, known: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """``values`` where ``known``; elsewhere linear between the nearest known bands, held beyond the ends."""
    if not known.any():
        raise ValueError("no band holds a measurement")
    return np.interp(centres, centres[known], values[known])


def _binned_power(
    spectra: np.ndarray, f: np.ndarray, w: np.ndarray, edges: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of ``w * spectra`` and of ``w`` per band (``spectra`` may carry a leading batch axis)."""
    band = np.broadcast_to(_band(f, edges), spectra.shape).ravel()
    ww = np.broadcast_to(w, spectra.shape).ravel()
    n = len(edges) - 1
    return np.bincount(band, ww * spectra.ravel(), n), np.bincount(band, ww, n)


def _taper(shape: Sequence[int], width: int) -> np.ndarray:
    """A separable cosine (Tukey) taper falling to 0 over ``width`` voxels at each border: full-image spectra
    without the wrap-around edge of a non-periodic image."""
    out = np.ones((), dtype=np.float64)
    for n in shape:
        k = min(width, n // 4)
        w = np.ones(n)
        if k > 0:
            ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 0.5) / k)
            w[:k], w[n - k :] = ramp, ramp[::-1]
        out = np.multiply.outer(out, w)
    return out


def _check_images(images: Sequence[np.ndarray], what: str, dims: int | None = None) -> list[np.ndarray]:
    """Float64 copies of ``images``; refuses an empty set, mixed dimensions, too small or non-finite images."""
    if isinstance(images, np.ndarray):
        raise ValueError(f"{what}s: give a sequence of images, not one array")
    out = []
    for i, im in enumerate(images):
        x = np.asarray(im, dtype=np.float64)
        if x.ndim not in (2, 3):
            raise ValueError(f"{what} {i}: shape {x.shape} must be 2D or 3D")
        if dims is None:
            dims = x.ndim
        if x.ndim != dims:
            raise ValueError(f"{what} {i} is {x.ndim}D, the images are {dims}D: all must have one dimensionality")
        if min(x.shape) < 4:
            raise ValueError(f"{what} {i}: shape {x.shape} is too small (at least 4 voxels per axis)")
        if not np.all(np.isfinite(x)):
            bad = int(x.size - np.count_nonzero(np.isfinite(x)))
            raise ValueError(f"{what} {i} holds {bad} NaN or infinite voxels")
        out.append(x)
    if not out:
        raise ValueError(f"no {what} images: the set is empty")
    return out


def _check_masks(masks: Sequence[np.ndarray | None] | None, images: Sequence[np.ndarray], what: str) -> list[Any]:
    if masks is None:
        return [None] * len(images)
    if len(masks) != len(images):
        raise ValueError(f"{len(masks)} {what} masks for {len(images)} {what} images")
    for i, (m, im) in enumerate(zip(masks, images, strict=True)):
        if m is not None and np.shape(m) != im.shape:
            raise ValueError(f"{what} mask {i}: shape {np.shape(m)} differs from its image's {im.shape}")
    return list(masks)


def _image_power(x: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per band: sum of the tapered, mean-removed image's power (``|F|^2 / sum(taper^2)``, so white noise of
    variance s2 gives s2 in every band) and the number of coefficients."""
    t = _taper(x.shape, max(2, min(x.shape) // 8))
    y = (x - np.average(x, weights=t)) * t
    f, w = _radial(x.shape)
    w = np.array(w)
    w[(0,) * x.ndim] = 0.0  # the mean was removed: the DC coefficient holds nothing
    spec = np.abs(sfft.rfftn(y)) ** 2 / float(np.sum(t**2))
    return _binned_power(spec, f, w, edges)


def _powers(xs: Sequence[np.ndarray], edges: np.ndarray) -> np.ndarray:
    """Per image (rows) and band: the mean power (NaN where the image has no frequency in the band)."""
    out = np.full((len(xs), len(edges) - 1), np.nan)
    for i, x in enumerate(xs):
        s, n = _image_power(x, edges)
        out[i, n > 0] = s[n > 0] / n[n > 0]
    return out


def _set_mean(powers: np.ndarray, edges: np.ndarray) -> np.ndarray:
    seen = np.isfinite(powers).any(axis=0)
    mean = np.zeros(powers.shape[1])
    mean[seen] = np.nanmean(powers[:, seen], axis=0)
    return _fill(mean, seen, _centres(edges))


def mean_power(
    images: Sequence[np.ndarray], bands: int = 64, masks: Sequence[np.ndarray | None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(edges, P)``: the set's mean power spectrum per band of ``|f|``, each image weighted equally.

    Each image is mean-removed and tapered at its borders (a cosine over an eighth of its size) so the
    wrap-around edge adds no power; the normalisation makes white noise of variance ``s2`` give ``P == s2``.
    ``masks`` are checked but not used: the full spectrum needs the whole grid."""
    xs = _check_images(images, "image")
    _check_masks(masks, xs, "image")
    edges = band_edges(xs[0].ndim, bands)
    return edges, _set_mean(_powers(xs, edges), edges)


# ----------------------------------------------------------------------------- noise from the images alone


def default_patch(shape: Sequence[int]) -> int:
    """The noise patch for an image of ``shape``: a tenth of its smallest side, 4 to 8 voxels in 3D (6 to 16
    in 2D). A whole volume's anatomy spans a fixed share of its grid on every pyramid scale, so a patch that
    is a fixed share of the grid finds as many homogeneous places on a coarse scale as on a fine one (on a 40^3
    thorax an 8^3 patch nearly always holds an edge; on 64^3 and finer it resolves the NPS better)."""
    lo, hi = (4, 8) if len(shape) == 3 else (6, 16)
    return int(np.clip(min(shape) // 10, lo, hi))


KEEP_FRACTION = 0.3  # noise_power keeps this share of the body's patches, the flattest (at least MIN_PATCHES)


def _body_patches(image: np.ndarray, mask: np.ndarray | None, patch: int) -> list[tuple[slice, ...]]:
    """Patches on a grid at half-patch steps that lie wholly inside the body: in ``mask``, or (no mask) above
    the Otsu threshold of the smoothed image, which in CT separates air and lung from soft tissue and bone."""
    import itertools

    from skimage.filters import threshold_otsu

    if mask is not None:
        inside = np.asarray(mask, dtype=bool)
    else:
        smooth = ndimage.gaussian_filter(image, patch / 4.0, mode="nearest")
        inside = smooth > threshold_otsu(smooth) if np.ptp(smooth) > 0 else np.ones(image.shape, bool)
    starts = [range(0, n - patch + 1, max(1, patch // 2)) for n in image.shape]
    out = []
    for start in itertools.product(*starts):
        sl = tuple(slice(a, a + patch) for a in start)
        if inside[sl].all():
            out.append(sl)
    return out


class TooFewPatchesError(ValueError):
    """An image too small (or too busy) for enough patches inside the body to estimate its noise."""


def noise_power(
    image: np.ndarray, mask: np.ndarray | None = None, patch: int | None = None, bands: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """``(edges, NPS)``: the noise power spectrum of one image per band of ``|f|``, from its flattest patches.

    The mean-removed patches inside the body (``mask``, or above the Otsu threshold) give periodograms
    (normalised as :func:`mean_power`'s). Anatomy only adds power to a patch, in every band (edges are
    broadband), so the flattest patches are those with the least power relative to the typical patch, each
    coefficient counted in units of its median over the patches. Ranking patches by their own noise would
    bias the estimate low, so the frequency grid is split in two (the parity of the index sum; a conjugate
    pair stays together): patches ranked on one half estimate the other half's NPS; Gaussian noise in the
    two halves is independent. Per band, the median over the kept patches (:data:`KEEP_FRACTION`), divided by
    the chi-square median's bias ``chi2.ppf(0.5, nu) / nu``, tolerates some structure among them. Bands no
    patch frequency falls in are interpolated.

    ``patch`` (default :func:`default_patch`) sets the resolution, ``1 / patch`` cycles/voxel; removing each
    patch's mean loses the noise below that (small for CT noise, whose NPS falls to 0 at ``f = 0``).
    Raises ValueError when fewer than :data:`MIN_PATCHES` patches lie inside the body."""
    from scipy.stats import chi2

    (x,) = _check_images([image], "image")
    if mask is not None and np.shape(mask) != x.shape:
        raise ValueError(f"mask shape {np.shape(mask)} differs from the image's {x.shape}")
    p = default_patch(x.shape) if patch is None else int(patch)
    if p < 4:
        raise ValueError(f"noise patch {p} must be at least 4 voxels")
    if min(x.shape) < p:
        raise TooFewPatchesError(f"image shape {x.shape} is smaller than the noise patch {p}")
    chosen = _body_patches(x, mask, p)
    if len(chosen) < MIN_PATCHES:
        raise TooFewPatchesError(
            f"only {len(chosen)} {p}-voxel patches lie wholly inside the body of the {x.shape} image; at least"
            f" {MIN_PATCHES} are needed to estimate the noise: give a larger image, a larger mask or a smaller patch"
        )
    stack = np.stack([x[sl] for sl in chosen])
    axes = tuple(range(1, stack.ndim))
    stack -= stack.mean(axis=axes, keepdims=True)
    spectra = (np.abs(sfft.rfftn(stack, axes=axes)) ** 2 / float(p**x.ndim)).reshape(len(chosen), -1)
    edges = band_edges(x.ndim, bands)
    f, w = _radial((p,) * x.ndim)
    idx = [np.rint(sfft.fftfreq(p) * p)] * (x.ndim - 1) + [np.rint(sfft.rfftfreq(p) * p)]
    parity = (np.sum(np.meshgrid(*idx, indexing="ij"), axis=0) % 2).astype(bool).ravel()
    w = np.array(w).ravel()
    w[0] = 0.0  # the mean was removed: the DC coefficient is no measurement
    band = _band(f, edges).ravel()
    typical = np.median(spectra, axis=0) + 1e-30
    keep = max(MIN_PATCHES, round(KEEP_FRACTION * len(chosen)))
    total, nu_all = np.zeros(bands), np.zeros(bands)
    for half in (parity, ~parity):
        wh = np.where(half, w, 0.0)  # the coefficients estimated here
        wr = np.where(~half, w, 0.0)  # the ones the patches are ranked on
        score = (spectra / typical) @ wr / max(float(wr.sum()), 1e-12)
        flat = spectra[np.argsort(score, kind="stable")[:keep]] * wh
        nu = np.bincount(band, wh, bands)
        seen = nu > 0
        per_patch = np.stack([np.bincount(band, row, bands) for row in flat])[:, seen] / nu[seen]
        total[seen] += nu[seen] * np.median(per_patch, axis=0) / (chi2.ppf(0.5, nu[seen]) / nu[seen])
        nu_all += nu
    seen = nu_all > 0
    nps = np.zeros(bands)
    nps[seen] = total[seen] / nu_all[seen]
    return edges, _fill(nps, seen, _centres(edges))


def noise_sigma(image: np.ndarray, mask: np.ndarray | None = None) -> float:
    """The noise standard deviation of ``image`` estimated from the image alone (its NPS, summed over the
    whole spectrum): what the ``nlm_tuned`` baseline sets NLM's ``h`` from. Unlike a wavelet estimate it
    also sees low-frequency (soft-kernel) noise."""
    edges, nps = noise_power(image, mask)
    return float(np.sqrt(_variance(edges, nps, np.asarray(image).ndim)))


def _variance(edges: np.ndarray, power: np.ndarray, dims: int, shape: int = 32) -> float:
    """The variance a field of the per-band power spectrum ``power`` has: its mean over the frequency cube."""
    f, w = _radial((shape,) * dims)
    return float(np.sum(w * _response(f, edges, power)) / np.sum(w))


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ForwardModel:
    """``source = H * target + noise``: a radially symmetric filter and coloured noise, in window units on one
    pyramid scale's grid. ``gain`` and ``noise`` are per band of ``|f|`` (``edges``, cycles/voxel),
    interpolated linearly between band centres; ``noise`` is a power spectrum normalised so that white noise
    of variance ``s2`` per voxel is ``noise == (s2,) * bands``. Each :meth:`degrade` call scales the noise's
    amplitude by one of ``noise_scales`` (one per source image of the fit, mean square 1), so synthesized
    sources span the source domain's noise levels (a site scanning at several doses)."""

    dims: int
    edges: tuple[float, ...]
    gain: tuple[float, ...]
    noise: tuple[float, ...]
    noise_scales: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        _validate(self.dims, self.edges, self.gain, self.noise, self.noise_scales)

    def margin(self) -> int:
        """Voxels of context per side a region needs so that :meth:`degrade` beyond them matches filtering
        the whole volume: the Chebyshev radius outside which the filter's impulse response stays below
        :data:`TAIL` of its peak, at most :data:`MARGIN_CAP` (computed once per model: a training step asks
        for it per patch)."""
        return self._margin

    @functools.cached_property
    def _margin(self) -> int:
        n = 4 * MARGIN_CAP + 8
        f, _ = _radial((n,) * self.dims)
        h = sfft.irfftn(_response(f, self.edges, self.gain), s=(n,) * self.dims)
        h = np.abs(np.fft.fftshift(h))
        peak = float(h.max())
        if peak <= 0:
            return 0
        idx = np.indices(h.shape) - n // 2
        radius = np.max(np.abs(idx), axis=0)
        big = radius[h > TAIL * peak]
        return int(min(MARGIN_CAP, int(big.max()) if big.size else 0))

    def degrade(self, region: np.ndarray, rng: np.random.Generator, noise: bool = True) -> np.ndarray:
        """The synthesized source of a target ``region`` (same shape, float32, not clipped): filtered by ``H``
        (FFT on the region reflect-padded by :meth:`margin`, so its borders behave as inside a volume), plus
        coloured noise of power spectrum ``noise * scale**2`` with ``scale`` drawn from ``noise_scales``.
        The caller reads the region with that margin and crops it from the result."""
        x = np.asarray(region, dtype=np.float32)
        if x.ndim != self.dims:
            raise ValueError(f"region of shape {x.shape}: the forward model is {self.dims}D")
        if not np.all(np.isfinite(x)):
            raise ValueError("region holds NaN or infinite voxels")
        m = self.margin()
        padded = np.pad(x, m, mode="symmetric") if m else x
        gain, amp = self._spectra(padded.shape)
        spec = sfft.rfftn(padded) * gain  # single precision: a training step synthesizes four patches
        if noise and amp is not None:
            # the noise is drawn on the padded grid and cropped with the signal: one inverse transform for both,
            # and a crop of a stationary field is stationary with the same spectrum
            scale = np.float32(self.noise_scales[int(rng.integers(len(self.noise_scales)))])
            spec += sfft.rfftn(rng.standard_normal(padded.shape, dtype=np.float32)) * (scale * amp)
        y = sfft.irfftn(spec, s=padded.shape)
        if m:
            y = y[(slice(m, -m),) * self.dims]
        return np.ascontiguousarray(y, dtype=np.float32)

    def _spectra(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
        """The filter's gain and the noise's amplitude on the ``rfftn`` grid of ``shape`` (float32), kept per
        shape: training asks for the same few patch shapes thousands of times."""
        cache: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray | None]] = self._spectra_cache
        if shape not in cache:
            f, _ = _radial(shape)
            gain = _response(f, self.edges, self.gain).astype(np.float32)
            amp = None
            if any(v > 0 for v in self.noise):
                amp = np.sqrt(np.maximum(_response(f, self.edges, self.noise), 0.0)).astype(np.float32)
            if len(cache) >= 16:
                cache.clear()
            cache[shape] = (gain, amp)
        return cache[shape]

    @functools.cached_property
    def _spectra_cache(self) -> dict[tuple[int, ...], tuple[np.ndarray, np.ndarray | None]]:
        return {}

    def filter_only(self) -> ForwardModel:
        """The same filter without noise (tests and diagnostics)."""
        return replace(self, noise=(0.0,) * len(self.noise), noise_scales=(1.0,))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; :meth:`from_dict` reads it back."""
        return {
            "dims": int(self.dims),
            "edges": [float(v) for v in self.edges],
            "gain": [float(v) for v in self.gain],
            "noise": [float(v) for v in self.noise],
            "noise_scales": [float(v) for v in self.noise_scales],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ForwardModel:
        """The model :meth:`to_dict` wrote; ValueError on a missing key, wrong lengths, non-finite or negative
        values."""
        if not isinstance(d, dict):
            raise ValueError(f"forward model: expected a mapping, got {type(d).__name__}")
        missing = [k for k in ("dims", "edges", "gain", "noise") if k not in d]
        if missing:
            raise ValueError(f"forward model: missing {missing}")
        try:
            return cls(
                dims=int(d["dims"]),
                edges=tuple(float(v) for v in d["edges"]),
                gain=tuple(float(v) for v in d["gain"]),
                noise=tuple(float(v) for v in d["noise"]),
                noise_scales=tuple(float(v) for v in d.get("noise_scales", (1.0,))),
            )
        except TypeError as e:
            raise ValueError(f"forward model: {e}") from e

    def summary(self) -> dict[str, float]:
        """A few numbers for logs: ``|H|`` at 0.1, 0.25 and 0.4 cycles/voxel and the added noise's std."""
        g = _response(np.array([0.1, 0.25, 0.4]), self.edges, self.gain)
        e = np.asarray(self.edges)
        return {
            "gain_0.1": float(g[0]),
            "gain_0.25": float(g[1]),
            "gain_0.4": float(g[2]),
            "noise_std": float(np.sqrt(_variance(e, np.asarray(self.noise), self.dims))),
            "noise_scale_min": float(min(self.noise_scales)),
            "noise_scale_max": float(max(self.noise_scales)),
        }


def _validate(
    dims: int, edges: Sequence[float], gain: Sequence[float], noise: Sequence[float], scales: Sequence[float]
) -> None:
    if dims not in (2, 3):
        raise ValueError(f"forward model: dims {dims} must be 2 or 3")
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or len(e) < 2:
        raise ValueError(f"forward model: {len(e)} band edges; at least 2 are needed")
    for name, v in (("edges", e), ("gain", gain), ("noise", noise), ("noise_scales", scales)):
        a = np.asarray(v, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"forward model: {name} holds NaN or infinite values")
        if np.any(a < 0):
            raise ValueError(f"forward model: {name} holds negative values")
    if np.any(np.diff(e) <= 0):
        raise ValueError("forward model: band edges must ascend strictly")
    if e[0] != 0.0 or e[-1] < math.sqrt(dims) / 2:
        raise ValueError(f"forward model: band edges must run from 0 to at least {math.sqrt(dims) / 2:.4f}")
    bands = len(e) - 1
    if len(gain) != bands or len(noise) != bands:
        raise ValueError(f"forward model: {bands} bands but {len(gain)} gains and {len(noise)} noise powers")
    if len(scales) < 1:
        raise ValueError("forward model: noise_scales is empty")


# ----------------------------------------------------------------------------- fitting


def fit(
    sources: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    bands: int = 64,
    source_masks: Sequence[np.ndarray | None] | None = None,
    target_masks: Sequence[np.ndarray | None] | None = None,
) -> ForwardModel:
    """Fit ``source = H * target + noise`` from a set of source images and a set of target images (no pairs;
    any shapes, one dimensionality). Masks (optional, boolean, per image) say where noise patches may lie.
    See the module's docstring for the model and :func:`_gain` for how ``|H|`` is made robust."""
    src = _check_images(sources, "source")
    tgt = _check_images(targets, "target", dims=src[0].ndim)
    smasks, tmasks = _check_masks(source_masks, src, "source"), _check_masks(target_masks, tgt, "target")
    dims = src[0].ndim
    edges = band_edges(dims, bands)
    ps, pt = _powers(src, edges), _powers(tgt, edges)
    try:
        nps_each = np.stack(
            [_nps(x, m, bands, f"source {i}") for i, (x, m) in enumerate(zip(src, smasks, strict=True))]
        )
        nps_tgt_each = np.stack(
            [_nps(x, m, bands, f"target {i}") for i, (x, m) in enumerate(zip(tgt, tmasks, strict=True))]
        )
    except TooFewPatchesError:
        # A grid too small for noise patches (a cascade's coarsest scales: 8^3-32^3 voxels, where block means
        # have averaged most noise away): every power is the signal's, the filter alone, no added noise.
        return _filter_model(ps, pt, edges, dims)
    nps_src, nps_tgt = nps_each.mean(axis=0), nps_tgt_each.mean(axis=0)
    gain = _gain(ps - nps_each, _set_mean(ps, edges), pt - nps_tgt_each, _set_mean(pt, edges), edges)
    # The filtered target noise |H|^2 NPS_tgt, measured on the filtered targets by the same estimator as
    # NPS_src, so the estimator's leakage cancels: a soft target's NPS at high frequency is tiny and its
    # estimate is mostly leakage, which |H|^2 (up to hundreds for soft -> sharp) would blow up.
    zeros = (0.0,) * bands
    filt = ForwardModel(dims, tuple(edges.tolist()), tuple(gain.tolist()), zeros)
    rng = np.random.default_rng(0)  # unused: no noise
    nps_ht = np.mean(
        [_nps(filt.degrade(x, rng, noise=False), m, bands, f"filtered target {i}")
         for i, (x, m) in enumerate(zip(tgt, tmasks, strict=True))], axis=0,
    )  # fmt: skip
    nps_ht = np.minimum(nps_ht, gain**2 * nps_tgt)  # neither estimate of the filtered noise can be too low
    added = [np.maximum(n - nps_ht, 0.0) for n in nps_each]
    noise = np.maximum(nps_src - nps_ht, 0.0)
    scales = _noise_scales(added, noise, edges, dims, _variance(edges, nps_src, dims))
    return ForwardModel(dims, tuple(edges.tolist()), tuple(gain.tolist()), tuple(noise.tolist()), scales)


def fit_filter(sources: Sequence[np.ndarray], targets: Sequence[np.ndarray], bands: int = 64) -> ForwardModel:
    """The filter alone (no noise), fitted from the sets' total mean power spectra: what :func:`fit` gives on a
    grid too small for noise patches, and the gain of a cascade's coarser scales (:func:`coarser`)."""
    src = _check_images(sources, "source")
    tgt = _check_images(targets, "target", dims=src[0].ndim)
    edges = band_edges(src[0].ndim, bands)
    return _filter_model(_powers(src, edges), _powers(tgt, edges), edges, src[0].ndim)


def _filter_model(ps: np.ndarray, pt: np.ndarray, edges: np.ndarray, dims: int) -> ForwardModel:
    """The noise-free model of the per-image power spectra ``ps`` (sources) and ``pt`` (targets)."""
    gain = _gain(ps, _set_mean(ps, edges), pt, _set_mean(pt, edges), edges)
    bands = len(edges) - 1
    return ForwardModel(dims, tuple(edges.tolist()), tuple(gain.tolist()), (0.0,) * bands, (1.0,))


COARSE_GRID = 16  # voxels per side of the coarse noise fields :func:`downsampled_noise` measures


def downsampled_noise(model: ForwardModel, levels: int, draws: int = 4, seed: int = 0) -> np.ndarray:
    """The power spectrum (per band of ``model.edges``) of ``model``'s added noise after ``levels`` x2 block-mean
    downsamplings (:func:`msgan.pyramid.downsample2`): the noise a coarser pyramid scale of the same source sees.
    Measured on periodic noise fields (FFT-made, so no taper is needed) of ``COARSE_GRID * 2**levels`` voxels per
    side, ``draws`` of them averaged; each draw at the set's mean noise level (scale 1)."""
    from msgan.pyramid import downsample2

    if levels < 0:
        raise ValueError(f"levels {levels} must be >= 0")
    edges = np.asarray(model.edges)
    if not any(v > 0 for v in model.noise):
        return np.zeros(len(edges) - 1)
    unit = replace(model, gain=(1.0,) * len(model.gain), noise_scales=(1.0,))
    fine = (COARSE_GRID * 2**levels,) * model.dims
    rng = np.random.default_rng(seed)
    f, w = _radial((COARSE_GRID,) * model.dims)
    w = np.array(w)
    w[(0,) * model.dims] = 0.0
    total = np.zeros(len(edges) - 1)
    count = np.zeros(len(edges) - 1)
    for _ in range(draws):
        x = unit.degrade(np.zeros(fine, np.float32), rng)
        for _ in range(levels):
            x = downsample2(x)
        x = x - x.mean()
        spec = np.abs(sfft.rfftn(x.astype(np.float64))) ** 2 / float(x.size)
        s, n = _binned_power(spec, f, w, edges)
        total += s
        count += n
    seen = count > 0
    power = np.zeros(len(edges) - 1)
    power[seen] = total[seen] / count[seen]
    return _fill(power, seen, _centres(edges))


def coarser(
    finest: ForwardModel, levels: int, sources: Sequence[np.ndarray], targets: Sequence[np.ndarray]
) -> ForwardModel:
    """The forward model of a scale ``levels`` x2 downsamplings coarser than the one ``finest`` was fitted on:
    its filter fitted on that scale's images (:func:`fit_filter`: there the signal dominates every band), its
    noise ``finest``'s downsampled (:func:`downsampled_noise`), with ``finest``'s per-image noise scales.

    Noise is measured where it is measurable: on a coarse grid (8^3-64^3 voxels of a cascade's first scales)
    block means have averaged it nearly away and the flattest patches still hold anatomy, so a patch estimate
    there reads anatomy as noise (on a 16^3 contrast scale it read 56 HU where the true noise is under 3)."""
    filt = fit_filter(sources, targets, bands=len(finest.edges) - 1)
    if filt.edges != finest.edges:
        raise ValueError("the coarse and the finest forward models have other band edges")
    noise = downsampled_noise(finest, levels)
    return replace(filt, noise=tuple(float(v) for v in noise), noise_scales=finest.noise_scales)


def _nps(x: np.ndarray, mask: np.ndarray | None, bands: int, what: str) -> np.ndarray:
    try:
        return noise_power(x, mask, bands=bands)[1]
    except ValueError as e:
        raise (TooFewPatchesError if isinstance(e, TooFewPatchesError) else ValueError)(f"{what}: {e}") from e


GAIN_DEGREE = 4  # log|H| is a polynomial in f^2 of this degree (no constant term: |H(0)| = 1)


def _gain(s_src: np.ndarray, p_src: np.ndarray, s_tgt: np.ndarray, p_tgt: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``|H| = sqrt(S_src / S_tgt)`` from per-image signal powers ``s_*`` (images x bands; NaN where an image
    has no frequency) and the sets' total mean powers ``p_*``, made robust to what differs between subjects.

    The raw per-band ratio of two small sets' mean spectra wanders by 10-30 % (one set's subjects hold more
    anatomy, or more of it at some scale), and at low frequencies, where the signal power is largest, such a
    wander costs more than any kernel difference. So ``log|H|`` is fitted as a smooth even function, a
    polynomial in ``f^2`` of degree :data:`GAIN_DEGREE` with a free constant that is then dropped
    (``|H(0)| = 1``: a kernel or a dose keeps the mean, and the sets' overall power ratio says how much anatomy
    each set's subjects hold, not what the scanner does), weighted per band by the inverse variance of the log
    ratio, estimated from the spread between images of each set. Bands where either set's signal is not
    measurable (below :data:`MIN_SIGNAL_FRACTION` of its power) are left out of the fit; beyond the highest
    measurable band the gain is held."""
    centres = _centres(edges)
    ss_mean, st_mean = _set_mean(s_src, edges), _set_mean(s_tgt, edges)
    known = (
        (st_mean >= MIN_SIGNAL_FRACTION * p_tgt)
        & (ss_mean >= MIN_SIGNAL_FRACTION * p_src)
        & np.isfinite(s_src).any(axis=0)
        & np.isfinite(s_tgt).any(axis=0)
        & (centres > 0)
    )
    ss, st = np.maximum(ss_mean, SIGNAL_FLOOR), np.maximum(st_mean, SIGNAL_FLOOR)
    if known.sum() <= GAIN_DEGREE + 1:  # too few measurable bands for a curve: the held ratio is all there is
        return _fill(np.sqrt(ss / st), known if known.any() else np.ones_like(known), centres)

    def rel_var(s: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """The relative variance of a set's mean signal power per band, from the spread between its images."""
        n = np.sum(np.isfinite(s), axis=0)
        v = np.zeros(s.shape[1])
        many = n > 1
        v[many] = np.nanvar(s[:, many], axis=0, ddof=1)
        return v / np.maximum(n, 1) / mean**2

    var = 0.25 * (rel_var(s_src, ss) + rel_var(s_tgt, st)) + 1e-4  # of log|H| = 0.5 log(S_src / S_tgt)
    y = 0.5 * np.log(ss / st)
    top = float(centres[known].max())
    u = centres / top
    design = np.stack([u ** (2 * j) for j in range(GAIN_DEGREE + 1)], axis=1)  # the constant, u^2, u^4, ...
    sw = 1.0 / np.sqrt(var[known])
    coef = np.linalg.lstsq(design[known] * sw[:, None], y[known] * sw, rcond=None)[0]
    log_gain = design[:, 1:] @ coef[1:]
    log_gain[u > 1] = float(np.ones(GAIN_DEGREE) @ coef[1:])  # held beyond the highest measurable band
    return np.exp(np.clip(log_gain, -30.0, 30.0))


def _noise_scales(
    added: list[np.ndarray], noise: np.ndarray, edges: np.ndarray, dims: int, source: float
) -> tuple[float, ...]:
    """Per source image: the amplitude of the noise it adds relative to ``noise`` (mean square 1; its noise std
    relative to the set's when the target's noise is small). Regularised towards 1 by a tenth of the sources'
    mean noise variance ``source``, so a set that adds almost no noise (the ratios of tiny numbers) gets
    scales near 1."""
    eps = 0.1 * source
    total = _variance(edges, noise, dims) + eps
    if total <= 0:
        return (1.0,)
    return tuple(float(np.sqrt((_variance(edges, a, dims) + eps) / total)) for a in added)


def spectral_ratio_gain(
    sources: Sequence[np.ndarray], targets: Sequence[np.ndarray], bands: int = 64, smooth: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``(edges, gain)`` with ``gain = sqrt(P_target / P_source)`` of the sets' total mean power spectra: the
    source -> target ``linear`` baseline without pairs (a radially symmetric filter from the ratio of the mean
    power spectra of the source and target sets). Noise counts as signal here, as in the issue's baseline.

    ``smooth`` (default) fits the ratio as :func:`_gain` fits the forward model's (a smooth even curve in
    ``log``, weighted by how much each band varies between images, ``gain(0) = 1``): the raw per-band ratio of
    two small sets of different subjects wanders with their anatomy (a 32^3 low-dose check: 0.66-1.33 in the
    lowest bands, SSIM 0.87 against the input's 0.96), which a reviewer's filter would not keep. ``smooth=False``
    gives the raw ratio."""
    src = _check_images(sources, "source")
    tgt = _check_images(targets, "target", dims=src[0].ndim)
    if smooth:
        edges = band_edges(src[0].ndim, bands)
        ps, pt = _powers(src, edges), _powers(tgt, edges)
        return edges, _gain(pt, _set_mean(pt, edges), ps, _set_mean(ps, edges), edges)
    edges, p_src = mean_power(src, bands)
    _, p_tgt = mean_power(tgt, bands)
    return edges, np.sqrt(np.maximum(p_tgt, 0.0) / np.maximum(p_src, SIGNAL_FLOOR))


def apply_radial(
    image: np.ndarray, edges: Sequence[float] | np.ndarray, gain: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Filter a whole image by the radial gain (FFT, periodic; linear between band centres), float32."""
    x = np.asarray(image, dtype=np.float64)
    f, _ = _radial(x.shape)
    return sfft.irfftn(sfft.rfftn(x) * _response(f, edges, gain), s=x.shape).astype(np.float32)
