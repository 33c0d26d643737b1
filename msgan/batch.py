"""Translation of volumes at rest (OME-Zarr on ``file://`` or ``s3://``), staged, then published whole.

One :class:`InferencePlan` per batch, resolved once where the batch starts: the model reference
pinned (``models:/NAME@ALIAS`` -> ``models:/NAME/VERSION``, a folder -> its manifest's hash), the
inference overrides, the run id. Every step of every volume receives that plan, never the alias.

A volume goes through four steps, each a plain function of its :class:`VolumeTask`, so Ray
Data (:mod:`msgan.distributed.translate`) and the local ``msgan translate`` run the same code:

1. :func:`plan_volume` + :func:`stage`: the input is checked (geometry, every chunk present),
   its tile plan made; the windowed input and its edge pyramid are written block by block (dask)
   into the run's own staging folder; the output levels are created, chunked by each scale's tile;
2. :func:`run_scale0`: the LR generator on the whole LR edge image;
3. :class:`ScaleRunner`: each HR scale, tile by tile; a tile's core is exactly one output
   chunk, so no two tiles ever write the same chunk;
4. :func:`publish`: every level is checked complete (staged arrays read NaN where never written)
   and checksummed, the manifest is written, and the output appears at once: an atomic exchange
   with the old output on ``file://``; on ``s3://`` a copy whose ``manifest.json`` is written last.

A volume is published iff ``<output>/manifest.json`` exists. A rerun skips outputs published by the
same model version and translates again (and replaces) those of another version. A lease per
output (:mod:`msgan.lease`) keeps two runs from publishing the same output at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import itertools
import json
import math
import os
import posixpath
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
import zarr

from msgan import lease, outputs, storage
from msgan.cascade import Cascade, CascadeError, run_lr
from msgan.config import Config
from msgan.engine import needed_arrays, run_tiles, tile_feed
from msgan.io.volume import Geometry, VolumeError, dimension_names, ome_attrs, open_group, read_level
from msgan.nets import HRGenerator
from msgan.pyramid import downsample2_chunked, edges_chunked, output_units, window_chunked
from msgan.tiling import Tile, batches_of, pyramid_shapes, tile_grid

MANIFEST = "manifest.json"
PUBLISHING = ".publishing.json"  # on s3://, beside an output whose manifest is being replaced (ours, mid-publish)
RUN_FILE = "run.json"  # in a staging folder: which run made it, for which output
MANIFEST_KEYS = ("volume", "model", "shape", "tiles", "checksum_sha256")

Progress = Callable[[int, int, int], None]  # (scale, tiles done, tiles total)
Log = Callable[[str], None]


class ModelError(ValueError):
    """A model reference that cannot be pinned or loaded; the message names it and says why."""


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class InferencePlan:
    """What translates a batch, resolved once: every task and actor gets this, never an alias."""

    model: str  # what loads: models:/NAME/VERSION, runs:/..., or an absolute cascade folder
    model_id: str  # what manifests record: NAME/VERSION, or folder-name/manifest-hash
    run: str  # this batch's run id (staging folder, leases)
    overrides: dict[str, Any] = field(default_factory=dict)  # inference.* settings, without the prefix
    tile: int | None = None  # every HR scale's tile core (else each scale's from the memory budget)
    digest: str | None = None  # sha256 of a folder model's manifest.json, checked at every load

    def load(self, device: str | torch.device = "cpu") -> Cascade:
        """The pinned cascade with the plan's overrides (a folder changed since pinning is refused)."""
        if self.model.startswith(("models:/", "runs:/")):
            from msgan.registry import load_cascade

            cascade = load_cascade(self.model, str(device))
        else:
            self._check_pinned()
            try:
                cascade = Cascade.load(self.model, device)  # checks every weight file against the manifest
            except CascadeError as err:
                raise ModelError(str(err)) from None
            self._check_pinned()  # the same manifest before and after: what loaded is what was pinned
        return with_overrides(cascade, self.overrides)

    def _check_pinned(self) -> None:
        digest, _ = _folder_manifest(self.model)
        if self.digest is not None and digest != self.digest:
            raise ModelError(
                f"{self.model}: the cascade changed since this batch pinned it "
                f"(manifest sha256 {digest[:12]}, pinned {self.digest[:12]}); rerun the batch"
            )


