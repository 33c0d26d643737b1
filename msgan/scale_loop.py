"""The one per-scale loop of cascaded inference: scale 0 on the whole LR grid, then every HR scale in
order, tile by tile, each scale reading the previous one's output.

Every inference path runs this loop (:func:`run_cascade`): ``Cascade.translate_arrays`` (arrays in memory),
:func:`msgan.volumes.local.translate_volume` (one staged volume, in this process) and the Ray batch
(:mod:`msgan.distributed.translate`: scale 0 as tasks, each HR scale on an actor pool, many volumes at once).
They supply only

- where outputs go, a :class:`Target`: the named arrays each scale reads (``image`` / ``edges`` at the scale,
  ``prev`` = the previous scale's output) and where a scale's output is written (:class:`ArrayTarget`: arrays
  in memory; :class:`msgan.volumes.steps.StagedVolume`: a volume's staging folder), and
- where tiles run, a :class:`Runner`: :class:`InProcess` (here), or Ray tasks and a Ray Data actor pool.

A scale's tiles run in fixed batches (:func:`msgan.engine.run_tiles`), a function of the tile grid only,
so every path writes the same bytes. Imports torch and numpy only (no zarr, dask or Ray).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from msgan.engine import WriteFn, array_writer, needed_arrays, run_tiles, run_whole, tile_feed
from msgan.nets import HRGenerator
from msgan.tiling import Tile, tile_grid

if TYPE_CHECKING:
    from msgan.cascade import Cascade
    from msgan.config import Config

Progress = Callable[[int, int, int], None]  # (scale, tiles done, tiles total)
Tick = Callable[[int, int], None]  # (tiles done, tiles total) of one scale
Log = Callable[[str], None]


def check_same_shape(arrays: Mapping[str, Any], shape: tuple[int, ...]) -> None:
    """A scale's named input arrays (``prev`` aside) have its output's shape."""
    for name, a in arrays.items():
        if name != "prev" and tuple(a.shape) != shape:
            raise ValueError(f"output shape {shape} differs from array {name!r}'s {tuple(a.shape)}")


class Target(Protocol):
    """Where a cascade's outputs go, and the named arrays each scale reads."""

    def inputs(self, scale: int) -> Mapping[str, Any]:
        """``image`` / ``edges`` at ``scale`` and, above scale 0, ``prev`` (scale - 1's output, window units)."""
        ...

    def tiles(self, scale: int) -> list[Tile]:
        """The tile grid of HR scale ``scale``."""
        ...

    def core(self, scale: int) -> int:
        """The tile core of HR scale ``scale``."""
        ...

    def write_lr(self, y: np.ndarray) -> None:
        """Scale 0's whole output (window units)."""
        ...

    def writer(self, scale: int) -> WriteFn:
        """The writer of HR scale ``scale``'s tile cores (window units)."""
        ...


class Runner(Protocol):
    """Where tiles run. Each step returns its record (``tiles`` and what else it measured), or None when
    nothing is left to run (the loop stops)."""

    def scale0(self) -> dict[str, Any] | None: ...

    def hr_scale(self, scale: int, tick: Tick | None) -> dict[str, Any] | None: ...


def run_cascade(
    num_scales: int, runner: Runner, progress: Progress | None = None, log: Log | None = None
) -> list[dict[str, Any]]:
    """The one per-scale loop: scale 0, then HR scales 1..n-1 in order (each reads the one before).
    ``progress(scale, done, total)`` per scale (scale 0 counts as one tile); ``log`` gets a line per HR
    scale. Returns one record per scale run: ``scale``, the runner's record, ``seconds``."""
    records: list[dict[str, Any]] = []
    for s in range(num_scales):
        t0 = time.perf_counter()
        if s == 0:
            if progress is not None:
                progress(0, 0, 1)
            record = runner.scale0()
            if progress is not None:
                progress(0, 1, 1)
        else:
            record = runner.hr_scale(s, None if progress is None else _tick(progress, s))
        if record is None:
            break
        records.append({"scale": s, **record, "seconds": time.perf_counter() - t0})
        if log is not None and s > 0:
            log(f"  scale {s}: {record['tiles']} tiles of {record.get('tile')} in {records[-1]['seconds']:.1f}s")
    return records


def _tick(progress: Progress, scale: int) -> Tick:
    def tick(done: int, total: int) -> None:
        progress(scale, done, total)

    return tick


# ----------------------------------------------------------------------------- one target, in this process


