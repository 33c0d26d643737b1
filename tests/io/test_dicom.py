import numpy as np
import pydicom
import pytest

from msgan.io.dicom import DicomError, derived_uid, read_series, write_series
from msgan.io.volume import Geometry
from tests.dicom_data import OBLIQUE, PATIENT, assert_valid_dicom, dciodvfy_errors, phantom_ct, write_ct_series


def _edit(path, **tags):
    ds = pydicom.dcmread(path)
    for k, v in tags.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    ds.save_as(path)


def test_roundtrip_keeps_geometry_and_pixels(tmp_path):
    _, uid, hu = write_ct_series(tmp_path / "src")
    res = read_series([tmp_path / "src"])
    assert not res.errors and not res.skipped and len(res.volumes) == 1
    v = res.volumes[0]
    assert v.series_uid == uid and v.image.dtype == np.float32
    np.testing.assert_array_equal(v.image, hu)  # HU kept exactly, not 8-bit
    assert v.geometry.allclose(OBLIQUE, atol=1e-6)
    assert v.identifiers["PatientID"] == PATIENT["PatientID"] and v.identifiers["ConvolutionKernel"] == "B80f"

    out = write_series(v.image, v.geometry, tmp_path / "out", v.identifiers, derived_uid(uid, "m/1"), "msgan m/1",
                       derived_from=uid)  # fmt: skip
    again = read_series([tmp_path / "out"]).volumes[0]
    np.testing.assert_array_equal(again.image, hu)
    assert again.geometry.allclose(OBLIQUE, atol=1e-6)
    ds = pydicom.dcmread(out[0])
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]  # the source's third value kept
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert ds.SeriesInstanceUID == derived_uid(uid, "m/1") != uid
    assert ds.StudyInstanceUID == v.identifiers["StudyInstanceUID"] and ds.PatientID == PATIENT["PatientID"]
    assert len({pydicom.dcmread(f).SOPInstanceUID for f in out}) == len(out)
    assert ds.FrameOfReferenceUID == v.identifiers["FrameOfReferenceUID"]


def test_values_outside_int16_are_clipped_not_wrapped(tmp_path):
    img = np.full((3, 8, 8), 40000.0, np.float32)
    img[:, 0, 0] = -1000
    write_series(img, OBLIQUE, tmp_path, PATIENT, derived_uid("x"), "x")
    back = read_series([tmp_path]).volumes[0].image
    assert back.max() >= 32767 - 1000 and back.min() >= -1000 - 1  # shifted by the intercept, never wrapped


def test_two_series_in_one_folder_and_a_structured_report(tmp_path):
    write_ct_series(tmp_path, seed=1, series_name="a")
    write_ct_series(tmp_path / "b", seed=2, series_name="b")
    sr = pydicom.Dataset()
    sr.file_meta = pydicom.dataset.FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    sr.SOPClassUID, sr.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", derived_uid("sr")
    sr.Modality, sr.SeriesInstanceUID = "SR", derived_uid("sr-series")
    sr.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    res = read_series([tmp_path])
    assert len(res.volumes) == 2 and not res.errors
    assert "not an image" in res.skipped[str(tmp_path / "report.dcm")]


def _one_error(tmp_path):
    res = read_series([tmp_path])
    assert not res.volumes and len(res.errors) == 1, res
    return next(iter(res.errors.values()))


