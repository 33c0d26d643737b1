"""Translation of volumes at rest (OME-Zarr on ``file://`` or ``s3://``), staged, then published whole.

A volume goes through four steps, each a plain function of its :class:`VolumeTask`, so Ray
Data (:mod:`msgan.distributed.translate`) and the local ``msgan translate`` run the same code:

1. :func:`stage`: the windowed input and its edge pyramid are written block by block (dask)
   into ``<staging>/inputs.zarr``; the output levels are created, chunked by each scale's tile;
2. :func:`run_scale0`: the LR generator on the whole LR edge image;
3. :func:`translate_tiles`: each HR scale, tile by tile; a tile's core is exactly one output
   chunk, so no two tiles ever write the same chunk;
4. :func:`publish`: every level is checked complete (unwritten chunks read as NaN) and
   checksummed, the manifest is written, and the output appears at once: a rename on
   ``file://``; on ``s3://`` a copy whose ``manifest.json`` is written last.

A volume is published iff ``<output>/manifest.json`` exists; reruns skip published volumes.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
import zarr

from msgan import storage
from msgan.cascade import Cascade, run_lr, tile_inputs
from msgan.io.volume import Geometry, ome_attrs
from msgan.nets import HRGenerator
from msgan.pyramid import edges_chunked, image_pyramid_chunked, unwindow, window_chunked
from msgan.tiling import Tile, iter_batches, pyramid_shapes, tile_grid

MANIFEST = "manifest.json"


class VolumeError(ValueError):
    """A volume that cannot be translated; the message names it and says why."""


@dataclass(frozen=True)
class VolumeTask:
    name: str
    input: str  # URI of the input OME-Zarr group
    output: str  # URI of the published output group
    staging: str  # URI of the volume's staging folder
    model: str  # what translates it, e.g. "msgan-cascade/3"

    @property
    def inputs_uri(self) -> str:
        return storage.join(self.staging, "inputs.zarr")

    @property
    def result_uri(self) -> str:
        return storage.join(self.staging, "output.zarr")


def volume_task(input_uri: str, out_prefix: str, model: str, output: str | None = None) -> VolumeTask:
    """The task of translating ``input_uri`` into ``<out_prefix>/<name>.zarr`` (or ``output``);
    staging lives beside the output, under ``.staging/``, named per volume and model."""
    src = storage.normalize_uri(input_uri)
    base = posixpath.basename(src.rstrip("/"))
    name = base[: -len(".zarr")] if base.endswith(".zarr") else base
    dest = storage.normalize_uri(output) if output else storage.join(storage.normalize_uri(out_prefix), f"{name}.zarr")
    parent = posixpath.dirname(dest.rstrip("/"))
    tag = hashlib.sha256(f"{src}|{model}".encode()).hexdigest()[:10]
    return VolumeTask(name, src, dest, staging=f"{parent}/.staging/{name}-{tag}", model=model)


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


def is_published(task: VolumeTask) -> bool:
    return storage.exists(storage.join(task.output, MANIFEST))


def _open(uri: str, mode: str) -> zarr.Group:
    store, options = storage.zarr_store(uri)
    return zarr.open_group(store, mode=mode, storage_options=options)  # type: ignore[arg-type]


def _array(group: zarr.Group, key: str) -> zarr.Array:
    arr = group[key]
    assert isinstance(arr, zarr.Array)
    return arr


def inspect_input(uri: str, dims: int) -> tuple[zarr.Array, Geometry, dict[str, Any]]:
    """The input's level 0, geometry and attributes; a clear :class:`VolumeError` when unusable."""
    try:
        group = _open(uri, "r")
    except Exception as err:  # zarr raises several types for a missing or broken store
        raise VolumeError(f"{uri}: not a readable zarr group ({type(err).__name__}: {err})") from err
    meta = group.attrs.get("msgan")
    if not isinstance(meta, dict) or "geometry" not in meta:
        raise VolumeError(f"{uri}: no msgan geometry attribute; ingest the volume with msgan first")
    if "0" not in group or not isinstance(group["0"], zarr.Array):
        raise VolumeError(f"{uri}: missing array '0' (the full-resolution level)")
    arr = _array(group, "0")
    if arr.ndim != dims:
        raise VolumeError(f"{uri}: array '0' has shape {arr.shape}; the model translates {dims}D volumes")
    try:
        geom = Geometry.from_dict(meta["geometry"])
    except ValueError as err:
        raise VolumeError(f"{uri}: {err}") from err
    if geom.dims != dims:
        raise VolumeError(f"{uri}: geometry is {geom.dims}D, array '0' is {dims}D")
    return arr, geom, dict(meta)


# ----------------------------------------------------------------------------- 1. stage


