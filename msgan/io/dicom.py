"""DICOM series in and out.

Ingest: files are read with pydicom (headers, checks) and SimpleITK/GDCM (pixels, decoders),
grouped by SeriesInstanceUID and sorted along the slice normal. SimpleITK is silent about
several broken series (missing slices, gantry tilt, missing positions, localizers mixed in,
duplicates, non-image files), so each is checked here and refused with a named reason.
Pixel values are rescaled to modality units (HU for CT), kept as float32, never 8-bit.

Enhanced (and Legacy Converted Enhanced) CT/MR multi-frame files are read frame by frame from their functional
groups and exported in the same form; radiographs (CR, DX, MG, single-frame XA/RF) are 2D images kept with their
source header, MONOCHROME1 and spacing rules, and exported as derived images of the source's SOP class.
Non-image objects with pixels (SEG, parametric maps, RT dose) are skipped with the reason.

Export: a classic volume becomes a derived series of single-frame images with the same size and
geometry: new Series/SOP Instance UIDs (deterministic from the source series and the model,
so a retried push is not a duplicate), ImageType DERIVED\\SECONDARY\\<the source's third value>, the
source's patient and study attributes (Type 2 attributes present, empty when unknown), and a reference to
the source series. Written with pydicom (sequences included).
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from msgan.io import limits
from msgan.io.uids import UidError, check_uid, shown
from msgan.io.volume import Geometry, nonfinite

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
# Multi-frame image SOP classes read frame by frame from their functional groups -> the classic class they map to.
ENHANCED = {
    ENHANCED_CT: CT_IMAGE,
    ENHANCED_MR: MR_IMAGE,
    "1.2.840.10008.5.1.4.1.1.2.2": CT_IMAGE,  # Legacy Converted Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.4": MR_IMAGE,  # Legacy Converted Enhanced MR
}
# Objects with pixel data that are not images to translate: skipped with this reason.
NOT_IMAGES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "a segmentation (SEG)",
    "1.2.840.10008.5.1.4.1.1.30": "a parametric map",
    "1.2.840.10008.5.1.4.1.1.481.2": "an RT dose",
    "1.2.840.10008.5.1.4.1.1.66.5": "a surface segmentation",
}
PROJECTION_MODALITIES = {"CR", "DX", "MG", "XA", "RF"}  # a single image is a complete 2D image
IDENTIFIERS = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
    "StudyID", "AccessionNumber", "StudyDescription", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
    "Modality", "FrameOfReferenceUID", "ConvolutionKernel", "Manufacturer", "ManufacturerModelName",
    "BodyPartExamined", "KVP", "SOPClassUID", "SpecificCharacterSet", "ReferringPhysicianName", "PatientPosition",
    "Laterality", "ImageType", "InstitutionName", "ScanningSequence", "SequenceVariant", "ScanOptions",
    "MRAcquisitionType", "RepetitionTime", "EchoTime", "EchoTrainLength", "MagneticFieldStrength",
    "PixelPaddingValue", "RescaleSlope", "RescaleIntercept",  # a pair's field of view (msgan.data.pairs)
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
# Identifiers copied into a derived object, with their VR and its most characters (PS3.5 6.2; PN: per component
# group). A longer value is refused, never truncated: two patients cut to the same 64 characters would merge. Control
# characters (NUL, CR, LF, ...; ESC starts a character set switch and is allowed) are refused too.
IDENTIFIER_VR = {
    "PatientID": ("LO", 64),
    "PatientName": ("PN", 64),
    "ReferringPhysicianName": ("PN", 64),
    "AccessionNumber": ("SH", 16),
    "StudyID": ("SH", 16),
}
# Descriptions (LO) are not identifiers: longer ones are truncated to what the VR allows, with a note.
DESCRIPTIONS = {"SeriesDescription": ("0008103E", 64), "StudyDescription": ("00081030", 64)}
DEFLATED_HEADER_MAX = 64 * 2**20  # the inflated bytes before the pixel data of a deflated file that are parsed
_ITEM, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)


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


def _count(ds: Dataset, tag: str, default: int, path: Path) -> int:
    value = ds.get(tag, default)
    try:
        n = int(value if value not in (None, "") else default)
    except (TypeError, ValueError):
        raise DicomError(f"{path}: {tag} is {value!s:.40}; it must be a positive integer") from None
    if n < 1:
        raise DicomError(f"{path}: {tag} is {n}; it must be a positive integer")
    return n


def _declared(path: Path, ds: Dataset) -> int:
    """The pixel bytes ``ds`` declares (rows x columns x frames x samples x bits / 8), after the frame and volume
    rules of :mod:`msgan.io.limits`: nothing of that size is allocated before these checks."""
    rows, cols = _count(ds, "Rows", 0, path), _count(ds, "Columns", 0, path)
    frames = _count(ds, "NumberOfFrames", 1, path)
    samples, bits = _count(ds, "SamplesPerPixel", 1, path), _count(ds, "BitsAllocated", 0, path)
    _limit(limits.check_frame, rows, cols, str(path))
    _limit(limits.check_shape, (frames, rows, cols), f"{path} ({frames} frame{'s' * (frames > 1)})")
    return rows * cols * frames * samples * -(-bits // 8)


def _stored_bytes(path: Path, ds: Dataset) -> int:
    """The bytes of pixel data the file actually holds (encapsulated: the sum of its fragments), read from the
    element and item lengths without loading the value; what lies past the end of the file does not count."""
    elem = ds.get_item("PixelData", keep_deferred=True)
    if elem is None:
        return 0
    size = path.stat().st_size
    if not isinstance(elem, pydicom.dataelem.RawDataElement) or elem.value is not None:
        value = elem.value
        return len(value) if isinstance(value, (bytes, bytearray)) else 0
    start = int(elem.value_tell)
    if elem.length != 0xFFFFFFFF:
        return max(0, min(int(elem.length), size - start))
    total = 0
    with open(path, "rb") as fp:  # undefined length: items (basic offset table, fragments) up to the delimiter
        fp.seek(start)
        while fp.tell() < size:
            head = fp.read(8)
            if len(head) < 8:
                break
            group, element, length = struct.unpack("<HHL", head)
            if (group, element) == _SEQUENCE_END:
                break
            if (group, element) != _ITEM:
                raise DicomError(f"{path}: encapsulated pixel data holds ({group:04X},{element:04X}) where an "
                                 f"item was expected; malformed")  # fmt: skip
            length = min(length, size - fp.tell())
            total += length
            fp.seek(length, io.SEEK_CUR)
    return total


class SizeError(DicomError):
    """A file or series declares more than :mod:`msgan.io.limits` allows (or more than it stores): refused before
    any pixel is decoded; the message names the input and the rule."""


def _limit(check: Callable[..., Any], *args: Any) -> Any:
    """A :mod:`msgan.io.limits` rule; its LimitError becomes a :class:`SizeError` (a DicomError) with its message."""
    try:
        return check(*args)
    except limits.LimitError as err:
        raise SizeError(str(err)) from err


def check_deflated(path: Path) -> None:
    """A deflated file (Deflated Explicit VR Little Endian) inflates its whole dataset in memory when pydicom (or
    GDCM) reads it. Before that, the stream is inflated here in bounded pieces: the header in front of the pixel
    data is parsed and its declared size checked, the inflated total is held to the deflate ratio rule and to what
    the header declares, so a small file cannot inflate to gigabytes."""
    size = path.stat().st_size
    with open(path, "rb") as fp:
        try:
            pydicom.filereader.read_preamble(fp, False)
            meta = pydicom.filereader._read_file_meta_info(fp)
        except Exception:  # not a DICOM file with a file meta: the ordinary read says why
            return
        if str(meta.get("TransferSyntaxUID", "")) != DeflatedExplicitVRLittleEndian:
            return
        inflate, head, total = zlib.decompressobj(-zlib.MAX_WBITS), bytearray(), 0
        while chunk := fp.read(2**20):
            while chunk:
                out = inflate.decompress(chunk, 2**22)
                chunk = inflate.unconsumed_tail
                total += len(out)
                if len(head) < DEFLATED_HEADER_MAX:
                    head += out[: DEFLATED_HEADER_MAX - len(head)]
                _limit(limits.check_ratio, total, size, f"{path} (deflated dataset, inflated so far)")
                if not out:
                    break
    buf = pydicom.filebase.DicomBytesIO(bytes(head))
    buf.is_little_endian, buf.is_implicit_VR = True, False
    try:
        ds = pydicom.filereader.read_dataset(
            cast(BinaryIO, buf), False, True, stop_when=lambda tag, vr, n: tag == 0x7FE00010
        )
    except Exception as err:
        raise DicomError(f"{path}: deflated dataset cannot be read ({type(err).__name__}: {err})") from err
    header_bytes = buf.tell()
    if "Rows" not in ds or "Columns" not in ds:
        return  # no image header (or one past the parsed part): the ordinary checks refuse it by name
    declared = _declared(path, ds)
    _limit(limits.check_ratio, declared, size, f"{path} (deflated)")
    if total > header_bytes + declared + 2**16:
        raise SizeError(
            f"{path}: deflated dataset inflates to {total} bytes, more than its header ({header_bytes} bytes) and "
            f"the {declared} bytes of pixels it declares; refused before reading it"
        )


def _read_header(path: Path) -> Dataset:
    """The dataset (pixels deferred), or a DicomError saying why this file is not a usable image."""
    try:
        check_deflated(path)
        ds = pydicom.dcmread(path, defer_size="1 KB")
    except DicomError:
        raise
    except pydicom.errors.InvalidDicomError as err:
        raise DicomError(f"{path.name}: not a DICOM file ({err})") from err
    except Exception as err:  # truncated headers raise EOFError, struct.error, ...
        raise DicomError(f"{path.name}: unreadable or truncated DICOM ({type(err).__name__}: {err})") from err
    try:
        sop = str(ds.get("SOPClassUID", ""))  # a damaged header may hold any VR or multiplicity here
        if "PixelData" not in ds:
            kind = (pydicom.uid.UID(sop).name if sop else "") or str(ds.get("Modality", "object"))
            kind = ascii(kind[:60])[1:-1] + ("..." if len(kind) > 60 else "")  # a damaged header: no garbage dumps
            raise DicomError(f"{path.name}: not an image ({kind}, no pixel data)")
        what = NOT_IMAGES.get(sop)
        if what is not None:
            raise DicomError(f"{path.name}: {what}, not an image to translate ({pydicom.uid.UID(sop).name})")
        str(ds.get("SeriesInstanceUID", ""))  # the grouping key must read
    except DicomError:
        raise
    except Exception as err:
        raise DicomError(f"{path.name}: malformed DICOM header ({type(err).__name__}: {err})") from err
    return ds


def _check_pixels(path: Path, ds: Dataset) -> tuple[int, int, bool]:
    """Refuse the file before any decoding when its pixel data is unusable or declares too much; returns
    (declared bytes, stored bytes, compressed). Every compressed transfer syntax is held to the ratio rule."""
    for tag in ("Rows", "Columns", "BitsAllocated", "BitsStored"):  # the Image Pixel module's Type 1 attributes
        try:
            if int(ds.get(tag)) <= 0:
                raise ValueError
        except (TypeError, ValueError):
            raise DicomError(f"{path.name}: {tag} is {ds.get(tag)!s:.40}; an image needs a positive one") from None
    declared = _declared(path, ds)
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None and str(ts) not in DECODABLE:
        name = getattr(ts, "name", "") or "unknown"
        raise DicomError(f"{path.name}: transfer syntax {ts} ({name}) has no decoder here")
    try:
        stored = _stored_bytes(path, ds)
    except DicomError:
        raise
    except Exception as err:
        raise DicomError(f"{path.name}: pixel data cannot be read ({type(err).__name__}: {err})") from err
    if ts is not None and ts.is_encapsulated:
        frames = _count(ds, "NumberOfFrames", 1, path)
        label = f"{path} ({ts.name} pixel data" + (f", {frames} frames)" if frames > 1 else ")")
        _limit(limits.check_ratio, declared, stored, label)
        return declared, stored, True
    if ts is not None and ts.is_deflated:  # the pixel data is inside the deflated stream: the file is what is stored
        _limit(limits.check_ratio, declared, path.stat().st_size, f"{path} ({ts.name})")
        return declared, path.stat().st_size, True
    need = _expected_pixel_bytes(ds)
    if stored < need:
        raise DicomError(f"{path.name}: truncated: pixel data has {stored} of {need} bytes")
    return declared, stored, False


def identifier_problem(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be the identifier ``key`` of a DICOM object (:data:`IDENTIFIER_VR`), or None."""
    vr, most = IDENTIFIER_VR[key]
    if value is None:
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        if len(value) > 1:
            return f"holds {len(value)} values; it has one"
        value = value[0] if len(value) else ""
    text = str(value)
    bad = sorted({c for c in text if (ord(c) < 0x20 and c != "\x1b") or ord(c) == 0x7F})
    if bad:
        return f"contains control characters ({', '.join(map(ascii, bad[:5]))}), which {vr} does not allow"
    groups = text.split("=") if vr == "PN" else [text]
    if len(groups) > 3:
        return f"has {len(groups)} component groups; PN has at most 3"
    longest = max(len(g) for g in groups)
    if longest > most:
        where = " in a component group" if vr == "PN" else ""
        return f"is {longest} characters{where}, above the {most} that {vr} allows"
    return None


