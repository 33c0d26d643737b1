"""Hostile DICOM inputs and outputs (issue 19): nothing lost, nothing leaked, nothing exhausted.

Each case builds the hostile input in tmp_path with pydicom, calls the library (in-process) and asserts the named
refusal. For the bombs, the refusal must come from the declared sizes, before any pixel is decoded: the process's
peak RSS may not grow by more than 200 MB (a decoded 65535^2 frame is 8.6 GB).
"""

from __future__ import annotations

import os
import resource
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
import zarr
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_dataset, write_file_meta_info

from msgan.io.convert import export, ingest
from msgan.io.dicom import DicomError, read_series
from msgan.io.volume import read_volume, write_volume
from tests.dicom_data import OBLIQUE, phantom_ct, write_ct_series, write_radiograph

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_2000 = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
MB = 2**20


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@pytest.fixture
def no_blowup():
    """The test may not raise the process's peak RSS by 200 MB or more."""
    before = _peak_rss()
    yield
    grown = _peak_rss() - before
    assert grown < 200 * MB, f"peak RSS grew by {grown / MB:.0f} MB"


def _series(folder: Path, slices: int = 2, seed: int = 1) -> tuple[list[Path], str]:
    files, uid, _ = write_ct_series(folder, phantom_ct(shape=(slices, 8, 8), seed=seed), seed=seed,
                                    series_name=folder.name)  # fmt: skip
    return files, uid


