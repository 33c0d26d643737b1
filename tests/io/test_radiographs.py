"""2D radiographs in and out: CR, DX, MG (synthetic, with a modality's attributes) and real CR files from
pydicom-data; MONOCHROME1 kept, spacing by the standard's rules, exported as the source's SOP class."""

import shutil

import numpy as np
import pydicom
import pytest

from msgan.io.convert import export, ingest
from msgan.io.dicom import read_series, write_projection
from msgan.io.volume import Geometry, read_volume, write_volume
from tests.dicom_data import assert_valid_dicom, pydicom_data_file, write_radiograph


def _roundtrip(tmp_path, src_file):
    report = ingest(src_file.parent, tmp_path / "v.zarr")
    assert not report.errors, report.errors
    image, geom = read_volume(tmp_path / "v.zarr")
    out = export(str(tmp_path / "v.zarr"), tmp_path / "out").files
    return image, geom, report, out


@pytest.mark.parametrize(
    ("modality", "mono1"), [("DX", False), ("MG", False), ("CR", True), ("DX", True), ("XA", False), ("RF", False)]
)
def test_a_radiograph_round_trips_as_its_own_sop_class(tmp_path, modality, mono1):
    src_file, uid, shown = write_radiograph(tmp_path / "src", modality, monochrome1=mono1)
    assert_valid_dicom([src_file])  # the synthetic source is a valid object of its IOD
    image, geom, report, out = _roundtrip(tmp_path, src_file)
    np.testing.assert_array_equal(image, shown)  # MONOCHROME1 is read as displayed (white = attenuating)
    assert geom.allclose(Geometry((0.2 / 1.1, 0.2 / 1.1), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0)))
    assert any("EstimatedRadiographicMagnificationFactor" in n for n in report.notes[uid])
    src, got = pydicom.dcmread(src_file), pydicom.dcmread(out[0])
    assert got.SOPClassUID == src.SOPClassUID and got.Modality == modality  # never Secondary Capture
    assert got.PhotometricInterpretation == src.PhotometricInterpretation  # MONOCHROME1 restored
    np.testing.assert_array_equal(got.pixel_array, src.pixel_array)  # displays like the source
    assert list(got.ImageType)[:2] == ["DERIVED", "SECONDARY"] and got.SeriesInstanceUID != uid
    assert got.ImagerPixelSpacing == src.ImagerPixelSpacing and got.StudyInstanceUID == src.StudyInstanceUID
    assert_valid_dicom(out)
    again = read_series([tmp_path / "out"]).volumes[0]
    np.testing.assert_array_equal(again.image, shown)
    assert again.geometry.allclose(geom)


def test_spacing_follows_the_standard(tmp_path):
    f, _, _ = write_radiograph(tmp_path / "a", pixel_spacing=(0.15, 0.16))  # calibrated in the patient: wins
    assert read_series([f]).volumes[0].geometry.spacing == (0.16, 0.15)  # (x = column, y = row)
    f, _, _ = write_radiograph(tmp_path / "b", magnification=None)  # detector plane only
    v = read_series([f]).volumes[0]
    assert v.geometry.spacing == (0.2, 0.2) and any("at the detector" in n for n in v.notes)


def test_a_zero_spacing_is_never_geometry(tmp_path):
    f, uid, _ = write_radiograph(tmp_path / "src", "CR", pixel_spacing=(0.0, 0.0), monochrome1=True)
    ds = pydicom.dcmread(f)
    del ds.ImagerPixelSpacing, ds.EstimatedRadiographicMagnificationFactor
    ds.save_as(f)
    _, geom, report, out = _roundtrip(tmp_path, f)
    assert geom.spacing == (1.0, 1.0) and any("NOT measurements" in n for n in report.notes[uid])
    got = pydicom.dcmread(out[0])
    assert "PixelSpacing" not in got  # the zero spacing is not written back as if it were one
    assert_valid_dicom(out)


def test_a_2d_image_without_a_dicom_source_is_not_exported_as_dicom(tmp_path):
    write_volume(tmp_path / "x.nii.gz", np.zeros((8, 9), np.float32), Geometry.identity(2))
    ingest(tmp_path / "x.nii.gz", tmp_path / "x.zarr")
    with pytest.raises(ValueError, match=r"no source header.*--format nifti"):
        export(str(tmp_path / "x.zarr"), tmp_path / "out")
    with pytest.raises(ValueError, match="keeps the source grid"):
        f, _, _ = write_radiograph(tmp_path / "s")
        v = read_series([f]).volumes[0]
        write_projection(v.image[:-1], v.geometry, tmp_path / "o", v.identifiers, "1.2.3", "x")


def test_several_projection_images_in_one_series_are_refused_by_name(tmp_path):
    f, uid, _ = write_radiograph(tmp_path / "s")
    ds = pydicom.dcmread(f)
    ds.SOPInstanceUID = "1.2.3.4"
    ds.save_as(tmp_path / "s" / "lateral.dcm")
    res = read_series([tmp_path / "s"])
    assert not res.volumes and "2 DX images in one series" in res.errors[uid]


def test_a_real_monochrome1_cr_and_its_jpeg2000_twin(tmp_path):
    """Philips CR chest 1955x1841, MONOCHROME1, PixelSpacing 0\\0 (pydicom-data RG1_UNCR / RG1_J2KR)."""
    images = {}
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm"):
        (tmp_path / name).mkdir()
        shutil.copy(pydicom_data_file(name), tmp_path / name / "a.dcm")
        images[name], geom, report, out = _roundtrip(tmp_path / name, tmp_path / name / "a.dcm")
        assert geom.spacing == (1.0, 1.0) and any("NOT measurements" in n for n in next(iter(report.notes.values())))
        src, got = pydicom.dcmread(tmp_path / name / "a.dcm"), pydicom.dcmread(out[0])
        assert got.SOPClassUID == src.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"
        assert got.PhotometricInterpretation == "MONOCHROME1" and "PixelSpacing" not in got
        assert_valid_dicom(out)
    np.testing.assert_array_equal(images["RG1_UNCR.dcm"], images["RG1_J2KR.dcm"])  # JPEG 2000: pixel for pixel
    stored = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm")).pixel_array
    np.testing.assert_array_equal(images["RG1_UNCR.dcm"], 2**15 - 1 - stored.astype(np.float32))  # GDCM's inversion
    assert pydicom.dcmread(next((tmp_path / "RG1_UNCR.dcm" / "out").iterdir())).pixel_array.tolist() == stored.tolist()


def test_a_malformed_header_element_is_left_out_of_the_kept_header(tmp_path):
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    f, _, _ = write_radiograph(tmp_path / "s")
    ds = pydicom.dcmread(f)
    ds._dict[Tag(0x00181152)] = RawDataElement(Tag(0x00181152), "IS", 4, b"abc ", 0, False, True)  # Exposure
    ds.save_as(f)
    with pytest.warns(UserWarning):
        v = read_series([f]).volumes[0]
    assert "00181152" not in v.identifiers["Header"] and "00280010" in v.identifiers["Header"]  # Rows kept
    out = write_projection(v.image, v.geometry, tmp_path / "o", v.identifiers, "1.2.3", "x")
    assert_valid_dicom(out)
