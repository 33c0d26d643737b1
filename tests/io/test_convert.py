import numpy as np
import pydicom
import pytest
import zarr

from msgan import storage
from msgan.cli import main
from msgan.io.convert import export, ingest
from msgan.io.volume import read_volume, write_volume
from tests.dicom_data import OBLIQUE, PATIENT, assert_valid_dicom, write_ct_series


def test_ingest_export_through_the_cli(tmp_path, capsys):
    _, uid, hu = write_ct_series(tmp_path / "one", seed=4)
    assert main(["ingest", str(tmp_path / "one"), str(tmp_path / "v.zarr")]) == 0
    g = zarr.open_group(str(tmp_path / "v.zarr"), mode="r")
    np.testing.assert_array_equal(g["0"][...], hu)
    assert g.attrs["msgan"]["dicom"]["SeriesInstanceUID"] == uid
    assert main(["export", str(tmp_path / "v.zarr"), str(tmp_path / "out"), "--format", "dicom"]) == 0
    exported = sorted((tmp_path / "out").glob("*.dcm"))
    ds = pydicom.dcmread(exported[0])
    assert ds.PatientID == PATIENT["PatientID"] and ds.SeriesInstanceUID != uid
    assert_valid_dicom(exported)
    assert main(["export", str(tmp_path / "v.zarr"), str(tmp_path / "v.nii.gz"), "--format", "nifti"]) == 0
    img, geom = read_volume(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(img, hu)
    assert geom.allclose(OBLIQUE)


def test_several_series_go_to_a_folder_and_refusals_are_reported(tmp_path, capsys):
    write_ct_series(tmp_path / "in" / "a", seed=5, series_name="a")
    files, bad_uid, _ = write_ct_series(tmp_path / "in" / "b", seed=6, series_name="b")
    files[2].unlink()  # series b now has a gap
    assert main(["ingest", str(tmp_path / "in"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"REFUSED {bad_uid}" in err and "non-uniform" in err
    assert len(list((tmp_path / "out").glob("*.zarr"))) == 1


def test_nifti_in(tmp_path):
    img = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    write_volume(tmp_path / "x.mha", img, OBLIQUE)
    report = ingest(tmp_path / "x.mha", tmp_path / "x.zarr")
    assert list(report.written.values()) == [storage.normalize_uri(tmp_path / "x.zarr")]
    with pytest.raises(ValueError, match="2D"):
        write_volume(tmp_path / "f.nii.gz", img[0], type(OBLIQUE).identity(2))
        ingest(tmp_path / "f.nii.gz", tmp_path / "f.zarr")
        export(str(tmp_path / "f.zarr"), tmp_path / "fo", "dicom")


def test_s3_prefix_in_and_out(s3_bucket, tmp_path):
    files, uid, hu = write_ct_series(tmp_path / "s", seed=7)
    fs, _ = storage.filesystem(f"s3://{s3_bucket}")
    for f in files:
        fs.put_file(str(f), f"{s3_bucket}/exports/series1/{f.name}")
    out = f"s3://{s3_bucket}/volumes/v.zarr"
    report = ingest(f"s3://{s3_bucket}/exports/series1", out)
    assert report.written == {uid: out}
    store, opts = storage.zarr_store(out)
    np.testing.assert_array_equal(zarr.open_group(store, mode="r", storage_options=opts)["0"][...], hu)


@pytest.mark.parametrize("bad", ["../../escaped", "1..2", "ABS", "1." + "2" * 63, "1.02.3"])
def test_a_series_with_an_invalid_uid_is_refused_and_nothing_of_it_is_written(tmp_path, capsys, bad):
    """A hostile SeriesInstanceUID never names a folder: `../../escaped` once made ingest write outside OUT."""
    bad = str(tmp_path / "abs") if bad == "ABS" else bad  # an absolute path as the UID
    root = tmp_path / "a" / "b"
    _, good_uid, _ = write_ct_series(root / "in" / "good", seed=8, series_name="good")
    write_ct_series(root / "in" / "bad", seed=9, series_uid=bad)
    with pytest.warns(UserWarning):  # pydicom warns about the invalid UI value it reads; we refuse it
        code = main(["ingest", str(root / "in"), str(root / "out")])
    assert code == 1
    err = capsys.readouterr().err
    assert "REFUSED (invalid UID" in err and "is not a valid DICOM UID" in err and "nothing of it is written" in err
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.zarr"))
    assert written == [root.relative_to(tmp_path) / "out" / f"{good_uid}.zarr"]  # nothing escaped, nothing of bad
    assert not (tmp_path / "escaped.zarr").exists() and not (tmp_path / "abs.zarr").exists()


def test_a_single_series_with_an_invalid_uid_writes_nothing(tmp_path, capsys):
    write_ct_series(tmp_path / "in", seed=10, series_uid="1..2")
    with pytest.warns(UserWarning):
        assert main(["ingest", str(tmp_path / "in"), str(tmp_path / "v.zarr")]) == 1
    assert "REFUSED (invalid UID '1..2')" in capsys.readouterr().err
    assert not (tmp_path / "v.zarr").exists() and not list(tmp_path.glob(".v.zarr*"))


def test_ingest_never_deletes_a_folder_or_file_that_is_not_a_zarr(tmp_path, capsys):
    """`msgan ingest ct.nii.gz ~/data` once replaced ~/data (and all it held) by the volume."""
    write_volume(tmp_path / "ct.nii.gz", np.zeros((3, 8, 8), np.float32), OBLIQUE)
    data = tmp_path / "data"
    data.mkdir()
    (data / "thesis.txt").write_text("precious")
    assert main(["ingest", str(tmp_path / "ct.nii.gz"), str(data)]) == 0
    assert (data / "thesis.txt").read_text() == "precious"  # the volume goes beside it, named after the file
    np.testing.assert_array_equal(read_volume(data / "ct.zarr")[0], np.zeros((3, 8, 8), np.float32))
    (tmp_path / "notes.zarr").mkdir()
    (tmp_path / "notes.zarr" / "mine.txt").write_text("kept")
    with pytest.raises(ValueError, match=r"notes.zarr: exists and is not a zarr store"):
        ingest(tmp_path / "ct.nii.gz", tmp_path / "notes.zarr")
    assert (tmp_path / "notes.zarr" / "mine.txt").read_text() == "kept"
    _, uid, _ = write_ct_series(tmp_path / "dicom", seed=12)
    (tmp_path / "out" / f"{uid}.zarr").mkdir(parents=True)
    (tmp_path / "out" / f"{uid}.zarr" / "mine.txt").write_text("kept")
    assert main(["ingest", str(tmp_path / "dicom"), str(tmp_path / "out")]) == 1  # refused by name, nothing deleted
    assert "is not a zarr store" in capsys.readouterr().err
    assert (tmp_path / "out" / f"{uid}.zarr" / "mine.txt").read_text() == "kept"
    with pytest.raises(ValueError, match=r"ct.zarr: an msgan volume is already there; pass --replace"):
        ingest(tmp_path / "ct.nii.gz", data / "ct.zarr")  # an msgan volume is replaced only when asked
    assert ingest(tmp_path / "ct.nii.gz", data / "ct.zarr", replace=True).written  # then it is, as before


def test_ingest_to_an_s3_prefix_keeps_what_it_holds(s3_bucket, tmp_path):
    """On s3:// a zarr written in mode w clears its prefix: a volume goes to PREFIX/<file name>.zarr instead."""
    write_volume(tmp_path / "ct.nii.gz", np.zeros((3, 8, 8), np.float32), OBLIQUE)
    fs, _ = storage.filesystem(f"s3://{s3_bucket}")
    fs.pipe_file(f"{s3_bucket}/data/thesis.txt", b"precious")
    report = ingest(tmp_path / "ct.nii.gz", f"s3://{s3_bucket}/data")
    assert report.written == {str(tmp_path / "ct.nii.gz"): f"s3://{s3_bucket}/data/ct.zarr"}
    assert fs.cat_file(f"{s3_bucket}/data/thesis.txt") == b"precious"
