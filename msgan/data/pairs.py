"""The pairs manifest: which image is the source and which the target of each training pair.

A ``pairs.csv`` (local or ``s3://``) has the columns ``source,target`` and optionally ``split``
(``train``, ``validation`` or ``holdout``; default ``train``) and ``patient``. Relative paths resolve
against the CSV's own folder (or S3 prefix); absolute local paths are allowed in a local CSV, never in
a remote one (a manifest from the object store must not name this machine's files). Every refusal is a
:class:`PairsError` naming the CSV and its line (the header is line 1).

A side is an image file (NIfTI, MHA, NRRD), a folder holding one DICOM series, a single DICOM file
(a CR/DX/MG radiograph or an Enhanced multi-frame image) or an OME-Zarr volume (local or ``s3://``).
:func:`check_pair` says whether a pair can train: both sides readable, same patient and modality when
known, same dimensionality, enough physical overlap; a pair on another grid is resampled, a pair in
another frame of reference needs ``data.align``.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import io
import os
import posixpath
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msgan import storage
from msgan.config import ConfigError
from msgan.io.volume import ITK_SUFFIXES, ZARR_SUFFIXES, Geometry, VolumeError, check_finite

SPLITS = ("train", "validation", "holdout")
COLUMNS = ("source", "target", "split", "patient")
REQUIRED = ("source", "target")
MAX_CSV_BYTES = 16 * 2**20  # a manifest of ~100,000 pairs; anything larger is not a pairs list
MAX_CELL_CHARS = 4096  # a path or a patient label
MIN_OVERLAP = 0.10  # below this fraction of the source's box covered by the target, a pair is refused
GRID_RTOL = 1e-3  # same grid: shape equal, spacing/origin/direction within this relative tolerance
OVERLAP_SAMPLES = 48  # sample points per axis of the source box when the overlap is measured
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


class PairsError(ConfigError):
    """A pairs manifest that cannot be used; the message is ``<csv> row <N>: <reason>`` (or ``<csv>: <reason>``
    for the file as a whole)."""


@dataclass(frozen=True)
class Pair:
    """One row of a pairs manifest, its paths resolved."""

    row: int  # the CSV line number (the header is line 1)
    source: str  # a local path or an s3:// URI
    target: str
    split: str = "train"
    patient: str = ""  # "" when the column is absent or empty


# ----------------------------------------------------------------------------- the manifest


def _is_remote(uri: str) -> bool:
    return str(uri).startswith("s3://")


def csv_uri(uri: str | os.PathLike[str]) -> str:
    return storage.normalize_uri(uri)


def read_csv_bytes(uri: str | os.PathLike[str], kind: str = "a pairs CSV") -> bytes:
    """A manifest's bytes (local or ``s3://``) within :data:`MAX_CSV_BYTES`; ``kind`` names the file in refusals
    (a regular file that exists and reads, never a folder, FIFO or device)."""
    shown = str(uri)
    what = "pairs file" if kind == "a pairs CSV" else kind.split(" ", 1)[-1]  # "no such image-set CSV"
    try:
        norm = csv_uri(uri)
    except (ValueError, RuntimeError, OSError) as err:  # another scheme; a symlink loop
        raise PairsError(f"{shown}: {err}") from None
    if not storage.is_s3(norm):
        try:
            size = os.stat(storage.local_path(norm)).st_size
        except OSError:
            size = 0  # missing or unreadable: said below
        if size > MAX_CSV_BYTES:
            raise PairsError(f"{shown}: {size} bytes, above the {MAX_CSV_BYTES} {kind} may hold; refused")
    try:
        return storage.read_bytes(norm, MAX_CSV_BYTES)
    except FileNotFoundError:
        raise PairsError(f"{shown}: no such {what}") from None
    except IsADirectoryError:
        raise PairsError(f"{shown}: a folder, not {kind}") from None
    except OSError as err:
        if err.errno == errno.EFBIG:
            raise PairsError(f"{shown}: {err.strerror} ({kind} holds at most {MAX_CSV_BYTES} bytes)") from None
        if err.errno == errno.EINVAL:
            raise PairsError(f"{shown}: not a regular file (a FIFO, device or socket); refused") from None
        raise PairsError(f"{shown}: cannot be read ({err.strerror or err})") from None


def pairs_fingerprint(uri: str | os.PathLike[str]) -> str:
    """sha256 of the manifest's bytes (hex, 24 characters): what a training run records in MLflow."""
    return hashlib.sha256(read_csv_bytes(uri)).hexdigest()[:24]


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def decode_csv(shown: str, data: bytes, kind: str = "a pairs CSV") -> str:
    """A manifest's text: UTF-8 (a leading byte-order mark dropped), no NUL byte; refusals name the row."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise PairsError(f"{shown} row {_line_of(data, nul)}: a NUL byte; {kind} is UTF-8 text")
    body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # the byte-order mark a spreadsheet may write
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PairsError(
            f"{shown} row {_line_of(body, err.start)}: not UTF-8 (byte 0x{body[err.start]:02x}); save the CSV as UTF-8"
        ) from None


def resolve_ref(shown: str, row: int, column: str, cell: str, base_uri: str) -> str:
    """The side's path or URI: an s3:// URI as it is; relative paths against the CSV's folder or prefix; in a
    local CSV absolute local paths too; in a remote CSV nothing local."""
    where = f"{shown} row {row}"
    if _is_remote(cell):
        bucket_key = cell[len("s3://") :]
        if "@" in bucket_key.split("/", 1)[0] or ":" in bucket_key.split("/", 1)[0]:  # never echoed: a secret
            raise PairsError(
                f"{where}: {column} is an s3:// URI carrying credentials (user:secret@bucket); a manifest names the "
                "bucket and key alone, credentials come from the environment"
            )
        if not bucket_key or bucket_key.startswith("/") or ".." in bucket_key.split("/"):
            raise PairsError(f"{where}: {column} {cell!r} is not an s3://bucket/key URI")
        return cell.rstrip("/")
    if "://" in cell and not cell.startswith("file://"):
        raise PairsError(f"{where}: {column} {cell!r}: only local paths and s3:// URIs name a side")
    if _is_remote(base_uri):
        if cell.startswith(("file://", "/", "~", "\\")) or re.match(r"[A-Za-z]:[\\/]", cell):
            raise PairsError(
                f"{where}: {column} {cell!r} is a local path in a manifest from the object store; a remote manifest "
                f"names s3:// URIs or paths relative to its own prefix, never this machine's files"
            )
        bucket, _, key = base_uri[len("s3://") :].partition("/")
        folder = posixpath.dirname(key)
        joined = posixpath.normpath(posixpath.join(folder, cell)) if folder else posixpath.normpath(cell)
        if joined in (".", "") or joined.startswith(".."):
            raise PairsError(f"{where}: {column} {cell!r} leaves the bucket {bucket!r}")
        return f"s3://{bucket}/{joined}"
    local = cell[len("file://") :] if cell.startswith("file://") else cell
    base = storage.local_path(base_uri).parent
    return os.path.normpath(os.path.join(base, os.path.expanduser(local)))  # the user's own choice of path


def ref_exists(ref: str) -> bool:
    if _is_remote(ref):
        try:
            return storage.exists(ref)
        except Exception:
            return False
    return os.path.exists(ref)


def ref_key(ref: str) -> str:
    """What makes two references the same image (symlinks followed locally)."""
    return ref if _is_remote(ref) else os.path.realpath(ref)


def _header(shown: str, first: list[str], row: int) -> list[str]:
    names = [c.strip().lower() for c in first]
    for i, name in enumerate(names):
        if name not in COLUMNS:
            raise PairsError(
                f"{shown} row {row}: unknown column {first[i].strip()!r} (column {i + 1}); the columns are "
                f"{', '.join(COLUMNS)} (source and target required)"
            )
        if name in names[:i]:
            raise PairsError(f"{shown} row {row}: column {name!r} appears twice")
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise PairsError(
            f"{shown} row {row}: no {' and no '.join(repr(m) for m in missing)} column; the header names the columns "
            f"{', '.join(COLUMNS)} (source and target required)"
        )
    return names


def manifest_rows(
    shown: str, text: str, header: Callable[[str, list[str], int], list[str]], error: type[ValueError], empty: str,
) -> Iterator[tuple[int, str, dict[str, str]]]:  # fmt: skip
    """The data rows of a manifest CSV's ``text`` (the pairs manifest's and the image sets'): ``(row, where,
    cells)`` with ``cells`` the stripped values by column name as ``header`` (which checks the header row and
    raises its own errors) names them, and ``where`` = ``"<csv> row N"``. Blank lines are skipped; a malformed
    line, a row with another number of values than columns, an over-long cell or a control character raise
    ``error`` naming the row; a CSV without a header raises ``error`` with ``empty`` as the hint."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    names: list[str] | None = None
    line = 0
    while True:
        row = line + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise error(f"{shown} row {reader.line_num}: not a CSV line ({err})") from None
        line = reader.line_num
        if not any(c.strip() for c in record):
            continue  # blank lines carry nothing
        if names is None:
            names = header(shown, record, row)
            continue
        where = f"{shown} row {row}"
        if len(record) != len(names):
            raise error(f"{where}: {len(record)} values for the {len(names)} columns {', '.join(names)}")
        cells = {}
        for name, value in zip(names, record, strict=True):
            value = value.strip()
            if len(value) > MAX_CELL_CHARS:
                raise error(f"{where}: {name} has {len(value)} characters (at most {MAX_CELL_CHARS})")
            if CONTROL_CHARS.search(value):
                raise error(f"{where}: {name} holds a control character")
            cells[name] = value
        yield row, where, cells
    if names is None:
        raise error(f"{shown}: empty; {empty}")


