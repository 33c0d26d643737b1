"""Put a training pair's target onto its source's grid, and say which voxels may train.

A pair (source, target) is two images of one patient: two reconstructions of one acquisition
(same grid, or another slice thickness, spacing or field of view in the same frame of reference),
or two acquisitions (contrast phases, a repeated scan) that need registration.

- :func:`fov_mask`: the voxels inside the scanner's field of view (not padding such as -2048 or
  -3024 HU, nor an explicit DICOM PixelPaddingValue).
- :func:`align_pair`: the target on the source's grid (as is when both share a grid and no
  registration is asked; else resampled physically with SimpleITK, after a rigid or affine
  registration by Mattes mutual information when asked), and ``valid``: the source voxels inside
  both fields of view and inside the (moved) target's extent. Only ``valid`` voxels may enter a
  loss, a metric or a fingerprint.

Registration: Mattes mutual information (50 bins, about :data:`SAMPLES` random samples per level
inside the source's field of view, the target's field of view as moving mask), linear
interpolation, a pyramid of 2x shrink levels (down to 16 voxels on the shortest side, at most 8x,
smoothed by half the shrink factor in voxels), regular-step gradient descent with scales from
physical shift. "rigid" optimises an Euler transform (3D or 2D); "affine" starts from that rigid
result and frees the affine matrix on the two finest levels. The start is the identity transform
(both images in one frame of reference, as the series of one study are) with its centre at the
centre of the source's grid: a start that centres the two grids on each other would move a target
of another field of view or extent away from where the scanner put it. Measured
(``benchmarks/align_check.py``): a 128^3 CT phantom pair (contrast phases, 3.1 mm voxels) moved by
up to 8 degrees and 15 mm is recovered to 0.01-0.02 voxel RMS displacement over the body in about
5 s of one core (affine: about 9 s).

Registration is deterministic: the metric's samples come from a fixed seed and the work runs on a
fixed number of threads (:data:`THREADS` unless asked otherwise; ITK's global default is set to it
for the duration and restored, as ``ImageRegistrationMethod.SetNumberOfThreads`` alone left results
differing in the last digits between runs); another thread count may differ in the last digits.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from msgan.io.volume import Geometry, to_sitk

METHODS = ("none", "rigid", "affine")
THREADS = 1  # registration threads: a fixed count keeps results identical from run to run
SEED = 20210  # the metric's sampling seed
MIN_OVERLAP = 0.01  # a pair whose valid voxels are fewer than this fraction of the source grid is refused
PADDING_FLOOR = -1500.0  # CT padding is at or below this (air is -1000 HU)
PADDING_SHARE = 0.001  # ... and at least this share of the voxels hold exactly it
SAMPLES = 60_000  # metric samples per level (fewer when the mask holds fewer voxels)
HISTOGRAM_BINS = 50


class AlignError(ValueError):
    """A pair that cannot be aligned or has too little overlap; the message names the pair and the reason."""


@dataclass(frozen=True)
class Aligned:
    """The target of a pair on the source's grid.

    ``residual`` is ``1 - r``, ``r`` the Pearson correlation (normalised cross-correlation) of source
    and aligned target over the ``valid`` voxels: 0 for targets that are a linear function of the
    source, about 1 for unrelated images (2 for inverted ones); it rises when a pair is misaligned.
    ``transform`` holds the parameters found by registration (SimpleITK's order: the Euler angle(s) in
    radians then the translation in mm for rigid; the row-major matrix then the translation for affine)
    followed by the centre of rotation in mm; it maps a point of the source to the target. It is
    empty when no registration ran.
    """

    target: np.ndarray  # float32, on the source's grid
    valid: np.ndarray  # bool, source grid: inside both fields of view and inside the (moved) target's extent
    method: str
    same_grid: bool
    overlap: float  # fraction of the source grid's voxels that are valid
    residual: float  # 1 - Pearson correlation of source and target inside ``valid``
    transform: tuple[float, ...]
    seconds: float


def _pair(label: str) -> str:
    return f"pair {label!r}" if label else "pair"


def fov_mask(image: np.ndarray, padding: float | None = None, modality: str = "") -> np.ndarray:
    """True where a voxel lies inside the scanner's field of view.

    ``padding`` is an explicit padding value in the image's units (a DICOM PixelPaddingValue after
    the rescale slope and intercept): every voxel holding it is outside. Without one, a CT image
    (``modality`` "CT", or "" with values in HU) is padded by its minimum when that is at most
    :data:`PADDING_FLOOR` (-1500) and at least :data:`PADDING_SHARE` (0.1 %) of the voxels hold
    exactly it: scanners write a constant such as -2048, -3024 or -2000 outside the round field of
    view, where noise never gives many voxels of exactly one value. Other modalities (MR, radiographs)
    have no padding unless it is given.
    """
    image = np.asarray(image)
    if padding is not None:
        if not math.isfinite(float(padding)):
            raise ValueError(f"padding value {padding!r}: must be a finite number")
        return np.asarray(image != padding)
    mask = np.ones(image.shape, dtype=bool)
    if modality.strip().upper() not in ("CT", "") or image.size == 0:
        return mask
    low = image.min()
    if not np.isfinite(low) or float(low) > PADDING_FLOOR:
        return mask
    outside = image == low
    if np.count_nonzero(outside) < PADDING_SHARE * image.size:
        return mask
    return ~outside


def same_grid(
    shape_a: Sequence[int], geom_a: Geometry, shape_b: Sequence[int], geom_b: Geometry, tol: float = 1e-3
) -> bool:
    """Whether two images share one voxel grid: equal shapes and dimensions, spacings equal within a
    relative ``tol``, origins within ``tol`` of a voxel and direction cosines within ``tol``."""
    if tuple(shape_a) != tuple(shape_b) or geom_a.dims != geom_b.dims or len(tuple(shape_a)) != geom_a.dims:
        return False
    sa, sb = np.asarray(geom_a.spacing, float), np.asarray(geom_b.spacing, float)
    if np.any(np.abs(sa - sb) > tol * np.maximum(np.abs(sa), np.abs(sb))):
        return False
    if np.any(np.abs(np.asarray(geom_a.origin) - np.asarray(geom_b.origin)) > tol * np.minimum(sa, sb)):
        return False
    return bool(np.all(np.abs(np.asarray(geom_a.direction) - np.asarray(geom_b.direction)) <= tol))


def _check(image: np.ndarray, geometry: Geometry, side: str, label: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim not in (2, 3) or image.ndim != geometry.dims:
        raise AlignError(
            f"{_pair(label)}: the {side} is a {image.ndim}D array with a {geometry.dims}D geometry; "
            "a pair's images are both 2D or both 3D, each with a geometry of its dimensions"
        )
    if min(image.shape) < 1:
        raise AlignError(f"{_pair(label)}: the {side} is empty (shape {image.shape})")
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise AlignError(f"{_pair(label)}: the {side} holds {image.dtype}; a real-valued image is needed")
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        raise AlignError(f"{_pair(label)}: the {side} has {bad} NaN or infinite voxel(s); it cannot be aligned")
    if not all(s > 0 and math.isfinite(s) for s in geometry.spacing):
        raise AlignError(f"{_pair(label)}: the {side}'s spacing {geometry.spacing} must be positive")
    return image


def _filled(image: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """float32 copy with the voxels outside the field of view set to a low in-view value (the 1st
    percentile: air for CT), so neither smoothing nor interpolation spreads padding into the image."""
    out = image.astype(np.float32, copy=True)
    if not fov.all():
        inside = out[fov]
        out[~fov] = np.float32(np.percentile(inside, 1.0)) if inside.size else np.float32(0.0)
    return out


def _corners(shape: Sequence[int], geometry: Geometry) -> np.ndarray:
    """Physical positions (ITK order) of the corners of a grid's voxel extent (half a voxel beyond the centres)."""
    dims = geometry.dims
    size = tuple(reversed(tuple(shape)))  # ITK order
    direction = np.asarray(geometry.direction, float).reshape(dims, dims)
    spacing = np.asarray(geometry.spacing, float)
    idx = np.array([[(-0.5 if bit == 0 else n - 0.5) for bit, n in zip(bits, size, strict=True)]
                    for bits in np.ndindex(*(2,) * dims)])  # fmt: skip
    return np.asarray(geometry.origin, float) + (idx * spacing) @ direction.T