def check_identifiers(values: Mapping[str, Any] | Dataset, what: str) -> None:
    """Refuse (DicomError naming ``what`` and the attribute, never the value) an identifier that is longer than its
    VR allows or holds control characters: it is never truncated or cleaned, so two patients cannot merge."""
    for key in IDENTIFIER_VR:
        problem = identifier_problem(key, values.get(key))
        if problem is not None:
            raise DicomError(f"{what}: {key} {problem}; refused (identifiers are never truncated or cleaned: two "
                             f"patients must not merge)")  # fmt: skip


def trim_descriptions(identifiers: dict[str, Any]) -> list[str]:
    """Truncate SeriesDescription and StudyDescription (LO, 64 characters) in ``identifiers`` and in its kept
    source ``Header`` to what the standard allows; returns a note per truncation."""
    notes = []
    header = identifiers.get("Header")
    for key, (tag, most) in DESCRIPTIONS.items():
        value = identifiers.get(key)
        if isinstance(value, str) and len(value) > most:
            identifiers[key] = value[:most]
            notes.append(f"{key} of {len(value)} characters truncated to the {most} that LO allows")
        entry = header.get(tag) if isinstance(header, dict) else None
        values = entry.get("Value") if isinstance(entry, dict) else None
        if isinstance(values, list) and values and isinstance(values[0], str) and len(values[0]) > most:
            notes.append(f"{key} of the source header ({len(values[0])} characters) truncated to {most}")
            entry["Value"] = [values[0][:most], *values[1:]]  # type: ignore[index]
    return notes