def read_pairs(uri: str | os.PathLike[str], check_files: bool = True) -> list[Pair]:
    """The pairs a manifest names, checked: known columns, a source and a target on every row, a known split,
    no row twice, no image the source of two pairs, no source that is its own target, one image and one patient
    in one split only, and (``check_files``) every file there."""
    shown = str(uri)
    data = read_csv_bytes(uri)
    base_uri = csv_uri(uri)
    text = decode_csv(shown, data)
    pairs: list[Pair] = []
    seen_pair: dict[tuple[str, str], int] = {}
    seen_source: dict[str, int] = {}
    patient_split: dict[str, tuple[str, int]] = {}
    image_split: dict[str, tuple[str, int]] = {}
    header = "a pairs CSV starts with the header 'source,target[,split][,patient]'"
    for row, where, cells in manifest_rows(shown, text, _header, PairsError, header):
        for name in REQUIRED:
            if not cells[name]:
                raise PairsError(f"{where}: no {name} (every pair names a source and a target)")
        split = cells.get("split", "").lower() or "train"
        if split not in SPLITS:
            raise PairsError(f"{where}: split {cells['split']!r} is not one of {', '.join(SPLITS)}")
        source = resolve_ref(shown, row, "source", cells["source"], base_uri)
        target = resolve_ref(shown, row, "target", cells["target"], base_uri)
        keys = (ref_key(source), ref_key(target))
        if keys[0] == keys[1]:
            raise PairsError(f"{where}: the source and the target are the same image ({cells['source']})")
        if keys in seen_pair:
            raise PairsError(f"{where}: the same pair as row {seen_pair[keys]} (a duplicated row)")
        if keys[0] in seen_source:
            raise PairsError(
                f"{where}: source {cells['source']} is already the source of row {seen_source[keys[0]]}; one image is "
                f"the source of one pair (a second target for it would teach two answers)"
            )
        for name, key in zip(REQUIRED, keys, strict=True):
            other = image_split.get(key)
            if other is not None and other[0] != split:
                raise PairsError(
                    f"{where}: {name} {cells[name]} is in split {split!r} here and in split {other[0]!r} at row "
                    f"{other[1]}; one image belongs to one split (held-out figures leak otherwise)"
                )
        patient = cells.get("patient", "")
        if patient:
            first = patient_split.setdefault(patient, (split, row))
            if first[0] != split:
                raise PairsError(
                    f"{where}: patient {patient!r} is in split {split!r} here and in split {first[0]!r} at row "
                    f"{first[1]}; one patient's pairs belong to one split (held-out figures leak otherwise)"
                )
        if check_files:
            for name, ref in (("source", source), ("target", target)):
                if not ref_exists(ref):
                    raise PairsError(f"{where}: {name} {ref} does not exist")
        seen_pair[keys] = row
        seen_source[keys[0]] = row
        for key in keys:
            image_split.setdefault(key, (split, row))
        pairs.append(Pair(row, source, target, split, patient))
    if not pairs:
        raise PairsError(f"{shown}: no pairs below the header")
    return pairs