def _boxes_overlap(shape_a: Sequence[int], geom_a: Geometry, shape_b: Sequence[int], geom_b: Geometry) -> bool:
    """Whether the two grids' physical bounding boxes intersect (a quick test before any resampling)."""
    ca, cb = _corners(shape_a, geom_a), _corners(shape_b, geom_b)
    return bool(np.all(ca.min(0) < cb.max(0)) and np.all(cb.min(0) < ca.max(0)))


_THREADS_LOCK = threading.Lock()


@contextlib.contextmanager
def _itk_threads(threads: int) -> Iterator[None]:
    """ITK's global default thread count set to ``threads`` while registering and resampling, then restored.

    ``ImageRegistrationMethod.SetNumberOfThreads`` alone leaves parts of the work on the global default
    (measured with SimpleITK 2.5: two runs on 2 default threads differed in the last digits of the transform,
    on 1 they were identical); the lock keeps concurrent alignments from restoring each other's setting.
    """
    with _THREADS_LOCK:
        before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        try:
            yield
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def _shrink_factors(shape: Sequence[int]) -> list[int]:
    """Pyramid levels for registration: halve while the smallest side keeps at least 16 voxels, at most 8x."""
    factors = [1]
    while factors[-1] < 8 and min(shape) / (factors[-1] * 2) >= 16:
        factors.append(factors[-1] * 2)
    return factors[::-1]


