"""Ingest (DICOM series, NIfTI/MHA -> OME-Zarr volume) and export (OME-Zarr -> DICOM series or NIfTI).

An ingested volume keeps its geometry and its DICOM identifiers (patient, study, series,
frame of reference, modality, kernel) in the zarr attributes; a translated volume carries
them on (``msgan.source``), so its export can become a derived series of the same study.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from msgan import storage
from msgan.io.dicom import (
    ENHANCED,
    DicomError,
    derived_uid,
    read_series,
    write_enhanced,
    write_projection,
    write_series,
)
from msgan.io.uids import check_uid
from msgan.io.volume import (
    ITK_SUFFIXES,
    ZARR_SUFFIXES,
    Geometry,
    read_foreign_zarr,
    read_level,
    read_volume,
    suffix_of,
    write_volume,
    write_zarr,
)


@dataclass
class IngestReport:
    written: dict[str, str] = field(default_factory=dict)  # series UID (or file) -> zarr URI
    errors: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)


def _destination(out: str | os.PathLike[str], name: str, single: bool = True) -> str:
    """Where an ingested volume goes: ``out`` itself when it names a zarr (``*.zarr``) and one volume goes there,
    else ``out/<name>.zarr``. Writing replaces the destination whole, so a path there that is not a zarr store
    (a folder of other files, a file) is refused, never deleted."""
    dest = storage.normalize_uri(out)
    uri = dest if single and dest.rstrip("/").lower().endswith(ZARR_SUFFIXES) else storage.join(dest, f"{name}.zarr")
    fs, path = storage.filesystem(uri)
    if fs.exists(path) and (
        fs.isfile(path) or not any(fs.exists(f"{path.rstrip('/')}/{m}") for m in ("zarr.json", ".zgroup", ".zarray"))
    ):
        raise ValueError(
            f"{uri}: exists and is not a zarr store; ingest replaces its destination whole, so it will not delete "
            f"it: give a new *.zarr path or a folder to put <name>.zarr in"
        )
    return uri


def _stem(source: str | os.PathLike[str]) -> str:
    """The name of a volume file without its volume suffix (``ct.nii.gz`` -> ``ct``)."""
    name = str(source).rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(suffix_of(name))] or "volume"


def ingest(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> IngestReport:
    """DICOM folder or S3 prefix (one or more series), or a NIfTI/MHA/NRRD file or a foreign zarr -> OME-Zarr.

    One series (or a file) goes to ``out`` when it names a zarr (``*.zarr``), else to ``out/<name>.zarr`` (the
    file's name); several series go to ``out/<SeriesInstanceUID>.zarr``. An existing destination that is not a zarr
    store is refused (never replaced).
    """
    report = IngestReport()
    if str(source).startswith("s3://"):  # an S3 prefix of DICOM files: fetched once, read like a folder
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            fs, path = storage.filesystem(str(source))
            if not fs.exists(path):
                raise DicomError(f"{source}: no such S3 prefix")
            fs.get(path.rstrip("/") + "/", tmp + "/", recursive=True)
            return ingest(tmp, out)
    src = Path(source)
    if str(source).rstrip("/").lower().endswith(ZARR_SUFFIXES):  # a zarr msgan did not write: wrapped
        image, geom, notes = read_foreign_zarr(storage.normalize_uri(source))
        for note in notes:
            warnings.warn(note, stacklevel=2)
        dest = _destination(out, _stem(source))
        write_zarr(dest, [image], geom, attrs={"source": str(source), "notes": notes})
        report.written[str(source)] = dest
        report.notes[str(source)] = notes
        return report
    if src.is_file() and str(src).lower().endswith(ITK_SUFFIXES):
        image, geom = read_volume(src)
        dest = _destination(out, _stem(src))
        write_zarr(dest, [image.astype(np.float32)], geom, attrs={"source": str(src)})
        report.written[str(src)] = dest
        return report
    result = read_series([src])
    report.errors, report.skipped = dict(result.errors), dict(result.skipped)
    for v in result.volumes:
        try:
            uri = _destination(out, check_uid(v.series_uid, "SeriesInstanceUID"), single=len(result.volumes) == 1)
        except ValueError as err:
            report.errors[v.series_uid] = str(err)
            continue
        write_zarr(uri, [v.image], v.geometry, attrs={"source": "dicom", "dicom": v.identifiers, "notes": v.notes})
        report.written[v.series_uid] = uri
        if v.notes:
            report.notes[v.series_uid] = v.notes
    return report


@dataclass(frozen=True)
class Exported:
    files: list[Path]
    series_uid: str | None


def _open_volume(uri: str) -> tuple[np.ndarray, Geometry, dict[str, Any]]:
    arr, geom, meta = read_level(uri, 0)  # the one reader: a VolumeError (a ValueError) naming the volume
    return np.asarray(arr[...]), geom, meta


def export(
    volume: str,
    out: str | os.PathLike[str],
    fmt: str = "dicom",
    description: str | None = None,
    classic: bool = False,
) -> Exported:
    """A volume (ingested or translated) as a DICOM series folder or a NIfTI/MHA file.

    DICOM keeps the source's form: an Enhanced CT/MR source gives one Enhanced image of the same SOP class
    (``classic=True``: a series of classic single-frame images), a radiograph a derived image of its SOP class."""
    image, geom, meta = _open_volume(volume)
    if fmt == "nifti":
        dest = Path(out)
        if not str(dest).lower().endswith(ITK_SUFFIXES):
            dest = dest / (Path(str(volume).rstrip("/")).stem + ".nii.gz")
        suffix_of(dest)
        write_volume(dest, image, geom)
        return Exported([dest], None)
    if fmt != "dicom":
        raise ValueError(f"export format {fmt!r}: must be 'dicom' or 'nifti'")
    if image.ndim not in (2, 3):
        raise ValueError(f"{volume}: DICOM export writes 2D images and 3D series; this volume is {image.ndim}D")
    source = meta.get("source") if isinstance(meta.get("source"), dict) else meta
    ids: dict[str, Any] = dict(source.get("dicom", {})) if isinstance(source, dict) else {}
    model = meta.get("translated_by")
    src_uid = ids.get("SeriesInstanceUID")
    enhanced_source = str(ids.get("SOPClassUID", "")) in ENHANCED and "Header" in ids
    # Deterministic from the source series and the model version (a retried push is the same objects); the classic
    # form of an Enhanced source is another series: the same UIDs would name an Enhanced and a classic instance.
    form = ("classic",) if enhanced_source and classic and image.ndim == 3 else ()
    series_uid = derived_uid(str(src_uid or volume), str(model or "export"), *form)
    if model:
        what = description or f"msgan {model} from {ids.get('SeriesDescription', 'series')}"
    else:
        what = description or str(ids.get("SeriesDescription", "msgan export"))
    enhanced = enhanced_source and not classic
    write = write_projection if image.ndim == 2 else write_enhanced if enhanced else write_series
    files = write(image, geom, out, ids, series_uid, what, derived_from=src_uid if model else None)
    return Exported(files, series_uid)


__all__ = ["DicomError", "Exported", "IngestReport", "export", "ingest"]
