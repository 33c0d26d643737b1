"""A deterministic digital thorax in HU, and its soft- and sharp-kernel reconstructions.

We have no public CT here, so this phantom is our CT: body with a fat layer, lungs
with parenchymal texture, a branching vessel tree, airways, ribs, spine, heart and
small nodules. Anatomy is drawn from the seed; the phantom can be evaluated at any
grid size and spacing, and on any sub-box of the grid (``region``), so large volumes
and projections are made slab by slab.

Axes are numpy ``(z, y, x)``; coordinates in mm, centred on the grid; ``+y`` is
posterior and ``+x`` the patient's left (DICOM LPS), ``+z`` superior.

:class:`PhantomOptions` adds what the translation tasks (:mod:`msgan.data.tasks`) and the
full-HU-range tests need: dense cortical bone (1500-2000 HU), a metal implant (3000 HU),
low-attenuation (emphysema) areas in the lungs and an aorta. They are off by default, so a seed
makes the same phantom as before; :func:`thorax_labels` gives the tissue label of every voxel.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

if TYPE_CHECKING:
    from msgan.io.volume import Geometry

FOV_MM = 400.0  # default field of view: the largest axis spans this many mm

AIR, FAT, SOFT, LUNG, BLOOD, MYOCARDIUM, BONE, CANCELLOUS, DISC, AIRWAY_WALL = (
    -1000.0, -100.0, 40.0, -850.0, 45.0, 60.0, 750.0, 250.0, 80.0, 30.0,
)  # fmt: skip

METAL = 3000.0  # a steel/titanium implant, far above the usual window
LAA = -985.0  # low-attenuation (emphysematous) lung
CORTICAL_RANGE = (1500.0, 2000.0)  # dense cortical bone, one value per subject

Vec = tuple[float, float, float]


class Label:
    """Tissue label of a voxel (uint8), from :func:`thorax_labels`."""

    OUTSIDE = 0  # air around the body
    FAT = 1
    SOFT = 2  # muscle and other soft tissue of the body wall and mediastinum
    LUNG = 3
    LAA = 4  # low-attenuation lung (emphysema)
    LUNG_VESSEL = 5
    AIRWAY = 6  # lumen (air inside the body)
    AIRWAY_WALL = 7
    MYOCARDIUM = 8
    HEART_BLOOD = 9  # the heart's chambers
    AORTA = 10
    NODULE = 11
    CORTICAL = 12  # ribs and the vertebrae's cortical shell
    CANCELLOUS = 13
    DISC = 14
    METAL = 15


TISSUES: dict[str, tuple[int, ...]] = {
    "lung": (Label.LUNG, Label.LAA),
    "soft": (Label.FAT, Label.SOFT, Label.AIRWAY_WALL, Label.MYOCARDIUM, Label.NODULE, Label.DISC),
    "bone": (Label.CORTICAL, Label.CANCELLOUS, Label.METAL),
    "blood": (Label.LUNG_VESSEL, Label.HEART_BLOOD, Label.AORTA),
}  # the tissue classes of the metrics; every label but OUTSIDE and AIRWAY is in one


@dataclass(frozen=True)
class PhantomOptions:
    """Anatomy beyond the original phantom, each drawn from the seed when switched on."""

    dense_bone: bool = False  # ribs and vertebral cortex at a subject's value in CORTICAL_RANGE (else 750 HU)
    metal: bool = False  # a cylindrical implant (radius 12 mm, 40 mm long) at METAL HU in a vertebral body
    emphysema: bool = False  # low-attenuation areas, 3-15 % of the lung, at about LAA HU
    aorta: bool = False  # ascending aorta, arch and descending aorta (blood, 45 HU)


ALL_OPTIONS = PhantomOptions(dense_bone=True, metal=True, emphysema=True, aorta=True)


@dataclass(frozen=True)
class Tube:
    """A capsule from ``p0`` to ``p1`` (mm) of radius ``r``."""

    p0: Vec
    p1: Vec
    r: float


@dataclass(frozen=True)
class Ellipsoid:
    centre: Vec
    axes: Vec


@dataclass(frozen=True)
class Anatomy:
    """Everything the seed decides; lengths in mm."""

    body: tuple[float, float]  # semi-axes (y, x) of the body's elliptic cross-section
    fat: float  # subcutaneous fat thickness
    lungs: tuple[Ellipsoid, Ellipsoid]
    heart: Ellipsoid
    spine: tuple[float, float, float]  # (y, x, radius) of the vertebral column
    ribs: tuple[Tube, ...]
    vessels: tuple[Tube, ...]
    airways: tuple[Tube, ...]
    nodules: tuple[tuple[Vec, float, float], ...]  # (centre, radius, HU)
    texture_seed: int = 0
    extras: dict[str, float] = field(default_factory=dict)
    # drawn from a second stream of the seed, so the fields above do not change with them
    aorta: tuple[Tube, ...] = ()
    cortical_hu: float = BONE  # with PhantomOptions.dense_bone
    laa_fraction: float = 0.0  # share of the lung that is low-attenuation, with PhantomOptions.emphysema
    implant: Tube | None = None


def _rotate_towards(d: np.ndarray, angle: float, rng: np.random.Generator) -> np.ndarray:
    """``d`` turned by ``angle`` about a random axis perpendicular to it."""
    d = d / np.linalg.norm(d)
    a = rng.normal(size=3)
    a -= a.dot(d) * d
    a /= np.linalg.norm(a)
    return np.cos(angle) * d + np.sin(angle) * np.cross(a, d)


def _branch(
    p: np.ndarray, d: np.ndarray, length: float, r: float, depth: int, spread: float,
    rng: np.random.Generator, out: list[Tube],
) -> None:  # fmt: skip
    q = p + d * length
    out.append(Tube(tuple(p), tuple(q), r))  # type: ignore[arg-type]
    if depth == 0:
        return
    for sign in (-1.0, 1.0):
        nd = _rotate_towards(d, sign * spread * rng.uniform(0.6, 1.2), rng)
        _branch(q, nd, length * rng.uniform(0.75, 0.9), r * 0.78, depth - 1, spread, rng, out)


def sample_anatomy(seed: int) -> Anatomy:
    """Draw one subject's anatomy; same seed, same anatomy."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.9, 1.1)
    ay, ax = 118 * s * rng.uniform(0.95, 1.05), 168 * s * rng.uniform(0.95, 1.05)
    fat = rng.uniform(8, 20)
    iy, ix = ay - fat - 8, ax - fat - 8  # inside the muscle wall
    z0 = rng.uniform(-15, 15)
    lungs = []
    for side in (-1.0, 1.0):
        lungs.append(
            Ellipsoid(
                centre=(z0, 0.05 * iy, side * 0.47 * ix),
                axes=(115 * s * rng.uniform(0.9, 1.1), 0.8 * iy, 0.4 * ix * rng.uniform(0.93, 1.03)),
            )
        )
    heart = Ellipsoid(centre=(z0 - 45 * s, -0.3 * iy, 0.12 * ix), axes=(60 * s, 52 * s, 58 * s))
    spine = (iy - 28 * s, 0.0, 17 * s)
    ribs = []
    for k in range(11):
        zk = z0 + 120 * s - k * 24 * s
        for side in (-1.0, 1.0):
            pts = []
            for theta in np.linspace(0.25, 2.6, 14):
                y, x = (iy + 3) * math.cos(theta), side * (ix + 3) * math.sin(theta)
                pts.append((zk - 35 * s * theta / math.pi, y, x))
            ribs += [Tube(a, b, 4.5 * s) for a, b in itertools.pairwise(pts)]
    vessels: list[Tube] = []
    airways: list[Tube] = []
    carina = np.array([z0 + 45 * s, -0.15 * iy, 0.0])
    airways.append(Tube((z0 + 220.0, -0.15 * iy, 0.0), tuple(carina), 8.5 * s))  # type: ignore[arg-type]
    for lung in lungs:
        c = np.array(lung.centre)
        hilum = np.array([z0 + 10 * s, -0.05 * iy, c[2] * 0.45])
        for _ in range(5):  # arterial/venous trunks towards apex, base and periphery
            d = (c - hilum) + rng.normal(scale=30, size=3) + np.array([rng.uniform(-70, 70), 0, 0])
            _branch(hilum, d / np.linalg.norm(d), 34 * s, 5.5 * s, 5, 0.5, rng, vessels)
        d = hilum - carina
        airways.append(Tube(tuple(carina), tuple(hilum), 6.0 * s))  # type: ignore[arg-type]
        _branch(hilum, (c - hilum) / np.linalg.norm(c - hilum), 30 * s, 4.2 * s, 2, 0.5, rng, airways)
    nodules: list[tuple[Vec, float, float]] = []
    count = int(rng.integers(2, 6))
    while len(nodules) < count:
        lung = lungs[int(rng.integers(2))]
        u = rng.uniform(-0.7, 0.7, size=3)
        if np.sum(u**2) < 0.5:
            (cz, cy, cx), (az, ay_, ax_) = lung.centre, lung.axes
            centre = (float(cz + az * u[0]), float(cy + ay_ * u[1]), float(cx + ax_ * u[2]))
            nodules.append((centre, float(rng.uniform(2.5, 7.0)), float(rng.uniform(-30, 60))))
    texture_seed = int(rng.integers(2**31))
    more = np.random.default_rng([seed, 1])  # the additions' own stream
    sy, _, sr = spine
    top, arch_y = z0 + 80 * s, -0.05 * iy
    desc = (sy - sr - 15 * s, 24 * s)  # (y, x): left and in front of the spine
    path = [(z0 - 15 * s, -0.32 * iy, 0.0), (top - 5 * s, -0.47 * iy, -5 * s), (top, -0.42 * iy, 25 * s),
            (top + 3 * s, arch_y, 32 * s), (top - 8 * s, *desc), (z0 - 400.0, *desc)]  # fmt: skip
    radii = [14 * s, 14 * s, 13 * s, 12 * s, 11 * s]
    aorta = tuple(Tube(a, b, r) for (a, b), r in zip(itertools.pairwise(path), radii, strict=True))
    cortical = float(more.uniform(*CORTICAL_RANGE))
    laa = float(more.uniform(0.03, 0.15))
    zc = z0 + float(more.uniform(-60, 20)) * s
    implant = Tube((zc - 20 * s, sy, 0.0), (zc + 20 * s, sy, 0.0), 12 * s)
    return Anatomy(
        body=(ay, ax), fat=fat, lungs=(lungs[0], lungs[1]), heart=heart, spine=spine, ribs=tuple(ribs),
        vessels=tuple(vessels), airways=tuple(airways), nodules=tuple(nodules),  # type: ignore[arg-type]
        texture_seed=texture_seed, aorta=aorta, cortical_hu=cortical, laa_fraction=laa, implant=implant,
    )  # fmt: skip


