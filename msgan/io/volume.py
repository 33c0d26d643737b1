"""Volumes in and out with their geometry: NIfTI/MHA/NRRD (SimpleITK) and OME-Zarr (zarr 3).

All axis-order and geometry conversions between SimpleITK, numpy and zarr live here.
Arrays are numpy order (``z, y, x`` in 3D); :class:`Geometry` keeps ITK's physical
order (``x, y, z``): spacing, origin, and the direction matrix row-major.
Writes are atomic: a reader never sees a half-written output.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import zarr

ITK_SUFFIXES = (".nii", ".nii.gz", ".mha", ".nrrd")
ZARR_SUFFIXES = (".zarr",)
OME_VERSION = "0.5"


@dataclass(frozen=True)
class Geometry:
    """Physical placement of an image grid, in ITK order (x, y, z)."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]  # row-major dims x dims

    @classmethod
    def identity(cls, dims: int, spacing: Sequence[float] | None = None) -> Geometry:
        sp = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * dims
        return cls(sp, (0.0,) * dims, tuple(float(v) for v in np.eye(dims).ravel()))

    @property
    def dims(self) -> int:
        return len(self.spacing)

    def as_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        try:
            g = cls(tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"geometry {d!r} needs spacing, origin and direction lists") from err
        if len(g.origin) != g.dims or len(g.direction) != g.dims**2:
            raise ValueError(f"geometry {d!r}: origin/direction do not match {g.dims} dimensions")
        return g

    def numpy_spacing(self) -> tuple[float, ...]:
        """Spacing in numpy axis order (z, y, x)."""
        return tuple(reversed(self.spacing))

    def allclose(self, other: Geometry, atol: float = 1e-6) -> bool:
        return all(
            np.allclose(a, b, atol=atol)
            for a, b in ((self.spacing, other.spacing), (self.origin, other.origin), (self.direction, other.direction))
        )


def suffix_of(path: str | os.PathLike[str]) -> str:
    name = str(path).rstrip("/").lower()
    for s in ITK_SUFFIXES + ZARR_SUFFIXES:
        if name.endswith(s):
            return s
    raise ValueError(f"{path}: unknown volume format; use one of {', '.join(ITK_SUFFIXES + ZARR_SUFFIXES)}")


def to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    if array.ndim != geometry.dims:
        raise ValueError(f"array of {array.ndim} dimensions with a {geometry.dims}D geometry")
    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.SetSpacing(geometry.spacing)
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.direction)
    return img


def from_sitk(img: sitk.Image) -> tuple[np.ndarray, Geometry]:
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"image has {img.GetNumberOfComponentsPerPixel()} components per pixel; need a scalar image")
    geom = Geometry(tuple(img.GetSpacing()), tuple(img.GetOrigin()), tuple(img.GetDirection()))
    return sitk.GetArrayFromImage(img), geom


# ----------------------------------------------------------------------------- OME-Zarr


def dimension_names(ndim: int) -> tuple[str, ...]:
    """The zarr 3 ``dimension_names`` of an array (NGFF 0.5 requires them, matching the multiscales axes)."""
    if ndim not in (2, 3):
        raise ValueError(f"an OME-Zarr volume has 2 or 3 dimensions (yx or zyx), not {ndim}")
    return tuple("zyx"[3 - ndim :])


def ome_attrs(shapes: Sequence[Sequence[int]], geometry: Geometry, name: str) -> dict[str, Any]:
    dims = geometry.dims
    axes = [{"name": n, "type": "space", "unit": "millimeter"} for n in dimension_names(dims)]
    sp0 = np.array(geometry.numpy_spacing())
    org = np.array(tuple(reversed(geometry.origin)))
    datasets = []
    for k in range(len(shapes)):
        f = 2.0**k  # every level halves every axis (odd sizes rounded up)
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": (sp0 * f).tolist()},
                    {"type": "translation", "translation": (org + (f - 1) / 2 * sp0).tolist()},
                ],
            }
        )
    return {"version": OME_VERSION, "multiscales": [{"name": name, "axes": axes, "datasets": datasets}]}


def _write_group(group: zarr.Group, levels: Sequence[np.ndarray], chunks: int | Sequence[int]) -> None:
    for k, lv in enumerate(levels):
        want = [chunks] * lv.ndim if isinstance(chunks, int) else list(chunks)
        ch = tuple(min(c, s) for c, s in zip(want, lv.shape, strict=True))
        arr = group.create_array(
            str(k), shape=lv.shape, dtype=lv.dtype, chunks=ch, dimension_names=dimension_names(lv.ndim),
            config={"write_empty_chunks": True},  # every chunk stored: a missing one means an incomplete volume
        )  # fmt: skip
        arr[...] = lv