def _unit(v: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray([float(x) for x in v])
    return a / np.linalg.norm(a)


@dataclass(frozen=True)
class _Plane:
    """Where one slice or frame lies: what a stack's geometry is made of."""

    label: str  # file name, or "file frame k"
    position: tuple[float, ...]
    orientation: tuple[float, ...]
    spacing: tuple[float, ...]  # (between rows, between columns)
    thickness: float
    tilt: float


def _floats(v: Any) -> tuple[float, ...]:
    return tuple(float(x) for x in v)


def _plane(name: str, label: str, values: dict[str, Any], thickness: Any, tilt: Any) -> _Plane:
    """A slice's plane from its ImagePositionPatient, ImageOrientationPatient and PixelSpacing, or a DicomError
    naming the slice when one is missing, has the wrong number of values, or cannot be geometry."""
    counts = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2}
    got = {}
    for tag, n in counts.items():
        value = values.get(tag)
        if value in (None, ""):
            raise DicomError(f"series {name}: {label} has no {tag}; its geometry would be guessed")
        try:
            got[tag] = _floats(value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value])
        except (TypeError, ValueError):
            got[tag] = ()
        if len(got[tag]) != n or not np.isfinite(got[tag]).all():
            raise DicomError(f"series {name}: {label} has {tag} {value!s:.80}; it needs {n} finite numbers")
    iop, spacing = np.asarray(got["ImageOrientationPatient"]), got["PixelSpacing"]
    if min(np.linalg.norm(iop[:3]), np.linalg.norm(iop[3:])) < 0.5 or min(spacing) <= 0:
        raise DicomError(f"series {name}: {label} has ImageOrientationPatient {list(iop)} and PixelSpacing "
                         f"{list(spacing)}; direction cosines must be unit vectors and spacing positive")  # fmt: skip
    return _Plane(label, got["ImagePositionPatient"], got["ImageOrientationPatient"], spacing,
                  _number(thickness, 1.0), _number(tilt, 0.0))  # fmt: skip