def with_overrides(cascade: Cascade, overrides: dict[str, Any]) -> Cascade:
    if overrides:
        cascade.config = cascade.config.replace(**{f"inference.{k}": v for k, v in overrides.items()})
    return cascade


def _folder_manifest(folder: str) -> tuple[str, dict[str, Any]]:
    """(sha256, content) of a cascade folder's manifest, read once with the folder's confinement rules
    (:func:`msgan.cascade.read_manifest_raw`); :class:`ModelError` naming the file when unusable."""
    from msgan.cascade import CascadeError, read_manifest_raw

    try:
        raw, content = read_manifest_raw(folder)
    except CascadeError as err:
        raise ModelError(str(err)) from None
    return hashlib.sha256(raw).hexdigest(), content


def _pin_registry(model: str) -> str:
    """``models:/NAME@ALIAS`` -> ``models:/NAME/VERSION`` (:func:`msgan.registry.pin_model`)."""
    from msgan.registry import pin_model

    try:
        return pin_model(model)
    except ValueError as err:
        raise ModelError(str(err)) from err
    except Exception as err:  # MLflow's own errors for an unknown name or alias
        raise ModelError(f"{model}: cannot be resolved to a registered version ({type(err).__name__}: {err})") from err


def resolve_plan(
    model: str, overrides: dict[str, Any] | None = None, tile: int | None = None, run: str | None = None
) -> InferencePlan:
    """Pin ``model`` (registry alias -> version, folder -> manifest hash) for one batch."""
    if model.startswith("models:/"):
        pinned = _pin_registry(model)
        return InferencePlan(pinned, pinned[len("models:/") :], run or lease.new_run_id(), dict(overrides or {}), tile)
    if model.startswith("runs:/"):
        return InferencePlan(model, model[len("runs:/") :], run or lease.new_run_id(), dict(overrides or {}), tile)
    folder = str(Path(model).expanduser().resolve())
    digest, _ = _folder_manifest(folder)
    return InferencePlan(
        folder, f"{Path(folder).name}/{digest[:12]}", run or lease.new_run_id(), dict(overrides or {}), tile, digest
    )


def model_id(model: str) -> str:
    """A stable name for what translates: ``NAME/VERSION`` for registry models, a content hash for folders."""
    return resolve_plan(model).model_id


# ----------------------------------------------------------------------------- volumes and their outputs


@dataclass(frozen=True)
class VolumeTask:
    name: str
    input: str  # URI of the input OME-Zarr group
    output: str  # URI of the published output group
    staging: str  # URI of this run's staging folder for this volume
    model: str  # what translates it, pinned, e.g. "msgan-cascade/3"
    run: str = ""  # the run id (leases)

    @property
    def inputs_uri(self) -> str:
        return storage.join(self.staging, "inputs.zarr")

    @property
    def result_uri(self) -> str:
        return storage.join(self.staging, "output.zarr")

    @property
    def lease(self) -> lease.Lease:
        parent, base = posixpath.split(self.output.rstrip("/"))
        return lease.Lease(f"{parent}/.leases/{base}.json", self.run)


def parent_of(uri: str) -> str:
    """The folder (prefix) an output lives in: its ``.leases`` and ``.staging`` are there."""
    return posixpath.dirname(uri.rstrip("/"))


def volume_task(
    input_uri: str, out_prefix: str, model: str, output: str | None = None, run: str | None = None
) -> VolumeTask:
    """The task of translating ``input_uri`` into ``<out_prefix>/<name>.zarr`` (or ``output``);
    staging lives beside the output, under ``.staging/``, one folder per volume and run."""
    src = storage.normalize_uri(input_uri)
    base = posixpath.basename(src.rstrip("/"))
    name = base[: -len(".zarr")] if base.endswith(".zarr") else base
    dest = output if output else storage.join(storage.normalize_uri(out_prefix), f"{name}.zarr")
    dest = outputs.resolve_output(dest, [src])  # a symlink leaving its folder, or the input itself: refused
    run = run or lease.new_run_id()
    return VolumeTask(name, src, dest, staging=f"{parent_of(dest)}/.staging/{name}-{run}", model=model, run=run)


