"""Intensity windowing, anti-aliased x2 downsampling, edge extraction and the per-volume pyramid.

Scale 0 is the low-resolution (LR) grid; scale ``n - 1`` is the original grid. Images
in a pyramid are windowed to [-1, 1]; edges are in [-1, 1] too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from msgan.config import EdgeConfig, IntensityConfig
from msgan.tiling import pyramid_shapes, upsample_region


def window(image: np.ndarray, intensity: IntensityConfig) -> np.ndarray:
    """Map ``[low, high]`` linearly onto [-1, 1], clipping outside; NaN/inf are rejected."""
    x = np.asarray(image, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise ValueError(f"image holds {bad} NaN or infinite voxels; clean the input before translating it")
    lo, hi = intensity.low, intensity.high
    return np.clip((x - lo) * (2.0 / (hi - lo)) - 1.0, -1.0, 1.0).astype(np.float32)


def unwindow(x: np.ndarray, intensity: IntensityConfig) -> np.ndarray:
    """Inverse of :func:`window` inside the window (clipped values stay at the window's ends)."""
    lo, hi = intensity.low, intensity.high
    return ((np.asarray(x, dtype=np.float32) + 1.0) * ((hi - lo) / 2.0) + lo).astype(np.float32)


def outside_weight(source: np.ndarray, intensity: IntensityConfig) -> np.ndarray:
    """Weight of the translation per voxel (``intensity.outside == "source"``): 1 inside the window and
    below it, a half cosine down to 0 over ``blend`` window widths above it, 0 beyond. Only the high
    side passes the source through: below the window lies nothing but air and noise (CT: air is
    -1000 HU), and a noisy source passed through there shows as dark speckle in the lungs."""
    s = np.asarray(source, dtype=np.float32)
    lo, hi = intensity.low, intensity.high
    dist = np.maximum(s - hi, 0.0)
    ramp = intensity.blend * (hi - lo)
    if ramp <= 0:
        return (dist == 0).astype(np.float32)
    t = np.minimum(dist / ramp, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * t))).astype(np.float32)


def output_units(x: np.ndarray, intensity: IntensityConfig, source: np.ndarray | None = None) -> np.ndarray:
    """A translation (window units) in input units, by the rule of ``intensity.outside``: ``clip`` keeps
    the window's ends; ``source`` blends to the ``source`` (input units, same grid) above the window.
    Voxel by voxel, so a tile's core converts alone."""
    y = unwindow(x, intensity)
    if intensity.outside == "clip":
        return y
    if source is None:
        raise ValueError("intensity.outside='source' needs the source image (input units) to convert an output")
    src = np.asarray(source, dtype=np.float32)
    if src.shape != y.shape:
        raise ValueError(f"source of shape {src.shape} does not match the output's {y.shape}")
    w = outside_weight(src, intensity)
    return (w * y + (1.0 - w) * src).astype(np.float32)


def downsample2(x: np.ndarray) -> np.ndarray:
    """Anti-aliased x2 downsampling: mean of each 2x2(x2) block; odd axes repeat their last voxel."""
    x = np.asarray(x, dtype=np.float32)
    pad = [(0, s % 2) for s in x.shape]
    if any(p for _, p in pad):
        x = np.pad(x, pad, mode="edge")
    shape: list[int] = []
    for s in x.shape:
        shape += [s // 2, 2]
    return x.reshape(shape).mean(axis=tuple(range(1, 2 * x.ndim, 2))).astype(np.float32)


def upsample2(x: np.ndarray, fine_shape: Sequence[int]) -> np.ndarray:
    """Linear x2 upsampling onto ``fine_shape`` (torch ``align_corners=False`` convention)."""
    return upsample_region(x, fine_shape, [0] * len(fine_shape), list(fine_shape))


def edges(image: np.ndarray, cfg: EdgeConfig) -> np.ndarray:
    """Edge image in [-1, 1] of a windowed image (2D or 3D)."""
    x = np.asarray(image, dtype=np.float32)
    if cfg.method == "gradient":
        if cfg.sigma > 0:
            g = ndimage.gaussian_gradient_magnitude(x, cfg.sigma, mode="reflect")
        else:
            g = np.sqrt(sum(d * d for d in np.gradient(x)))
        return (2.0 * np.tanh(g / cfg.scale) - 1.0).astype(np.float32)
    if cfg.method == "canny":
        img = sitk.GetImageFromArray(x.astype(np.float64))
        variance = [float(cfg.sigma) ** 2] * x.ndim
        e = sitk.CannyEdgeDetection(img, cfg.canny_lower, cfg.canny_upper, variance)
        return (2.0 * sitk.GetArrayFromImage(e) - 1.0).astype(np.float32)
    raise ValueError(f"edges.method={cfg.method!r}: must be 'gradient' or 'canny'")


# ----------------------------------------------------------------------------- chunked (dask) versions
#
# Volume-level work on arrays that need not fit in memory (zarr, dask): the same operations,
# block by block. Edges are always computed on blocks of EDGE_BLOCK voxels with an overlap
# of the filter's reach, so the result does not depend on how the input is stored or chunked.

EDGE_BLOCK = 128


def edge_depth(cfg: EdgeConfig) -> int:
    """Overlap that makes block-wise edges equal whole-volume ones: the Gaussian's truncation radius + 2."""
    return int(4.0 * cfg.sigma + 0.5) + 2


def edges_chunked(image: Any, cfg: EdgeConfig) -> da.Array:
    """:func:`edges` computed lazily, block by block with overlap (mirrored at the volume border)."""
    x = image if isinstance(image, da.Array) else da.from_array(image, chunks=EDGE_BLOCK)
    x = x.rechunk(EDGE_BLOCK)
    if all(len(c) == 1 for c in x.chunks):  # one block: the whole volume at once
        return x.map_blocks(edges, cfg=cfg, dtype=np.float32)
    depth = edge_depth(cfg)
    return x.map_overlap(edges, depth=depth, boundary="reflect", dtype=np.float32, cfg=cfg)


def _window_block(block: np.ndarray, intensity: IntensityConfig, label: str) -> np.ndarray:
    try:
        return window(block, intensity)
    except ValueError as err:
        raise ValueError(f"{label}: {err}") from None


def window_chunked(image: Any, intensity: IntensityConfig, name: str = "image") -> da.Array:
    """:func:`window` lazily; a block with NaN/inf raises a ValueError naming ``name``."""
    x = image if isinstance(image, da.Array) else da.from_array(image, chunks=EDGE_BLOCK)
    return da.map_blocks(_window_block, x, intensity=intensity, label=name, dtype=np.float32)


def downsample2_chunked(x: da.Array) -> da.Array:
    """:func:`downsample2` lazily (edge-padded odd axes, then 2x block means)."""
    pad = [(0, s % 2) for s in x.shape]
    if any(p for _, p in pad):
        x = da.pad(x, pad, mode="edge")
    x = x.rechunk(EDGE_BLOCK)
    return da.coarsen(np.mean, x, dict.fromkeys(range(x.ndim), 2)).astype(np.float32)


@dataclass
class Pyramid:
    """Windowed image and edges at every scale, LR (scale 0) first. A training pair also holds the
    windowed source image per scale (``sources``; the edges are then the source's, as at inference) and,
    when some voxels must not train (outside the pair's overlap or a scanner's field of view), a boolean
    mask of the valid voxels per scale (``masks``; None: every voxel is valid)."""

    images: list[np.ndarray]
    edges: list[np.ndarray]
    sources: list[np.ndarray] | None = None
    masks: list[np.ndarray] | None = None

    @property
    def num_scales(self) -> int:
        return len(self.images)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(im.shape) for im in self.images]