# ----------------------------------------------------------------------------- one side of a pair


@dataclass(frozen=True)
class SideInfo:
    """What is known of one side without training on it."""

    ref: str
    shape: tuple[int, ...]  # numpy order (z, y, x) / (y, x)
    geometry: Geometry
    modality: str = ""  # DICOM Modality; "" unknown
    patient: str = ""  # DICOM PatientID; "" unknown
    frame_of_reference: str = ""  # DICOM FrameOfReferenceUID; "" unknown
    study: str = ""  # DICOM StudyInstanceUID; "" unknown
    padding: float | None = None  # PixelPaddingValue in output units (HU after rescale); None unknown


def _text(value: Any) -> str:
    if isinstance(value, list):
        value = value[0] if value else ""
    return "" if value is None else str(value).strip()


def _float(value: Any) -> float | None:
    try:
        v = float(_text(value) if not isinstance(value, (int, float)) else value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _from_identifiers(ref: str, shape: tuple[int, ...], geom: Geometry, ids: Any, padding: float | None) -> SideInfo:
    ids = ids if isinstance(ids, dict) else {}
    return SideInfo(
        ref=ref,
        shape=tuple(int(s) for s in shape),
        geometry=geom,
        modality=_text(ids.get("Modality")).upper(),
        patient=_text(ids.get("PatientID")),
        frame_of_reference=_text(ids.get("FrameOfReferenceUID")),
        study=_text(ids.get("StudyInstanceUID")),
        padding=padding,
    )


def _kind(ref: str) -> str:
    low = ref.rstrip("/").lower()
    if low.endswith(ZARR_SUFFIXES):
        return "zarr"
    if _is_remote(ref):
        raise VolumeError(
            f"{ref}: on s3:// a side is an OME-Zarr volume (*.zarr); ingest DICOM or NIfTI first (`msgan ingest`)"
        )
    path = ref[len("file://") :] if ref.startswith("file://") else ref
    if not os.path.exists(path):
        raise FileNotFoundError(f"{ref}: no such file or folder")
    if os.path.isdir(path):
        return "dicom"
    if not os.path.isfile(path):
        raise VolumeError(f"{ref}: not a regular file or folder (a FIFO or device); refused")
    return "itk" if low.endswith(ITK_SUFFIXES) else "dicom"


def _local(ref: str) -> str:
    return ref[len("file://") :] if ref.startswith("file://") else ref


def _zarr_meta(ref: str) -> tuple[Any, Geometry, dict[str, Any]]:
    from msgan.io.volume import read_level

    return read_level(ref, 0, complete=False)


def _zarr_info(ref: str, shape: tuple[int, ...], geom: Geometry, meta: dict[str, Any]) -> SideInfo:
    source = meta.get("source")
    ids = meta.get("dicom") or (source.get("dicom") if isinstance(source, dict) else None) or {}
    padding = _float(meta.get("padding"))
    if padding is None and isinstance(ids, dict) and "PixelPaddingValue" in ids:
        raw, slope = _float(ids.get("PixelPaddingValue")), _float(ids.get("RescaleSlope"))
        intercept = _float(ids.get("RescaleIntercept"))
        padding = None if raw is None else raw * (1.0 if slope is None else slope) + (intercept or 0.0)
    return _from_identifiers(ref, shape, geom, ids, padding)


def _itk_header(ref: str) -> tuple[tuple[int, ...], Geometry]:
    import SimpleITK as sitk

    from msgan.io.volume import check_itk_file

    path = _local(ref)
    check_itk_file(path)  # declared sizes against the caps and the stored bytes
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    if reader.GetNumberOfComponents() != 1:
        raise VolumeError(f"{ref}: {reader.GetNumberOfComponents()} components per pixel; a side is a scalar image")
    size = tuple(int(v) for v in reader.GetSize())
    if len(size) not in (2, 3):
        raise VolumeError(f"{ref}: a {len(size)}D image; a side is 2D or 3D")
    geom = Geometry(tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(reader.GetDirection()))
    if problem := geom.problem():
        raise VolumeError(f"{ref}: its header's geometry cannot place it: {problem}")
    return size[::-1], geom


def _dicom_padding(folder: str, series_uid: str) -> float | None:
    """PixelPaddingValue of the series (first file that holds it), rescaled to output units; None when absent.
    MONOCHROME1 images are read inverted, so their padding value means nothing here."""
    import pydicom

    root = Path(folder)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    tags = ["SeriesInstanceUID", "PixelPaddingValue", "RescaleSlope", "RescaleIntercept", "PhotometricInterpretation",
            "PixelRepresentation", "SharedFunctionalGroupsSequence"]  # fmt: skip
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=tags)
            if str(ds.get("SeriesInstanceUID", "")) != series_uid:
                continue
            if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
                return None
            raw = _float(ds.get("PixelPaddingValue"))
            if raw is None:
                return None
            slope, intercept = _float(ds.get("RescaleSlope")), _float(ds.get("RescaleIntercept"))
            shared = ds.get("SharedFunctionalGroupsSequence")
            if slope is None and shared:
                pvt = shared[0].get("PixelValueTransformationSequence")
                if pvt:
                    slope, intercept = _float(pvt[0].get("RescaleSlope")), _float(pvt[0].get("RescaleIntercept"))
            return raw * (1.0 if slope is None else slope) + (intercept or 0.0)
        except Exception:  # an unreadable file is read_series's business; padding stays unknown
            continue
    return None