def _initial(method: str, dims: int, centre: Sequence[float]) -> sitk.Transform:
    t: sitk.Transform
    if method == "rigid":
        t = sitk.Euler3DTransform() if dims == 3 else sitk.Euler2DTransform()
    else:
        t = sitk.AffineTransform(dims)
    t.SetCenter(tuple(float(c) for c in centre))  # type: ignore[attr-defined]
    return t


def _register(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image,
    moving_mask: sitk.Image,
    method: str,
    shape: Sequence[int],
    threads: int,
) -> sitk.Transform:
    """Rigid: Euler transform over the whole pyramid. Affine: the rigid result first, then an affine
    transform started from it (12 or 6 free parameters from the start drift on small, noisy images)."""
    dims = fixed.GetDimension()
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in fixed.GetSize()])
    factors = _shrink_factors(shape)
    rigid = _run(fixed, moving, fixed_mask, moving_mask, _initial("rigid", dims, centre), factors, threads)
    if method == "rigid":
        return rigid
    euler = _last(rigid)
    affine = sitk.AffineTransform(dims)
    affine.SetCenter(tuple(euler.GetFixedParameters()[:dims]))
    affine.SetMatrix(euler.GetMatrix())  # type: ignore[attr-defined]
    affine.SetTranslation(euler.GetTranslation())  # type: ignore[attr-defined]
    return _run(fixed, moving, fixed_mask, moving_mask, affine, factors[-2:], threads)


def _run(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image,
    moving_mask: sitk.Image,
    initial: sitk.Transform,
    factors: Sequence[int],
    threads: int,
) -> sitk.Transform:
    dims = fixed.GetDimension()
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(threads)
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetMetricMovingMask(moving_mask)
    in_mask = max(1, int(np.count_nonzero(sitk.GetArrayViewFromImage(fixed_mask))))
    percentages = [min(1.0, SAMPLES * f**dims / in_mask) for f in factors]  # about SAMPLES inside the mask
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel(percentages, SEED)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(list(factors))
    reg.SetSmoothingSigmasPerLevel([f / 2.0 if f > 1 else 0.0 for f in factors])  # in voxels of the full grid
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-3, numberOfIterations=200, relaxationFactor=0.6, gradientMagnitudeTolerance=1e-8
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(initial, inPlace=False)
    return reg.Execute(fixed, moving)


def _last(transform: sitk.Transform) -> sitk.Transform:
    """The transform itself, or the last one of a composite, as its own type."""
    t = transform
    if t.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(t)
        t = comp.GetNthTransform(comp.GetNumberOfTransforms() - 1)
    return t.Downcast()


def _params(transform: sitk.Transform) -> tuple[float, ...]:
    """The parameters of a registration result followed by its centre (see :class:`Aligned`)."""
    t = _last(transform)
    dims = t.GetDimension()
    return tuple(float(p) for p in t.GetParameters()) + tuple(float(c) for c in t.GetFixedParameters()[:dims])