def _bomb(path: Path, syntax: str, rows: int, cols: int, bits: int = 16, frames: int | None = None, **tags) -> None:
    """Make a file claim ``rows`` x ``cols`` (x ``frames``) pixels in a 4-byte compressed fragment."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    if frames is not None:
        ds.NumberOfFrames = frames
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 16 * 1024  # a small file


def _refused(folder: Path, *says: str) -> str:
    res = read_series([folder])
    assert not res.volumes and len(res.errors) == 1, res
    message = next(iter(res.errors.values()))
    for text in says:
        assert text in message, message
    return message


def test_jpeg_baseline_65535_squared_is_refused_by_its_frame_size(tmp_path, no_blowup):
    files, uid = _series(tmp_path / "in")
    for f in files:
        _bomb(f, JPEG_BASELINE, 65535, 65535, bits=8)
    message = _refused(tmp_path / "in", uid, str(files[0]), "65535 x 65535", "refused before decoding")
    assert "above the cap" in message
    report = ingest(tmp_path / "in", tmp_path / "v.zarr")
    assert not report.written and uid in report.errors and not (tmp_path / "v.zarr").exists()


@pytest.mark.parametrize("syntax", [JPEG_2000, RLE, JPEG_BASELINE], ids=["jpeg2000", "rle", "jpeg-baseline"])
def test_a_frame_under_the_size_cap_but_a_bomb_by_ratio_is_refused(tmp_path, no_blowup, syntax):
    """8192^2 x 16 bit (128 MB) from 4 bytes: under the frame cap, far over the ratio any codec reaches."""
    files, uid = _series(tmp_path / "in")
    for f in files:
        _bomb(f, syntax, 8192, 8192)
    _refused(tmp_path / "in", uid, str(files[0]), "decompression bomb", pydicom.uid.UID(syntax).name)


def test_a_series_of_small_compressed_frames_is_held_to_the_ratio_as_a_whole(tmp_path, no_blowup):
    """Each file declares 32 MB (under the floor where single frames are not checked); the series 256 MB."""
    files, uid = _series(tmp_path / "in", slices=8)
    for f in files:
        _bomb(f, JPEG_2000, 4096, 4096)
    _refused(tmp_path / "in", uid, "8 files in", "decompression bomb")


@pytest.mark.parametrize(("size", "says"), [((65535, 65535), "65535 x 65535"), ((8192, 8192), "decompression bomb")])
def test_a_dx_radiograph_bomb_is_refused(tmp_path, no_blowup, size, says):
    path, uid, _ = write_radiograph(tmp_path / "dx", "DX")
    _bomb(path, JPEG_2000, *size)
    _refused(tmp_path / "dx", uid, str(path), says)


def test_an_enhanced_ct_of_100000_compressed_frames_is_refused(tmp_path, no_blowup):
    files, uid = _series(tmp_path / "in")
    files[1].unlink()
    _bomb(files[0], JPEG_2000, 512, 512, frames=100000, SOPClassUID=ENHANCED_CT)
    _refused(tmp_path / "in", uid, "100000 frames", "above the cap")
    _bomb(files[0], JPEG_2000, 512, 512, frames=1000, SOPClassUID=ENHANCED_CT)  # under the volume cap: the ratio
    _refused(tmp_path / "in", uid, "1000 frames", "decompression bomb")


def test_an_uncompressed_file_declaring_65535_squared_by_100000_frames_is_still_refused(tmp_path, no_blowup):
    files, uid = _series(tmp_path / "in")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.Rows = ds.Columns = 65535
        ds.NumberOfFrames = 100000
        ds.save_as(f)
    _refused(tmp_path / "in", uid, "65535 x 65535")


def _deflated(path: Path, rows: int, cols: int, pixel_bytes: int) -> None:
    """A Deflated Explicit VR Little Endian CT slice whose pixel data element holds ``pixel_bytes`` zeros, written
    through zlib in pieces (never whole in memory)."""
    src = pydicom.dcmread(path)
    del src.PixelData
    src.Rows, src.Columns = rows, cols
    head = BytesIO()
    write_dataset(pydicom.filebase.DicomFileLike(head), src)  # explicit VR little endian, as the source
    meta = src.file_meta
    meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as fp:
        fp.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(pydicom.filebase.DicomFileLike(fp), meta)
        fp.write(squeeze.compress(head.getvalue()))
        fp.write(squeeze.compress(b"\xe0\x7f\x10\x00OW\0\0" + pixel_bytes.to_bytes(4, "little")))
        zeros = bytes(4 * MB)
        for _ in range(pixel_bytes // len(zeros)):
            fp.write(squeeze.compress(zeros))
        fp.write(squeeze.flush())


def test_a_deflated_bomb_is_refused_before_pydicom_inflates_it(tmp_path, no_blowup):
    """An 8x8 slice whose deflated stream holds 100 MB: pydicom would inflate all of it in memory to read the
    header; the stream is inflated in pieces first and refused by its size."""
    files, _ = _series(tmp_path / "in")
    for f in files:
        _deflated(f, 8, 8, 100 * MB)
        assert f.stat().st_size < 1 * MB
    with pytest.raises(DicomError, match=r"no DICOM images") as err:
        read_series([tmp_path / "in"])
    assert str(files[0]) in str(err.value) and "deflated" in str(err.value)


def test_a_real_deflated_series_still_reads(tmp_path):
    files, _ = _series(tmp_path / "in")
    expected = read_series([tmp_path / "in"]).volumes[0].image
    for f in files:
        ds = pydicom.dcmread(f)
        ds.save_as(f, enforce_file_format=True, implicit_vr=False, little_endian=True)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
        ds.save_as(f, enforce_file_format=True)
    assert {str(pydicom.dcmread(f).file_meta.TransferSyntaxUID) for f in files} == {"1.2.840.10008.1.2.1.99"}
    np.testing.assert_array_equal(read_series([tmp_path / "in"]).volumes[0].image, expected)


@pytest.mark.filterwarnings("ignore:The (value|PN component) length")  # pydicom, as the hostile file is written
@pytest.mark.parametrize(
    ("key", "value", "says"),
    [("PatientID", "P" * 10000, "PatientID is 10000 characters, above the 64 that LO allows"),
     ("PatientID", "MSGAN\x00-0002", "PatientID contains control characters ('\\x00')"),
     ("AccessionNumber", "A" * 17, "AccessionNumber is 17 characters, above the 16 that SH allows"),
     ("PatientName", "Doe^" + "J" * 70, "PatientName is 74 characters in a component group")],
)  # fmt: skip
def test_an_identifier_beyond_its_vr_refuses_the_series_never_truncated(tmp_path, key, value, says):
    files, uid = _series(tmp_path / "in")
    for f in files:
        ds = pydicom.dcmread(f)
        setattr(ds, key, value)
        ds.save_as(f)
    report = ingest(tmp_path / "in", tmp_path / "v.zarr")
    assert not report.written and not (tmp_path / "v.zarr").exists()
    assert says in report.errors[uid] and str(files[0]) in report.errors[uid]
    assert value not in report.errors[uid]  # the identifier itself never reaches a message


def test_an_identifier_edited_into_a_volume_is_refused_at_export_and_descriptions_are_truncated(tmp_path):
    _series(tmp_path / "in")
    ingest(tmp_path / "in", tmp_path / "v.zarr")
    group = zarr.open_group(str(tmp_path / "v.zarr"), mode="r+")
    meta = dict(group.attrs["msgan"])
    meta["dicom"] = dict(meta["dicom"], StudyDescription="S" * 100)
    group.attrs["msgan"] = meta
    out = export(str(tmp_path / "v.zarr"), tmp_path / "out")
    assert pydicom.dcmread(out.files[0]).StudyDescription == "S" * 64
    assert any("StudyDescription of 100 characters truncated" in n for n in out.notes)
    meta["dicom"] = dict(meta["dicom"], PatientID="X" * 65)
    group.attrs["msgan"] = meta
    with pytest.raises(DicomError, match=r"v.zarr: PatientID is 65 characters, above the 64"):
        export(str(tmp_path / "v.zarr"), tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_export_into_a_folder_of_another_series_is_refused_naming_it(tmp_path):
    _series(tmp_path / "a", seed=1)
    _series(tmp_path / "b", slices=3, seed=2)
    ingest(tmp_path / "a", tmp_path / "a.zarr")
    ingest(tmp_path / "b", tmp_path / "b.zarr")
    first = export(str(tmp_path / "a.zarr"), tmp_path / "out")
    with pytest.raises(ValueError, match=rf"out: holds 2 DICOM file\(s\) of series {first.series_uid}.*new folder"):
        export(str(tmp_path / "b.zarr"), tmp_path / "out")
    assert sorted((tmp_path / "out").iterdir()) == sorted(first.files)  # the first series alone, untouched
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("kept")
    with pytest.raises(ValueError, match=r"notes: holds 1 other entry \(notes.txt\)"):
        export(str(tmp_path / "a.zarr"), tmp_path / "notes")
    assert (tmp_path / "notes" / "notes.txt").read_text() == "kept"


def test_export_twice_needs_replace_and_replaces_only_its_own_series(tmp_path):
    _series(tmp_path / "a")
    ingest(tmp_path / "a", tmp_path / "a.zarr")
    first = export(str(tmp_path / "a.zarr"), tmp_path / "out")
    stamp = [f.stat().st_mtime_ns for f in first.files]
    with pytest.raises(ValueError, match=r"already holds this export .*pass --replace"):
        export(str(tmp_path / "a.zarr"), tmp_path / "out")
    assert [f.stat().st_mtime_ns for f in first.files] == stamp
    again = export(str(tmp_path / "a.zarr"), tmp_path / "out", replace=True)
    assert again.series_uid == first.series_uid and sorted((tmp_path / "out").iterdir()) == sorted(again.files)


def test_nifti_export_over_an_existing_file_needs_replace(tmp_path):
    _series(tmp_path / "a")
    ingest(tmp_path / "a", tmp_path / "a.zarr")
    (tmp_path / "mine.nii.gz").write_bytes(b"precious")
    with pytest.raises(ValueError, match=r"mine.nii.gz: exists; pass --replace"):
        export(str(tmp_path / "a.zarr"), tmp_path / "mine.nii.gz", "nifti")
    assert (tmp_path / "mine.nii.gz").read_bytes() == b"precious"
    export(str(tmp_path / "a.zarr"), tmp_path / "mine.nii.gz", "nifti", replace=True)
    assert read_volume(tmp_path / "mine.nii.gz")[0].shape == (2, 8, 8)


def test_ingest_into_a_plain_folder_or_a_volume_without_replace_keeps_what_is_there(tmp_path):
    _, uid = _series(tmp_path / "in")
    (tmp_path / "plain.zarr").mkdir()
    (tmp_path / "plain.zarr" / "notes.txt").write_text("kept")
    report = ingest(tmp_path / "in", tmp_path / "plain.zarr")
    assert "not a zarr store msgan wrote (a folder holding 1 entries (notes.txt))" in report.errors[uid]
    assert (tmp_path / "plain.zarr" / "notes.txt").read_text() == "kept"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("kept")
    assert ingest(tmp_path / "in", tmp_path / "out").written == {uid: f"file://{tmp_path / 'out' / uid}.zarr"}
    assert (tmp_path / "out" / "notes.txt").read_text() == "kept"
    assert "pass --replace" in ingest(tmp_path / "in", tmp_path / "out").errors[uid]
    assert ingest(tmp_path / "in", tmp_path / "out", replace=True).written


def test_ingest_in_equals_out_is_refused_symlinks_resolved(tmp_path):
    write_volume(tmp_path / "ct.nii.gz", np.zeros((2, 4, 4), np.float32), OBLIQUE)
    ingest(tmp_path / "ct.nii.gz", tmp_path / "v.zarr")
    with pytest.raises(ValueError, match=r"v.zarr: is the input"):
        ingest(tmp_path / "v.zarr", tmp_path / "v.zarr", replace=True)
    os.symlink(tmp_path / "v.zarr", tmp_path / "alias.zarr")
    with pytest.raises(ValueError, match=r"is the input"):
        ingest(tmp_path / "alias.zarr", tmp_path / "v.zarr", replace=True)
    _series(tmp_path / "dicom")
    with pytest.raises(ValueError, match=r"dicom: is the input"):
        ingest(tmp_path / "dicom", tmp_path / "dicom")
    assert read_volume(tmp_path / "v.zarr")[0].shape == (2, 4, 4)


def test_a_destination_symlink_leaving_its_folder_is_refused(tmp_path):
    write_volume(tmp_path / "ct.nii.gz", np.zeros((2, 4, 4), np.float32), OBLIQUE)
    ingest(tmp_path / "ct.nii.gz", tmp_path / "elsewhere" / "theirs.zarr")
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path / "elsewhere" / "theirs.zarr", tmp_path / "out" / "v.zarr")
    with pytest.raises(ValueError, match=r"v.zarr: is a symlink to .*theirs.zarr, outside its folder"):
        ingest(tmp_path / "ct.nii.gz", tmp_path / "out" / "v.zarr", replace=True)
    assert (tmp_path / "elsewhere" / "theirs.zarr" / "zarr.json").exists()


def test_a_damaged_header_is_skipped_by_name_never_a_crash(tmp_path):
    """Flipped bytes can turn SOPClassUID into a multi-valued garbage string: a skipped file, not an AttributeError."""
    from pydicom.dataset import FileMetaDataset

    from msgan.io.dicom import DicomError, read_series

    files, _ = _series(tmp_path / "in")
    ds = pydicom.dcmread(files[0])
    del ds.PixelData
    ds.SOPClassUID = ["1.2.840.10008.5.1.4.1.1.2\x00garbage" * 20, "x"]
    ds.file_meta = FileMetaDataset(ds.file_meta)
    ds.save_as(files[0], enforce_file_format=False)
    result = read_series([tmp_path / "in"])
    reason = result.skipped[str(files[0])]
    assert files[0].name in reason and "no pixel data" in reason and len(reason) < 200 and "\x00" not in reason
    with pytest.raises(DicomError, match="no DICOM images"):
        read_series([files[0]])
