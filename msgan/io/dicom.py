"""DICOM series in and out.

Ingest: files are read with pydicom (headers, checks) and SimpleITK/GDCM (pixels, decoders),
grouped by SeriesInstanceUID and sorted along the slice normal. SimpleITK is silent about
several broken series (missing slices, gantry tilt, missing positions, localizers mixed in,
duplicates, non-image files), so each is checked here and refused with a named reason.
Pixel values are rescaled to modality units (HU for CT), kept as float32, never 8-bit.

Export: a volume becomes a derived series of single-frame images with the same size and
geometry: new Series/SOP Instance UIDs (deterministic from the source series and the model,
so a retried push is not a duplicate), ImageType DERIVED\\SECONDARY\\<the source's third value>, the
source's patient and study attributes (Type 2 attributes present, empty when unknown), and a reference to
the source series. Written with pydicom (sequences included).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from msgan.io.uids import UidError, check_uid, shown
from msgan.io.volume import Geometry

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
PROJECTION_MODALITIES = {"CR", "DX", "MG", "XA", "RF"}  # a single image is a complete 2D image
IDENTIFIERS = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
    "StudyID", "AccessionNumber", "StudyDescription", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
    "Modality", "FrameOfReferenceUID", "ConvolutionKernel", "Manufacturer", "ManufacturerModelName",
    "BodyPartExamined", "KVP", "SOPClassUID", "SpecificCharacterSet", "ReferringPhysicianName", "PatientPosition",
    "Laterality", "ImageType", "InstitutionName", "ScanningSequence", "SequenceVariant", "ScanOptions",
    "MRAcquisitionType", "RepetitionTime", "EchoTime", "EchoTrainLength", "MagneticFieldStrength",
)  # fmt: skip
# What a derived image carries over from its source, by module (PS3.3): Patient and General Study (the same
# patient and study), General Equipment, and the acquisition attributes of the CT/MR Image modules.
COPIED = (
    "SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription", "Manufacturer",
    "ManufacturerModelName", "InstitutionName", "BodyPartExamined", "PatientPosition", "Laterality",
)  # fmt: skip
# Type 2 attributes (present, empty when the source has no value) of the modules each SOP class writes.
TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "Manufacturer",
    "PatientPosition",
    "AcquisitionNumber",
)  # fmt: skip  (Laterality is 2C: only when the source has it, as dciodvfy checks)
TYPE2_BY_CLASS = {
    CT_IMAGE: ("KVP", "ConvolutionKernel"),
    MR_IMAGE: ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength", "RepetitionTime"),
}
# Type 1 attributes of the MR Image module with the values PS3.3 C.8.3.1 gives when the source does not say.
MR_TYPE1 = {"ScanningSequence": ["RM"], "SequenceVariant": ["NONE"]}
GEOMETRY_TOL_MM = 1e-3
# Transfer syntaxes SimpleITK's GDCM decodes; anything else compressed (HTJ2K, JPEG XL, video, ...) is refused
# by name instead of being handed to a decoder that may misread it.
DECODABLE = {
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
}  # fmt: skip


class DicomError(ValueError):
    """A DICOM input that cannot become a volume; the message names it and says why."""


@dataclass
class SeriesVolume:
    """One ingested series: pixels in modality units, geometry, identifiers, and what was left out."""

    series_uid: str
    image: np.ndarray  # (z, y, x) or (y, x), float32
    geometry: Geometry
    identifiers: dict[str, Any]
    notes: list[str] = field(default_factory=list)


@dataclass
class IngestResult:
    volumes: list[SeriesVolume]
    errors: dict[str, str]  # series UID (or file) -> reason
    skipped: dict[str, str]  # file -> reason it was not part of any series


def _json_value(v: Any) -> Any:
    if isinstance(v, (pydicom.multival.MultiValue, list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, (int, float, str)):
        return v
    return str(v)


def _identifiers(ds: Dataset) -> dict[str, Any]:
    return {k: _json_value(ds.get(k)) for k in IDENTIFIERS if k in ds and ds.get(k) not in (None, "")}


def _files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise DicomError(f"{p}: no such file or folder")
    return out


def _expected_pixel_bytes(ds: Dataset) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8 * frames


def _read_header(path: Path) -> Dataset:
    """The dataset (pixels deferred), or a DicomError saying why this file is not a usable image."""
    try:
        ds = pydicom.dcmread(path, defer_size="1 KB")
    except pydicom.errors.InvalidDicomError as err:
        raise DicomError(f"{path.name}: not a DICOM file ({err})") from err
    except Exception as err:  # truncated headers raise EOFError, struct.error, ...
        raise DicomError(f"{path.name}: unreadable or truncated DICOM ({type(err).__name__}: {err})") from err
    if "PixelData" not in ds:
        kind = str(ds.get("SOPClassUID", pydicom.uid.UID("")).name or ds.get("Modality", "object"))
        raise DicomError(f"{path.name}: not an image ({kind}, no pixel data)")
    return ds


def _check_pixels(path: Path, ds: Dataset) -> None:
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None and str(ts) not in DECODABLE:
        name = getattr(ts, "name", "") or "unknown"
        raise DicomError(f"{path.name}: transfer syntax {ts} ({name}) has no decoder here")
    if ts is not None and not ts.is_compressed:
        try:
            n = len(ds.PixelData)
        except Exception as err:
            raise DicomError(f"{path.name}: pixel data cannot be read ({type(err).__name__}: {err})") from err
        need = _expected_pixel_bytes(ds)
        if n < need:
            raise DicomError(f"{path.name}: truncated: pixel data has {n} of {need} bytes")


def _unit(v: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray([float(x) for x in v])
    return a / np.linalg.norm(a)


def _series_geometry(name: str, slices: list[tuple[Path, Dataset]]) -> tuple[list[Path], Geometry, list[str]]:
    """Sort slices along their normal and derive the geometry; refuse what SimpleITK would get wrong."""
    notes: list[str] = []
    for p, ds in slices:
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds or ds.get(tag) in (None, ""):
                raise DicomError(f"series {name}: {p.name} has no {tag}; its geometry would be guessed")
    iop = np.asarray([float(x) for x in slices[0][1].ImageOrientationPatient])
    for p, ds in slices[1:]:
        if np.abs(np.asarray([float(x) for x in ds.ImageOrientationPatient]) - iop).max() > 1e-4:
            raise DicomError(f"series {name}: {p.name} has another orientation (a localizer or a mixed series)")
    row, col = _unit(iop[:3]), _unit(iop[3:])
    normal = np.cross(row, col)
    pos = np.asarray([[float(x) for x in ds.ImagePositionPatient] for _, ds in slices])
    order = np.argsort(pos @ normal)
    slices = [slices[i] for i in order]
    pos = pos[order]
    along = pos @ normal
    steps = np.diff(along)
    if len(slices) > 1:
        if np.any(steps < GEOMETRY_TOL_MM):
            dup = [slices[i + 1][0].name for i in np.flatnonzero(steps < GEOMETRY_TOL_MM)]
            raise DicomError(f"series {name}: several slices at one position ({', '.join(dup[:3])})")
        if steps.max() - steps.min() > max(GEOMETRY_TOL_MM * 10, 0.01 * float(np.median(steps))):
            raise DicomError(
                f"series {name}: non-uniform slice spacing ({steps.min():.3f}..{steps.max():.3f} mm; "
                f"a missing slice or a variable-spacing scan); refusing to average it"
            )
        inplane = np.diff(pos, axis=0) - np.outer(steps, normal)
        shear = float(np.linalg.norm(inplane, axis=1).max())
        tilt = float(slices[0][1].get("GantryDetectorTilt", 0) or 0)
        if shear > 0.01 or abs(tilt) > 1e-3:
            raise DicomError(
                f"series {name}: gantry tilt / sheared stack (slices shift {shear:.3f} mm in-plane per slice, "
                f"GantryDetectorTilt {tilt}); resample it to an orthogonal grid first"
            )
    ps = [float(x) for x in slices[0][1].PixelSpacing]  # (between rows, between columns)
    dz = float(np.median(steps)) if len(slices) > 1 else float(slices[0][1].get("SliceThickness", 1.0) or 1.0)
    direction = np.stack([row, col, normal], axis=1)  # columns: x, y, z axes of the grid
    geom = Geometry((ps[1], ps[0], dz), tuple(float(v) for v in pos[0]), tuple(float(v) for v in direction.ravel()))
    return [p for p, _ in slices], geom, notes


def _read_pixels(name: str, files: list[Path]) -> np.ndarray:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    try:
        img = reader.Execute()
    except RuntimeError as err:
        msg = str(err).strip().splitlines()[-1]
        raise DicomError(f"series {name}: pixel data cannot be decoded here ({msg})") from err
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DicomError(f"series {name}: {img.GetNumberOfComponentsPerPixel()} samples per pixel; need grayscale")
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    if arr.shape[0] != len(files):
        raise DicomError(f"series {name}: {len(files)} files gave {arr.shape[0]} slices")
    return arr


def read_series(paths: Iterable[str | os.PathLike[str]]) -> IngestResult:
    """Every series found in ``paths`` (folders searched recursively), each checked on its own."""
    files = _files(paths)
    if not files:
        raise DicomError(f"{', '.join(map(str, paths))}: no files (empty folder)")
    skipped: dict[str, str] = {}
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for f in files:
        try:
            ds = _read_header(f)
        except DicomError as err:
            skipped[str(f)] = str(err)
            continue
        if ds.get("SeriesInstanceUID") in (None, ""):
            skipped[str(f)] = f"{f.name}: no SeriesInstanceUID; it belongs to no series"
            continue
        groups[str(ds.SeriesInstanceUID)].append((f, ds))
    if not groups:
        reasons = "; ".join(list(skipped.values())[:3])
        raise DicomError(f"{', '.join(map(str, paths))}: no DICOM images ({reasons})")
    volumes, errors = [], {}
    for uid, members in groups.items():
        try:
            _check_uids(uid, members)
            volumes.append(_ingest_one(uid, members))
        except DicomError as err:
            errors[shown(uid)] = str(err)
    return IngestResult(volumes, errors, skipped)


def _check_uids(uid: str, members: list[tuple[Path, Dataset]]) -> None:
    """Refuse the series when a UID that may name a file, key or request is not a DICOM UID."""
    try:
        check_uid(uid, "SeriesInstanceUID")
        for p, ds in members:
            for tag in ("StudyInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID", "SOPClassUID"):
                if ds.get(tag) not in (None, ""):
                    check_uid(str(ds.get(tag)), f"{p.name}: {tag}")
    except UidError as err:
        raise DicomError(f"series {shown(uid)}: refused, nothing of it is written: {err}") from None


def _ingest_one(uid: str, members: list[tuple[Path, Dataset]]) -> SeriesVolume:
    notes = []
    seen: dict[str, Path] = {}
    unique = []
    for p, ds in members:
        sop = str(ds.get("SOPInstanceUID", p.name))
        if sop in seen:
            notes.append(f"{p.name}: duplicate of {seen[sop].name} (same SOP Instance UID), left out")
            continue
        seen[sop] = p
        if "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]:
            notes.append(f"{p.name}: localizer, left out")
            continue
        unique.append((p, ds))
    if not unique:
        raise DicomError(f"series {uid}: no images left after removing duplicates and localizers")
    first = unique[0][1]
    for p, ds in unique:
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        if spp != 1 or str(ds.get("PhotometricInterpretation", "MONOCHROME2")).startswith(("RGB", "YBR", "PALETTE")):
            raise DicomError(f"series {uid}: {p.name} is a color image ({ds.get('PhotometricInterpretation')}); "
                             f"only grayscale is translated")  # fmt: skip
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise DicomError(f"series {uid}: {p.name} is a multi-frame image; only single-frame series are read")
        _check_pixels(p, ds)
    modality = str(first.get("Modality", ""))
    if modality in PROJECTION_MODALITIES:
        if len(unique) != 1:
            raise DicomError(f"series {uid}: {len(unique)} {modality} images in one series; a projection series "
                             f"is read when it holds one image (split the views into series of their own)")  # fmt: skip
        return _projection(uid, *unique[0], notes)
    if len(unique) == 1:
        raise DicomError(f"series {uid}: a single {modality or 'image'} slice is not a volume")
    files, geom, more = _series_geometry(uid, unique)
    arr = _read_pixels(uid, files)
    by_path = dict(unique)
    sources = [str(by_path[f].get("SOPInstanceUID", "")) for f in files]  # UIDs checked in _check_uids
    ids = _identifiers(first) | {"NumberOfSlices": len(files), "SourceInstances": sources}
    return SeriesVolume(uid, arr, geom, ids, notes + more)


# ----------------------------------------------------------------------------- 2D projection images


def projection_spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str]:
    """(row spacing, column spacing) in mm in the patient, and where it came from (PS3.3 C.8.11.4, C.8.11.7):
    PixelSpacing when present and non-zero (calibrated in the patient); else ImagerPixelSpacing (at the detector)
    divided by EstimatedRadiographicMagnificationFactor when there is one; None when no usable spacing exists."""

    def pair(tag: str) -> tuple[float, float] | None:
        v = ds.get(tag)
        try:
            vals = tuple(float(x) for x in v) if v is not None and len(v) == 2 else None
        except (TypeError, ValueError):
            return None
        return (vals[0], vals[1]) if vals and all(np.isfinite(x) and x > 0 for x in vals) else None

    ps, ips = pair("PixelSpacing"), pair("ImagerPixelSpacing")
    if ps is not None:
        kind = ds.get("PixelSpacingCalibrationType")
        return ps, "PixelSpacing (in the patient" + (f", calibration {kind})" if kind else ")")
    if ips is not None:
        try:
            m = float(ds.get("EstimatedRadiographicMagnificationFactor") or 0)
        except (TypeError, ValueError):
            m = 0.0
        if m > 0:
            return (ips[0] / m, ips[1] / m), f"ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor {m:g}"
        return ips, "ImagerPixelSpacing (at the detector; no magnification factor, so not corrected to the patient)"
    found = {t: str(ds.get(t)) for t in ("PixelSpacing", "ImagerPixelSpacing") if t in ds}
    return None, f"no usable spacing ({found or 'PixelSpacing and ImagerPixelSpacing absent'})"


def _header(ds: Dataset) -> dict[str, Any]:
    """The source's attributes as DICOM JSON, without pixels, private tags, overlays and icons: the template a
    derived image of the same SOP class is written from, so it keeps every module of the source's IOD."""
    head = Dataset()
    for elem in ds:
        tag = elem.tag
        if (
            tag.is_private
            or tag.group == 0x7FE0
            or 0x6000 <= tag.group <= 0x60FF
            or elem.keyword == "IconImageSequence"
        ):
            continue
        if elem.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") and elem.value is not None and len(elem.value) > 1024:
            continue
        head.add(elem)
    return dict(head.to_json_dict())


