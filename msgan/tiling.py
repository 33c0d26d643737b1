"""Patch and tile geometry, apart from any model: tile grids, halo reads, reflect borders.

Everything here works on any array that supports numpy basic slicing (numpy, zarr,
dask, h5py): a read touches only the bounding box of the requested region, so a
volume never needs to be in memory whole.

Border rule, shared by training and inference: outside the volume, voxel ``i`` reads
voxel ``reflect(i)`` (numpy's ``"reflect"``: mirrored about the edge voxel, repeated
as often as needed). Tiled inference and a whole-volume pass use the same rule, which
is what makes them equal.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Tile:
    """One inference tile: the output core ``[start, stop)`` per axis (input adds the halo).

    ``run`` is the core the generator actually runs on, ``[start, start + run)``: every tile
    of a plan has the same one, so a border tile is read whole through the reflect rule and
    its output cropped to ``[start, stop)``. Same shapes in every forward pass are what make
    the output bytes a function of the plan alone.
    """

    start: tuple[int, ...]
    stop: tuple[int, ...]
    run: tuple[int, ...] | None = None  # None: the tile's own shape

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))

    @property
    def run_shape(self) -> tuple[int, ...]:
        return self.shape if self.run is None else self.run

    @property
    def run_stop(self) -> tuple[int, ...]:
        return tuple(a + r for a, r in zip(self.start, self.run_shape, strict=True))

    @property
    def crop(self) -> tuple[slice, ...]:
        """Where the tile's own core lies in an output over the run box."""
        return tuple(slice(0, n) for n in self.shape)


def tile_grid(shape: Sequence[int], core: int | Sequence[int]) -> list[Tile]:
    """Cover ``shape`` with cores of ``core`` voxels starting at multiples of ``core``.

    The last tile along an axis is cut at the volume border, but runs at the plan's full core
    (``min(core, size)`` per axis, :attr:`Tile.run`). With ``core`` equal to the output's chunk
    size, no two tiles touch the same chunk.
    """
    cores = [core] * len(shape) if isinstance(core, int) else list(core)
    if len(cores) != len(shape):
        raise ValueError(f"core {cores} has {len(cores)} axes, volume shape {tuple(shape)} has {len(shape)}")
    if any(c < 1 for c in cores):
        raise ValueError(f"tile core {cores} must be >= 1 voxel per axis")
    run = tuple(min(c, s) for c, s in zip(cores, shape, strict=True))
    ranges = [[(a, min(a + c, s)) for a in range(0, s, c)] for s, c in zip(shape, cores, strict=True)]
    return [Tile(tuple(r[0] for r in combo), tuple(r[1] for r in combo), run) for combo in itertools.product(*ranges)]


