"""Per-volume intensity normalisation for data without a fixed scale (MR): ``intensity.normalize: percentile``.

An MR volume's values have no physical unit: two scanners, coils or sessions give the same tissue values that
differ by a gain and an offset. So every volume, source and target alike, at training and at inference, is
mapped linearly so that two percentiles of its *body* (``intensity.percentiles``, default the 1st and 99th)
become :data:`NORMALISED_LOW` (0) and :data:`NORMALISED_HIGH` (1000) "normalised units"; the intensity window
is then given in normalised units, and a translation comes out in the normalised units of the target domain.

The body: MR background is air (near 0, with noise), so the body is every sampled voxel above
``floor + BODY_FRACTION * (ceiling - floor)``, where ``floor`` and ``ceiling`` are the sample's
:data:`BODY_FLOOR` and :data:`BODY_CEILING` percentiles (10 % of the way from background to bright tissue).
The rule uses percentiles only, so a gain (> 0) and an offset of the input change nothing in its normalised
values.

The sample: a fixed stride on every axis, the smallest that keeps at most :data:`MAX_SAMPLE_VOXELS` voxels,
read by plain strided slicing (``image[::s, ::s, ::s]``), so a numpy array, a zarr array and a dask array give
the same voxels and the same :class:`Scaling` without reading the volume into memory; the same input gives the
same bytes on every inference path (in memory, a staged volume, the Ray batch).

Torch-free; numpy (and dask for :func:`apply_chunked`) only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from msgan.spec import IntensityConfig

NORMALISED_LOW = 0.0  # where the body's low percentile lands
NORMALISED_HIGH = 1000.0  # where the body's high percentile lands
MAX_SAMPLE_VOXELS = 1 << 21  # 2,097,152: a 512^3 volume is sampled every 4th voxel on each axis
NORMALISED_UNITS = "normalised: the body's low percentile at 0, its high percentile at 1000"
BODY_FLOOR = 1.0  # percentile of the whole sample taken as the background's level
BODY_CEILING = 99.5  # percentile of the whole sample taken as bright tissue
BODY_FRACTION = 0.1  # the body starts this far from floor to ceiling


@dataclass(frozen=True)
class Scaling:
    """One volume's normalisation: its body's ``percentiles`` were ``low_value`` and ``high_value`` (input
    units); :func:`apply` maps them onto :data:`NORMALISED_LOW` and :data:`NORMALISED_HIGH`."""

    low_value: float
    high_value: float
    percentiles: tuple[float, float] = (1.0, 99.0)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low_value) and math.isfinite(self.high_value) and self.high_value > self.low_value):
            raise ValueError(f"scaling [{self.low_value}, {self.high_value}]: needs finite values with high > low")

    @property
    def gain(self) -> float:
        """Normalised units per input unit."""
        return (NORMALISED_HIGH - NORMALISED_LOW) / (self.high_value - self.low_value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (a volume plan, a translated volume's attributes); floats round-trip exactly."""
        return {"low_value": self.low_value, "high_value": self.high_value, "percentiles": list(self.percentiles)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "scaling") -> Scaling:
        """The scaling :meth:`to_dict` gave; a :class:`ValueError` naming ``where`` for anything else."""
        try:
            if not isinstance(d, Mapping):
                raise TypeError(f"a {type(d).__name__}, expected an object")
            low, high = d["low_value"], d["high_value"]
            p_low, p_high = d.get("percentiles", (1.0, 99.0))
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (low, high, p_low, p_high)):
                raise TypeError("values must be numbers")
            return cls(float(low), float(high), (float(p_low), float(p_high)))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: not an intensity scaling ({type(err).__name__}: {err})") from None


def sample_stride(shape: Sequence[int], cap: int = MAX_SAMPLE_VOXELS) -> int:
    """The smallest stride ``s`` (the same on every axis) whose sample ``image[::s, ...]`` holds at most
    ``cap`` voxels."""
    s = 1
    while math.prod(-(-int(n) // s) for n in shape) > cap:
        s += 1
    return s


def sample(image: Any, cap: int = MAX_SAMPLE_VOXELS) -> np.ndarray:
    """The fixed strided sample of ``image`` (numpy, zarr or dask; read by slicing, never whole) as float64."""
    s = sample_stride(tuple(image.shape), cap)
    part = image[(slice(None, None, s),) * len(image.shape)]
    if isinstance(part, da.Array):
        part = part.compute()
    return np.asarray(part, dtype=np.float64).ravel()


def scaling_of(image: Any, intensity: IntensityConfig, name: str = "image") -> Scaling | None:
    """The :class:`Scaling` of ``image`` (numpy, zarr or dask, in input units) by ``intensity``: None when
    ``intensity.normalize`` is ``none``. A volume with NaN/inf in its sample, no body or a flat body (its two
    percentiles equal) is refused with a :class:`ValueError` naming ``name``."""
    if intensity.normalize == "none":
        return None
    x = sample(image)
    if x.size == 0:
        raise ValueError(f"{name}: an empty volume cannot be normalised")
    finite = np.isfinite(x)
    if not finite.all():
        raise ValueError(
            f"{name}: holds NaN or infinite voxels ({int(x.size - finite.sum())} in a sample of {x.size}); "
            "clean the input before normalising it"
        )
    floor, ceiling = np.percentile(x, [BODY_FLOOR, BODY_CEILING])
    body = x[x > floor + BODY_FRACTION * (ceiling - floor)]
    p_low, p_high = intensity.percentiles
    if body.size == 0:
        raise ValueError(
            f"{name}: flat volume (every sampled voxel is {floor:g}): no body to normalise by "
            f"(intensity.normalize={intensity.normalize!r})"
        )
    low, high = (float(v) for v in np.percentile(body, [p_low, p_high]))
    if not high > low:
        raise ValueError(
            f"{name}: flat body: its percentiles {p_low:g} and {p_high:g} are both {low:g}; "
            f"intensity.normalize={intensity.normalize!r} needs a body with contrast"
        )
    return Scaling(low, high, (float(p_low), float(p_high)))


def _check(scaling: Scaling | None, intensity: IntensityConfig) -> None:
    if (scaling is None) != (intensity.normalize == "none"):
        have = "no scaling" if scaling is None else "a scaling"
        raise ValueError(f"{have} given for intensity.normalize={intensity.normalize!r}")


def apply(image: Any, scaling: Scaling | None, intensity: IntensityConfig) -> Any:
    """``image`` in normalised units (float32): ``(x - low_value) * gain`` with both factors in float32,
    voxel by voxel, so any block of a volume normalises alone to the same bytes. With ``scaling`` None
    (``intensity.normalize: none``) the image itself, untouched."""
    _check(scaling, intensity)
    if scaling is None:
        return image
    x = np.asarray(image, dtype=np.float32)
    return ((x - np.float32(scaling.low_value)) * np.float32(scaling.gain)).astype(np.float32, copy=False)


def apply_chunked(image: Any, scaling: Scaling | None, intensity: IntensityConfig) -> Any:
    """:func:`apply` lazily, block by block (a dask array); ``image`` itself when ``scaling`` is None."""
    _check(scaling, intensity)
    if scaling is None:
        return image
    x = image if isinstance(image, da.Array) else da.from_array(image)
    return da.map_blocks(apply, x, scaling=scaling, intensity=intensity, dtype=np.float32)