def _dicom_side(ref: str) -> tuple[np.ndarray, SideInfo]:
    from msgan.io.dicom import DicomError, read_series

    path = _local(ref)
    result = read_series([path])
    what = "folder" if os.path.isdir(path) else "file"
    if result.errors:
        reasons = "; ".join(list(result.errors.values())[:2])
        raise DicomError(f"{ref}: a broken series in this {what} ({reasons})")
    if len(result.volumes) != 1:
        raise DicomError(f"{ref}: {len(result.volumes)} DICOM series in this {what}; a side is one series")
    vol = result.volumes[0]
    padding = _dicom_padding(path, vol.series_uid)
    image = np.asarray(vol.image, dtype=np.float32)
    return image, _from_identifiers(ref, image.shape, vol.geometry, vol.identifiers, padding)


def _foreign_zarr(ref: str) -> tuple[np.ndarray, Geometry]:
    from msgan.io.volume import read_foreign_zarr

    image, geom, _ = read_foreign_zarr(storage.normalize_uri(ref))
    return image, geom


def side_info(ref: str) -> SideInfo:
    """Shape, geometry and the DICOM attributes of one side, from its header where the format allows (NIfTI,
    MHA, NRRD, msgan OME-Zarr); a DICOM series is read whole (its checks need every slice)."""
    kind = _kind(ref)
    if kind == "itk":
        shape, geom = _itk_header(ref)
        return SideInfo(ref, shape, geom)
    if kind == "zarr":
        try:
            arr, geom, meta = _zarr_meta(ref)
        except VolumeError as err:
            if "no msgan geometry attribute" not in str(err):
                raise
            image, geom = _foreign_zarr(ref)  # an OME-Zarr msgan did not write: geometry from its multiscales
            return SideInfo(ref, tuple(image.shape), geom)
        return _zarr_info(ref, tuple(arr.shape), geom, meta)
    return _dicom_side(ref)[1]


