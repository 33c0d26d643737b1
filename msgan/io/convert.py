"""Ingest (DICOM series, NIfTI/MHA -> OME-Zarr volume) and export (OME-Zarr -> DICOM series or NIfTI).

An ingested volume keeps its geometry and its DICOM identifiers (patient, study, series,
frame of reference, modality, kernel) in the zarr attributes; a translated volume carries
them on (``msgan.source``), so its export can become a derived series of the same study.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from msgan import storage
from msgan.io import outputs
from msgan.io.dicom import (
    ENHANCED,
    DicomError,
    check_identifiers,
    derived_uid,
    read_series,
    trim_descriptions,
    write_enhanced,
    write_projection,
    write_series,
)
from msgan.io.uids import check_uid, shown
from msgan.io.volume import (
    ITK_SUFFIXES,
    ZARR_SUFFIXES,
    check_finite,
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


def _local(uri: str) -> Path | None:
    return storage.local_path(uri) if not storage.is_s3(uri) else None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _destination(
    out: str | os.PathLike[str], name: str, single: bool = True, replace: bool = False, source: str | None = None
) -> str:
    """Where an ingested volume goes: ``out`` itself when it names a zarr (``*.zarr``) and one volume goes there,
    else ``out/<name>.zarr``. Writing replaces the destination whole, so an existing destination is replaced only
    when it is an msgan volume (a zarr group whose ``msgan`` attribute holds geometry) and ``replace`` is true;
    anything else there (a folder of other files, a file, a zarr msgan did not write) is refused, never deleted.
    The destination may not be the source (or hold it), and may not be a symlink that leaves its parent folder."""
    zarr_named = single and str(out).rstrip("/").lower().endswith(ZARR_SUFFIXES)
    # the path as given: a symlink leaving its folder is refused, one inside it followed
    uri = outputs.resolve_output(out if zarr_named else storage.join(storage.normalize_uri(out), f"{name}.zarr"))
    here, src = _local(uri), _local(storage.normalize_uri(source)) if source is not None else None
    if src is not None and here is not None and _inside(src, here):
        raise ValueError(
            f"{uri}: is the input {source} (or holds it); ingest replaces its destination whole: give an output "
            f"path apart from the input"
        )
    if source is not None and storage.is_s3(source) and storage.normalize_uri(source).rstrip("/") == uri.rstrip("/"):
        raise ValueError(f"{uri}: is the input {source}; give an output path apart from the input")
    if outputs.exists(uri):
        if not outputs.is_msgan_volume(uri):
            raise ValueError(
                f"{uri}: exists and is not a zarr store msgan wrote ({outputs.describe(uri)}); ingest replaces "
                f"its destination whole, so it will not delete it: give a new *.zarr path or a folder to put "
                f"<name>.zarr in"
            )
        if not replace:
            raise ValueError(
                f"{uri}: an msgan volume is already there; pass --replace (replace=True) to replace it, or give "
                f"another *.zarr path"
            )
    return uri


def _stem(source: str | os.PathLike[str]) -> str:
    """The name of a volume file without its volume suffix (``ct.nii.gz`` -> ``ct``)."""
    name = str(source).rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(suffix_of(name))] or "volume"


def ingest(source: str | os.PathLike[str], out: str | os.PathLike[str], replace: bool = False) -> IngestReport:
    """DICOM folder or S3 prefix (one or more series), or a NIfTI/MHA/NRRD file or a foreign zarr -> OME-Zarr.

    One series (or a file) goes to ``out`` when it names a zarr (``*.zarr``), else to ``out/<name>.zarr`` (the
    file's name); several series go to ``out/<SeriesInstanceUID>.zarr``. An existing destination is replaced only
    when it is an msgan volume and ``replace`` is true; anything else there is refused by name, never deleted. The
    output may not be the input (symlinks resolved). Every size a DICOM file declares is checked before its pixels
    are decoded, and identifiers longer than their VR allows (or with control characters) refuse their series.
    """
    report = IngestReport()
    if storage.normalize_uri(source).rstrip("/") == storage.normalize_uri(out).rstrip("/"):  # symlinks resolved
        raise ValueError(f"{out}: is the input {source}; give an output path apart from the input")
    if str(source).startswith("s3://"):  # an S3 prefix of DICOM files: fetched once, read like a folder
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            fs, path = storage.filesystem(str(source))
            if not fs.exists(path):
                raise DicomError(f"{source}: no such S3 prefix")
            fs.get(path.rstrip("/") + "/", tmp + "/", recursive=True)
            return ingest(tmp, out, replace=replace)
    src = Path(source)
    if str(source).rstrip("/").lower().endswith(ZARR_SUFFIXES):  # a zarr msgan did not write: wrapped
        dest = _destination(out, _stem(source), replace=replace, source=str(source))
        image, geom, notes = read_foreign_zarr(storage.normalize_uri(source))
        for note in notes:
            warnings.warn(note, stacklevel=2)
        write_zarr(dest, [image], geom, attrs={"source": str(source), "notes": notes})
        report.written[str(source)] = dest
        report.notes[str(source)] = notes
        return report
    if src.is_file() and str(src).lower().endswith(ITK_SUFFIXES):
        dest = _destination(out, _stem(src), replace=replace, source=str(src))
        image, geom = read_volume(src)
        write_zarr(dest, [image.astype(np.float32)], geom, attrs={"source": str(src)})
        report.written[str(src)] = dest
        return report
    result = read_series([src])
    report.errors, report.skipped = dict(result.errors), dict(result.skipped)
    for v in result.volumes:
        try:
            uri = _destination(out, check_uid(v.series_uid, "SeriesInstanceUID"), single=len(result.volumes) == 1,
                               replace=replace, source=str(src))  # fmt: skip
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
    notes: list[str] = field(default_factory=list)


def _series_of(path: Path) -> str | None:
    """The SeriesInstanceUID of a DICOM file (header only), or None for anything else (a folder, a link, another
    file, a deflated file: an export never writes one, and inflating it is not worth the risk)."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        if str(meta.get("TransferSyntaxUID", "")) == pydicom.uid.DeflatedExplicitVRLittleEndian:
            return None
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    except Exception:
        return None
    uid = ds.get("SeriesInstanceUID")
    return str(uid) if uid not in (None, "") else None


def _own_files(out: Path, series_uid: str, replace: bool) -> list[Path]:
    """The files of series ``series_uid`` already in ``out`` (to be replaced); refuses a folder holding anything
    else, naming what is there, and this series' own files unless ``replace``."""
    if not out.exists() and not out.is_symlink():
        return []
    if not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; a DICOM export writes a folder of files: give a new one")
    ours, others = [], defaultdict(list)
    for entry in sorted(out.iterdir()):
        uid = _series_of(entry)
        if uid == series_uid:
            ours.append(entry)
        else:
            others[uid].append(entry.name)
    if others:
        parts = [f"{len(names)} DICOM file(s) of series {shown(uid)}" for uid, names in others.items() if uid]
        names = others.get(None, [])
        if names:
            parts.append(f"{len(names)} other entr{'y' if len(names) == 1 else 'ies'} ({', '.join(names[:5])}"
                         f"{', ...' if len(names) > 5 else ''})")  # fmt: skip
        raise ValueError(
            f"{out}: holds {'; '.join(parts)}; a DICOM export goes only into a new or empty folder, or one holding "
            f"nothing but this export's own series {series_uid}, so series never mix and nothing else is replaced: "
            f"give a new folder"
        )
    if ours and not replace:
        raise ValueError(
            f"{out}: already holds this export (series {series_uid}, {len(ours)} file(s)); pass --replace "
            f"(replace=True) to replace them"
        )
    return ours


def export(
    volume: str,
    out: str | os.PathLike[str],
    fmt: str = "dicom",
    description: str | None = None,
    classic: bool = False,
    replace: bool = False,
) -> Exported:
    """A volume (ingested or translated) as a DICOM series folder or a NIfTI/MHA file.

    DICOM keeps the source's form: an Enhanced CT/MR source gives one Enhanced image of the same SOP class
    (``classic=True``: a series of classic single-frame images), a radiograph a derived image of its SOP class.

    Nothing that is not this export's own is mixed with or replaced: a DICOM export into a folder that holds
    anything else (DICOM files of another series, any other file or folder) is refused, naming what is there
    (give a new folder). Re-exporting the same series (the same derived SeriesInstanceUID: UIDs are deterministic
    from the source series and the model) into its own folder replaces that series' files, and only those, when
    ``replace`` is true (``--replace``); otherwise it is refused. A NIfTI/MHA export over an existing file is refused
    unless ``replace`` is true. The identifiers written (PatientID, PatientName, AccessionNumber, StudyID,
    ReferringPhysicianName) are checked again against their VR (the volume's attributes may have been edited): too
    long or with control characters is refused, never truncated; descriptions are truncated to 64 characters with a
    note in :attr:`Exported.notes`."""

    arr, geom, meta = read_level(volume, 0)  # the one reader: a VolumeError (a ValueError) naming the volume
    image = np.asarray(arr[...])
    check_finite(image, volume)  # a NaN would become a NaN RescaleIntercept in every file, or NaN in a NIfTI
    if fmt == "nifti":
        dest = Path(out)
        if not str(dest).lower().endswith(ITK_SUFFIXES):
            dest = dest / (Path(str(volume).rstrip("/")).stem + ".nii.gz")
        dest = storage.local_path(outputs.resolve_output(dest, [volume]))  # never into the input, never elsewhere
        suffix_of(dest)
        if dest.is_dir() or (dest.is_symlink() and not dest.exists()):
            raise ValueError(f"{dest}: exists and is not a file; give another file name")
        if dest.exists() and not replace:
            raise ValueError(f"{dest}: exists; pass --replace (replace=True) to replace it, or give another name")
        write_volume(dest, image, geom, replace=replace)
        return Exported([dest], None)
    if fmt != "dicom":
        raise ValueError(f"export format {fmt!r}: must be 'dicom' or 'nifti'")
    out = storage.local_path(outputs.resolve_output(out, [volume]))  # never into the input, never through a symlink
    if arr.ndim not in (2, 3):
        raise ValueError(f"{volume}: DICOM export writes 2D images and 3D series; this volume is {arr.ndim}D")
    source = meta.get("source") if isinstance(meta.get("source"), dict) else meta
    ids: dict[str, Any] = dict(source.get("dicom", {})) if isinstance(source, dict) else {}
    check_identifiers(ids, f"{volume}")
    if isinstance(ids.get("Header"), dict):
        try:
            header = pydicom.Dataset.from_json(ids["Header"])
        except Exception as err:
            raise DicomError(f"{volume}: the kept source header cannot be read ({type(err).__name__}: {err})") from err
        check_identifiers(header, f"{volume} (source header)")
    notes = trim_descriptions(ids)
    model = meta.get("translated_by")
    src_uid = ids.get("SeriesInstanceUID")
    enhanced_source = str(ids.get("SOPClassUID", "")) in ENHANCED and "Header" in ids
    # Deterministic from the source series and the model version (a retried push is the same objects); the classic
    # form of an Enhanced source is another series: the same UIDs would name an Enhanced and a classic instance.
    form = ("classic",) if enhanced_source and classic and arr.ndim == 3 else ()
    series_uid = derived_uid(str(src_uid or volume), str(model or "export"), *form)
    old = _own_files(Path(out), series_uid, replace)
    if model:
        what = description or f"msgan {model} from {ids.get('SeriesDescription', 'series')}"
    else:
        what = description or str(ids.get("SeriesDescription", "msgan export"))
    if len(what) > 64:
        notes.append(f"SeriesDescription of {len(what)} characters truncated to the 64 that LO allows")
    enhanced = enhanced_source and not classic
    write = write_projection if arr.ndim == 2 else write_enhanced if enhanced else write_series
    files = write(image, geom, out, ids, series_uid, what, derived_from=src_uid if model else None)
    for stale in set(old) - set(files):  # this series' files the new export does not have (verified ours above)
        stale.unlink(missing_ok=True)
    return Exported(files, series_uid, notes)


__all__ = ["DicomError", "Exported", "IngestReport", "export", "ingest"]