class _Grid:
    """Coordinates (mm) of a sub-box of a grid; finds the index box of a box in mm."""

    def __init__(self, shape: Sequence[int], spacing: Sequence[float], region: Sequence[slice]) -> None:
        self.axes = []
        for n, sp, sl in zip(shape, spacing, region, strict=True):
            idx = np.arange(*sl.indices(n)[:2], dtype=np.float64)
            self.axes.append(((idx - (n - 1) / 2.0) * sp).astype(np.float32))
        self.shape = tuple(len(a) for a in self.axes)

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, ...] | None:
        out = []
        for a, l, h in zip(self.axes, lo, hi, strict=True):
            i0, i1 = int(np.searchsorted(a, l, "left")), int(np.searchsorted(a, h, "right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def coords(self, sl: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z, y, x = (a[s] for a, s in zip(self.axes, sl, strict=True))
        return z[:, None, None], y[None, :, None], x[None, None, :]


def _ellipsoid_mask(grid: _Grid, e: Ellipsoid) -> tuple[tuple[slice, ...], np.ndarray] | None:
    lo = [c - a for c, a in zip(e.centre, e.axes, strict=True)]
    hi = [c + a for c, a in zip(e.centre, e.axes, strict=True)]
    sl = grid.box(lo, hi)
    if sl is None:
        return None
    z, y, x = grid.coords(sl)
    (cz, cy, cx), (az, ay, ax) = e.centre, e.axes
    return sl, ((z - cz) / az) ** 2 + ((y - cy) / ay) ** 2 + ((x - cx) / ax) ** 2 <= 1.0


def _tube_mask(grid: _Grid, t: Tube, r: float | None = None) -> tuple[tuple[slice, ...], np.ndarray] | None:
    r = t.r if r is None else r
    p0, p1 = np.array(t.p0), np.array(t.p1)
    sl = grid.box(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
    if sl is None:
        return None
    z, y, x = grid.coords(sl)
    d = p1 - p0
    dd = max(float(d.dot(d)), 1e-9)
    vz, vy, vx = z - p0[0], y - p0[1], x - p0[2]
    tt = np.clip((vz * d[0] + vy * d[1] + vx * d[2]) / dd, 0.0, 1.0)
    dist2 = (vz - tt * d[0]) ** 2 + (vy - tt * d[1]) ** 2 + (vx - tt * d[2]) ** 2
    return sl, dist2 <= r * r


def _smooth_noise(grid: _Grid, seed: int, cell_mm: float, extent_mm: float = 600.0) -> np.ndarray:
    """Smooth unit-variance noise defined on a global lattice, sampled at the grid's coordinates."""
    n = int(extent_mm / cell_mm) + 4
    rng = np.random.default_rng(seed)
    lattice = ndimage.gaussian_filter(rng.normal(size=(n, n, n)).astype(np.float32), 1.0, mode="wrap")
    lattice /= lattice.std()
    out = lattice
    for axis, coords in enumerate(grid.axes):
        pos = coords / cell_mm + n / 2.0
        i0 = np.clip(np.floor(pos).astype(np.int64), 0, n - 2)
        w = (pos - i0).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = len(w)
        w3 = w.reshape(shape)
        out = np.take(out, i0, axis=axis) * (1 - w3) + np.take(out, i0 + 1, axis=axis) * w3
    return out.astype(np.float32)


def default_spacing(shape: Sequence[int]) -> tuple[float, ...]:
    """Isotropic spacing that fits :data:`FOV_MM` into the largest axis."""
    sp = FOV_MM / max(shape)
    return tuple(sp for _ in shape)


def thorax_phantom(
    shape: Sequence[int],
    spacing: Sequence[float] | None = None,
    seed: int = 0,
    region: Sequence[slice] | None = None,
    options: PhantomOptions | None = None,
) -> np.ndarray:
    """The noiseless phantom in HU (float32) on a ``(z, y, x)`` grid, or on its sub-box ``region``."""
    return thorax_labels(shape, spacing, seed, region, options)[0]


def thorax_labels(
    shape: Sequence[int],
    spacing: Sequence[float] | None = None,
    seed: int = 0,
    region: Sequence[slice] | None = None,
    options: PhantomOptions | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The noiseless phantom in HU (float32) and its tissue labels (uint8, :class:`Label`)."""
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"phantom shape {tuple(shape)}: must be three positive sizes (z, y, x)")
    spacing = default_spacing(shape) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"phantom spacing {spacing}: must be three positive sizes in mm")
    opt = options or PhantomOptions()
    region = tuple(region) if region is not None else tuple(slice(0, n) for n in shape)
    an = sample_anatomy(seed)
    c = _Canvas(_Grid(shape, spacing, region))
    inner = _paint_body(c, an)  # tissues in painting order: each may cover the ones before it
    heart = _ellipsoid_mask(c.grid, an.heart)
    lung = _paint_lungs(c, an, opt, inner, heart)
    _paint_lung_vessels_and_airways(c, an, lung)
    if opt.aorta:
        for t in an.aorta:
            c.put(_tube_mask(c.grid, t), BLOOD, Label.AORTA)
    if heart is not None:
        c.put(heart, MYOCARDIUM, Label.MYOCARDIUM)
        c.put(_ellipsoid_mask(c.grid, Ellipsoid(an.heart.centre, tuple(a * 0.72 for a in an.heart.axes))),  # type: ignore[arg-type]
              BLOOD, Label.HEART_BLOOD)  # fmt: skip
    for centre, r, hu in an.nodules:
        c.put(_ellipsoid_mask(c.grid, Ellipsoid(centre, (r, r, r))), hu, Label.NODULE)
    cortical = an.cortical_hu if opt.dense_bone else BONE
    _paint_spine(c, an, cortical)
    if opt.metal and an.implant is not None:
        c.put(_tube_mask(c.grid, an.implant), METAL, Label.METAL)
    for t in an.ribs:
        c.put(_tube_mask(c.grid, t), cortical, Label.CORTICAL)
    return c.vol, c.lab


_Mask = tuple[tuple[slice, ...], np.ndarray]  # an index box and a boolean mask inside it


class _Canvas:
    """The phantom being painted: HU and labels on the grid, air to begin with."""

    def __init__(self, grid: _Grid) -> None:
        self.grid = grid
        self.vol = np.full(grid.shape, AIR, dtype=np.float32)
        self.lab = np.zeros(grid.shape, dtype=np.uint8)

    def put(self, m: _Mask | None, hu: float, label: int) -> None:
        if m is not None:
            self.vol[m[0]][m[1]] = hu
            self.lab[m[0]][m[1]] = label


def _paint_body(c: _Canvas, an: Anatomy) -> np.ndarray:
    """Fat in the body's elliptic cylinder, soft tissue inside its fat layer; returns that inside ``(H, W)``."""
    _, y, x = c.grid.coords((slice(None),) * 3)
    ay, ax = an.body
    body2 = (y / ay) ** 2 + (x / ax) ** 2  # (1, H, W): a cylinder along z
    c.vol[:] = np.where(body2 <= 1.0, FAT, AIR)
    c.lab[:] = np.where(body2 <= 1.0, Label.FAT, Label.OUTSIDE)
    inner = ((y / (ay - an.fat)) ** 2 + (x / (ax - an.fat)) ** 2 <= 1.0)[0]
    c.vol[:, inner] = SOFT
    c.lab[:, inner] = Label.SOFT
    return inner


def _paint_lungs(c: _Canvas, an: Anatomy, opt: PhantomOptions, inner: np.ndarray, heart: _Mask | None) -> np.ndarray:
    """Textured lungs inside the body less the heart, with emphysema when switched on; returns the lung mask."""
    grid = c.grid
    lung = np.zeros(grid.shape, dtype=bool)
    for e in an.lungs:
        m = _ellipsoid_mask(grid, e)
        if m is not None:
            lung[m[0]] |= m[1] & inner[m[0][1:]]
    if heart is not None:
        lung[heart[0]] &= ~heart[1]
    if lung.any():
        tex = 38.0 * _smooth_noise(grid, an.texture_seed, 3.0) + 22.0 * _smooth_noise(grid, an.texture_seed + 1, 9.0)
        c.vol[lung] = LUNG + tex[lung]
        c.lab[lung] = Label.LUNG
        if opt.emphysema:  # clusters where a smooth field exceeds its (1 - laa_fraction) quantile
            field_ = _smooth_noise(grid, an.texture_seed + 2, 5.0)
            laa = lung & (field_ > _normal_quantile(1.0 - an.laa_fraction))
            c.vol[laa] = np.minimum(LAA + 0.25 * tex[laa], -955.0)
            c.lab[laa] = Label.LAA
            del field_
        del tex
    return lung


def _paint_lung_vessels_and_airways(c: _Canvas, an: Anatomy, lung: np.ndarray) -> None:
    """Vessels (blood) where they run through the lungs, then the airways: a wall, then air inside it."""
    for t in an.vessels:
        m = _tube_mask(c.grid, t)
        if m is not None:
            hit = m[1] & lung[m[0]]
            c.vol[m[0]][hit] = BLOOD
            c.lab[m[0]][hit] = Label.LUNG_VESSEL
    for t in an.airways:
        c.put(_tube_mask(c.grid, t, t.r + max(1.2, 0.25 * t.r)), AIRWAY_WALL, Label.AIRWAY_WALL)
        c.put(_tube_mask(c.grid, t), AIR, Label.AIRWAY)


def _paint_spine(c: _Canvas, an: Anatomy, cortical: float) -> None:
    """The spine along z: 25 mm vertebrae (a ``cortical`` shell around cancellous bone), 5 mm discs."""
    sy, sx, sr = an.spine
    sl = c.grid.box([-1e9, sy - sr - 1, sx - sr - 1], [1e9, sy + sr + 1, sx + sr + 1])
    if sl is None:
        return
    z, yy, xx = c.grid.coords(sl)
    rr = np.sqrt((yy - sy) ** 2 + (xx - sx) ** 2)  # (1, h, w)
    phase = np.mod(z, 30.0)  # (d, 1, 1): 25 mm vertebrae, 5 mm discs
    shell = rr > sr - 2.5
    val = np.where(phase < 25.0, np.where(shell, cortical, CANCELLOUS), DISC)
    kind = np.where(phase < 25.0, np.where(shell, Label.CORTICAL, Label.CANCELLOUS), Label.DISC)
    sub, sub_lab = c.vol[sl], c.lab[sl]
    inside = np.broadcast_to(rr <= sr, sub.shape)
    sub[inside] = np.broadcast_to(val, sub.shape)[inside]
    sub_lab[inside] = np.broadcast_to(kind, sub.shape)[inside]


def _normal_quantile(q: float) -> float:
    from scipy.special import ndtri

    return float(ndtri(q))


def phantom_geometry(shape: Sequence[int], spacing: Sequence[float] | None = None) -> Geometry:
    """The geometry of a phantom grid: identity direction, zero origin, spacing in ITK order (x, y, z),
    i.e. the numpy-order (z, y, x) spacing of :func:`default_spacing` (or ``spacing``) reversed."""
    from msgan.io.volume import Geometry

    sp = default_spacing(shape) if spacing is None else tuple(float(v) for v in spacing)
    if len(sp) != len(shape):
        raise ValueError(f"spacing {tuple(sp)} does not match the {len(shape)}D shape {tuple(shape)}")
    return Geometry.identity(len(shape), tuple(reversed(sp)))


# ----------------------------------------------------------------------------- reconstruction kernels


def _radial_frequency(shape: Sequence[int]) -> np.ndarray:
    """|f| in cycles/voxel on the ``rfftn`` grid of ``shape``."""
    axes = [sfft.fftfreq(n).astype(np.float32) for n in shape[:-1]] + [sfft.rfftfreq(shape[-1]).astype(np.float32)]
    f2 = np.zeros([len(a) for a in axes], dtype=np.float32)
    for i, a in enumerate(axes):
        s = [1] * len(axes)
        s[i] = len(a)
        f2 = f2 + a.reshape(s) ** 2
    return np.sqrt(f2)


@dataclass(frozen=True)
class Kernel:
    """A reconstruction kernel as an MTF and a noise power spectrum (frequencies in cycles/voxel)."""

    name: str
    noise_hu: float  # noise standard deviation

    def mtf(self, f: np.ndarray) -> np.ndarray:
        if self.name == "soft":  # B20f-like: smooth, 50 % at 0.25 cycles/voxel
            return np.exp(-np.log(2.0) * (f / 0.25) ** 2)
        # B80f-like: edge-enhancing overshoot (~1.3 near 0.35 cycles/voxel), still high at Nyquist
        return (1.0 + 1.6 * (f / 0.35) ** 2) * np.exp(-((f / 0.42) ** 2))

    def nps_amplitude(self, f: np.ndarray) -> np.ndarray:
        if self.name == "soft":  # low, low-frequency noise
            return np.sqrt(f * np.exp(-((f / 0.12) ** 2)))
        return np.sqrt(f * (1.0 + (f / 0.25) ** 2) * np.exp(-((f / 0.55) ** 2)))  # ramp-shaped


KERNELS = {"soft": Kernel("soft", noise_hu=12.0), "sharp": Kernel("sharp", noise_hu=90.0)}


def reconstruct(
    phantom: np.ndarray, kernels: Sequence[str] = ("soft", "sharp"), seed: int = 0, workers: int = -1
) -> dict[str, np.ndarray]:
    """Reconstructions of one phantom with each kernel, sharing one noise realisation (as a scanner's
    reconstructions of one acquisition do). 2D or 3D; float32 HU."""
    for k in kernels:
        if k not in KERNELS:
            raise ValueError(f"kernel {k!r}: must be one of {sorted(KERNELS)}")
    x = np.asarray(phantom, dtype=np.float32)
    f = _radial_frequency(x.shape)
    spectrum = sfft.rfftn(x, workers=workers)
    white = sfft.rfftn(np.random.default_rng(seed).standard_normal(x.shape, dtype=np.float32), workers=workers)
    out = {}
    for name in kernels:
        kernel = KERNELS[name]
        image = sfft.irfftn(spectrum * kernel.mtf(f), s=x.shape, workers=workers).astype(np.float32)
        noise = sfft.irfftn(white * kernel.nps_amplitude(f), s=x.shape, workers=workers).astype(np.float32)
        noise *= kernel.noise_hu / max(float(noise.std()), 1e-12)
        image += noise
        out[name] = image
    return out


def apply_mtf(phantom: np.ndarray, kernel: str, workers: int = -1) -> np.ndarray:
    """The noiseless reconstruction of ``phantom`` with ``kernel`` (its MTF only): what
    :func:`reconstruct` gives before the noise is added."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r}: must be one of {sorted(KERNELS)}")
    x = np.asarray(phantom, dtype=np.float32)
    spectrum = sfft.rfftn(x, workers=workers) * KERNELS[kernel].mtf(_radial_frequency(x.shape))
    return sfft.irfftn(spectrum, s=x.shape, workers=workers).astype(np.float32)


def kernel_noise(shape: Sequence[int], kernel: str, seed: int, std: float, workers: int = -1) -> np.ndarray:
    """Noise with ``kernel``'s noise power spectrum and standard deviation ``std`` (HU), from ``seed``."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r}: must be one of {sorted(KERNELS)}")
    shape = tuple(shape)
    white = sfft.rfftn(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32), workers=workers)
    noise = sfft.irfftn(white * KERNELS[kernel].nps_amplitude(_radial_frequency(shape)), s=shape, workers=workers)
    noise = noise.astype(np.float32)
    noise *= std / max(float(noise.std()), 1e-12)
    return noise


def kernel_pair(
    shape: Sequence[int], seed: int = 0, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(soft, sharp) reconstructions of the phantom of ``seed``."""
    recon = reconstruct(thorax_phantom(shape, spacing, seed), seed=seed + 7919)
    return recon["soft"], recon["sharp"]


def phantom_image(shape: Sequence[int], seed: int, kernel: str = "soft") -> np.ndarray:
    """A training image from the phantom: 3D ``shape`` gives the volume reconstructed with ``kernel``;
    2D ``shape`` gives a radiograph (projection) of the phantom."""
    if len(shape) == 2:
        return radiograph(shape, seed=seed, depth=min(192, max(shape)))
    soft, sharp = kernel_pair(shape, seed)
    return soft if kernel == "soft" else sharp


# ----------------------------------------------------------------------------- radiographs

MU_WATER = 0.02  # linear attenuation of water, 1/mm (~70 keV)


def radiograph(
    size: int | Sequence[int] = 2048, seed: int = 0, depth: int = 192, slab: int = 32, noise: float = 0.01
) -> np.ndarray:
    """A frontal (AP) radiograph of the phantom: line integrals of attenuation along ``y``.

    Returns float32 in [0, ~1] (bone bright, lungs dark), shape ``(rows, cols)`` = ``(z, x)``;
    computed slab by slab so a 2048^2 image needs little memory.
    """
    rows, cols = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    sp = FOV_MM / max(rows, cols)
    shape = (rows, depth, cols)
    spacing = (sp, FOV_MM / depth, sp)
    out = np.empty((rows, cols), dtype=np.float32)
    for a in range(0, rows, slab):
        b = min(a + slab, rows)
        hu = thorax_phantom(shape, spacing, seed, region=(slice(a, b), slice(0, depth), slice(0, cols)))
        mu = np.clip(MU_WATER * (1.0 + hu / 1000.0), 0.0, None)
        out[a:b] = mu.sum(axis=1) * spacing[1]
    out /= 6.0  # ~ the path integral through the mediastinum: the image spans about [0, 1]
    out = ndimage.gaussian_filter(out, 0.7)  # detector blur
    out += noise * np.random.default_rng(seed + 104729).standard_normal(out.shape, dtype=np.float32)
    return out.astype(np.float32)
