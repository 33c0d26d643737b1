"""Enhanced multi-frame CT and MR: geometry from the functional groups, exported in the same form (one Enhanced
object of the same SOP class, the source's functional groups carried over) or as a classic series on request.

Real files from pydicom-data (MIT): eCT_Supplemental.dcm (Enhanced CT, 2 frames of 512^2), emri_small.dcm
(Enhanced MR, 64x64x10, stripped of its functional groups: refused as is, completed by tests/dicom_data.py),
liver.dcm (a SEG: skipped)."""

import shutil

import numpy as np
import pydicom

from msgan.cascade import Cascade
from msgan.cli import main
from msgan.io.convert import export, ingest
from msgan.io.dicom import ENHANCED_CT, ENHANCED_MR, read_series
from msgan.io.volume import Geometry, open_zarr, write_zarr
from tests.conftest import tiny_config
from tests.dicom_data import OBLIQUE, assert_valid_dicom, enhanced_mr, pydicom_data_file

ECT_GEOMETRY = Geometry((0.388672, 0.388672, 10.0), (99.5, -301.5, -149.0), (-1, 0, 0, 0, 1, 0, 0, 0, -1))


def _translated(tmp_path, ingested: str, seed: int | None = 3) -> str:
    """``ingested`` through a tiny untrained 3D cascade (``seed=None``: unchanged, for a 2-slice volume too thin
    for a cascade), stored as the batch job stores a result."""
    arr, geom, meta = open_zarr(ingested.removeprefix("file://"))
    out = np.asarray(arr[...])
    if seed is not None:
        out = Cascade.untrained(tiny_config(num_scales=2), seed=seed).translate(out, tile=6)
    uri = str(tmp_path / "translated.zarr")
    source = {k: v for k, v in meta.items() if k != "geometry"}
    write_zarr(uri, [out.astype(np.float32)], geom, attrs={"source": source, "translated_by": "tiny/1"})
    return uri


def _check_derived(out, src_file, source_volume, sop_class):
    src, got = pydicom.dcmread(src_file), pydicom.dcmread(out[0])
    assert len(out) == 1 and got.SOPClassUID == sop_class == src.SOPClassUID  # the same form as the source
    assert got.PhotometricInterpretation == src.PhotometricInterpretation and got.NumberOfFrames == src.NumberOfFrames
    assert got.ImageType[0] == "DERIVED" and got.SeriesInstanceUID != src.SeriesInstanceUID
    positions = [f.PlanePositionSequence[0].ImagePositionPatient for f in got.PerFrameFunctionalGroupsSequence]
    assert positions == [f.PlanePositionSequence[0].ImagePositionPatient for f in src.PerFrameFunctionalGroupsSequence]
    assert_valid_dicom(out)
    back = read_series([out[0]]).volumes[0]
    assert back.geometry.allclose(source_volume.geometry, atol=1e-6)
    return back


def test_enhanced_ct_geometry_from_the_functional_groups_and_same_form_out(tmp_path):
    (tmp_path / "src").mkdir()
    src_file = shutil.copy(pydicom_data_file("eCT_Supplemental.dcm"), tmp_path / "src" / "ect.dcm")
    report = ingest(tmp_path / "src", tmp_path / "v.zarr")
    volume = read_series([src_file]).volumes[0]
    assert volume.geometry.allclose(ECT_GEOMETRY, atol=1e-6), volume.geometry
    ds = pydicom.dcmread(src_file)
    hu = ds.pixel_array.astype(np.float32) - 1024.0  # RescaleIntercept -1024 in the shared groups
    np.testing.assert_array_equal(volume.image, hu[::-1])  # frame 2 lies first along the normal

    back = _check_derived(export(next(iter(report.written.values())), tmp_path / "out").files, src_file, volume,
                          ENHANCED_CT)  # fmt: skip
    np.testing.assert_array_equal(back.image, volume.image)
    derived = export(_translated(tmp_path, next(iter(report.written.values())), seed=None), tmp_path / "derived").files
    _check_derived(derived, src_file, volume, ENHANCED_CT)
    groups = pydicom.dcmread(derived[0]).PerFrameFunctionalGroupsSequence
    assert groups[1].DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber == 2
    classic = export(next(iter(report.written.values())), tmp_path / "classic", classic=True).files
    assert len(classic) == 2 and {pydicom.dcmread(f).SOPClassUID for f in classic} == {"1.2.840.10008.5.1.4.1.1.2"}
    assert_valid_dicom(classic)
    assert main(["export", next(iter(report.written.values())), str(tmp_path / "cli"), "--classic"]) == 0
    assert len(list((tmp_path / "cli").glob("*.dcm"))) == 2
    again = read_series([tmp_path / "classic"]).volumes[0]
    np.testing.assert_array_equal(again.image, volume.image)
    assert again.geometry.allclose(ECT_GEOMETRY, atol=1e-5)