def test_truncated_file(tmp_path):
    files, _, _ = write_ct_series(tmp_path)
    data = files[5].read_bytes()
    files[5].write_bytes(data[: len(data) * 2 // 3])
    assert "truncated" in _one_error(tmp_path)


def test_missing_image_position(tmp_path):
    files, _, _ = write_ct_series(tmp_path)
    _edit(files[3], ImagePositionPatient=None)
    assert "has no ImagePositionPatient" in _one_error(tmp_path)


def test_non_uniform_spacing(tmp_path):
    files, _, _ = write_ct_series(tmp_path)
    files[4].unlink()  # a missing slice
    assert "non-uniform slice spacing" in _one_error(tmp_path)


def test_gantry_tilt(tmp_path):
    files, _, _ = write_ct_series(tmp_path)
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        p = [float(x) for x in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [p[0], p[1] + 0.5 * k, p[2]]  # sheared stack
        ds.GantryDetectorTilt = 11.3
        ds.save_as(f)
    assert "gantry tilt" in _one_error(tmp_path)


def test_single_slice(tmp_path):
    files, _, _ = write_ct_series(tmp_path)
    for f in files[1:]:
        f.unlink()
    assert "single CT slice is not a volume" in _one_error(tmp_path)


def test_rgb_image(tmp_path):
    files, _, _ = write_ct_series(tmp_path)
    for f in files:
        ds = pydicom.dcmread(f)
        rgb = np.repeat(ds.pixel_array[..., None], 3, axis=-1).astype(np.uint8)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = rgb.tobytes()
        ds.save_as(f)
    assert "color image (RGB)" in _one_error(tmp_path)


def test_compressed_without_decoder(tmp_path):
    files, _, _ = write_ct_series(tmp_path)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"  # HTJ2K: no decoder here
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x0a" + b"\x00" * 64])
        ds["PixelData"].VR = "OB"
        ds.save_as(f, enforce_file_format=True)
    assert "High-Throughput JPEG 2000" in _one_error(tmp_path) and "has no decoder here" in _one_error(tmp_path)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomError, match="empty folder"):
        read_series([tmp_path / "empty"])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not dicom")
    with pytest.raises(DicomError, match="no DICOM images"):
        read_series([tmp_path / "junk"])


def test_duplicates_and_localizer_left_out(tmp_path):
    files, _, hu = write_ct_series(tmp_path / "s")
    (tmp_path / "s" / "copy.dcm").write_bytes(files[2].read_bytes())
    loc = pydicom.dcmread(files[0])
    loc.SOPInstanceUID = derived_uid("loc")
    loc.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    loc.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    loc.save_as(tmp_path / "s" / "loc.dcm")
    res = read_series([tmp_path / "s"])
    assert len(res.volumes) == 1, res.errors
    np.testing.assert_array_equal(res.volumes[0].image, hu)
    assert any("duplicate" in n for n in res.volumes[0].notes) and any("localizer" in n for n in res.volumes[0].notes)


def test_a_derived_ct_series_passes_dciodvfy_and_keeps_the_study(tmp_path):
    files, uid, _ = write_ct_series(tmp_path / "src")
    src = pydicom.dcmread(files[0])
    src.ReferringPhysicianName, src.KVP, src.PatientPosition = "Doe^Jane", "120", "HFS"
    src.SpecificCharacterSet = "ISO_IR 100"
    for f in files:
        ds = pydicom.dcmread(f)
        ds.ReferringPhysicianName, ds.KVP, ds.PatientPosition = "Doe^Jane", "120", "HFS"
        ds.SpecificCharacterSet, ds.PatientName = "ISO_IR 100", "Müller^Jörg"
        ds.save_as(f)
    assert_valid_dicom(files[:1])  # the synthetic source is itself a valid CT image
    v = read_series([tmp_path / "src"]).volumes[0]
    out = write_series(v.image, v.geometry, tmp_path / "out", v.identifiers, derived_uid(uid, "m/2"), "msgan m/2",
                       derived_from=uid)  # fmt: skip
    assert_valid_dicom(out)
    ds = pydicom.dcmread(out[0])
    for key in ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
                "PatientName", "PatientBirthDate", "PatientSex", "KVP", "PatientPosition", "Manufacturer"):  # fmt: skip
        assert ds[key].value == pydicom.dcmread(files[0])[key].value, key
    assert ds.SOPClassUID == src.SOPClassUID and ds.PhotometricInterpretation == src.PhotometricInterpretation
    assert str(ds.PatientName) == "Müller^Jörg" and ds.SpecificCharacterSet == "ISO_IR 100"


def test_unknown_type2_attributes_are_present_and_empty(tmp_path):
    """A volume without DICOM identifiers (e.g. from NIfTI) still exports as a valid CT image."""
    out = write_series(phantom_ct(shape=(3, 16, 12)), OBLIQUE, tmp_path, {}, derived_uid("bare"), "bare")
    assert_valid_dicom(out)
    ds = pydicom.dcmread(out[0])
    for key in ("PatientName", "PatientID", "ReferringPhysicianName", "AccessionNumber", "KVP", "AcquisitionNumber"):
        assert key in ds and ds[key].value in ("", None), key


def test_a_derived_mr_series_passes_dciodvfy(tmp_path):
    ids = PATIENT | {"Modality": "MR", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.4", "EchoTime": "10",
                     "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"], "ScanningSequence": "SE",
                     "SequenceVariant": "NONE", "RepetitionTime": "500"}  # fmt: skip
    out = write_series(phantom_ct(shape=(3, 16, 12)), Geometry.identity(3), tmp_path, ids, derived_uid("mr"), "mr")
    assert_valid_dicom(out)
    ds = pydicom.dcmread(out[0])
    assert ds.SOPClassUID == ids["SOPClassUID"] and list(ds.ImageType) == ["DERIVED", "SECONDARY", "M", "ND"]
    assert ds.ScanningSequence == "SE" and float(ds.EchoTime) == 10