def run_scale0(cascade: Cascade, target: Target, device: str | torch.device = "cpu") -> None:
    """Scale 0 of ``target``: the whole LR grid through the U-Net."""
    gen = cascade.generators[0]
    lr = {k: a[...] for k, a in target.inputs(0).items() if k in needed_arrays(gen)}
    target.write_lr(run_whole(gen, lr, device, cascade.config.train.amp))


class ScaleTiles:
    """HR scale ``scale`` of one target, ready to run tiles: the generator, its feed over the target's arrays
    and the target's writer; :meth:`run` hands fixed batches to the one tile runner."""

    def __init__(self, cascade: Cascade, target: Target, scale: int) -> None:
        gen = cascade.generators[scale]
        if not isinstance(gen, HRGenerator):
            raise TypeError(f"scale {scale} is not an HR generator")
        self.gen, self.cfg = gen, cascade.config
        self.feed = tile_feed(gen, target.inputs(scale))
        self.write = target.writer(scale)

    def run(self, tiles: Sequence[Tile], device: str | torch.device = "cpu", progress: Tick | None = None) -> int:
        bs = max(1, self.cfg.inference.batch_size)
        return run_tiles(self.gen, tiles, self.feed, self.write, bs, device, self.cfg.train.amp, progress)


class InProcess:
    """Runner: every tile of one target in this process (``after_scale``: e.g. hand freed heap back)."""

    def __init__(
        self,
        cascade: Cascade,
        target: Target,
        device: str | torch.device = "cpu",
        after_scale: Callable[[], None] | None = None,
    ) -> None:
        self.cascade, self.target, self.device, self.after_scale = cascade, target, device, after_scale

    def scale0(self) -> dict[str, Any]:
        run_scale0(self.cascade, self.target, self.device)
        self._after()
        return {"tiles": 1}

    def hr_scale(self, scale: int, tick: Tick | None) -> dict[str, Any]:
        tiles = self.target.tiles(scale)
        n = ScaleTiles(self.cascade, self.target, scale).run(tiles, self.device, tick)
        self._after()
        return {"tiles": n, "tile": self.target.core(scale)}

    def _after(self) -> None:
        if self.after_scale is not None:
            self.after_scale()


# ----------------------------------------------------------------------------- arrays in memory


class ArrayTarget:
    """Outputs in arrays (numpy, zarr; window units), one per scale, LR first; inputs: the named arrays per
    scale. ``core(scale, shape)`` picks each HR scale's tile core."""

    def __init__(
        self,
        levels: Sequence[Mapping[str, Any]],
        config: Config,
        core: Callable[[int, tuple[int, ...]], int],
        outputs: Sequence[Any] | None = None,
    ) -> None:
        self.levels, self._core = levels, core
        self.shapes = level_shapes(levels, config)
        self.outputs = list(outputs) if outputs is not None else [np.zeros(sh, np.float32) for sh in self.shapes]
        self._cores: dict[int, int] = {}

    def inputs(self, scale: int) -> Mapping[str, Any]:
        if scale == 0:
            return self.levels[0]
        check_same_shape(self.levels[scale], tuple(self.outputs[scale].shape))
        return {**self.levels[scale], "prev": self.outputs[scale - 1]}

    def core(self, scale: int) -> int:
        if scale not in self._cores:
            self._cores[scale] = self._core(scale, self.shapes[scale])
        return self._cores[scale]

    def tiles(self, scale: int) -> list[Tile]:
        return tile_grid(tuple(self.outputs[scale].shape), self.core(scale))

    def write_lr(self, y: np.ndarray) -> None:
        self.outputs[0][...] = y

    def writer(self, scale: int) -> WriteFn:
        return array_writer(self.outputs[scale])


def level_shapes(levels: Sequence[Mapping[str, Any]], config: Config) -> list[tuple[int, ...]]:
    """Each level's grid (its first named array other than ``prev``), checked against the cascade's scales
    and dimensions; a :class:`ValueError` naming the level otherwise."""
    if len(levels) != config.num_scales:
        raise ValueError(f"{len(levels)} levels given; the cascade has {config.num_scales} scales")
    shapes = []
    for s, arrays in enumerate(levels):
        named = [a for k, a in arrays.items() if k != "prev"]
        if not named:
            raise ValueError(f"level {s} holds no image or edges array")
        shape = tuple(named[0].shape)
        if len(shape) != config.dims:
            raise ValueError(f"level {s} has shape {shape}; the cascade is {config.dims}D")
        shapes.append(shape)
    return shapes