def stage(task: VolumeTask, cascade: Cascade, chunk: int = 64, tile: int | None = None) -> dict[str, Any]:
    """Write the windowed image and edges of every scale to staging and create the output levels.
    Each HR scale's tile (= output chunk) comes from the memory budget unless ``tile`` is given."""
    cfg = cascade.config
    n = cfg.num_scales
    level0, geom, attrs = inspect_input(task.input, cfg.dims)
    shapes = pyramid_shapes(level0.shape, n)
    if min(shapes[0]) < 1 or any(min(s) < 2 for s in shapes[1:]):
        raise VolumeError(f"{task.input}: shape {level0.shape} is too small for {n} scales")
    tiles = [0] + [tile or cascade.tile_size(s, shapes[s]) for s in range(1, n)]
    inputs = _open(task.inputs_uri, "w")
    windowed = window_chunked(da.from_zarr(level0), cfg.intensity, name=task.input)
    images = image_pyramid_chunked(windowed, n)
    img_arrays = []
    for s, shape in enumerate(shapes):
        ch = tuple(min(chunk, d) for d in shape)
        img_arrays.append(inputs.create_array(f"image/{s}", shape=shape, chunks=ch, dtype="float32"))
        inputs.create_array(f"edges/{s}", shape=shape, chunks=ch, dtype="float32")
    with dask.config.set(scheduler="threads"):
        try:
            sources = [im.rechunk(a.chunks) for im, a in zip(images, img_arrays, strict=True)]
            da.store(sources, img_arrays, lock=False)  # type: ignore[arg-type]
            for s in range(n):
                e = edges_chunked(da.from_zarr(img_arrays[s]), cfg.edges)
                da.store(e.rechunk(img_arrays[s].chunks), _array(inputs, f"edges/{s}"), lock=False)  # type: ignore[arg-type]
        except ValueError as err:
            raise VolumeError(str(err)) from err
    for s in range(n - 1):  # the cascade's intermediate outputs (window units), chunked by the scale's tile
        ch = tuple(min(tiles[s] or d, d) for d in shapes[s])
        inputs.create_array(f"work/{s}", shape=shapes[s], chunks=ch, dtype="float32", fill_value=np.nan)
    result = _open(task.result_uri, "w")
    for s, shape in enumerate(shapes):  # OME level k = scale n-1-k, in input units
        ch = tuple(min(tiles[s] or d, d) for d in shape)
        result.create_array(str(n - 1 - s), shape=shape, chunks=ch, dtype="float32", fill_value=np.nan)
    plan: dict[str, Any] = {
        "shapes": [list(s) for s in shapes],
        "tiles": tiles,
        "geometry": geom.as_dict(),
        "source": attrs,
    }
    inputs.attrs["plan"] = plan
    return plan


def plan_of(task: VolumeTask) -> dict[str, Any]:
    plan = _open(task.inputs_uri, "r").attrs.get("plan")
    if not isinstance(plan, dict):
        raise VolumeError(f"{task.name}: not staged")
    return plan


def tiles_of(plan: dict[str, Any], scale: int) -> list[Tile]:
    return tile_grid(tuple(plan["shapes"][scale]), plan["tiles"][scale])


# ----------------------------------------------------------------------------- 2. + 3. the cascade


def run_scale0(task: VolumeTask, cascade: Cascade, device: str | torch.device = "cpu") -> float:
    """Scale 0 on the whole LR edge image; returns seconds."""
    t0 = time.perf_counter()
    cfg = cascade.config
    n = cfg.num_scales
    inputs, result = _open(task.inputs_uri, "r+"), _open(task.result_uri, "r+")
    y = run_lr(cascade.generators[0], _array(inputs, "edges/0")[...], device, cfg.train.amp)
    if n > 1:
        _array(inputs, "work/0")[...] = y
    _array(result, str(n - 1))[...] = unwindow(y, cfg.intensity)
    return time.perf_counter() - t0


@torch.no_grad()
def translate_tiles(
    task: VolumeTask,
    cascade: Cascade,
    scale: int,
    tiles: Sequence[Tile],
    device: str | torch.device = "cpu",
    batch_size: int = 1,
) -> int:
    """Run HR ``scale`` on ``tiles`` of one volume, writing each core into its own output chunk."""
    cfg = cascade.config
    n = cfg.num_scales
    gen = cascade.generators[scale]
    assert isinstance(gen, HRGenerator)
    d = torch.device(device)
    gen.eval()
    inputs, result = _open(task.inputs_uri, "r+"), _open(task.result_uri, "r+")
    prev, edges = _array(inputs, f"work/{scale - 1}"), _array(inputs, f"edges/{scale}")
    work = _array(inputs, f"work/{scale}") if scale < n - 1 else None
    out = _array(result, str(n - 1 - scale))
    done = 0
    for batch in iter_batches(tiles, batch_size):
        feeds = [tile_inputs(gen, prev, edges, t) for t in batch]
        x = torch.from_numpy(np.stack([f[0] for f in feeds])).to(d)
        c = torch.from_numpy(np.stack([f[1] for f in feeds])).to(d) if feeds[0][1] is not None else None  # type: ignore[misc]
        amp = cfg.train.amp and d.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
            y = gen(x, c).float().cpu().numpy()
        for t, yi in zip(batch, y, strict=True):
            if work is not None:
                work[t.slices] = yi[0]
            out[t.slices] = unwindow(yi[0], cfg.intensity)
        done += len(batch)
    return done


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
                raise VolumeError(f"{name}: level {k} has unwritten voxels in rows {a}..{a + step}; not published")
            h.update(np.ascontiguousarray(block, dtype=np.float32).tobytes())
    return h.hexdigest()