def _number(value: Any, default: float) -> float:
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _series_geometry(name: str, slices: list[tuple[Path, Dataset]]) -> tuple[list[Path], Geometry, list[str]]:
    """Sort slices along their normal and derive the geometry; refuse what SimpleITK would get wrong."""
    tags = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
    planes = [
        _plane(name, p.name, {t: ds.get(t) for t in tags}, ds.get("SliceThickness"), ds.get("GantryDetectorTilt"))
        for p, ds in slices
    ]
    order, geom = _stack_geometry(name, planes)
    return [slices[i][0] for i in order], geom, []


def _stack_geometry(name: str, planes: list[_Plane]) -> tuple[list[int], Geometry]:
    """(order along the normal, geometry) of parallel planes; refuses what would make a wrong grid."""
    iop = np.asarray(planes[0].orientation)
    for pl in planes[1:]:
        if np.abs(np.asarray(pl.orientation) - iop).max() > 1e-4:
            raise DicomError(f"series {name}: {pl.label} has another orientation (a localizer or a mixed series)")
        if np.abs(np.asarray(pl.spacing) - np.asarray(planes[0].spacing)).max() > 1e-6:
            raise DicomError(f"series {name}: {pl.label} has another pixel spacing ({pl.spacing})")
    row, col = _unit(iop[:3]), _unit(iop[3:])
    normal = np.cross(row, col)
    pos = np.asarray([pl.position for pl in planes])
    order = [int(i) for i in np.argsort(pos @ normal, kind="stable")]
    pos = pos[order]
    steps = np.diff(pos @ normal)
    if len(planes) > 1:
        if np.any(steps < GEOMETRY_TOL_MM):
            dup = [planes[order[i + 1]].label for i in np.flatnonzero(steps < GEOMETRY_TOL_MM)]
            raise DicomError(f"series {name}: several slices at one position ({', '.join(dup[:3])})")
        if steps.max() - steps.min() > max(GEOMETRY_TOL_MM * 10, 0.01 * float(np.median(steps))):
            raise DicomError(
                f"series {name}: non-uniform slice spacing ({steps.min():.3f}..{steps.max():.3f} mm; "
                f"a missing slice or a variable-spacing scan); refusing to average it"
            )
        inplane = np.diff(pos, axis=0) - np.outer(steps, normal)
        shear = float(np.linalg.norm(inplane, axis=1).max())
        tilt = planes[order[0]].tilt
        if shear > 0.01 or abs(tilt) > 1e-3:
            raise DicomError(
                f"series {name}: gantry tilt / sheared stack (slices shift {shear:.3f} mm in-plane per slice, "
                f"GantryDetectorTilt {tilt}); resample it to an orthogonal grid first"
            )
    ps = planes[0].spacing
    dz = float(np.median(steps)) if len(planes) > 1 else planes[0].thickness
    direction = np.stack([row, col, normal], axis=1)  # columns: x, y, z axes of the grid
    geom = Geometry((ps[1], ps[0], dz), tuple(float(v) for v in pos[0]), tuple(float(v) for v in direction.ravel()))
    return order, geom


def _decode(name: str, read: Callable[[], sitk.Image], slices: int, what: str) -> np.ndarray:
    """(slices, rows, cols) float32 from a SimpleITK read (GDCM decodes and rescales), or a DicomError."""
    try:
        img = read()
    except RuntimeError as err:
        msg = str(err).strip().splitlines()[-1]
        raise DicomError(f"series {name}: pixel data cannot be decoded here ({msg})") from err
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DicomError(f"series {name}: {img.GetNumberOfComponentsPerPixel()} samples per pixel; need grayscale")
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below, by name
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
    if arr.shape[0] != slices:
        raise DicomError(f"series {name}: {slices} {what} gave {arr.shape[0]} slices")
    if bad := nonfinite(arr):  # RescaleSlope/Intercept beyond float32 (1e38 x a stored value)
        raise DicomError(f"series {name}: {bad} voxel(s) are not finite after RescaleSlope/RescaleIntercept; "
                         "a volume must hold finite values")  # fmt: skip
    return arr


