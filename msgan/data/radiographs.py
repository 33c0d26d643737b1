"""Bone suppression of phantom radiographs: a 2D pair task with ground truth (issue 21, item 6b).

For one subject (a seed of :mod:`msgan.data.tasks`' splits) the thorax phantom is drawn in 3D with its tissue
labels (:func:`msgan.data.phantom.thorax_labels`, the tasks' anatomy: dense cortical bone, emphysema, aorta)
and projected front to back (AP, along ``y``) as :func:`msgan.data.phantom.radiograph` does: line integrals
of the linear attenuation ``mu = mu_water (1 + HU / 1000)``, divided by :data:`PATH_SCALE`, then the detector
blur. Two projections of that one phantom:

- ``input``: the standard radiograph (every tissue with its own attenuation);
- ``target``: the same projection with bone attenuation replaced by soft tissue's: every voxel labelled
  cortical or cancellous bone is given :data:`msgan.data.phantom.SOFT` HU before projecting. This is
  what dual-energy subtraction's soft-tissue image shows: the anatomy without the bone, everything else kept.

Noise model (said once, here): both images get the same detector blur and the same white noise level
(``noise``, in image units), as two independent realisations (input: stream 1, target: stream 2 of the seed).
The target is therefore ``noiseless`` + its own noise, like a separately read-out image; no network can
learn to copy the input's noise into it. ``noiseless`` (the target before noise) is what a bone-suppression
measure compares with; ``body`` and ``bone`` are the pixels whose ray crosses the body / any bone.

Images are float32 in radiograph units (about [0, 1]: lungs dark, bone bright), shape ``(rows, cols)`` =
``(z, x)``; pure functions of (seed, size, depth, noise), computed slab by slab so 1024^2 needs little memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from msgan.data.phantom import FOV_MM, MU_WATER, SOFT, Label, PhantomOptions, thorax_labels

if TYPE_CHECKING:
    from msgan.io.volume import Geometry

BONE_LABELS = (Label.CORTICAL, Label.CANCELLOUS)  # what dual-energy moves into the bone image (metal stays in both)
RADIOGRAPH_PHANTOM = PhantomOptions(dense_bone=True, metal=False, emphysema=True, aorta=True)  # the tasks' anatomy
PATH_SCALE = 6.0  # mm of water-equivalent path per image unit, as msgan.data.phantom.radiograph
DETECTOR_BLUR = 0.7  # pixels (Gaussian sigma), as msgan.data.phantom.radiograph
NOISE = 0.01  # white detector noise, image units
WINDOW = (0.0, 1.2)  # radiograph units onto [-1, 1] for SSIM / PSNR (configs/xray-2048.yaml's intensity window)


@dataclass(frozen=True)
class RadiographPair:
    seed: int
    input: np.ndarray  # the standard radiograph, with noise
    target: np.ndarray  # the bone-suppressed (soft-tissue) radiograph, with its own noise
    noiseless: np.ndarray  # the target without noise
    body: np.ndarray  # bool: rays through the body
    bone: np.ndarray  # bool: rays through any bone (BONE_LABELS)
    spacing: tuple[float, float]  # mm, numpy order (row, col)


def radiograph_spacing(size: Sequence[int]) -> tuple[float, float]:
    """Pixel spacing (mm, numpy order) of a radiograph of ``size``: the field of view over the largest side."""
    sp = FOV_MM / max(int(size[0]), int(size[1]))
    return (sp, sp)


def radiograph_geometry(size: Sequence[int]) -> Geometry:
    """Identity direction, zero origin, :func:`radiograph_spacing` in ITK order (x, y)."""
    from msgan.io.volume import Geometry

    row, col = radiograph_spacing(size)
    return Geometry.identity(2, (col, row))


def _stream(seed: int, k: int) -> int:
    """An independent sub-seed ``k`` of subject ``seed`` for this task."""
    return int(np.random.SeedSequence([seed, 0xB0E, k]).generate_state(1)[0])


def bone_suppression_pair(
    seed: int,
    size: int | Sequence[int] = 1024,
    depth: int = 192,
    noise: float = NOISE,
    slab: int = 32,
    options: PhantomOptions = RADIOGRAPH_PHANTOM,
) -> RadiographPair:
    """One subject's (radiograph, bone-suppressed radiograph) pair with its truth; see the module docstring."""
    rows, cols = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(rows, cols, depth, slab) < 1:
        raise ValueError(f"radiograph size {(rows, cols)}, depth {depth}, slab {slab}: must be positive")
    if noise < 0:
        raise ValueError(f"radiograph noise {noise}: must be >= 0")
    sp = radiograph_spacing((rows, cols))[0]
    shape, spacing = (rows, depth, cols), (sp, FOV_MM / depth, sp)
    full = np.empty((rows, cols), np.float32)
    soft = np.empty((rows, cols), np.float32)
    body = np.empty((rows, cols), bool)
    bone = np.empty((rows, cols), bool)
    for a in range(0, rows, slab):
        b = min(a + slab, rows)
        hu, lab = thorax_labels(shape, spacing, seed, (slice(a, b), slice(0, depth), slice(0, cols)), options)
        is_bone = np.isin(lab, BONE_LABELS)
        for out, values in ((full, hu), (soft, np.where(is_bone, np.float32(SOFT), hu))):
            mu = np.clip(MU_WATER * (1.0 + values / 1000.0), 0.0, None)
            out[a:b] = mu.sum(axis=1) * spacing[1] / PATH_SCALE
        body[a:b] = (lab != Label.OUTSIDE).any(axis=1)
        bone[a:b] = is_bone.any(axis=1)
    full = ndimage.gaussian_filter(full, DETECTOR_BLUR)
    clean = ndimage.gaussian_filter(soft, DETECTOR_BLUR)
    noisy_in = full + noise * np.random.default_rng(_stream(seed, 1)).standard_normal(full.shape, dtype=np.float32)
    noisy_out = clean + noise * np.random.default_rng(_stream(seed, 2)).standard_normal(clean.shape, dtype=np.float32)
    return RadiographPair(
        seed, noisy_in.astype(np.float32), noisy_out.astype(np.float32), clean.astype(np.float32), body, bone,
        (sp, sp),
    )  # fmt: skip


__all__ = [
    "BONE_LABELS",
    "NOISE",
    "RADIOGRAPH_PHANTOM",
    "WINDOW",
    "RadiographPair",
    "bone_suppression_pair",
    "radiograph_geometry",
    "radiograph_spacing",
]