def read_side(ref: str) -> tuple[np.ndarray, SideInfo]:
    """One side's pixels (float32, physical units: HU after the rescale for CT) and what is known of it; NaN or
    infinite voxels are refused."""
    from msgan.io.volume import read_volume

    kind = _kind(ref)
    if kind == "itk":
        image, geom = read_volume(_local(ref))
        info = SideInfo(ref, tuple(image.shape), geom)
    elif kind == "zarr":
        try:
            arr, geom, meta = _zarr_meta(ref)
        except VolumeError as err:
            if "no msgan geometry attribute" not in str(err):
                raise
            image, geom = _foreign_zarr(ref)
            info = SideInfo(ref, tuple(image.shape), geom)
        else:
            from msgan.io.volume import check_stored

            check_stored(ref, "0", arr)  # every chunk written: a missing one would read as the fill value
            image = np.asarray(arr[...])
            info = _zarr_info(ref, tuple(arr.shape), geom, meta)
    else:
        image, info = _dicom_side(ref)
    image = np.asarray(image, dtype=np.float32)
    check_finite(image, ref)
    return image, info


# ----------------------------------------------------------------------------- a pair


@dataclass(frozen=True)
class PairCheck:
    """Whether a pair can train, and how its two sides sit in space."""

    pair: Pair
    source: SideInfo | None
    target: SideInfo | None
    same_grid: bool
    overlap: float  # fraction of the source grid's physical box covered by the target's
    problems: tuple[str, ...]
    notes: tuple[str, ...] = ()  # what a user should know that does not stop training

    @property
    def usable(self) -> bool:
        return not self.problems

    @property
    def different_frames(self) -> bool:
        """Both frames of reference known and different: the target must be registered (``data.align``)."""
        s, t = self.source, self.target
        return bool(s and t and s.frame_of_reference and t.frame_of_reference
                    and s.frame_of_reference != t.frame_of_reference)  # fmt: skip

    @property
    def alignment(self) -> str:
        """``same grid``, ``resample`` or ``different frame of reference: align``."""
        if self.different_frames:
            return "different frame of reference: align"
        return "same grid" if self.same_grid else "resample"