MM_PER_UNIT = {"millimeter": 1.0, "micrometer": 1e-3, "nanometer": 1e-6, "centimeter": 10.0, "meter": 1000.0}


def read_foreign_zarr(uri: str) -> tuple[np.ndarray, Geometry, list[str]]:
    """A zarr that msgan did not write: a bare 2D/3D array (identity geometry, with a warning note) or an
    OME-Zarr image (level 0; spacing and origin in mm from its first dataset's scale/translation, then the
    multiscale's, and the axes' units; no rotation)."""
    from msgan import storage

    store, options = storage.zarr_store(uri)
    try:
        node = zarr.open(store, mode="r", storage_options=options)
    except Exception as err:
        raise ValueError(not_a_volume_message(uri, err)) from err
    if isinstance(node, zarr.Array):
        if node.ndim not in (2, 3):
            raise ValueError(f"{uri}: a zarr array of shape {node.shape}; a volume is 2D (yx) or 3D (zyx)")
        note = f"{uri}: a bare zarr array has no geometry; identity assumed (1 mm spacing, origin 0, axes as stored)"
        return np.asarray(node[...], dtype=np.float32), Geometry.identity(node.ndim), [note]
    ms = node.attrs.get("ome", node.attrs).get("multiscales")  # type: ignore[union-attr]
    if not isinstance(ms, list) or not ms:
        raise ValueError(f"{uri}: a zarr group without OME multiscales metadata or msgan geometry; not a volume")
    try:
        first = ms[0]["datasets"][0]
        arr = node[first["path"]]  # type: ignore[index]
        if not isinstance(arr, zarr.Array) or arr.ndim not in (2, 3):
            raise ValueError(f"level 0 must be a 2D/3D scalar image (yx/zyx), got {getattr(arr, 'shape', arr)}")
        transforms = {t["type"]: t for t in first.get("coordinateTransformations", [])}
        scale = transforms.get("scale", {}).get("scale", [1.0] * arr.ndim)
        shift = transforms.get("translation", {}).get("translation", [0.0] * arr.ndim)
        if len(scale) != arr.ndim or len(shift) != arr.ndim:
            raise ValueError(f"scale {scale} / translation {shift} do not match {arr.ndim} axes")
        outer = {t["type"]: t for t in ms[0].get("coordinateTransformations", [])}  # applied after the dataset's
        s2 = outer.get("scale", {}).get("scale", [1.0] * arr.ndim)
        t2 = outer.get("translation", {}).get("translation", [0.0] * arr.ndim)
        axes = [a if isinstance(a, dict) else {"name": a} for a in ms[0].get("axes") or [{}] * arr.ndim]
        if len(axes) != arr.ndim or any(a.get("type", "space") != "space" for a in axes):
            raise ValueError(f"axes {axes}: a volume has space axes only (zyx or yx)")
        units = [a.get("unit") or "millimeter" for a in axes]
        if not set(units) <= set(MM_PER_UNIT):
            raise ValueError(f"axis units {units}: one of {', '.join(MM_PER_UNIT)} is needed to get millimetres")
        mm = [MM_PER_UNIT[u] for u in units]
        scale = [a * b * f for a, b, f in zip(scale, s2, mm, strict=True)]
        shift = [(a * b + c) * f for a, b, c, f in zip(shift, s2, t2, mm, strict=True)]
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"{uri}: unusable OME multiscales metadata ({type(err).__name__}: {err})") from err
    geom = Geometry(tuple(map(float, reversed(scale))), tuple(map(float, reversed(shift))),
                    tuple(float(v) for v in np.eye(arr.ndim).ravel()))  # fmt: skip
    return (
        np.asarray(arr[...], dtype=np.float32),
        geom,
        [f"{uri}: OME-Zarr without direction cosines; axes assumed aligned"],
    )


def write_zarr(
    path: str | os.PathLike[str],
    levels: Sequence[np.ndarray],
    geometry: Geometry,
    attrs: dict[str, Any] | None = None,
    chunks: int | Sequence[int] = 64,
) -> None:
    """An OME-Zarr multiscale group (level 0 finest) with our geometry beside ``ome`` (NGFF has no
    direction cosines). Local paths are written to a staging folder and renamed when complete;
    on ``s3://`` the msgan attributes, which readers require, are written last."""
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    ome = ome_attrs([lv.shape for lv in levels], geometry, name)
    meta = {"geometry": geometry.as_dict(), **(attrs or {})}
    if str(path).startswith("s3://"):
        group = open_group(str(path), "w")
        _write_group(group, levels, chunks)
        group.attrs["ome"] = ome
        group.attrs["msgan"] = meta
        return
    from msgan.storage import staged_dir

    with staged_dir(str(path)[len("file://") :] if str(path).startswith("file://") else path) as stage:
        group = open_group(stage, "w")
        _write_group(group, levels, chunks)
        group.attrs["ome"] = ome
        group.attrs["msgan"] = meta


