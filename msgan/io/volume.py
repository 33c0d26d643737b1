"""Volumes in and out with their geometry: NIfTI/MHA/NRRD (SimpleITK) and OME-Zarr (zarr 3).

All axis-order and geometry conversions between SimpleITK, numpy and zarr live here.
Arrays are numpy order (``z, y, x`` in 3D); :class:`Geometry` keeps ITK's physical
order (``x, y, z``): spacing, origin, and the direction matrix row-major.
Writes are atomic: a reader never sees a half-written output.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import zarr

from msgan.io import limits

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
        """A stored geometry (an attribute of a volume: untrusted), checked by :meth:`problem`."""
        try:
            parts = [tuple(d[k]) for k in ("spacing", "origin", "direction")]
        except (KeyError, TypeError) as err:
            raise ValueError(f"geometry {d!r:.200} needs spacing, origin and direction lists") from err
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for part in parts for v in part):
            raise ValueError(f"geometry {d!r:.200}: spacing, origin and direction must hold numbers")
        g = cls(*(tuple(float(v) for v in part) for part in parts))
        if len(g.origin) != g.dims or len(g.direction) != g.dims**2:
            raise ValueError(f"geometry {d!r:.200}: origin/direction do not match {g.dims} dimensions")
        if problem := g.problem():
            raise ValueError(f"geometry {d!r:.200}: {problem}")
        return g

    def problem(self) -> str | None:
        """Why this geometry cannot place an image (None when it can): every value finite, the spacing
        positive, the direction's columns unit vectors (within 1%) spanning the space. A reader refuses what
        this names, so no writer ever puts a zero spacing or a degenerate orientation into a DICOM or NIfTI."""
        values = np.asarray(self.spacing + self.origin + self.direction, dtype=np.float64)
        if not np.isfinite(values).all():
            return "spacing, origin and direction must be finite numbers"
        if min(self.spacing) <= 0:
            return f"spacing {list(self.spacing)} must be positive"
        d = np.asarray(self.direction).reshape(self.dims, self.dims)
        if np.abs(np.linalg.norm(d, axis=0) - 1).max() > 0.01 or abs(float(np.linalg.det(d))) < 0.5:
            return f"direction {list(self.direction)} must be unit vectors spanning the space"
        return None

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
    check_meta_files(uri)
    try:
        node = zarr.open(store, mode="r", storage_options=options)
    except Exception as err:
        raise ValueError(not_a_volume_message(uri, err)) from err
    if isinstance(node, zarr.Array):
        if node.ndim not in (2, 3):
            raise ValueError(f"{uri}: a zarr array of shape {node.shape}; a volume is 2D (yx) or 3D (zyx)")
        note = f"{uri}: a bare zarr array has no geometry; identity assumed (1 mm spacing, origin 0, axes as stored)"
        check_stored(uri, "", node)  # declared sizes and every chunk, before anything is read
        image = np.asarray(node[...], dtype=np.float32)
        check_finite(image, uri)
        return image, Geometry.identity(node.ndim), [note]
    ms = node.attrs.get("ome", node.attrs).get("multiscales")  # type: ignore[union-attr]
    if not isinstance(ms, list) or not ms:
        raise ValueError(f"{uri}: a zarr group without OME multiscales metadata or msgan geometry; not a volume")
    try:
        first = ms[0]["datasets"][0]
        name = first["path"]
        if not isinstance(name, str) or not DATASET_PATH.fullmatch(name) or ".." in name.split("/"):
            raise ValueError(f"dataset path {first['path']!r} is not a relative name inside the store")
        check_meta_files(uri, first["path"])
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
    check_stored(uri, str(first["path"]), arr)  # declared sizes and every chunk, before anything is read
    image = np.asarray(arr[...], dtype=np.float32)
    check_finite(image, uri)
    return image, geom, [f"{uri}: OME-Zarr without direction cosines; axes assumed aligned"]


def write_zarr(
    path: str | os.PathLike[str],
    levels: Sequence[np.ndarray],
    geometry: Geometry,
    attrs: dict[str, Any] | None = None,
    chunks: int | Sequence[int] = 64,
    replace: bool = True,
) -> None:
    """An OME-Zarr multiscale group (level 0 finest) with our geometry beside ``ome`` (NGFF has no
    direction cosines). Local paths are written to a staging folder and renamed when complete;
    on ``s3://`` the msgan attributes, which readers require, are written last. Without ``replace`` an
    existing destination is refused (:class:`FileExistsError`), never removed; callers decide whether
    what is there is theirs to replace (:mod:`msgan.io.outputs`)."""
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    ome = ome_attrs([lv.shape for lv in levels], geometry, name)
    meta = {"geometry": geometry.as_dict(), **(attrs or {})}
    if str(path).startswith("s3://"):
        from msgan import storage

        if not replace and storage.exists(str(path)):
            raise FileExistsError(f"{path}: exists; not replaced")
        group = open_group(str(path), "w")
        _write_group(group, levels, chunks)
        group.attrs["ome"] = ome
        group.attrs["msgan"] = meta
        return
    from msgan.storage import staged_dir

    local = str(path)[len("file://") :] if str(path).startswith("file://") else path
    with staged_dir(local, replace=replace) as stage:
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


MAX_LISTED_MISSING = 1_000_000  # declared chunks up to which the first missing key is named (else counts only)


DATASET_PATH = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")  # an OME dataset path: relative, inside the store
META_FILES = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")


def check_meta_files(uri: str | os.PathLike[str], key: str = "") -> None:
    """The zarr metadata files of a local group or array (``key``): regular files of a sane size, before zarr
    reads them (a FIFO hangs, ``/dev/zero`` fills memory)."""
    from msgan import storage

    norm = storage.normalize_uri(uri)
    if storage.is_s3(norm):
        return
    folder = storage.local_path(storage.join(norm, key) if key else norm)
    for name in META_FILES:
        path = folder / name
        try:
            mode = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if not stat.S_ISREG(mode.st_mode) or mode.st_size > storage.SMALL_FILE_BYTES:
            what = "a symlink" if stat.S_ISLNK(mode.st_mode) else "not a regular file"
            if stat.S_ISREG(mode.st_mode):
                what = f"{mode.st_size} bytes (metadata is at most {storage.SMALL_FILE_BYTES})"
            raise VolumeError(f"{uri}: its metadata file {f'{key}/{name}' if key else name} is {what}; refused")


def _itemsize(arr: zarr.Array) -> int:
    try:
        return int(np.dtype(arr.dtype).itemsize)  # type: ignore[arg-type]
    except TypeError:
        return 8


def check_declared(uri: str | os.PathLike[str], key: str, arr: zarr.Array) -> int:
    """The array's declared shape and (inner) chunk shape against :mod:`msgan.io.limits`, before any read;
    returns the declared number of stored objects (shards when sharded, else chunks; computed, never
    enumerated)."""
    what = f"{uri}: array '{key}'"
    try:
        limits.check_shape(arr.shape, what)
        count = limits.check_chunks(arr.shape, arr.chunks, what, _itemsize(arr))
        if arr.shards is not None:
            count = limits.check_chunks(arr.shape, arr.shards, what, 0)  # inner chunks bound the decoded size
        return count
    except limits.LimitError as err:
        raise VolumeError(str(err)) from err


def _chunk_index_parser(arr: zarr.Array, grid: Sequence[int]) -> Callable[[str], tuple[int, ...] | None]:
    """The chunk index a stored key names (None when it names no chunk of ``arr``), parsed by the array's
    own key encoding (``c/0/1/2``, ``0.1.2``, ...), worked out once per array, without listing the declared keys."""
    n = len(grid)
    zero = arr.metadata.encode_chunk_key((0,) * n)
    body = "0" + (zero[-2] + "0") * (n - 1) if n > 1 else "0"
    prefix, sep = zero[: len(zero) - len(body)], (zero[-2] if n > 1 else "/")

    def parse(stored: str) -> tuple[int, ...] | None:
        if not stored.startswith(prefix):
            return None
        parts = stored[len(prefix) :].split(sep)
        if len(parts) != n or not all(p.isdigit() and (p == "0" or not p.startswith("0")) for p in parts):
            return None
        index = tuple(int(p) for p in parts)
        return index if all(i < g for i, g in zip(index, grid, strict=True)) else None

    return parse


def check_stored(uri: str | os.PathLike[str], key: str, arr: zarr.Array) -> None:
    """Every chunk (shard) the array declares is stored, as a regular file on ``file://``: a chunk never
    written reads back as the fill value without error, and a chunk that is a symlink, FIFO or device could
    read another file or hang. The stored keys are listed (one listing), never enumerated from the shape."""
    from msgan import storage

    declared = check_declared(uri, key, arr)
    unit = arr.shards or arr.chunks
    grid = tuple(-(-s // c) for s, c in zip(arr.shape, unit, strict=True))
    unit_bytes = math.prod(unit) * _itemsize(arr)
    base_uri = storage.join(storage.normalize_uri(uri), key) if key else storage.normalize_uri(uri)
    present: set[tuple[int, ...]] = set()
    stored = 0
    chunk_index = _chunk_index_parser(arr, grid)

    def count(rel: str, index: tuple[int, ...], size: int) -> None:
        nonlocal stored
        if size > unit_bytes + unit_bytes // 8 + 2**20:  # codecs never grow data that much; zarr reads it whole
            raise VolumeError(
                f"{uri}: chunk {rel} of array '{key}' stores {size} bytes for {unit_bytes} bytes of voxels; refused"
            )
        present.add(index)
        stored += size

    if storage.is_s3(base_uri):
        fs, path = storage.filesystem(base_uri)
        base = path.rstrip("/") + "/"
        listing = fs.find(base, detail=True) if fs.exists(path) else {}
        for p, info in listing.items():
            index = chunk_index(p[len(base) :])
            if index is not None:
                count(p[len(base) :], index, int(info.get("size") or 0))
    else:
        root = storage.local_path(base_uri)
        for dirpath, dirnames, filenames in os.walk(root):  # os.walk never follows symlinked folders
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                index = chunk_index(rel)
                if index is None:
                    continue
                st = os.lstat(full)
                mode = st.st_mode
                if not stat.S_ISREG(mode):
                    kind = (
                        "a symlink" if stat.S_ISLNK(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
                    )
                    raise VolumeError(
                        f"{uri}: chunk {rel} of array '{key}' is {kind}; a volume's chunks are regular files "
                        "(refused: it could read another file or block forever)"
                    )
                count(rel, index, st.st_size)
    if len(present) >= declared:
        try:  # every chunk stored, but do they hold what the shape declares? (a decompression bomb does not)
            limits.check_ratio(math.prod(arr.shape) * _itemsize(arr), stored, f"{uri}: array '{key}'")
        except limits.LimitError as err:
            raise VolumeError(str(err)) from err
        return
    missing = declared - len(present)
    first = ""
    if declared <= MAX_LISTED_MISSING:
        gap = next(c for c in itertools.product(*(range(g) for g in grid)) if c not in present)
        first = f" (first: {arr.metadata.encode_chunk_key(gap)})"
    raise VolumeError(
        f"{uri}: {missing} of the {declared} chunk(s) array '{key}' declares were never written{first}; they "
        f"would read as the fill value {arr.fill_value}. The volume is incomplete: ingest it again"
    )


def nonfinite(image: np.ndarray) -> int:
    """How many voxels of ``image`` are NaN or infinite (0 for an integer image), in one pass."""
    if not np.issubdtype(image.dtype, np.floating):
        return 0
    return int(image.size - np.count_nonzero(np.isfinite(image)))


def check_finite(image: np.ndarray, what: str | os.PathLike[str]) -> None:
    """NaN or inf voxels are refused: they would be windowed to a number and translated silently."""
    if bad := nonfinite(image):
        raise VolumeError(f"{what}: {bad} voxel(s) are NaN or infinite; a volume must hold finite values")


def open_group(uri: str | os.PathLike[str], mode: str = "r") -> zarr.Group:
    """The one way to open a zarr group: ``file://``, ``s3://`` or a local path, with this process's
    storage settings (:func:`msgan.storage.zarr_store`). Reading a missing or broken store, or a bare
    array, raises :class:`VolumeError`."""
    from msgan import storage

    store, options = storage.zarr_store(storage.normalize_uri(uri))
    if mode == "r":
        check_meta_files(uri)
    try:
        return zarr.open_group(store, mode=mode, storage_options=options)  # type: ignore[arg-type]
    except zarr.errors.ContainsArrayError as err:
        raise VolumeError(not_a_volume_message(uri, err)) from err
    except Exception as err:  # zarr raises several types for a missing or invalid store
        if mode in ("w", "w-", "a"):
            raise
        raise VolumeNotFoundError(not_a_volume_message(uri, err)) from err


def read_level(
    uri: str | os.PathLike[str], level: int = 0, dims: int | None = None, complete: bool = True
) -> tuple[zarr.Array, Geometry, dict[str, Any]]:
    """The one "geometry + level" reader of an msgan OME-Zarr volume: level ``level`` (lazy), its
    :class:`Geometry` and the msgan attributes; every problem is a :class:`VolumeError` naming ``uri``.
    Before anything is read the declared shape and chunks are checked against the caps of
    :mod:`msgan.io.limits` and, with ``complete``, every declared chunk against what is stored
    (:func:`check_stored`)."""
    group = open_group(uri, "r")
    meta = group.attrs.get("msgan")
    if not isinstance(meta, dict) or "geometry" not in meta:
        raise VolumeError(f"{uri}: no msgan geometry attribute; ingest the volume with msgan first")
    key = str(level)
    check_meta_files(uri, key)
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
    if complete:
        check_stored(uri, key, arr)  # declared sizes first, then every chunk
    else:
        check_declared(uri, key, arr)
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
        image = np.asarray(arr[...])
        check_finite(image, path)
        return image, geom
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not Path(path).is_file():
        raise VolumeError(f"{path}: not a regular file (a folder, FIFO or device); refused")
    check_itk_file(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise ValueError(f"{path}: cannot be read as {suffix} ({str(err).strip().splitlines()[-1]})") from err
    image, geom = from_sitk(img)
    if problem := geom.problem():
        raise VolumeError(f"{path}: its header's geometry cannot place it: {problem}")
    check_finite(image, path)
    if suffix in (".nii", ".nii.gz"):
        bad = nifti_nonfinite(path)  # ITK's NIfTI reader turns NaN into 0: look at the stored values
        if bad:
            raise VolumeError(f"{path}: {bad} voxel(s) are NaN or infinite; a volume must hold finite values")
    return image, geom


NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of real floating-point voxels


def nifti_nonfinite(path: str | os.PathLike[str], block: int = 16 * 2**20) -> int:
    """How many stored voxels of a NIfTI-1/-2 file (``.nii`` or ``.nii.gz``) are NaN or infinite, read in
    blocks (flat memory). SimpleITK reads NaN as 0, so the check looks at the stored bytes."""
    import gzip

    opener = gzip.open if str(path).lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(540)
        if len(head) < 348:
            return 0
        for endian in ("<", ">"):
            size = int(np.frombuffer(head[:4], endian + "i4")[0])
            if size in (348, 540):
                break
        else:
            return 0
        if size == 348:
            code = int(np.frombuffer(head[70:72], endian + "i2")[0])
            offset = int(np.frombuffer(head[108:112], endian + "f4")[0])
        else:
            code = int(np.frombuffer(head[12:14], endian + "i2")[0])
            offset = int(np.frombuffer(head[168:176], endian + "i8")[0])
        if code not in NIFTI_FLOATS:
            return 0
        dtype = np.dtype(endian + NIFTI_FLOATS[code])
        f.seek(max(offset, size))
        bad, rest = 0, b""
        while chunk := f.read(block):
            data = rest + chunk
            usable = len(data) - len(data) % dtype.itemsize
            bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(data[:usable], dtype))))
            rest = data[usable:]
    return bad


HEADER_BYTES = 65536  # MetaImage / NRRD text headers are read this far for the data file they name


def _data_file(path: Path, suffix: str) -> tuple[Path | None, bool]:
    """(separate data file, compressed) that a MetaImage or NRRD header names; (None, ...) when the voxels
    are inline. A data file must be a plain name in the header's own folder and a regular file: a header
    from elsewhere never names /dev/zero, another patient's file or a path outside its folder."""
    if suffix not in (".mha", ".nrrd"):
        return None, suffix == ".nii.gz"
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES).decode("latin-1")
        whole = not f.read(1)  # the file ends within HEADER_BYTES
    lines = head.splitlines()
    if suffix == ".mha":
        # ITK reads fields up to ElementDataFile, always the header's last; one it cannot find here is refused,
        # so that no padding pushes the data file past what is checked
        fields: dict[str, str] = {}
        for line in lines:
            k, eq, v = line.partition("=")
            if eq:
                fields[k.strip().lower()] = v.strip()
                if k.strip().lower() == "elementdatafile":
                    break
        else:
            raise VolumeError(f"{path}: no ElementDataFile within its header's first {HEADER_BYTES} bytes (refused)")
        name, compressed = fields["elementdatafile"], fields.get("compresseddata", "false").lower() == "true"
        local = name.upper() == "LOCAL"
    else:
        # the header ends at its first blank line; a header longer than what is checked is refused
        if "" not in lines and not whole:
            raise VolumeError(f"{path}: a NRRD header longer than {HEADER_BYTES} bytes (refused)")
        fields = {}
        for line in lines[1 : lines.index("") if "" in lines else len(lines)]:
            if line.startswith("#") or ":" not in line:
                continue
            k, _, v = line.partition(":")
            fields[k.strip().lower()] = v.lstrip("=").strip()
        name = fields.get("data file", fields.get("datafile", ""))
        compressed = fields.get("encoding", "raw").lower() in ("gzip", "gz", "bzip2", "bz2")
        local = not name
    if local:
        return None, compressed
    if (not name or "/" in name or "\\" in name or name in (".", "..") or "%" in name or " " in name.strip()
            or name.upper() == "LIST"):  # fmt: skip
        raise VolumeError(
            f"{path}: its header names the data file {name!r}; only a plain file name in the same folder is read "
            "(no paths, lists or patterns)"
        )
    data = path.parent / name
    try:
        mode = os.lstat(data).st_mode
    except FileNotFoundError as err:
        raise VolumeError(f"{path}: the data file {name!r} its header names does not exist") from err
    if not stat.S_ISREG(mode):
        raise VolumeError(f"{path}: the data file {name!r} its header names is not a regular file (refused)")
    return data, compressed