def _projection(uid: str, p: Path, ds: Dataset, notes: list[str]) -> SeriesVolume:
    """One radiograph (CR, DX, MG, single-frame XA/RF): pixels as displayed (MONOCHROME2), spacing as the standard
    says, and the source header kept for a derived image of the same SOP class."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "MONOCHROME1" and int(ds.get("PixelRepresentation", 0) or 0) == 1:
        raise DicomError(f"series {uid}: {p.name} is MONOCHROME1 with signed pixels; its inversion is undefined here")
    arr = _read_pixels(uid, [p])[0]
    if photometric == "MONOCHROME1":  # GDCM inverts it: slope * (2^BitsStored - 1 - stored) + intercept
        notes.append(f"{p.name}: MONOCHROME1 read inverted (white = attenuating, as MONOCHROME2); restored on export")
    spacing, where = projection_spacing(ds)
    if spacing is None:
        notes.append(f"{p.name}: {where}; 1 mm assumed: distances in this image are NOT measurements")
        spacing = (1.0, 1.0)
    else:
        notes.append(f"{p.name}: spacing {spacing[0]:g} x {spacing[1]:g} mm from {where}")
    geom = Geometry((spacing[1], spacing[0]), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    ids = _identifiers(ds) | {
        "PhotometricInterpretation": photometric,
        "SpacingSource": where if where.startswith(("PixelSpacing", "Imager")) else "assumed 1 mm",
        "SourceInstances": [str(ds.get("SOPInstanceUID", ""))],
        "Header": _header(ds),
    }
    return SeriesVolume(uid, arr, geom, ids, notes)


def write_projection(
    image: np.ndarray,
    geometry: Geometry,
    out_dir: str | os.PathLike[str],
    identifiers: dict[str, Any],
    series_uid: str,
    description: str,
    derived_from: str | None = None,
    series_number: int = 900,
) -> list[Path]:
    """A 2D image as a derived image of its source's SOP class (CR, DX, MG, XA, RF; never Secondary Capture):
    the source's attributes, its pixel encoding (bits, sign, rescale) and photometric interpretation (MONOCHROME1
    restored), new UIDs, ImageType DERIVED, and a reference to the source image."""
    header = identifiers.get("Header")
    if image.ndim != 2 or geometry.dims != 2:
        raise ValueError(f"write_projection needs a 2D image and geometry, got {image.shape}, {geometry.dims}D")
    if not isinstance(header, dict):
        raise ValueError(
            "a 2D image exports to DICOM only as a derived image of its DICOM source (CR, DX, MG, XA, RF); "
            "this one has no source header (not ingested from DICOM): use --format nifti"
        )
    ds = Dataset.from_json(header)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if tuple(image.shape) != (rows, cols):
        raise ValueError(f"image of shape {image.shape} but its source is {rows}x{cols}; a derived radiograph "
                         f"keeps the source grid")  # fmt: skip
    bits, alloc = int(ds.BitsStored), int(ds.BitsAllocated)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    stored = np.round((np.asarray(image, dtype=np.float64) - intercept) / slope)
    if str(ds.get("PhotometricInterpretation")) == "MONOCHROME1":
        stored = (2**bits - 1) - stored  # undo GDCM's inversion: the derived image displays like the source
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    dtype = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16, (16, True): np.int16}.get(
        (alloc, signed)
    )
    if dtype is None:
        raise ValueError(f"source pixels of {alloc} bits allocated cannot be written back (8 or 16 are)")
    for key in ("SmallestImagePixelValue", "LargestImagePixelValue", "PixelData"):
        if key in ds:
            delattr(ds, key)
    if "PixelSpacing" in ds and not projection_spacing(ds)[1].startswith("PixelSpacing"):
        del ds.PixelSpacing  # a zero PixelSpacing is no spacing (Type 3 in CR, 1C in DX): left out
    sop_class = str(ds.SOPClassUID)
    source_sop = str(ds.get("SOPInstanceUID", ""))
    sop_uid = derived_uid(series_uid, "0")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.UID(sop_class)
    meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series_uid, series_number, 1
    ds.SeriesDescription = description[:64]
    source_type = ds.get("ImageType") or []
    ds.ImageType = ["DERIVED", "SECONDARY", *(str(v) for v in (source_type if len(source_type) > 1 else [])[2:])]
    if derived_from and source_sop:
        ds.DerivationDescription = description[:1024]
        source = Dataset()
        source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = sop_class, source_sop
        ds.SourceImageSequence = [source]
        instance, ref = Dataset(), Dataset()
        instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID = sop_class, source_sop
        ref.SeriesInstanceUID, ref.ReferencedInstanceSequence = derived_from, [instance]
        ds.ReferencedSeriesSequence = [ref]
    ds.PixelData = np.ascontiguousarray(np.clip(stored, lo, hi).astype(dtype)).tobytes()
    ds["PixelData"].VR = "OW" if alloc > 8 else "OB"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "00001.dcm"
    ds.save_as(path, enforce_file_format=True)
    return [path]


# ----------------------------------------------------------------------------- export


def derived_uid(*parts: str) -> str:
    """A UID determined by ``parts`` (e.g. source series UID + model version): a retried export is identical."""
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def derived_image_type(source: Any, default_third: str) -> list[str]:
    """ImageType of a derived image: DERIVED\\SECONDARY, then the source's further values (e.g. AXIAL)."""
    values = [str(v) for v in source] if isinstance(source, (list, tuple)) else [str(source or "")]
    rest = [v for v in values[2:] if v]
    return ["DERIVED", "SECONDARY", *(rest or [default_third])]