def not_a_volume_message(uri: str | os.PathLike[str], err: Exception) -> str:
    """Why ``uri`` cannot be opened as an OME-Zarr volume; for a bare zarr array, how to wrap it."""
    if isinstance(err, zarr.errors.ContainsArrayError):
        return (
            f"{uri}: a bare zarr array, not an OME-Zarr volume (no geometry); wrap it first with "
            f"`msgan ingest {uri} OUT.zarr` (it gets identity geometry: 1 mm spacing, origin 0, axes as stored, "
            f"and a warning in its notes)"
        )
    return f"{uri}: not a readable zarr group ({type(err).__name__}: {err})"


class VolumeError(ValueError):
    """A volume that cannot be opened or used; the message names it and says why (the one error type
    of :func:`open_group` and :func:`read_level`)."""


class VolumeNotFoundError(VolumeError, FileNotFoundError):
    """No readable zarr group at the URI (also a ``FileNotFoundError``)."""


def open_group(uri: str | os.PathLike[str], mode: str = "r") -> zarr.Group:
    """The one way to open a zarr group: ``file://``, ``s3://`` or a local path, with this process's
    storage settings (:func:`msgan.storage.zarr_store`). Reading a missing or broken store, or a bare
    array, raises :class:`VolumeError`."""
    from msgan import storage

    store, options = storage.zarr_store(storage.normalize_uri(uri))
    try:
        return zarr.open_group(store, mode=mode, storage_options=options)  # type: ignore[arg-type]
    except zarr.errors.ContainsArrayError as err:
        raise VolumeError(not_a_volume_message(uri, err)) from err
    except Exception as err:  # zarr raises several types for a missing or invalid store
        if mode in ("w", "w-", "a"):
            raise
        raise VolumeNotFoundError(not_a_volume_message(uri, err)) from err


def read_level(
    uri: str | os.PathLike[str], level: int = 0, dims: int | None = None
) -> tuple[zarr.Array, Geometry, dict[str, Any]]:
    """The one "geometry + level" reader of an msgan OME-Zarr volume: level ``level`` (lazy), its
    :class:`Geometry` and the msgan attributes; every problem is a :class:`VolumeError` naming ``uri``."""
    group = open_group(uri, "r")
    meta = group.attrs.get("msgan")
    if not isinstance(meta, dict) or "geometry" not in meta:
        raise VolumeError(f"{uri}: no msgan geometry attribute; ingest the volume with msgan first")
    key = str(level)
    if key not in group or not isinstance(group[key], zarr.Array):
        what = "the full-resolution level" if level == 0 else f"level {level}"
        raise VolumeError(f"{uri}: missing array '{key}' ({what}; arrays: {sorted(group.array_keys())})")
    arr = group[key]
    assert isinstance(arr, zarr.Array)
    if dims is not None and arr.ndim != dims:
        raise VolumeError(f"{uri}: array '{key}' has shape {arr.shape}; the model translates {dims}D volumes")
    try:
        geom = Geometry.from_dict(meta["geometry"])
    except ValueError as err:
        raise VolumeError(f"{uri}: {err}") from err
    if geom.dims != arr.ndim:
        raise VolumeError(f"{uri}: geometry is {geom.dims}D, array '{key}' is {arr.ndim}D")
    return arr, geom, dict(meta)


def open_zarr(path: str | os.PathLike[str], level: int = 0) -> tuple[zarr.Array, Geometry, dict[str, Any]]:
    """Level ``level`` of an OME-Zarr volume (lazy), its geometry and our attributes (:func:`read_level`)."""
    return read_level(path, level)


# ----------------------------------------------------------------------------- any format


def read_volume(path: str | os.PathLike[str]) -> tuple[np.ndarray, Geometry]:
    """A scalar image and its geometry from NIfTI/MHA/NRRD or OME-Zarr (level 0)."""
    suffix = suffix_of(path)
    if suffix in ZARR_SUFFIXES:
        arr, geom, _ = open_zarr(path)
        return np.asarray(arr[...]), geom
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise ValueError(f"{path}: cannot be read as {suffix} ({str(err).strip().splitlines()[-1]})") from err
    return from_sitk(img)


def write_volume(path: str | os.PathLike[str], array: np.ndarray, geometry: Geometry) -> None:
    """Write a volume atomically in the format its suffix names."""
    suffix = suffix_of(path)
    if suffix in ZARR_SUFFIXES:
        write_zarr(path, [array], geometry)
        return
    from msgan.storage import staged_file

    with staged_file(path) as tmp:
        sitk.WriteImage(to_sitk(array, geometry), str(tmp), useCompression=True)