def test_enhanced_mr_round_trip_through_a_cascade(tmp_path):
    src_file, frames = enhanced_mr(tmp_path / "src")
    assert_valid_dicom([src_file])  # the completed source is a valid Enhanced MR
    volume = read_series([src_file]).volumes[0]
    assert volume.geometry.allclose(OBLIQUE, atol=1e-6)
    np.testing.assert_array_equal(volume.image, frames)
    report = ingest(tmp_path / "src", tmp_path / "v.zarr")
    translated = _translated(tmp_path, next(iter(report.written.values())))
    out = export(translated, tmp_path / "out").files
    back = _check_derived(out, src_file, volume, ENHANCED_MR)
    assert np.isfinite(back.image).all() and back.image.shape == frames.shape
    assert pydicom.dcmread(out[0]).ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series_uid
    classic = export(translated, tmp_path / "classic", classic=True).files
    assert len(classic) == frames.shape[0] and pydicom.dcmread(classic[0]).SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    assert_valid_dicom(classic)
    # each form is its own derived series, the same on a retry: no UID names both an Enhanced and a classic object
    uids = {f: (pydicom.dcmread(f).SeriesInstanceUID, pydicom.dcmread(f).SOPInstanceUID) for f in [*out, *classic]}
    assert uids[out[0]][0] != uids[classic[0]][0] and uids[out[0]][1] not in {uids[f][1] for f in classic}
    assert [pydicom.dcmread(f).SOPInstanceUID for f in export(translated, tmp_path / "again").files] == [
        uids[out[0]][1]
    ]


def test_frames_stored_out_of_order_are_sorted_and_written_back_in_the_source_order(tmp_path):
    src_file, frames = enhanced_mr(tmp_path / "src")
    ds = pydicom.dcmread(src_file)
    perm = [3, 0, 9, 1, 8, 2, 7, 4, 6, 5]
    ds.PerFrameFunctionalGroupsSequence = [ds.PerFrameFunctionalGroupsSequence[i] for i in perm]
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[perm]).tobytes()
    ds.save_as(src_file)
    volume = read_series([src_file]).volumes[0]
    np.testing.assert_array_equal(volume.image, frames)  # sorted along the normal again
    assert volume.geometry.allclose(OBLIQUE, atol=1e-6)
    ingest(tmp_path / "src", tmp_path / "v.zarr")
    out = export(str(tmp_path / "v.zarr"), tmp_path / "out").files
    got = pydicom.dcmread(out[0])
    np.testing.assert_array_equal(got.pixel_array, ds.pixel_array)  # frame k of the output is frame k of the source
    assert_valid_dicom(out)


def test_a_seg_is_skipped_and_an_enhanced_image_without_functional_groups_is_refused(tmp_path):
    shutil.copy(pydicom_data_file("liver.dcm"), tmp_path / "seg.dcm")
    shutil.copy(pydicom_data_file("emri_small.dcm"), tmp_path / "emri.dcm")
    res = read_series([tmp_path])
    assert "a segmentation (SEG), not an image" in res.skipped[str(tmp_path / "seg.dcm")]
    assert not res.volumes and "without per-frame functional groups" in next(iter(res.errors.values()))


def test_an_enhanced_frame_without_a_position_is_refused_by_name(tmp_path):
    src_file, _ = enhanced_mr(tmp_path / "src")
    ds = pydicom.dcmread(src_file)
    del ds.PerFrameFunctionalGroupsSequence[4].PlanePositionSequence
    ds.save_as(src_file)
    res = read_series([src_file])
    assert not res.volumes and "frame 5 has no ImagePositionPatient" in next(iter(res.errors.values()))