def _read_pixels(name: str, files: list[Path]) -> np.ndarray:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    # float32 out, so every slice is rescaled into it with its own RescaleSlope/Intercept (Type 1 per instance):
    # left to itself the reader takes the first file's pixel type and truncates another slice's fractional values
    reader.SetOutputPixelType(sitk.sitkFloat32)
    return _decode(name, reader.Execute, len(files), "files")


def read_series(paths: Iterable[str | os.PathLike[str]]) -> IngestResult:
    """Every series found in ``paths`` (folders searched recursively), each checked on its own."""
    files = _files(paths)
    if not files:
        raise DicomError(f"{', '.join(map(str, paths))}: no files (empty folder)")
    skipped: dict[str, str] = {}
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    errors: dict[str, str] = {}
    for f in files:
        try:
            ds = _read_header(f)
        except SizeError as err:  # a refusal, not a file of another kind: reported as an error by its path
            errors[str(f)] = str(err)
            continue
        except DicomError as err:
            skipped[str(f)] = str(err)
            continue
        if ds.get("SeriesInstanceUID") in (None, ""):
            skipped[str(f)] = f"{f.name}: no SeriesInstanceUID; it belongs to no series"
            continue
        groups[str(ds.SeriesInstanceUID)].append((f, ds))
    if not groups:
        reasons = "; ".join([*errors.values(), *skipped.values()][:3])
        raise DicomError(f"{', '.join(map(str, paths))}: no DICOM images ({reasons})")
    volumes = []
    for uid, members in groups.items():
        try:
            _check_uids(uid, members)
            volumes.append(_ingest_one(uid, members))
        except SizeError as err:
            errors[shown(uid)] = f"series {shown(uid)}: refused before decoding: {err}"
        except DicomError as err:
            errors[shown(uid)] = str(err)
        except Exception as err:  # malformed input this reader has no check for: this series only, never the folder
            errors[shown(uid)] = (
                f"series {shown(uid)} ({_members_label(members)}): cannot be read ({type(err).__name__}: "
                f"{str(err)[:300]})"
            )
    return IngestResult(volumes, errors, skipped)


def _members_label(members: list[tuple[Path, Dataset]]) -> str:
    """The files of a series, for messages: the first one's path and how many more."""
    more = f" and {len(members) - 1} more file(s)" if len(members) > 1 else ""
    return f"{members[0][0]}{more}" if members else "(no files)"


def _check_uids(uid: str, members: list[tuple[Path, Dataset]]) -> None:
    """Refuse the series when a UID that may name a file, key or request is not a DICOM UID."""
    try:
        check_uid(uid, f"{_members_label(members)}: SeriesInstanceUID")
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
    declared = stored = 0
    for p, ds in unique:
        check_identifiers(ds, f"series {uid}: {p}")
        d, n, compressed = _check_pixels(p, ds)  # every declared size, before anything else is looked at
        if compressed:
            declared, stored = declared + d, stored + n
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        if spp != 1 or str(ds.get("PhotometricInterpretation", "MONOCHROME2")).startswith(("RGB", "YBR", "PALETTE")):
            raise DicomError(f"series {uid}: {p.name} is a color image ({ds.get('PhotometricInterpretation')}); "
                             f"only grayscale is translated")  # fmt: skip
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames != 1 and str(ds.get("SOPClassUID", "")) not in ENHANCED:
            kind = pydicom.uid.UID(str(ds.get("SOPClassUID", ""))).name or "image"
            known = ", ".join(pydicom.uid.UID(c).name for c in ENHANCED)
            raise DicomError(f"series {uid}: {p.name} is a multi-frame {kind}; multi-frame images are read for {known}")
    if str(first.get("SOPClassUID", "")) in ENHANCED:
        if len(unique) != 1:
            raise DicomError(f"series {uid}: {len(unique)} multi-frame files in one series; one Enhanced image per "
                             f"series is read (a stack split over files is not joined)")  # fmt: skip
        return _trimmed(_enhanced(uid, *unique[0], notes))
    modality = str(first.get("Modality", ""))
    if modality in PROJECTION_MODALITIES:
        if len(unique) != 1:
            raise DicomError(f"series {uid}: {len(unique)} {modality} images in one series; a projection series "
                             f"is read when it holds one image (split the views into series of their own)")  # fmt: skip
        return _trimmed(_projection(uid, *unique[0], notes))
    if len(unique) == 1:
        raise DicomError(f"series {uid}: a single {modality or 'image'} slice is not a volume")
    grids = {(int(ds.Rows), int(ds.Columns)) for _, ds in unique}
    if len(grids) != 1:
        raise DicomError(f"series {uid}: slices of different sizes ({', '.join(f'{r}x{c}' for r, c in sorted(grids))})")
    (rows, cols), where = grids.pop(), f"series {uid} ({len(unique)} files in {unique[0][0].parent})"
    _limit(limits.check_shape, (len(unique), rows, cols), where)  # the whole series, before SimpleITK reads it
    _limit(limits.check_ratio, declared, stored, f"{where}, compressed")
    files, geom, more = _series_geometry(uid, unique)
    arr = _read_pixels(uid, files)
    by_path = dict(unique)
    sources = [str(by_path[f].get("SOPInstanceUID", "")) for f in files]  # UIDs checked in _check_uids
    ids = _identifiers(first) | {"NumberOfSlices": len(files), "SourceInstances": sources}
    return _trimmed(SeriesVolume(uid, arr, geom, ids, notes + more))