def residual_of(source: np.ndarray, target: np.ndarray, valid: np.ndarray) -> float:
    """``1 - r``: r the Pearson correlation of ``source`` and ``target`` over ``valid`` (1.0 when either is flat)."""
    a = np.asarray(source, dtype=np.float64)[valid]
    b = np.asarray(target, dtype=np.float64)[valid]
    if a.size < 2:
        return 1.0
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    return 1.0 - float(np.dot(a, b)) / den if den > 0 else 1.0


def align_pair(
    source: np.ndarray,
    source_geometry: Geometry,
    target: np.ndarray,
    target_geometry: Geometry,
    method: str = "none",
    source_padding: float | None = None,
    target_padding: float | None = None,
    modality: str = "",
    label: str = "",
    threads: int = THREADS,
) -> Aligned:
    """The target of a pair on the source's grid, with the voxels that may train (see :class:`Aligned`).

    - same grid and ``method`` "none": the target as it is; ``valid`` = both fields of view;
    - another grid in the same frame of reference: the target resampled onto the source's grid
      physically (linear; its field-of-view mask by nearest neighbour); source voxels the target
      does not cover are not valid;
    - "rigid" / "affine": the target registered onto the source first (Mattes mutual information,
      multi-resolution, sampled inside both fields of view), then resampled the same way.

    Paddings are explicit padding values in each image's units (see :func:`fov_mask`); ``modality``
    is the pair's DICOM modality ("" when unknown). Refused with :class:`AlignError` naming ``label``:
    an unknown method, NaN or infinite voxels, images of other dimensions, and a pair whose valid
    voxels are under :data:`MIN_OVERLAP` (1 %) of the source grid.
    """
    started = time.perf_counter()
    if method not in METHODS:
        raise AlignError(f"{_pair(label)}: alignment {method!r} is not one of {', '.join(METHODS)}")
    if threads < 1:
        raise AlignError(f"{_pair(label)}: threads={threads}; at least 1 is needed")
    source = _check(source, source_geometry, "source", label)
    target = _check(target, target_geometry, "target", label)
    if source.ndim != target.ndim:
        raise AlignError(f"{_pair(label)}: the source is {source.ndim}D and the target {target.ndim}D")
    source_fov = fov_mask(source, source_padding, modality)
    target_fov = fov_mask(target, target_padding, modality)
    for side, fov in (("source", source_fov), ("target", target_fov)):
        if not fov.any():
            raise AlignError(f"{_pair(label)}: the {side} holds padding only; nothing is inside its field of view")
    grid = same_grid(source.shape, source_geometry, target.shape, target_geometry)
    transform: tuple[float, ...] = ()
    if grid and method == "none":
        moved = target.astype(np.float32, copy=False)
        valid = source_fov & target_fov
    else:
        if not _boxes_overlap(source.shape, source_geometry, target.shape, target_geometry):
            raise AlignError(f"{_pair(label)}: the source and the target do not overlap in space; nothing can train")
        fixed = to_sitk(_filled(source, source_fov), source_geometry)
        moving = to_sitk(_filled(target, target_fov), target_geometry)
        moving_mask = to_sitk(target_fov.astype(np.uint8), target_geometry)
        t: sitk.Transform = sitk.Transform(source.ndim, sitk.sitkIdentity)
        with _itk_threads(threads):
            if method != "none":
                fixed_mask = to_sitk(source_fov.astype(np.uint8), source_geometry)
                try:
                    t = _register(fixed, moving, fixed_mask, moving_mask, method, source.shape, threads)
                except RuntimeError as err:
                    reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                    raise AlignError(f"{_pair(label)}: {method} registration failed ({reason[:300]})") from err
                transform = _params(t)
            moved = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, t, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
            covered = sitk.GetArrayFromImage(sitk.Resample(moving_mask, fixed, t, sitk.sitkNearestNeighbor, 0))
        valid = source_fov & (covered > 0)
    overlap = float(np.count_nonzero(valid)) / valid.size
    if overlap < MIN_OVERLAP:
        raise AlignError(
            f"{_pair(label)}: {overlap:.2%} of the source's voxels are inside both images and their fields of "
            f"view (alignment {method!r}); at least {MIN_OVERLAP:.0%} is needed to train"
        )
    moved = np.ascontiguousarray(moved, dtype=np.float32)
    return Aligned(
        target=moved,
        valid=valid,
        method=method,
        same_grid=grid,
        overlap=overlap,
        residual=residual_of(source, moved, valid),
        transform=transform,
        seconds=time.perf_counter() - started,
    )