def check_itk_file(path: str | os.PathLike[str]) -> None:
    """A NIfTI/MHA/NRRD header's declared size against the caps and against the bytes actually stored,
    before any voxel is read (:mod:`msgan.io.limits`)."""
    p = Path(path)
    suffix = suffix_of(p)
    data, compressed = _data_file(p, suffix)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise VolumeError(f"{path}: cannot be read as {suffix} ({str(err).strip().splitlines()[-1]})") from err
    size = tuple(int(v) for v in reader.GetSize())
    try:
        voxels = limits.check_shape(size[::-1], str(path))
    except limits.LimitError as err:
        raise VolumeError(str(err)) from err
    item = np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1] * len(size), reader.GetPixelID())).dtype).itemsize
    declared = voxels * item * max(1, reader.GetNumberOfComponents())
    stored = (data or p).stat().st_size
    if compressed:
        try:
            limits.check_ratio(declared, stored, str(path))
        except limits.LimitError as err:
            raise VolumeError(str(err)) from err
    elif stored < declared:
        raise VolumeError(
            f"{path}: its header declares {size} voxels ({declared} bytes) but "
            f"{'its data file holds' if data else 'the file holds'} {stored} bytes; truncated or forged"
        )


def write_volume(path: str | os.PathLike[str], array: np.ndarray, geometry: Geometry, replace: bool = True) -> None:
    """Write a volume atomically in the format its suffix names (an existing one only with ``replace``)."""
    suffix = suffix_of(path)
    if suffix in ZARR_SUFFIXES:
        write_zarr(path, [array], geometry, replace=replace)
        return
    from msgan.storage import staged_file

    check_finite(array, path)  # never a NaN or inf into a file (ITK's NIfTI reader would read them as 0)
    if problem := geometry.problem():
        raise VolumeError(f"{path}: not written, its geometry cannot place it: {problem}")
    with staged_file(path, replace=replace) as tmp:
        sitk.WriteImage(to_sitk(array, geometry), str(tmp), useCompression=True)