def _int16_encoding(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(stored int16, slope, intercept) for modality values; integers keep slope 1, others are rounded."""
    v = np.round(values).astype(np.float64)
    lo, hi = float(v.min()), float(v.max())
    intercept = 0.0 if lo >= -32768 and hi <= 32767 else float(np.floor((lo + hi) / 2))
    stored = np.clip(v - intercept, -32768, 32767).astype(np.int16)  # GDCM/pydicom would overflow silently
    return stored, 1.0, intercept


def write_series(
    image: np.ndarray,
    geometry: Geometry,
    out_dir: str | os.PathLike[str],
    identifiers: dict[str, Any],
    series_uid: str,
    description: str,
    derived_from: str | None = None,
    series_number: int = 900,
) -> list[Path]:
    """Write a 3D volume (z, y, x) in modality units as a series of single-frame images."""
    if image.ndim != 3 or geometry.dims != 3:
        raise ValueError(f"write_series needs a 3D volume and geometry, got {image.shape}, {geometry.dims}D")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    row, col, normal = d[:, 0], d[:, 1], d[:, 2]
    sx, sy, sz = geometry.spacing
    origin = np.asarray(geometry.origin, dtype=np.float64)
    stored, slope, intercept = _int16_encoding(np.asarray(image))
    sop_class = (
        str(identifiers.get("SOPClassUID")) if identifiers.get("SOPClassUID") in (CT_IMAGE, MR_IMAGE) else CT_IMAGE
    )
    modality = identifiers.get("Modality") or ("MR" if sop_class == MR_IMAGE else "CT")
    frame_uid = identifiers.get("FrameOfReferenceUID") or derived_uid(series_uid, "frame")
    sources = [str(u) for u in identifiers.get("SourceInstances") or []]
    source_class = str(identifiers.get("SOPClassUID") or sop_class)
    image_type = derived_image_type(identifiers.get("ImageType"), "AXIAL" if sop_class == CT_IMAGE else "OTHER")
    paths = []
    for k in range(image.shape[0]):
        sop_uid = derived_uid(series_uid, str(k))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.UID(sop_class)
        meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        for key in (*TYPE2, *TYPE2_BY_CLASS[sop_class]):
            setattr(ds, key, "")
        for key in (*COPIED, *TYPE2_BY_CLASS[sop_class], *(MR_TYPE1 if sop_class == MR_IMAGE else ())):
            value = identifiers.get(key, MR_TYPE1.get(key) if sop_class == MR_IMAGE else None)
            if value not in (None, ""):
                setattr(ds, key, value)
        if "BodyPartExamined" not in ds and "Laterality" not in ds:
            ds.Laterality = ""  # 2C: unknown body part, so whether it is paired is unknown too
        ds.StudyInstanceUID = identifiers.get("StudyInstanceUID") or derived_uid(series_uid, "study")
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series_uid, series_number, k + 1
        ds.SeriesDescription = description[:64]
        ds.Modality = modality
        ds.ImageType = image_type
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + k * sz * normal]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]
        ds.SliceThickness = f"{sz:.6f}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(image.shape[1]), int(image.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = f"{intercept:g}", f"{slope:g}"
        ds.RescaleType = "HU" if modality == "CT" else "US"
        if derived_from:
            ds.DerivationDescription = description[:1024]
            if len(sources) == image.shape[0] and all(sources):  # the source slice this one is made from
                source = Dataset()
                source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = source_class, sources[k]
                ds.SourceImageSequence = [source]
                instance, ref = Dataset(), Dataset()  # Common Instance Reference: the same instance, by series
                instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID = source_class, sources[k]
                ref.SeriesInstanceUID, ref.ReferencedInstanceSequence = derived_from, [instance]
                ds.ReferencedSeriesSequence = [ref]
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = out / f"{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