def test_the_validator_helper_reports_errors(tmp_path):
    """The helper can fail: a CT image without its Type 2 attributes has dciodvfy errors."""
    out = write_series(phantom_ct(shape=(2, 8, 8)), OBLIQUE, tmp_path, {}, derived_uid("x2"), "x")
    _edit(out[0], ReferringPhysicianName=None, KVP=None)
    errors = dciodvfy_errors(out)
    assert list(errors) == [out[0].name]
    assert any("ReferringPhysicianName" in e for e in errors[out[0].name])


def test_an_export_that_fails_midway_leaves_nothing_in_its_folder(tmp_path, monkeypatch):
    """A derived series appears whole or not at all (here the disk fills up at the third file)."""
    real, calls = pydicom.dataset.Dataset.save_as, []

    def disk_full_at_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", disk_full_at_third)
    with pytest.raises(OSError, match="No space"):
        write_series(phantom_ct(shape=(5, 8, 8)), OBLIQUE, tmp_path / "out", {}, derived_uid("full"), "x")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staging folder is left
    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", real)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("kept")
    out = write_series(phantom_ct(shape=(5, 8, 8)), OBLIQUE, tmp_path / "out", {}, derived_uid("full"), "x")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00001.dcm", "00002.dcm", "00003.dcm",
                                                                   "00004.dcm", "00005.dcm", "notes.txt"]  # fmt: skip
    assert out == [tmp_path / "out" / f"{k:05d}.dcm" for k in range(1, 6)] and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize(
    ("tag", "value", "says"),
    [("ImageOrientationPatient", [1, 0, 0], "needs 6 finite numbers"), ("ImagePositionPatient", [0, 0], "needs 3"),
     ("PixelSpacing", [0, 0], "spacing positive"), ("ImageOrientationPatient", [0, 0, 0, 0, 1, 0], "unit vectors")],
)  # fmt: skip
def test_a_malformed_geometry_tag_refuses_its_series_by_name_and_the_others_are_read(tmp_path, tag, value, says):
    """Before, an orientation of 3 values raised a numpy error out of read_series (no series was read), and a zero
    spacing or a zero direction cosine on every slice became a geometry."""
    files, bad_uid, _ = write_ct_series(tmp_path / "bad", image=phantom_ct(shape=(3, 8, 8)), series_name="bad")
    _, good_uid, _ = write_ct_series(tmp_path / "good", image=phantom_ct(shape=(3, 8, 8)), series_name="good")
    for f in files:
        _edit(f, **{tag: value})
    res = read_series([tmp_path])
    assert [v.series_uid for v in res.volumes] == [good_uid]
    assert files[0].name in res.errors[bad_uid] and tag in res.errors[bad_uid] and says in res.errors[bad_uid]


def test_a_file_without_rows_refuses_its_series_by_name_and_the_folder_is_still_read(tmp_path):
    """Before, a missing Rows raised AttributeError out of read_series: no series of the folder was read."""
    files, bad_uid, _ = write_ct_series(tmp_path / "bad", image=phantom_ct(shape=(3, 8, 8)), series_name="bad")
    _, good_uid, _ = write_ct_series(tmp_path / "good", image=phantom_ct(shape=(3, 8, 8)), series_name="good")
    _edit(files[1], Rows=None)
    res = read_series([tmp_path])
    assert [v.series_uid for v in res.volumes] == [good_uid]
    assert f"{files[1].name}: Rows is None; an image needs a positive one" in res.errors[bad_uid]


def test_every_slice_is_rescaled_with_its_own_slope_and_an_overflow_is_refused(tmp_path):
    """RescaleSlope/Intercept are per instance (MR often varies them): a later slice's fractional values are kept,
    not truncated to the first slice's integer type; a slope that overflows float32 refuses the series by name."""
    files, uid, hu = write_ct_series(tmp_path / "src")
    ds = pydicom.dcmread(files[2])
    stored = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    _edit(files[2], RescaleSlope="0.001", RescaleIntercept="0.5")
    v = read_series([tmp_path / "src"]).volumes[0]
    raw = pydicom.dcmread(files[2]).pixel_array.astype(np.float64)
    np.testing.assert_allclose(v.image[2], (raw * 0.001 + 0.5).astype(np.float32), rtol=0, atol=1e-6)
    assert np.any(v.image[2] % 1 != 0) and not np.allclose(v.image[2], stored)
    np.testing.assert_array_equal(np.delete(v.image, 2, axis=0), np.delete(hu, 2, axis=0))  # the others as they were

    _edit(files[3], RescaleSlope="1e38", RescaleIntercept="0")
    res = read_series([tmp_path / "src"])
    assert not res.volumes and "not finite after RescaleSlope" in res.errors[uid]