def image_pyramid(windowed: np.ndarray, num_scales: int) -> list[np.ndarray]:
    """``num_scales`` images, LR first, each coarser one the x2 block mean of the next."""
    levels = [np.asarray(windowed, dtype=np.float32)]
    for _ in range(num_scales - 1):
        levels.append(downsample2(levels[-1]))
    levels = levels[::-1]
    expected = pyramid_shapes(windowed.shape, num_scales)
    assert [lv.shape for lv in levels] == expected, ([lv.shape for lv in levels], expected)
    return levels


def build_pyramid(image: np.ndarray, num_scales: int, intensity: IntensityConfig, edge_cfg: EdgeConfig) -> Pyramid:
    """The pyramid of a raw image (HU for CT): window, downsample, edges per scale."""
    if min(image.shape) < 2 ** (num_scales - 1):
        raise ValueError(
            f"image of shape {tuple(image.shape)} is too small for num_scales={num_scales}: "
            f"the LR grid would be under one voxel per axis"
        )
    images = image_pyramid(window(image, intensity), num_scales)
    return Pyramid(images=images, edges=[np.asarray(edges_chunked(im, edge_cfg).compute()) for im in images])


def mask_pyramid(valid: np.ndarray, num_scales: int) -> list[np.ndarray]:
    """Valid-voxel masks per scale, LR first: a coarse voxel is valid only when every fine voxel of its
    x2 block is (odd axes repeat their last voxel, as :func:`downsample2` does)."""
    levels = [np.asarray(valid, dtype=bool)]
    for _ in range(num_scales - 1):
        levels.append(downsample2(levels[-1].astype(np.float32)) >= 1.0)
    return levels[::-1]


def build_pair_pyramid(
    source: np.ndarray,
    target: np.ndarray,
    num_scales: int,
    intensity: IntensityConfig,
    edge_cfg: EdgeConfig,
    valid: np.ndarray | None = None,
) -> Pyramid:
    """The pyramid of a training pair (raw units): the target's images, the source's images and edges, and
    with ``valid`` (a boolean array on the pair's grid) the valid-voxel masks per scale."""
    if np.shape(source) != np.shape(target):
        raise ValueError(f"source {np.shape(source)} and target {np.shape(target)} of a pair differ in shape")
    if valid is not None and np.shape(valid) != np.shape(source):
        raise ValueError(f"valid mask {np.shape(valid)} and the pair {np.shape(source)} differ in shape")
    src = build_pyramid(source, num_scales, intensity, edge_cfg)
    masks = mask_pyramid(valid, num_scales) if valid is not None else None
    images = image_pyramid(window(target, intensity), num_scales)
    return Pyramid(images=images, edges=src.edges, sources=src.images, masks=masks)


def foreground_mask(image_lr: np.ndarray, threshold: float) -> np.ndarray:
    """Voxels of a windowed image above ``threshold`` (the body), on the small LR grid."""
    return np.asarray(image_lr) > threshold