def _trimmed(volume: SeriesVolume) -> SeriesVolume:
    volume.notes += trim_descriptions(volume.identifiers)
    return volume


# ----------------------------------------------------------------------------- Enhanced multi-frame


def _functional(ds: Dataset, frame: int, sequence: str, attribute: str) -> Any:
    """``attribute`` of the functional group ``sequence`` for ``frame``: per-frame first, then shared."""
    groups = [ds.PerFrameFunctionalGroupsSequence[frame]] if "PerFrameFunctionalGroupsSequence" in ds else []
    groups += list(ds.get("SharedFunctionalGroupsSequence") or [])[:1]
    for group in groups:
        items = group.get(sequence)
        if items and attribute in items[0]:
            return items[0].get(attribute)
    return None


def _enhanced(uid: str, p: Path, ds: Dataset, notes: list[str]) -> SeriesVolume:
    """An Enhanced (or Legacy Converted Enhanced) CT/MR: the geometry of every frame from its functional groups
    (plane position, plane orientation, pixel measures), frames sorted along the normal; the source header is kept
    so the export can be an object of the same SOP class with the same functional groups."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if len(ds.get("PerFrameFunctionalGroupsSequence") or []) != n:
        raise DicomError(f"series {uid}: {p.name} is an Enhanced image without per-frame functional groups for its "
                         f"{n} frames; its geometry is unknown")  # fmt: skip
    planes, rescales = [], set()
    for k in range(n):
        got = {
            "ImagePositionPatient": _functional(ds, k, "PlanePositionSequence", "ImagePositionPatient"),
            "ImageOrientationPatient": _functional(ds, k, "PlaneOrientationSequence", "ImageOrientationPatient"),
            "PixelSpacing": _functional(ds, k, "PixelMeasuresSequence", "PixelSpacing"),
        }
        thickness = _functional(ds, k, "PixelMeasuresSequence", "SliceThickness")
        planes.append(_plane(uid, f"{p.name} frame {k + 1}", got, thickness,
                             ds.get("GantryDetectorTilt")))  # fmt: skip
        slope = _functional(ds, k, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(ds, k, "PixelValueTransformationSequence", "RescaleIntercept")
        rescales.add((float(slope if slope not in (None, "") else 1), float(intercept or 0)))
    if len(rescales) != 1:
        raise DicomError(f"series {uid}: {p.name} has {len(rescales)} different rescales across its frames; "
                         f"one per image is read")  # fmt: skip
    order, geom = _stack_geometry(uid, planes)
    arr = _decode(uid, lambda: sitk.ReadImage(str(p)), n, "frames")  # (frames, rows, cols) in file order
    ids = _identifiers(ds) | {
        "NumberOfSlices": n,
        "SourceInstances": [str(ds.get("SOPInstanceUID", ""))],
        "FrameOrder": order,  # slice k of the volume is frame order[k] (0-based) of the source
        "Header": _header(ds),
    }
    notes.append(f"{p.name}: {ds.SOPClassUID.name}, {n} frames, geometry from the functional groups")
    return SeriesVolume(uid, arr[order], geom, ids, notes)


# MR Pulse Sequence and Bulk Motion attributes (PS3.3 C.8.13.4, C.7.6.18.3): Type 1C, present only when ImageType
# Value 1 is ORIGINAL or MIXED, so a DERIVED Enhanced MR must leave them out.
MR_ACQUISITION_ONLY = (
    "PulseSequenceName", "MRAcquisitionType", "EchoPulseSequence", "MultiPlanarExcitation", "PhaseContrast",
    "VelocityEncodingAcquisitionSequence", "TimeOfFlightContrast", "ArterialSpinLabelingContrast",
    "SteadyStatePulseSequence", "EchoPlanarPulseSequence", "SaturationRecovery", "SpectrallySelectedSuppression",
    "OversamplingPhase", "GeometryOfKSpaceTraversal", "RectilinearPhaseEncodeReordering", "SegmentedKSpaceTraversal",
    "CoverageOfKSpace", "NumberOfKSpaceTrajectories", "BulkMotionCompensationTechnique", "BulkMotionSignalSource",
)  # fmt: skip


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _derivation(description: str, sop_class: str, sop_uid: str, frame: int) -> Dataset:
    """A Derivation Image macro item: frame ``frame`` of the source, processed by the model. CID 7203 has no code
    for a learned image translation, so the derivation code is our own (a private ``99`` coding scheme)."""
    source = _sop_ref(sop_class, sop_uid)
    source.ReferencedFrameNumber = frame
    source.PurposeOfReferenceCodeSequence = [_code("121322", "DCM", "Source image for image processing operation")]
    item = Dataset()
    item.DerivationDescription = description[:1024]
    item.DerivationCodeSequence = [_code("TRANSLATION", "99MSGAN", "Image translation by a multi-scale patch GAN")]
    item.SourceImageSequence = [source]
    return item


def _frame_groups(ds: Dataset) -> list[Dataset]:
    return list(ds.get("SharedFunctionalGroupsSequence") or []) + list(ds.get("PerFrameFunctionalGroupsSequence") or [])


def write_enhanced(
    image: np.ndarray,
    geometry: Geometry,
    out_dir: str | os.PathLike[str],
    identifiers: dict[str, Any],
    series_uid: str,
    description: str,
    derived_from: str | None = None,
    series_number: int = 900,
) -> list[Path]:
    """A 3D volume as one derived Enhanced image of its source's SOP class: the source's attributes and functional
    groups (frame geometry, dimensions), frames in the source's order and pixel encoding, new UIDs, ImageType and
    FrameType DERIVED, and a reference to the source instance."""
    header = identifiers.get("Header")
    order = identifiers.get("FrameOrder")
    if not isinstance(header, dict) or not isinstance(order, list):
        raise ValueError("an Enhanced export needs the source's header and frame order (ingest it from DICOM)")
    ds = Dataset.from_json(header)
    sop_class, source_sop = str(ds.SOPClassUID), str(ds.get("SOPInstanceUID", ""))
    n, rows, cols = int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns)
    if tuple(image.shape) != (n, rows, cols) or geometry.dims != 3 or sorted(order) != list(range(n)):
        raise ValueError(f"volume of shape {image.shape} but its Enhanced source is {n}x{rows}x{cols}; a derived "
                         f"Enhanced image keeps the source grid (export with classic=True otherwise)")  # fmt: skip
    frames = np.empty(image.shape, dtype=np.float64)
    frames[order] = image  # slice k is source frame order[k]
    slope = float(_functional(ds, 0, "PixelValueTransformationSequence", "RescaleSlope") or 1)
    intercept = float(_functional(ds, 0, "PixelValueTransformationSequence", "RescaleIntercept") or 0)
    _set_pixels(ds, np.round((frames - intercept) / slope))
    _new_instance(ds, series_uid, series_number, description)
    ds.ImageType = ["DERIVED", *[str(v) for v in (ds.get("ImageType") or ["", "PRIMARY"])[1:]]]
    if sop_class == ENHANCED_MR:
        for key in MR_ACQUISITION_ONLY:
            if key in ds:
                delattr(ds, key)
    for group in _frame_groups(ds):
        for key in ("CTImageFrameTypeSequence", "MRImageFrameTypeSequence"):
            for item in group.get(key) or []:
                if "FrameType" in item:
                    item.FrameType = ["DERIVED", *[str(v) for v in item.FrameType[1:]]]
        for item in group.get("PixelValueTransformationSequence") or []:
            if ds.get("Modality") == "CT":
                item.RescaleType = "HU"  # the only value Enhanced CT allows; our values are HU
    if derived_from and source_sop:
        ds.ReferencedSeriesSequence = _referenced_series(derived_from, sop_class, source_sop)
        for k, group in enumerate(ds.PerFrameFunctionalGroupsSequence):  # Derivation Image macro, frame by frame
            group.DerivationImageSequence = [_derivation(description, sop_class, source_sop, k + 1)]
        if sop_class in (ENHANCED_CT, ENHANCED_MR):  # evidence of what the Source Image Sequences reference (1C)
            series, study = Dataset(), Dataset()
            series.SeriesInstanceUID, series.ReferencedSOPSequence = derived_from, [_sop_ref(sop_class, source_sop)]
            study.StudyInstanceUID, study.ReferencedSeriesSequence = ds.StudyInstanceUID, [series]
            ds.SourceImageEvidenceSequence = [study]
    return _write_files(out_dir, [ds])


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
    try:
        return dict(head.to_json_dict())
    except Exception:  # an element pydicom cannot put in JSON (a malformed value): left out, one by one
        for elem in list(head):
            try:
                _one(elem).to_json_dict()
            except Exception:
                del head[elem.tag]
        return dict(head.to_json_dict())


def _one(elem: Any) -> Dataset:
    ds = Dataset()
    ds.add(elem)
    return ds


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
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    stored = np.round((np.asarray(image, dtype=np.float64) - intercept) / slope)
    if str(ds.get("PhotometricInterpretation")) == "MONOCHROME1":
        stored = (2 ** int(ds.BitsStored) - 1) - stored  # undo GDCM's inversion: it displays like the source
    sop_class, source_sop = str(ds.SOPClassUID), str(ds.get("SOPInstanceUID", ""))
    _set_pixels(ds, stored)
    if "PixelSpacing" in ds and not projection_spacing(ds)[1].startswith("PixelSpacing"):
        del ds.PixelSpacing  # a zero PixelSpacing is no spacing (Type 3 in CR, 1C in DX): left out
    _new_instance(ds, series_uid, series_number, description)
    source_type = ds.get("ImageType") or []
    ds.ImageType = ["DERIVED", "SECONDARY", *(str(v) for v in (source_type if len(source_type) > 1 else [])[2:])]
    if derived_from and source_sop:
        ds.DerivationDescription = description[:1024]
        ds.SourceImageSequence = [_sop_ref(sop_class, source_sop)]
        ds.ReferencedSeriesSequence = _referenced_series(derived_from, sop_class, source_sop)
    return _write_files(out_dir, [ds])


# ----------------------------------------------------------------------------- export


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.UID(sop_class)
    meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    return meta


def _new_instance(ds: Dataset, series_uid: str, series_number: int, description: str) -> None:
    """Make a source header (one instance) the derived series' only instance: new UIDs, number, description."""
    sop_uid = derived_uid(series_uid, "0")
    ds.file_meta = _file_meta(str(ds.SOPClassUID), sop_uid)
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series_uid, series_number, 1
    ds.SeriesDescription = description[:64]