def run_voxels(shape: Sequence[int], core: int, halo: int) -> int:
    """Input voxels the generator reads over a whole plan of ``core`` (every tile runs at the full core)."""
    tiles = math.prod(-(-s // core) for s in shape)
    return tiles * math.prod(min(core, s) + 2 * halo for s in shape)


def plan_core(shape: Sequence[int], max_core: int, halo: int) -> int:
    """The even core up to ``max_core`` whose plan reads the fewest input voxels (:func:`run_voxels`;
    the largest such core on ties). E.g. 128 voxels under a budget of 96: 64 (two tiles with no
    waste), not 96 (a 32-voxel border tile running at 96)."""
    if max_core < 1:
        raise ValueError(f"max_core={max_core}: must be >= 1")
    top = min(max_core, max(shape) + max(shape) % 2)  # beyond the volume's side nothing changes
    candidates = list(range(2, top + 1, 2)) or [top]
    return min(candidates, key=lambda c: (run_voxels(shape, c, halo), -c))


def input_box(start: Sequence[int], stop: Sequence[int], halo: int) -> tuple[list[int], list[int]]:
    """The fine input box of an output core ``[start, stop)``: the core grown by ``halo`` per side."""
    return [a - halo for a in start], [b + halo for b in stop]


def context_box(
    start: Sequence[int], stop: Sequence[int], halo: int, head_halo: int, context_halo: int
) -> tuple[list[int], list[int]]:
    """Coarse box (start, stop per axis, at the previous scale's resolution) a wide-context generator
    needs for the fine output core ``[start, stop)``.

    The coarse branch joins the fine path after the head, whose output spans the input box less
    ``head_halo``; the box covers that span (halved) plus the branch's own ``context_halo``.
    Cores start on even voxels, so fine and coarse grids stay aligned.
    """
    if any(a % 2 for a in start):
        raise ValueError(f"wide-context tiles must start on even voxels, got start={list(start)}")
    f0 = [a - halo + head_halo for a in start]  # first fine voxel of the head's output
    f1 = [b + halo - head_halo for b in stop]
    return [f // 2 - context_halo for f in f0], [(f - 1) // 2 + 1 + context_halo for f in f1]


def reflect_index(index: np.ndarray, size: int) -> np.ndarray:
    """Map (possibly out-of-range) indices into ``[0, size)`` by repeated mirroring about the edge voxels."""
    if size < 1:
        raise ValueError(f"cannot index an axis of size {size}")
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    i = np.abs(index) % period
    return np.where(i >= size, period - i, i)


def _gather(array: Any, axes_index: Sequence[np.ndarray]) -> np.ndarray:
    """``array`` at the outer product of per-axis integer indices, reading one bounding box."""
    lo = [int(ix.min()) for ix in axes_index]
    hi = [int(ix.max()) + 1 for ix in axes_index]
    block = np.asarray(array[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))])
    for axis, (ix, a, b) in enumerate(zip(axes_index, lo, hi, strict=True)):
        if len(ix) != b - a or np.any(np.diff(ix) != 1):
            block = np.take(block, ix - a, axis=axis)
    return block


def read_region(array: Any, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
    """``array[start:stop]`` per axis, where the box may reach outside the volume (reflected)."""
    shape = array.shape
    if len(start) != len(shape) or len(stop) != len(shape):
        raise ValueError(f"box {list(start)}..{list(stop)} does not match array shape {tuple(shape)}")
    idx = [reflect_index(np.arange(a, b), s) for a, b, s in zip(start, stop, shape, strict=True)]
    return _gather(array, idx)


def _linear_taps(fine: np.ndarray, coarse_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear x2 upsampling taps (``align_corners=False``, as torch): fine index -> (i0, i1, w1)."""
    src = np.maximum((fine + 0.5) / 2.0 - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), coarse_size - 1)
    i1 = np.minimum(i0 + 1, coarse_size - 1)
    w1 = (src - i0).astype(np.float32)
    w1 = np.where(i1 == i0, np.float32(0.0), w1)
    return i0, i1, w1


def upsample_region(coarse: Any, fine_shape: Sequence[int], start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
    """The region ``[start, stop)`` of ``coarse`` upsampled x2 (linear) onto a grid of ``fine_shape``.

    Equals cropping the whole upsampled volume, so it can feed tiles without the whole
    upsampled volume ever existing. Out-of-volume fine indices are reflected first.
    """
    if len(fine_shape) != coarse.ndim:
        raise ValueError(f"fine shape {tuple(fine_shape)} and coarse shape {tuple(coarse.shape)} differ in axes")
    taps = []
    for a, b, fs, cs in zip(start, stop, fine_shape, coarse.shape, strict=True):
        if -(-fs // 2) != cs:
            raise ValueError(f"coarse axis of {cs} voxels is not half of fine axis {fs} (expected {-(-fs // 2)})")
        taps.append(_linear_taps(reflect_index(np.arange(a, b), fs), cs))
    lo = [int(i0.min()) for i0, _, _ in taps]
    hi = [int(i1.max()) + 1 for _, i1, _ in taps]
    out = np.asarray(coarse[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))], dtype=np.float32)
    for axis, ((i0, i1, w1), a) in enumerate(zip(taps, lo, strict=True)):
        shape = [1] * out.ndim
        shape[axis] = len(w1)
        w = w1.reshape(shape)
        out = np.take(out, i0 - a, axis=axis) * (1 - w) + np.take(out, i1 - a, axis=axis) * w
    return out.astype(np.float32, copy=False)


def batches_of(tiles: Sequence[Tile], batch_size: int) -> list[list[Tile]]:
    """The plan's batches: consecutive groups of ``batch_size`` tiles in plan order (the last may be
    short; :func:`msgan.engine.run_tiles` pads it). A fixed function of the plan, so any worker that
    runs a batch computes the same bytes."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    runs = {t.run_shape for t in tiles}
    if len(runs) > 1:
        raise ValueError(f"tiles of one plan run at one shape; got {sorted(runs)}")
    return [list(tiles[i : i + batch_size]) for i in range(0, len(tiles), batch_size)]


def pyramid_shapes(shape: Sequence[int], num_scales: int) -> list[tuple[int, ...]]:
    """Grid of every scale, LR first: each coarser scale has ``ceil(n / 2)`` voxels per axis."""
    shapes = [tuple(int(s) for s in shape)]
    for _ in range(num_scales - 1):
        shapes.append(tuple(-(-s // 2) for s in shapes[-1]))
    return shapes[::-1]


def sample_patch_starts(
    mask_lr: np.ndarray,
    factor: int,
    fine_shape: Sequence[int],
    patch: int,
    count: int,
    rng: np.random.Generator,
) -> list[tuple[int, ...]]:
    """Even start corners of ``count`` patches of ``patch`` voxels centred inside the foreground.

    The foreground is given on the small LR grid (``mask_lr``), ``factor`` finer voxels
    per LR voxel: a centre is an LR foreground voxel plus a uniform offset inside it, so
    sampling costs nothing that grows with the fine volume.
    """
    if any(patch > s for s in fine_shape):
        raise ValueError(f"patch of {patch} voxels is larger than the level {tuple(fine_shape)}")
    candidates = np.flatnonzero(mask_lr)
    if candidates.size == 0:
        candidates = np.arange(mask_lr.size)  # no foreground: anywhere
    starts = []
    for _ in range(count):
        lr = np.unravel_index(int(candidates[rng.integers(candidates.size)]), mask_lr.shape)
        start = []
        for c, s in zip(lr, fine_shape, strict=True):
            centre = int(c) * factor + int(rng.integers(factor))
            a = min(max(centre - patch // 2, 0), s - patch)
            start.append(a - a % 2)
        starts.append(tuple(start))
    return starts
