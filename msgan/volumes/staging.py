"""Staging a volume: its input checked and its :class:`VolumePlan` made (:func:`plan_volume`), then the
windowed image and edges of every scale written block by block (dask) into the run's own staging folder, and
the output levels created, NaN where never written (:func:`stage`). The plan travels as the staged inputs'
``plan`` attribute and, between Ray tasks and actors, as :meth:`VolumePlan.to_dict`. A model with
``intensity.normalize: percentile`` normalises the input by the plan's :class:`~msgan.normalize.Scaling`, made
once per volume from the fixed strided sample of its level 0 that the in-memory path uses too."""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from msgan import storage
from msgan.cascade import Cascade
from msgan.config import Config
from msgan.io.volume import Geometry, VolumeError, dimension_names, open_group, read_level
from msgan.normalize import Scaling, apply_chunked, scaling_of
from msgan.pyramid import downsample2_chunked, edges_chunked, window_chunked
from msgan.tiling import Tile, batches_of, pyramid_shapes, tile_grid
from msgan.volumes.heap import release_memory
from msgan.volumes.tasks import VolumeTask

RUN_FILE = "run.json"  # in a staging folder: which run made it, for which output
PLAN_ATTR = "plan"  # the staged inputs' attribute that holds the volume's plan


@dataclass(frozen=True)
class VolumePlan:
    """One volume's plan, made once from its checked input: every scale's grid (LR first), every HR scale's
    tile core (each tile's core is one output chunk; 0 for scale 0, which runs whole), the input's geometry
    and its other attributes (``source``, kept in the output's attributes), and the input's intensity
    ``scaling`` (None unless the model normalises: ``intensity.normalize``)."""

    shapes: tuple[tuple[int, ...], ...]
    tiles: tuple[int, ...]
    geometry: Geometry
    source: dict[str, Any] = field(default_factory=dict, hash=False)
    scaling: Scaling | None = None

    @property
    def num_scales(self) -> int:
        return len(self.shapes)

    def tiles_of(self, scale: int) -> list[Tile]:
        """The tile grid of HR scale ``scale``."""
        return tile_grid(self.shapes[scale], self.tiles[scale])

    def batches(self, scale: int, batch_size: int) -> list[list[Tile]]:
        """The fixed batches of ``scale``'s tiles: a function of the plan only, whoever runs them."""
        return batches_of(self.tiles_of(scale), batch_size)

    def voxels(self, scale: int) -> int:
        return int(np.prod(self.shapes[scale]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the staged ``plan`` attribute, Ray arguments)."""
        return {
            "shapes": [list(s) for s in self.shapes],
            "tiles": list(self.tiles),
            "geometry": self.geometry.as_dict(),
            "source": dict(self.source),
            "scaling": None if self.scaling is None else self.scaling.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "volume plan") -> VolumePlan:
        """The plan :meth:`to_dict` gave; a :class:`VolumeError` naming ``where`` for anything else."""
        try:
            shapes = tuple(tuple(int(n) for n in s) for s in d["shapes"])
            tiles = tuple(int(t) for t in d["tiles"])
            geometry = Geometry.from_dict(d["geometry"])
            source = d.get("source", {})
            if not shapes or len(tiles) != len(shapes) or not isinstance(source, dict):
                raise ValueError("shapes, tiles and source do not agree")
            scaling = d.get("scaling")
            scaling = None if scaling is None else Scaling.from_dict(scaling, "scaling")
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise VolumeError(f"{where}: not a volume plan ({type(err).__name__}: {err})") from None
        return cls(shapes, tiles, geometry, dict(source), scaling)

    @classmethod
    def staged(cls, task: VolumeTask) -> VolumePlan:
        """The plan :func:`stage` stored with ``task``'s staged inputs."""
        d = open_group(task.inputs_uri, "r").attrs.get(PLAN_ATTR)
        if not isinstance(d, dict):
            raise VolumeError(f"{task.name}: not staged")
        return cls.from_dict(d, f"{task.name}: staged plan")


def array(group: zarr.Group, key: str) -> zarr.Array:
    arr = group[key]
    assert isinstance(arr, zarr.Array)
    return arr


def scale_arrays(inputs: zarr.Group, scale: int) -> dict[str, zarr.Array]:
    """The staged named arrays a scale's generator may read (:func:`msgan.engine.feed_box`):
    ``prev`` (scale - 1's output, window units), ``image`` (windowed source) and ``edges`` at ``scale``."""
    arrays = {"image": array(inputs, f"image/{scale}"), "edges": array(inputs, f"edges/{scale}")}
    if scale > 0:
        arrays["prev"] = array(inputs, f"work/{scale - 1}")
    return arrays


def _chunk_grid(arr: zarr.Array) -> tuple[int, ...]:
    """Stored objects per axis (shards when sharded, else chunks)."""
    unit = arr.shards or arr.chunks
    return tuple(math.ceil(s / c) for s, c in zip(arr.shape, unit, strict=True))


def _find_bad_chunk(arr: zarr.Array) -> tuple[str, BaseException] | None:
    """The first chunk of ``arr`` that fails to read back, and its error (None when all read)."""
    unit = arr.shards or arr.chunks
    for c in itertools.product(*(range(g) for g in _chunk_grid(arr))):
        box = tuple(slice(i * u, min((i + 1) * u, s)) for i, u, s in zip(c, unit, arr.shape, strict=True))
        try:
            arr[box]
        except Exception as err:  # the codec's own error types (zstd, blosc, ...) vary
            return arr.metadata.encode_chunk_key(c), err
    return None


def _read_error(name: str, level0: zarr.Array, err: Exception) -> Exception:
    """What to raise for ``err`` met while reading ``level0`` of input ``name``: a :class:`VolumeError` naming
    the first chunk that does not decode, else one with ``err``'s message (a ValueError), else ``err``."""
    bad = _find_bad_chunk(level0)
    if bad is not None:
        key, why = bad
        return VolumeError(
            f"{name}: chunk {key} of array '0' cannot be read ({type(why).__name__}: {why}); "
            "the stored volume is corrupt: ingest it again"
        )
    return VolumeError(str(err)) if isinstance(err, ValueError) else err


def plan_volume(task: VolumeTask, cascade: Cascade, tile: int | None = None) -> VolumePlan:
    """The volume's plan, after checking the input: readable, the model's dimensions, large enough, declared
    sizes within the caps and every chunk of level 0 stored (:func:`msgan.io.volume.read_level`); with
    ``intensity.normalize`` its scaling, from a strided sample of level 0 (:func:`msgan.normalize.scaling_of`)."""
    cfg = cascade.config
    n = cfg.num_scales
    level0, geom, attrs = read_level(task.input, 0, cfg.dims)
    shapes = pyramid_shapes(level0.shape, n)
    if min(shapes[0]) < 1 or any(min(s) < 2 for s in shapes[1:]):
        raise VolumeError(f"{task.input}: shape {level0.shape} is too small for {n} scales")
    tiles = [0] + [int(tile or cascade.tile_size(s, shapes[s])) for s in range(1, n)]
    try:
        scaling = scaling_of(level0, cfg.intensity, name=task.input)  # reads a strided sample of level 0
    except (VolumeError, OSError):
        raise
    except Exception as err:  # a flat volume, NaN, or a chunk that does not decode: name it
        raise _read_error(task.input, level0, err) from err
    return VolumePlan(tuple(tuple(s) for s in shapes), tuple(tiles), geom, dict(attrs), scaling)


def stage(task: VolumeTask, config: Config | Cascade, vplan: VolumePlan, chunk: int = 64) -> None:
    """Write the windowed image and edges of every scale to the run's staging folder and create the
    output levels (NaN where never written), chunked by each scale's tile of ``vplan``."""
    cfg = config.config if isinstance(config, Cascade) else config
    n = cfg.num_scales
    shapes, tiles = vplan.shapes, vplan.tiles
    storage.write_text(
        storage.join(task.staging, RUN_FILE),
        json.dumps({"run": task.run, "output": task.output, "model": task.model, "time": time.time()}),
    )
    level0 = array(open_group(task.input, "r"), "0")
    inputs = open_group(task.inputs_uri, "w")
    with dask.config.set(scheduler="threads"):
        try:
            _write_pyramids(inputs, level0, cfg, vplan, chunk, task.input)
        except (VolumeError, OSError):
            raise
        except ValueError as err:
            raise VolumeError(str(err)) from err
        except Exception as err:  # a chunk that does not decode: name it
            raise _read_error(task.input, level0, err) from err
    release_memory()
    for s in range(n - 1):  # the cascade's intermediate outputs (window units), chunked by the scale's tile
        ch = tuple(min(tiles[s] or d, d) for d in shapes[s])
        inputs.create_array(f"work/{s}", shape=shapes[s], chunks=ch, dtype="float32", fill_value=np.nan)
    result = open_group(task.result_uri, "w")
    for s, shape in enumerate(shapes):  # OME level k = scale n-1-k, in input units
        ch = tuple(min(tiles[s] or d, d) for d in shape)
        result.create_array(str(n - 1 - s), shape=shape, chunks=ch, dtype="float32", fill_value=np.nan,
                            dimension_names=dimension_names(len(shape)))  # fmt: skip
    inputs.attrs[PLAN_ATTR] = vplan.to_dict()


def _write_pyramids(
    inputs: zarr.Group, level0: zarr.Array, cfg: Config, vplan: VolumePlan, chunk: int, name: str
) -> None:
    """The windowed image (normalised first by the plan's scaling when the model normalises) and edges at every
    scale (and the source in input units where outputs blend to it). Level by level, each read back from the
    level just stored: one graph per level keeps only a few blocks in memory whatever the volume's size (one
    graph for the whole pyramid held more)."""
    shapes = vplan.shapes
    n = len(shapes)
    if (vplan.scaling is None) != (cfg.intensity.normalize == "none"):
        raise VolumeError(
            f"{name}: the volume plan has {'no' if vplan.scaling is None else 'an'} intensity scaling; the model's "
            f"intensity.normalize is {cfg.intensity.normalize!r}: plan the volume with this model"
        )
    img, edge = {}, {}
    for s, shape in enumerate(shapes):
        ch = tuple(min(chunk, d) for d in shape)
        img[s] = inputs.create_array(f"image/{s}", shape=shape, chunks=ch, dtype="float32", fill_value=np.nan)
        edge[s] = inputs.create_array(f"edges/{s}", shape=shape, chunks=ch, dtype="float32", fill_value=np.nan)
    finest = window_chunked(apply_chunked(da.from_zarr(level0), vplan.scaling, cfg.intensity), cfg.intensity, name=name)
    da.store(finest.rechunk(img[n - 1].chunks), img[n - 1], lock=False)  # type: ignore[arg-type]
    for s in range(n - 2, -1, -1):
        coarse = downsample2_chunked(da.from_zarr(img[s + 1]))
        da.store(coarse.rechunk(img[s].chunks), img[s], lock=False)  # type: ignore[arg-type]
    for s in range(n):
        e = edges_chunked(da.from_zarr(img[s]), cfg.edges)
        da.store(e.rechunk(img[s].chunks), edge[s], lock=False)  # type: ignore[arg-type]
    if cfg.intensity.outside == "source":  # outputs blend to the source (input units) outside the window
        src = {s: inputs.create_array(f"source/{s}", shape=shapes[s], chunks=img[s].chunks,
                                      dtype="float32", fill_value=np.nan) for s in range(n)}  # fmt: skip
        da.store(da.from_zarr(level0).astype(np.float32).rechunk(src[n - 1].chunks), src[n - 1], lock=False)  # type: ignore[arg-type]
        for s in range(n - 2, -1, -1):
            coarse = downsample2_chunked(da.from_zarr(src[s + 1]))
            da.store(coarse.rechunk(src[s].chunks), src[s], lock=False)  # type: ignore[arg-type]
