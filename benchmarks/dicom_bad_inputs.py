"""What DICOM ingest makes of each kind of bad input: prints one line per case.

    python benchmarks/dicom_bad_inputs.py

Each case starts from a clean synthetic CT series (tests/dicom_data.py) and breaks it one way.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msgan.io.dicom import DicomError, derived_uid, read_series
from tests.dicom_data import pydicom_data_file, write_ct_series

Mutation = Callable[[Path, list[Path]], None]


def _edit_all(files: list[Path], fn: Callable[[int, pydicom.Dataset], None], **save: bool) -> None:
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        fn(k, ds)
        ds.save_as(f, **save)


def truncated(d: Path, files: list[Path]) -> None:
    data = files[5].read_bytes()
    files[5].write_bytes(data[: len(data) * 2 // 3])


def structured_report(d: Path, files: list[Path]) -> None:
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID, ds.Modality, ds.SeriesInstanceUID = derived_uid("sr"), "SR", derived_uid("sr-series")
    ds.save_as(d / "report.dcm", enforce_file_format=True)


def two_series(d: Path, files: list[Path]) -> None:
    write_ct_series(d / "second", seed=2, series_name="second")


def no_position(d: Path, files: list[Path]) -> None:
    ds = pydicom.dcmread(files[3])
    del ds.ImagePositionPatient
    ds.save_as(files[3])


def missing_slice(d: Path, files: list[Path]) -> None:
    files[4].unlink()


def gantry_tilt(d: Path, files: list[Path]) -> None:
    def tilt(k: int, ds: pydicom.Dataset) -> None:
        p = [float(x) for x in ds.ImagePositionPatient]
        ds.ImagePositionPatient, ds.GantryDetectorTilt = [p[0], p[1] + 0.5 * k, p[2]], 11.3

    _edit_all(files, tilt)


def single_slice(d: Path, files: list[Path]) -> None:
    for f in files[1:]:
        f.unlink()


def rgb(d: Path, files: list[Path]) -> None:
    def color(k: int, ds: pydicom.Dataset) -> None:
        a = np.repeat(ds.pixel_array[..., None], 3, axis=-1).astype(np.uint8)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = a.tobytes()

    _edit_all(files, color)


def htj2k(d: Path, files: list[Path]) -> None:
    def compress(k: int, ds: pydicom.Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x0a" + b"\x00" * 64])
        ds["PixelData"].VR = "OB"

    _edit_all(files, compress, enforce_file_format=True)


def empty(d: Path, files: list[Path]) -> None:
    for f in files:
        f.unlink()


def hostile_uid(d: Path, files: list[Path]) -> None:
    def escape(k: int, ds: pydicom.Dataset) -> None:
        ds.SeriesInstanceUID = "../../escaped"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that the value is no UID: that is the case
        _edit_all(files, escape)


def segmentation(d: Path, files: list[Path]) -> None:
    shutil.copy(pydicom_data_file("liver.dcm"), d / "seg.dcm")


def enhanced_without_groups(d: Path, files: list[Path]) -> None:
    empty(d, files)
    shutil.copy(pydicom_data_file("emri_small.dcm"), d / "emri.dcm")


def radiograph_without_spacing(d: Path, files: list[Path]) -> None:
    empty(d, files)
    shutil.copy(pydicom_data_file("RG1_UNCR.dcm"), d / "cr.dcm")


CASES: list[tuple[str, Mutation]] = [
    ("truncated file", truncated),
    ("structured report beside a series", structured_report),
    ("two series in one folder", two_series),
    ("missing ImagePositionPatient", no_position),
    ("non-uniform spacing (a missing slice)", missing_slice),
    ("gantry tilt", gantry_tilt),
    ("a single CT slice", single_slice),
    ("RGB image", rgb),
    ("compressed (HTJ2K), no decoder", htj2k),
    ("empty folder", empty),
    ("a hostile SeriesInstanceUID ../../escaped", hostile_uid),
    ("a SEG beside a series (pydicom-data liver.dcm)", segmentation),
    ("Enhanced MR without functional groups (pydicom-data emri_small.dcm)", enhanced_without_groups),
    ("CR with PixelSpacing 0\\0, MONOCHROME1 (pydicom-data RG1_UNCR.dcm)", radiograph_without_spacing),
]


def main() -> None:
    for name, mutate in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "series"
            files, _, _ = write_ct_series(folder)
            mutate(folder, files)
            try:
                r = read_series([folder])
                what = f"{len(r.volumes)} volume(s)"
                what += "".join(f"; note: {n}" for v in r.volumes for n in v.notes)
                what += "".join(f"; refused: {e}" for e in r.errors.values())
                what += "".join(f"; skipped: {s}" for s in r.skipped.values())
            except DicomError as err:
                what = f"error: {err}"
            print(f"- {name}: {what.replace(str(folder) + '/', '')}")


if __name__ == "__main__":
    main()