def _set_pixels(ds: Dataset, stored: np.ndarray) -> None:
    """Stored values (already unrescaled) into ``ds``'s own pixel encoding (bits, sign), clipped to its range."""
    bits, alloc = int(ds.BitsStored), int(ds.BitsAllocated)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    dtype = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16, (16, True): np.int16}.get(
        (alloc, signed)
    )
    if dtype is None:
        raise ValueError(f"source pixels of {alloc} bits allocated cannot be written back (8 or 16 are)")
    for key in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if key in ds:
            delattr(ds, key)
    ds.PixelData = np.ascontiguousarray(np.clip(stored, lo, hi).astype(dtype)).tobytes()
    ds["PixelData"].VR = "OW" if alloc > 8 else "OB"


def _sop_ref(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
    return item


def _referenced_series(series_uid: str, sop_class: str, sop_uid: str) -> list[Dataset]:
    """A Referenced Series Sequence (Common Instance Reference) naming one instance of ``series_uid``."""
    ref = Dataset()
    ref.SeriesInstanceUID, ref.ReferencedInstanceSequence = series_uid, [_sop_ref(sop_class, sop_uid)]
    return [ref]


def _write_files(out_dir: str | os.PathLike[str], datasets: Iterable[Dataset]) -> list[Path]:
    """``datasets`` as ``out_dir/00001.dcm``, ``00002.dcm``, ...: written into a staging folder beside ``out_dir``
    and moved in only when every file is complete, so an error leaves nothing of this export in ``out_dir``."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as stage:
        for k, ds in enumerate(datasets):
            names.append(f"{k + 1:05d}.dcm")
            ds.save_as(Path(stage, names[-1]), enforce_file_format=True)
        out.mkdir(exist_ok=True)  # only now, when every file is complete
        for name in names:
            os.replace(Path(stage, name), out / name)
    return [out / name for name in names]


def derived_uid(*parts: str) -> str:
    """A UID determined by ``parts`` (e.g. source series UID + model version): a retried export is identical."""
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def derived_image_type(source: Any, default_third: str) -> list[str]:
    """ImageType of a derived image: DERIVED\\SECONDARY, then the source's further values (e.g. AXIAL)."""
    values = [str(v) for v in source] if isinstance(source, (list, tuple)) else [str(source or "")]
    rest = [v for v in values[2:] if v]
    return ["DERIVED", "SECONDARY", *(rest or [default_third])]


def _int16_encoding(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(stored int16, slope, intercept) for modality values; integers keep slope 1, others are rounded. NaN or
    inf is refused: it would write a NaN RescaleIntercept into every file of the series."""
    if bad := nonfinite(np.asarray(values)):
        raise ValueError(f"{bad} voxel(s) are NaN or infinite; a DICOM image holds finite values (nothing written)")
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
    d = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    row, col, normal = d[:, 0], d[:, 1], d[:, 2]
    sx, sy, sz = geometry.spacing
    origin = np.asarray(geometry.origin, dtype=np.float64)
    stored, slope, intercept = _int16_encoding(np.asarray(image))
    source_class = str(identifiers.get("SOPClassUID") or "")
    sop_class = ENHANCED.get(source_class, source_class if source_class in (CT_IMAGE, MR_IMAGE) else CT_IMAGE)
    modality = identifiers.get("Modality") or ("MR" if sop_class == MR_IMAGE else "CT")
    frame_uid = identifiers.get("FrameOfReferenceUID") or derived_uid(series_uid, "frame")
    sources = [str(u) for u in identifiers.get("SourceInstances") or []]
    source_class = source_class or sop_class
    source_type = None if source_class in ENHANCED else identifiers.get("ImageType")  # Enhanced values differ
    image_type = derived_image_type(source_type, "AXIAL" if sop_class == CT_IMAGE else "OTHER")

    def instance(k: int) -> Dataset:
        sop_uid = derived_uid(series_uid, str(k))
        ds = Dataset()
        ds.file_meta = _file_meta(sop_class, sop_uid)
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
                ds.SourceImageSequence = [_sop_ref(source_class, sources[k])]
                # Common Instance Reference: the same instance, by series
                ds.ReferencedSeriesSequence = _referenced_series(derived_from, source_class, sources[k])
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        return ds

    return _write_files(out_dir, (instance(k) for k in range(image.shape[0])))