def publish(task: VolumeTask, cascade: Cascade, info: dict[str, Any]) -> dict[str, Any]:
    """Check, checksum and publish the staged output; returns the manifest."""
    plan = plan_of(task)
    n = cascade.config.num_scales
    result = _open(task.result_uri, "r+")
    geom = Geometry.from_dict(plan["geometry"])
    checksum = _checksum_and_check(result, n, task.name)
    shapes = [tuple(s) for s in plan["shapes"]][::-1]  # finest first
    result.attrs["ome"] = ome_attrs(shapes, geom, task.name)
    source = {k: v for k, v in plan["source"].items() if k != "geometry"}
    result.attrs["msgan"] = {"geometry": geom.as_dict(), "source": source, "translated_by": task.model}
    manifest = {
        "volume": task.name,
        "input": task.input,
        "model": task.model,
        "shape": list(plan["shapes"][-1]),
        "tiles": plan["tiles"],
        "checksum_sha256": checksum,
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **info,
    }
    text = json.dumps(manifest, indent=2)
    if storage.is_s3(task.output):
        fs, src = storage.filesystem(task.result_uri)
        _, dst = storage.filesystem(task.output)
        for key in fs.find(src):
            fs.copy(key, dst + key[len(src) :])
        storage.write_text(storage.join(task.output, MANIFEST), text)  # last: now it is published
        fs.rm(storage.filesystem(task.staging)[1], recursive=True)
    else:
        src_path, dst_path = storage.local_path(task.result_uri), storage.local_path(task.output)
        (src_path / MANIFEST).write_text(text)
        if dst_path.exists():
            shutil.rmtree(dst_path)
        dst_path.parent.mkdir(parents=True, exist_ok=True)
        src_path.rename(dst_path)  # atomic: the output appears whole, manifest included
        shutil.rmtree(storage.local_path(task.staging), ignore_errors=True)
    return manifest


def discard(task: VolumeTask) -> None:
    """Remove a volume's staging (after a failure); nothing of it was published."""
    fs, path = storage.filesystem(task.staging)
    if fs.exists(path):
        fs.rm(path, recursive=True)


# ----------------------------------------------------------------------------- local, one volume


def translate_volume(
    task: VolumeTask, cascade: Cascade, device: str | torch.device = "cpu", log: Any = None, tile: int | None = None
) -> dict[str, Any]:
    """All four steps in this process (``msgan translate`` for zarr): constant memory, same result
    as the distributed job."""
    if is_published(task):
        return json.loads(storage.read_text(storage.join(task.output, MANIFEST)))
    t0 = time.perf_counter()
    try:
        plan = stage(task, cascade, tile=tile)
        timings = [{"scale": 0, "tiles": 1, "seconds": run_scale0(task, cascade, device)}]
        for s in range(1, cascade.config.num_scales):
            t1 = time.perf_counter()
            tiles = tiles_of(plan, s)
            translate_tiles(task, cascade, s, tiles, device, cascade.config.inference.batch_size)
            timings.append({"scale": s, "tiles": len(tiles), "seconds": time.perf_counter() - t1})
            if log is not None:
                log(f"  scale {s}: {len(tiles)} tiles of {plan['tiles'][s]} in {timings[-1]['seconds']:.1f}s")
        return publish(task, cascade, {"timings": timings, "seconds": time.perf_counter() - t0})
    except BaseException:
        discard(task)
        raise


def model_id(model: str) -> str:
    """A stable name for what translates: ``NAME/VERSION`` for registry models, a content hash for folders."""
    if model.startswith("models:/"):
        from mlflow import MlflowClient

        from msgan.registry import tracking_uri

        ref = model[len("models:/") :]
        client = MlflowClient(tracking_uri())
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return f"{name}/{client.get_model_version_by_alias(name, alias).version}"
        return ref
    manifest = Path(model) / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:12] if manifest.is_file() else "unknown"
    return f"{Path(model).name}/{digest}"