def check_collisions(tasks: Sequence[VolumeTask]) -> None:
    """Refuse (before any work) inputs that would be translated into the same output."""
    by_output: dict[str, list[str]] = {}
    for t in tasks:
        by_output.setdefault(t.output, []).append(t.input)
    clashes = {out: ins for out, ins in by_output.items() if len(ins) > 1}
    if clashes:
        out, ins = next(iter(clashes.items()))
        raise VolumeError(
            f"{len(ins)} inputs map to one output {out}: {', '.join(ins)}; give volumes distinct names "
            f"or translate them into different output prefixes ({len(clashes)} such output(s))"
        )


def expand_inputs(items: Sequence[str]) -> list[str]:
    """Volumes named directly (``*.zarr``) or every ``*.zarr`` directly under a prefix."""
    out: list[str] = []
    for item in items:
        uri = storage.normalize_uri(item)
        if uri.rstrip("/").endswith(".zarr"):
            out.append(uri)
            continue
        fs, path = storage.filesystem(uri)
        if not fs.isdir(path):
            raise VolumeError(f"{item}: neither a .zarr volume nor a prefix holding them")
        scheme = "s3://" if storage.is_s3(uri) else "file://"
        found = sorted(p.rstrip("/") for p in fs.ls(path, detail=False) if p.rstrip("/").endswith(".zarr"))
        if not found:
            raise VolumeError(f"{item}: no .zarr volumes under this prefix")
        out += [scheme + p.lstrip("/") if scheme == "s3://" else scheme + p for p in found]
    return out


def read_manifest(task: VolumeTask) -> dict[str, Any] | None:
    """The published output's manifest, None when unpublished; a malformed one is a :class:`VolumeError`."""
    uri = storage.join(task.output, MANIFEST)
    if not storage.exists(uri):
        return None
    try:
        return storage.json_object(storage.read_bytes(uri), MANIFEST_KEYS)
    except ValueError as err:
        raise VolumeError(f"{uri}: malformed manifest: {err}; remove {task.output} to translate it again") from err


def is_ours(output: str) -> bool:
    """Whether ``output`` is msgan's own translation: published (its manifest) or caught mid-publish on
    ``s3://`` (the marker written before an old manifest is removed). Only such an output is ever replaced."""
    for name in (MANIFEST, PUBLISHING):
        uri = storage.join(output, name)
        if storage.exists(uri):
            try:
                storage.json_object(storage.read_bytes(uri), MANIFEST_KEYS if name == MANIFEST else ("run",))
            except ValueError as err:
                raise VolumeError(
                    f"{uri}: malformed manifest: {err}; {output} is not replaced: check it and remove it yourself "
                    "to translate it again"
                ) from err
            return True
    return False


def check_output(task: VolumeTask, replace: bool = True, volumes: bool = False) -> dict[str, Any] | None:
    """Before any work: the output is absent, or msgan's own (its manifest, returned). Another model
    version's output is replaced only with ``replace`` (the batch job's rule; ``msgan translate`` asks for
    ``--replace``), a zarr volume msgan wrote without a manifest only with ``volumes`` (``--replace``);
    anything else there is refused, never emptied (:class:`msgan.outputs.OutputError`)."""

    def ours(uri: str) -> bool:
        return is_ours(uri) or (volumes and outputs.is_msgan_volume(uri))

    outputs.refuse_foreign(task.output, ours, hint="; a translation goes to a new path or to msgan's own output")
    previous = read_manifest(task)
    if previous is not None and previous["model"] != task.model and not replace:
        raise outputs.OutputError(
            f"{task.output}: holds msgan's translation by {previous['model']}; pass --replace to replace it with "
            f"{task.model}'s"
        )
    return previous