def _matrix(geom: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """(index -> physical matrix, origin), ITK index order."""
    d = np.asarray(geom.direction, dtype=np.float64).reshape(geom.dims, geom.dims)
    return d @ np.diag(np.asarray(geom.spacing, dtype=np.float64)), np.asarray(geom.origin, dtype=np.float64)


def same_grid(a: SideInfo, b: SideInfo, rtol: float = GRID_RTOL) -> bool:
    """Shape, spacing, origin and direction equal within ``rtol`` (origin relative to the spacing)."""
    if a.shape != b.shape or a.geometry.dims != b.geometry.dims:
        return False
    sa, sb = np.asarray(a.geometry.spacing), np.asarray(b.geometry.spacing)
    if not np.allclose(sa, sb, rtol=rtol, atol=0):
        return False
    if np.abs(np.asarray(a.geometry.origin) - np.asarray(b.geometry.origin)).max() > rtol * float(sa.min()):
        return False
    return bool(np.abs(np.asarray(a.geometry.direction) - np.asarray(b.geometry.direction)).max() <= rtol)


def overlap_fraction(source: SideInfo, target: SideInfo, samples: int = OVERLAP_SAMPLES) -> float:
    """The fraction of the source grid's physical box (voxel edges) that the target grid's box covers, direction
    cosines included: points spread evenly over the source box are mapped into the target's index frame."""
    if source.geometry.dims != target.geometry.dims:
        return 0.0
    dims = source.geometry.dims
    ns = np.asarray(source.shape[::-1], dtype=np.float64)  # ITK order
    nt = np.asarray(target.shape[::-1], dtype=np.float64)
    axes = [(np.arange(k) + 0.5) / k * n - 0.5 for n, k in zip(ns, (min(int(n), samples) for n in ns), strict=True)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, dims)  # source indices
    ms, os_ = _matrix(source.geometry)
    mt, ot = _matrix(target.geometry)
    try:
        inv = np.linalg.inv(mt)
    except np.linalg.LinAlgError:
        return 0.0
    physical = points @ ms.T + os_
    index = (physical - ot) @ inv.T
    inside = np.all((index >= -0.5 - 1e-9) & (index <= nt - 0.5 + 1e-9), axis=1)
    return float(inside.mean())


def _side(ref: str, label: str) -> tuple[SideInfo | None, str | None]:
    from msgan.io.dicom import DicomError

    try:
        return side_info(ref), None
    except (VolumeError, DicomError, ValueError, FileNotFoundError, OSError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if ref not in reason:
            reason = f"{ref}: {reason}"
        return None, f"{label} unreadable ({reason})"


def check_pair(pair: Pair, dims: int | None = None) -> PairCheck:
    """Whether ``pair`` can train (``dims``: what the model translates, 2 or 3), with how its sides sit in space.

    Problems (each refuses the pair): a side unreadable; a side of another dimensionality than ``dims`` or than
    the other side; patients that differ (DICOM PatientID); modalities that differ; the target covering less than
    :data:`MIN_OVERLAP` of the source's physical box (none at all included), when both sides share a frame of
    reference (or it is unknown). Two known, different frames of reference are a note: ``data.align`` registers
    the target, and their physical overlap means little before that."""
    if dims is not None and dims not in (2, 3):
        raise ValueError(f"dims {dims}: 2 or 3")
    problems: list[str] = []
    notes: list[str] = []
    source, why_s = _side(pair.source, "source")
    target, why_t = _side(pair.target, "target")
    problems += [w for w in (why_s, why_t) if w]
    for label, side in (("source", source), ("target", target)):
        if side is not None and dims is not None and len(side.shape) != dims:
            problems.append(f"{label} is {len(side.shape)}D, the model is {dims}D")
    if source is None or target is None:
        return PairCheck(pair, source, target, False, 0.0, tuple(problems), tuple(notes))
    if len(source.shape) != len(target.shape):
        problems.append(f"source is {len(source.shape)}D, target {len(target.shape)}D")
        return PairCheck(pair, source, target, False, 0.0, tuple(problems), tuple(notes))
    if source.patient and target.patient and source.patient != target.patient:
        problems.append("patients differ (the DICOM PatientID of the two sides)")
    if source.modality and target.modality and source.modality != target.modality:
        problems.append(f"modalities differ ({source.modality} -> {target.modality})")
    grid = same_grid(source, target)
    overlap = 1.0 if grid else overlap_fraction(source, target)
    check = PairCheck(pair, source, target, grid, overlap, (), ())
    if check.different_frames:
        notes.append("frames of reference differ: needs data.align: rigid or affine")
        if overlap < MIN_OVERLAP:
            notes.append(f"physical overlap {overlap:.0%} before alignment")
    elif overlap == 0.0:
        problems.append("no physical overlap")
    elif overlap < MIN_OVERLAP:
        problems.append(f"overlap {overlap:.0%}, below {MIN_OVERLAP:.0%}")
    elif overlap < 0.5:
        notes.append(f"overlap {overlap:.0%}: only the overlap trains")
    return dataclasses.replace(check, problems=tuple(problems), notes=tuple(notes))


class Splits:
    """Which split each patient is in, from a row's ``patient`` value and its DICOM PatientID, so that no patient
    is in two splits (held-out figures leak otherwise). A ``patient`` value stands for its rows: rows with two
    different values are two patients whatever their PatientID (the column says so where PatientIDs are not
    patients). A row without one is its PatientID's, and meets every row of that PatientID, with a ``patient``
    value or not: a hand-added row of a patient whose other rows carry a pseudonym is still that patient."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], dict[str, str]] = {}  # (kind, key) -> {split: where first seen}

    def place(self, patient: str, patient_id: str, split: str, where: str) -> str | None:
        """Record a row; where the same patient already is in another split (a problem, said), else None."""
        if patient:
            look = [("patient", patient, "patient")] + ([("bare", patient_id, "DICOM PatientID")] if patient_id else [])
            keep = [("patient", patient)] + ([("any", patient_id)] if patient_id else [])
        elif patient_id:
            look, keep = [("any", patient_id, "DICOM PatientID")], [("any", patient_id), ("bare", patient_id)]
        else:
            return None
        clash = None
        for kind, key, what in look:
            other = next(((sp, w) for sp, w in self._seen.get((kind, key), {}).items() if sp != split), None)
            if other and clash is None:
                clash = (
                    f"the same {what} is in split {other[0]!r} at {other[1]}: one patient belongs to one split "
                    "(held-out figures leak otherwise; a patient column tells patients apart where PatientIDs do not)"
                )
        for k in keep:
            self._seen.setdefault(k, {}).setdefault(split, where)
        return clash


def pair_patient_id(check: PairCheck) -> str:
    """The DICOM PatientID both sides of a pair share ('' when neither has one, or they differ)."""
    ids = {s.patient for s in (check.source, check.target) if s is not None and s.patient}
    return next(iter(ids)) if len(ids) == 1 else ""


def check_pairs(pairs: Sequence[Pair], dims: int | None = None) -> list[PairCheck]:
    """:func:`check_pair` for every pair, then across pairs: one patient in two splits refuses the later pair
    (:class:`Splits`: by the ``patient`` column, and by the DICOM PatientID where a row has no ``patient`` value)."""
    checks = [check_pair(p, dims) for p in pairs]
    splits = Splits()
    out = []
    for c in checks:
        clash = splits.place(c.pair.patient, pair_patient_id(c), c.pair.split, f"row {c.pair.row}")
        if clash:
            c = dataclasses.replace(c, problems=(*c.problems, clash))
        out.append(c)
    return out


def describe(check: PairCheck) -> str:
    """One line for a person: row, split, both sides' size and spacing, alignment, overlap, problems or notes."""

    def side(info: SideInfo | None) -> str:
        if info is None:
            return "?"
        size = "x".join(str(s) for s in info.shape[::-1])
        spacing = "x".join(f"{s:.3g}" for s in info.geometry.spacing)
        mod = f" {info.modality}" if info.modality else ""
        return f"{size} @ {spacing} mm{mod}"

    p = check.pair
    head = f"row {p.row:<4d} {p.split:<10s} source {side(check.source)}  target {side(check.target)}"
    if check.source is not None and check.target is not None:
        head += f"  {check.alignment}  overlap {check.overlap:.0%}"
    tail = f"  UNUSABLE: {'; '.join(check.problems)}" if check.problems else "  ok"
    if check.notes:
        tail += f" (note: {'; '.join(check.notes)})"
    return head + tail


__all__ = [
    "MIN_OVERLAP",
    "SPLITS",
    "Pair",
    "PairCheck",
    "PairsError",
    "SideInfo",
    "Splits",
    "check_pair",
    "check_pairs",
    "describe",
    "overlap_fraction",
    "pairs_fingerprint",
    "read_pairs",
    "read_side",
    "same_grid",
    "side_info",
]