def is_published(task: VolumeTask, by_same_model: bool = True) -> bool:
    """Published (by ``task.model`` unless ``by_same_model`` is false)."""
    manifest = read_manifest(task)
    return manifest is not None and (not by_same_model or manifest["model"] == task.model)


# ----------------------------------------------------------------------------- zarr access


def _array(group: zarr.Group, key: str) -> zarr.Array:
    arr = group[key]
    assert isinstance(arr, zarr.Array)
    return arr


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


def inspect_input(uri: str, dims: int) -> tuple[zarr.Array, Geometry, dict[str, Any]]:
    """The input's level 0, geometry and attributes; a clear :class:`VolumeError` when unusable."""
    return read_level(uri, 0, dims)


HEAP_MMAP_THRESHOLD = 64 * 1024  # bytes: larger buffers (tiles, chunks) are mmapped, so freeing returns them


def bound_heap() -> None:
    """Keep this process's heap from growing with the number of tiles it has run (glibc): buffers above
    :data:`HEAP_MMAP_THRESHOLD` are mmapped and go back to the OS when freed (a fixed threshold also stops
    glibc from raising it, which let large buffers fragment the heap), and at most two malloc arenas.
    Measured: RSS over 216 tiles flat instead of +20 MiB, peak 456 instead of 604 MiB."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, HEAP_MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-8, 2)  # M_ARENA_MAX


def release_memory() -> None:
    """Hand freed heap back to the OS (glibc ``malloc_trim``) so the RSS follows what is live, not
    what a previous step (dask's threads, a whole LR image) once held."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ----------------------------------------------------------------------------- 1. plan + stage


def plan_volume(task: VolumeTask, cascade: Cascade, tile: int | None = None) -> dict[str, Any]:
    """The volume's tile plan (shapes and tile core per scale, geometry, source attributes), after
    checking the input: readable, the model's dimensions, large enough, declared sizes within the caps and
    every chunk of level 0 stored (:func:`msgan.io.volume.read_level`)."""
    cfg = cascade.config
    n = cfg.num_scales
    level0, geom, attrs = inspect_input(task.input, cfg.dims)
    shapes = pyramid_shapes(level0.shape, n)
    if min(shapes[0]) < 1 or any(min(s) < 2 for s in shapes[1:]):
        raise VolumeError(f"{task.input}: shape {level0.shape} is too small for {n} scales")
    tiles = [0] + [tile or cascade.tile_size(s, shapes[s]) for s in range(1, n)]
    return {"shapes": [list(s) for s in shapes], "tiles": tiles, "geometry": geom.as_dict(), "source": attrs}


def stage(task: VolumeTask, config: Config | Cascade, vplan: dict[str, Any], chunk: int = 64) -> None:
    """Write the windowed image and edges of every scale to the run's staging folder and create the
    output levels (NaN where never written), chunked by each scale's tile of ``vplan``."""
    cfg = config.config if isinstance(config, Cascade) else config
    n = cfg.num_scales
    shapes = [tuple(s) for s in vplan["shapes"]]
    tiles = vplan["tiles"]
    storage.write_text(
        storage.join(task.staging, RUN_FILE),
        json.dumps({"run": task.run, "output": task.output, "model": task.model, "time": time.time()}),
    )
    level0 = _array(open_group(task.input, "r"), "0")
    inputs = open_group(task.inputs_uri, "w")
    img_arrays, edge_arrays = {}, {}
    for s, shape in enumerate(shapes):
        ch = tuple(min(chunk, d) for d in shape)
        img_arrays[s] = inputs.create_array(f"image/{s}", shape=shape, chunks=ch, dtype="float32", fill_value=np.nan)
        edge_arrays[s] = inputs.create_array(f"edges/{s}", shape=shape, chunks=ch, dtype="float32", fill_value=np.nan)
    # Level by level, each read back from the level just stored: one graph per level keeps only a
    # few blocks in memory whatever the volume's size (one graph for the whole pyramid held more).
    with dask.config.set(scheduler="threads"):
        try:
            finest = window_chunked(da.from_zarr(level0), cfg.intensity, name=task.input)
            da.store(finest.rechunk(img_arrays[n - 1].chunks), img_arrays[n - 1], lock=False)  # type: ignore[arg-type]
            for s in range(n - 2, -1, -1):
                coarse = downsample2_chunked(da.from_zarr(img_arrays[s + 1]))
                da.store(coarse.rechunk(img_arrays[s].chunks), img_arrays[s], lock=False)  # type: ignore[arg-type]
            for s in range(n):
                e = edges_chunked(da.from_zarr(img_arrays[s]), cfg.edges)
                da.store(e.rechunk(img_arrays[s].chunks), edge_arrays[s], lock=False)  # type: ignore[arg-type]
            if cfg.intensity.outside == "source":  # outputs blend to the source (input units) outside the window
                src = {s: inputs.create_array(f"source/{s}", shape=shapes[s], chunks=img_arrays[s].chunks,
                                              dtype="float32", fill_value=np.nan) for s in range(n)}  # fmt: skip
                da.store(da.from_zarr(level0).astype(np.float32).rechunk(src[n - 1].chunks), src[n - 1], lock=False)  # type: ignore[arg-type]
                for s in range(n - 2, -1, -1):
                    coarse = downsample2_chunked(da.from_zarr(src[s + 1]))
                    da.store(coarse.rechunk(src[s].chunks), src[s], lock=False)  # type: ignore[arg-type]
        except (VolumeError, OSError):
            raise
        except ValueError as err:
            raise VolumeError(str(err)) from err
        except Exception as err:  # a chunk that does not decode: name it
            bad = _find_bad_chunk(level0)
            if bad is None:
                raise
            key, why = bad
            raise VolumeError(
                f"{task.input}: chunk {key} of array '0' cannot be read ({type(why).__name__}: {why}); "
                "the stored volume is corrupt: ingest it again"
            ) from err
    release_memory()
    for s in range(n - 1):  # the cascade's intermediate outputs (window units), chunked by the scale's tile
        ch = tuple(min(tiles[s] or d, d) for d in shapes[s])
        inputs.create_array(f"work/{s}", shape=shapes[s], chunks=ch, dtype="float32", fill_value=np.nan)
    result = open_group(task.result_uri, "w")
    for s, shape in enumerate(shapes):  # OME level k = scale n-1-k, in input units
        ch = tuple(min(tiles[s] or d, d) for d in shape)
        result.create_array(str(n - 1 - s), shape=shape, chunks=ch, dtype="float32", fill_value=np.nan,
                            dimension_names=dimension_names(len(shape)))  # fmt: skip
    inputs.attrs["plan"] = vplan


def plan_of(task: VolumeTask) -> dict[str, Any]:
    plan = open_group(task.inputs_uri, "r").attrs.get("plan")
    if not isinstance(plan, dict):
        raise VolumeError(f"{task.name}: not staged")
    return plan


def tiles_of(plan: dict[str, Any], scale: int) -> list[Tile]:
    return tile_grid(tuple(plan["shapes"][scale]), plan["tiles"][scale])


def plan_batches(plan: dict[str, Any], scale: int, batch_size: int) -> list[list[Tile]]:
    """The fixed batches of ``scale``'s tiles: a function of the plan only, whoever runs them."""
    return batches_of(tiles_of(plan, scale), batch_size)


# ----------------------------------------------------------------------------- 2. + 3. the cascade


def scale_arrays(inputs: zarr.Group, scale: int) -> dict[str, zarr.Array]:
    """The staged named arrays a scale's generator may read (:func:`msgan.engine.feed_box`):
    ``prev`` (scale - 1's output, window units), ``image`` (windowed source) and ``edges`` at ``scale``."""
    arrays = {"image": _array(inputs, f"image/{scale}"), "edges": _array(inputs, f"edges/{scale}")}
    if scale > 0:
        arrays["prev"] = _array(inputs, f"work/{scale - 1}")
    return arrays


def run_scale0(task: VolumeTask, cascade: Cascade, device: str | torch.device = "cpu") -> float:
    """Scale 0 on the whole LR grid; returns seconds."""
    t0 = time.perf_counter()
    cfg = cascade.config
    n = cfg.num_scales
    inputs, result = open_group(task.inputs_uri, "r+"), open_group(task.result_uri, "r+")
    gen = cascade.generators[0]
    lr = {k: a[...] for k, a in scale_arrays(inputs, 0).items() if k in needed_arrays(gen)}
    y = run_lr(gen, lr, device, cfg.train.amp)
    if n > 1:
        _array(inputs, "work/0")[...] = y
    source = np.asarray(_array(inputs, "source/0")[...]) if cfg.intensity.outside == "source" else None
    _array(result, str(n - 1))[...] = output_units(y, cfg.intensity, source)
    return time.perf_counter() - t0


class ScaleRunner:
    """One HR scale of one staged volume: its named input arrays and the writer of its outputs;
    :meth:`run` hands a fixed batch of tiles to the one tile runner (:func:`msgan.engine.run_tiles`)."""

    def __init__(self, task: VolumeTask, cascade: Cascade, scale: int) -> None:
        cfg = cascade.config
        n = cfg.num_scales
        gen = cascade.generators[scale]
        if not isinstance(gen, HRGenerator):
            raise TypeError(f"scale {scale} is not an HR generator")
        self.gen, self.cfg = gen, cfg
        inputs, result = open_group(task.inputs_uri, "r+"), open_group(task.result_uri, "r+")
        arrays = scale_arrays(inputs, scale)
        self.feed = tile_feed(gen, {k: arrays[k] for k in needed_arrays(gen)})
        self.work = _array(inputs, f"work/{scale}") if scale < n - 1 else None
        self.out = _array(result, str(n - 1 - scale))
        self.source = _array(inputs, f"source/{scale}") if cfg.intensity.outside == "source" else None

    def write(self, tile: Tile, core: np.ndarray) -> None:
        if self.work is not None:
            self.work[tile.slices] = core
        source = None if self.source is None else np.asarray(self.source[tile.slices])
        self.out[tile.slices] = output_units(core, self.cfg.intensity, source)

    def run(
        self,
        tiles: Sequence[Tile],
        device: str | torch.device = "cpu",
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        bs = max(1, self.cfg.inference.batch_size)
        return run_tiles(self.gen, tiles, self.feed, self.write, bs, device, self.cfg.train.amp, progress)


# ----------------------------------------------------------------------------- 4. publish


def _checksum_and_check(result: zarr.Group, n: int, name: str) -> str:
    """sha256 of every level's float32 bytes, read chunk-row by chunk-row; NaN means a tile was never written."""
    h = hashlib.sha256()
    for k in range(n):
        arr = _array(result, str(k))
        step = arr.chunks[0]
        for a in range(0, arr.shape[0], step):
            block = np.asarray(arr[a : a + step])
            if np.isnan(block).any():
                first = np.argwhere(np.isnan(block))[0]
                voxel = (a + int(first[0]), *(int(i) for i in first[1:]))
                key = arr.metadata.encode_chunk_key(tuple(v // c for v, c in zip(voxel, arr.chunks, strict=True)))
                raise VolumeError(
                    f"{name}: output level {k} chunk {key} has unwritten voxels (first at {voxel}; "
                    "a tile was lost or an input chunk was missing); not published"
                )
            h.update(np.ascontiguousarray(block, dtype=np.float32).tobytes())
    return h.hexdigest()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _replace_dir(new: Path, dest: Path) -> None:
    """Put ``new`` at ``dest``; an old ``dest`` is removed only once ``new`` is in its place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        os.rename(new, dest)
        return
    if _exchange(new, dest):
        shutil.rmtree(new, ignore_errors=True)  # the old output, now at the staging path
        return
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    os.rename(dest, old)  # fallback: a moment without an output, never a mix of two
    os.rename(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def publish(task: VolumeTask, info: dict[str, Any], volumes: bool = False) -> dict[str, Any]:
    """Check, checksum and publish the staged output (the run must hold the output's lease); it replaces
    only msgan's own output (with ``volumes``, also a zarr volume msgan wrote). Returns the manifest."""
    plan = plan_of(task)
    n = len(plan["shapes"])
    result = open_group(task.result_uri, "r+")
    geom = Geometry.from_dict(plan["geometry"])
    checksum = _checksum_and_check(result, n, task.name)
    shapes = [tuple(s) for s in plan["shapes"]][::-1]  # finest first
    result.attrs["ome"] = ome_attrs(shapes, geom, task.name)
    source = {k: v for k, v in plan["source"].items() if k != "geometry"}
    result.attrs["msgan"] = {"geometry": geom.as_dict(), "source": source, "translated_by": task.model}
    from msgan.preview import PREVIEW, preview_volume  # source beside result, published with the volume

    preview_volume(task.result_uri, storage.join(task.result_uri, PREVIEW), source=task.input)
    manifest = {
        "preview": PREVIEW,
        "volume": task.name,
        "input": task.input,
        "model": task.model,
        "run": task.run,
        "shape": list(plan["shapes"][-1]),
        "tiles": plan["tiles"],
        "checksum_sha256": checksum,
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **info,
    }
    if task.run and not lease.holds(task.lease):
        raise VolumeError(
            f"{task.name}: this run ({task.run}) no longer holds the lease on {task.output}; not published"
        )
    # again at the last moment: only msgan's own output is replaced
    outputs.refuse_foreign(task.output, lambda u: is_ours(u) or (volumes and outputs.is_msgan_volume(u)))
    if storage.is_s3(task.output):
        fs, src = storage.filesystem(task.result_uri)
        _, dst = storage.filesystem(task.output)
        fs.invalidate_cache()  # listings cached by s3fs predate this run's writes
        new_keys = {key[len(src) :] for key in fs.find(src)}
        manifest["objects"] = len(new_keys) + 1
        text = json.dumps(manifest, indent=2)
        if fs.exists(f"{dst}/{MANIFEST}"):
            storage.write_text(storage.join(task.output, PUBLISHING), json.dumps({"run": task.run}))
            fs.rm(f"{dst}/{MANIFEST}")  # unpublished from here until the new manifest lands
        for rel in sorted(new_keys):
            fs.copy(src + rel, dst + rel)
        stale = {key[len(dst) :] for key in fs.find(dst)} - new_keys - {f"/{PUBLISHING}"}
        for rel in sorted(stale):
            fs.rm(dst + rel)
        storage.write_text(storage.join(task.output, MANIFEST), text)  # last: it names exactly what is there
        if fs.exists(f"{dst}/{PUBLISHING}"):
            fs.rm(f"{dst}/{PUBLISHING}")
        fs.rm(storage.filesystem(task.staging)[1], recursive=True)
    else:
        src_path, dst_path = storage.local_path(task.result_uri), storage.local_path(task.output)
        text = json.dumps(manifest, indent=2)
        (src_path / MANIFEST).write_text(text)
        _replace_dir(src_path, dst_path)  # the output appears whole, manifest included
        shutil.rmtree(storage.local_path(task.staging), ignore_errors=True)
        outputs.remove_empty_dirs(parent_of(task.staging))
    return manifest


def discard(task: VolumeTask) -> None:
    """Remove a volume's staging (after a failure); nothing of it was published."""
    fs, path = storage.filesystem(task.staging)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    outputs.remove_empty_dirs(parent_of(task.staging))


def sweep_staging(out_parent: str, ttl_s: float = lease.DEFAULT_TTL_S) -> list[str]:
    """Remove staging folders under ``<out_parent>/.staging`` left by dead runs: whose run does not
    hold its output's lease (or the lease expired), or, without a run record, older than ``ttl_s``."""
    fs, path = storage.filesystem(storage.join(out_parent, ".staging"))
    if not fs.exists(path):
        return []
    removed = []
    scheme = "s3://" if storage.is_s3(out_parent) else "file://"
    for entry in fs.ls(path, detail=False):
        uri = scheme + entry.lstrip("/") if scheme == "s3://" else scheme + entry
        try:
            record = json.loads(storage.read_text(storage.join(uri, RUN_FILE)))
        except (FileNotFoundError, json.JSONDecodeError):
            record = None
        except OSError:
            continue
        if isinstance(record, dict) and "run" in record and "output" in record:
            out = str(record["output"])
            parent, base = posixpath.split(out.rstrip("/"))
            info = lease.holder(f"{parent}/.leases/{base}.json")
            alive = info is not None and info["run"] == record["run"] and lease.alive(info, ttl_s)
        else:
            try:
                alive = time.time() - float(fs.modified(entry).timestamp()) <= ttl_s
            except (OSError, NotImplementedError, AttributeError):
                alive = True
        if not alive:
            try:
                fs.rm(entry, recursive=True)
                removed.append(uri)
            except FileNotFoundError:
                pass
    outputs.remove_empty_dirs(storage.join(out_parent, ".staging"))
    return removed


# ----------------------------------------------------------------------------- local, one volume


def translate_volume(
    task: VolumeTask,
    cascade: Cascade,
    device: str | torch.device = "cpu",
    log: Log | None = None,
    tile: int | None = None,
    progress: Progress | None = None,
    replace: bool = True,
    volumes: bool = False,
) -> dict[str, Any]:
    """All four steps in this process (``msgan translate`` for zarr): constant memory, same result
    as the distributed job. Returns the manifest with ``status``: ``skipped`` (published by the same
    model), ``translated``, or ``re-translated`` (``previous_model`` replaced; only with ``replace``).
    An output that msgan did not publish is refused (:func:`check_output`), whatever ``replace`` says."""
    previous = check_output(task, replace, volumes)
    if previous is not None and previous["model"] == task.model:
        return {**previous, "status": "skipped"}
    bound_heap()
    t0 = time.perf_counter()
    held = task.lease
    try:
        lease.acquire(held, task.output)
    except lease.LeaseError as err:
        raise VolumeError(str(err)) from err
    beat = lease.Heartbeat([held])
    try:
        beat.__enter__()
        sweep_staging(parent_of(task.output))
        previous = check_output(
            task, replace, volumes
        )  # again under the lease: another run may have published meanwhile
        if previous is not None and previous["model"] == task.model:
            return {**previous, "status": "skipped"}
        vplan = plan_volume(task, cascade, tile)
        stage(task, cascade.config, vplan)
        if progress is not None:
            progress(0, 0, 1)
        timings = [{"scale": 0, "tiles": 1, "seconds": run_scale0(task, cascade, device)}]
        release_memory()
        if progress is not None:
            progress(0, 1, 1)
        for s in range(1, cascade.config.num_scales):
            t1 = time.perf_counter()
            tiles = tiles_of(vplan, s)

            def tick(done: int, total: int, s: int = s) -> None:
                if progress is not None:
                    progress(s, done, total)

            ScaleRunner(task, cascade, s).run(tiles, device, tick)
            release_memory()
            timings.append({"scale": s, "tiles": len(tiles), "seconds": time.perf_counter() - t1})
            if log is not None:
                log(f"  scale {s}: {len(tiles)} tiles of {vplan['tiles'][s]} in {timings[-1]['seconds']:.1f}s")
        manifest = publish(task, {"timings": timings, "seconds": time.perf_counter() - t0}, volumes)
    except OSError as err:
        discard(task)
        where = f" ({err.filename})" if err.filename else ""
        raise VolumeError(f"{task.name}: {err.strerror or err}{where}; nothing published") from err
    except BaseException:
        discard(task)
        raise
    finally:
        beat.__exit__()
        lease.release(held)
    if previous is not None:
        if log is not None:
            log(f"re-translated: model {previous['model']} -> {task.model}")
        return {**manifest, "status": "re-translated", "previous_model": previous["model"]}
    return {**manifest, "status": "translated"}


__all__ = [
    "InferencePlan",
    "ModelError",
    "VolumeError",
    "VolumeTask",
    "check_collisions",
    "expand_inputs",
    "open_group",
    "publish",
    "resolve_plan",
    "stage",
    "translate_volume",
    "volume_task",
]
