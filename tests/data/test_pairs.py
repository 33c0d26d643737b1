"""The pairs manifest (issue 21): reading and refusing pairs.csv, what each side is, and whether a pair can train."""

import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from msgan.data.pairs import (
    Pair,
    PairsError,
    check_pair,
    check_pairs,
    describe,
    overlap_fraction,
    pairs_fingerprint,
    read_pairs,
    read_side,
    side_info,
)
from msgan.io.volume import Geometry, to_sitk, write_volume, write_zarr
from tests.conftest import write_unchecked
from tests.dicom_data import write_ct_series, write_radiograph

EYE3 = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def vol(path, shape=(8, 12, 10), geom=None, value=0.0):
    """A small volume file (NIfTI/MHA/NRRD through SimpleITK, or OME-Zarr) on ``geom``."""
    geom = geom or Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), EYE3)
    image = np.full(shape, value, np.float32) + np.arange(shape[-1], dtype=np.float32)
    if str(path).endswith(".zarr"):
        write_zarr(path, [image], geom)
    else:
        write_volume(path, image, geom)
    return str(path)


def manifest(folder, text, name="pairs.csv"):
    path = folder / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def files(tmp_path):
    """Four small volumes beside the CSV, and one in another folder (named by an absolute path)."""
    for n in ("a.nii.gz", "b.mha", "c.nrrd", "d.nii", "g.mha", "h.nrrd"):
        vol(tmp_path / n)
    (tmp_path / "elsewhere").mkdir()
    vol(tmp_path / "elsewhere" / "e.nii.gz")
    return tmp_path


# ----------------------------------------------------------------------------- the manifest


def test_paths_resolve_against_the_csvs_folder_rows_are_lines_and_defaults_apply(files, monkeypatch):
    other = files / "run"
    other.mkdir()
    monkeypatch.chdir(other)  # the working directory is not where relative paths point
    text = (
        "\ufeffSource , target,split,patient\r\n"  # a BOM, CRLF, spaces and capitals as a spreadsheet writes them
        "a.nii.gz,b.mha,,P1\r\n"
        "\r\n"
        f"c.nrrd,{files / 'elsewhere' / 'e.nii.gz'},Holdout,\r\n"
        "./sub/../d.nii,g.mha,validation,P3\r\n"
    )
    pairs = read_pairs(manifest(files, text))
    assert pairs == [
        Pair(2, str(files / "a.nii.gz"), str(files / "b.mha"), "train", "P1"),
        Pair(4, str(files / "c.nrrd"), str(files / "elsewhere" / "e.nii.gz"), "holdout", ""),
        Pair(5, str(files / "d.nii"), str(files / "g.mha"), "validation", "P3"),
    ]


def test_a_target_may_be_another_rows_source_and_a_target_may_serve_two_sources(files):
    text = "source,target\na.nii.gz,b.mha\nb.mha,c.nrrd\nd.nii,c.nrrd\n"
    pairs = read_pairs(manifest(files, text))
    assert [(p.row, Path(p.source).name, Path(p.target).name) for p in pairs] == [
        (2, "a.nii.gz", "b.mha"),
        (3, "b.mha", "c.nrrd"),
        (4, "d.nii", "c.nrrd"),
    ]


def test_the_split_and_patient_columns_are_optional(files):
    pairs = read_pairs(manifest(files, "target,source\nb.mha,a.nii.gz\n"))
    assert pairs == [Pair(2, str(files / "a.nii.gz"), str(files / "b.mha"), "train", "")]


REFUSALS = [
    ("source,target,kernel\na.nii.gz,b.mha,B70f\n",
     r"row 1: unknown column 'kernel' \(column 3\); the columns are source, target, split, patient"),
    ("source,split\na.nii.gz,train\n", r"row 1: no 'target' column"),
    ("source,target,source\na.nii.gz,b.mha,c.nrrd\n", r"row 1: column 'source' appears twice"),
    ("source,target\na.nii.gz,b.mha\nc.nrrd,\n", r"row 3: no target"),
    ("source,target\n , b.mha\n", r"row 2: no source"),
    ("source,target,split\na.nii.gz,b.mha,test\n", r"row 2: split 'test' is not one of train, validation, holdout"),
    ("source,target\na.nii.gz,b.mha\nc.nrrd,d.nii\n./a.nii.gz,b.mha\n", r"row 4: the same pair as row 2"),
    ("source,target\na.nii.gz,b.mha\na.nii.gz,c.nrrd\n", r"row 3: source a.nii.gz is already the source of row 2"),
    ("source,target\na.nii.gz,./a.nii.gz\n", r"row 2: the source and the target are the same image"),
    ("source,target\na.nii.gz,b.mha\nc.nrrd,missing.nii.gz\n", r"row 3: target .*missing\.nii\.gz does not exist"),
    ("source,target,split,patient\na.nii.gz,b.mha,train,P1\nc.nrrd,d.nii,validation,P2\ng.mha,h.nrrd,holdout,P1\n",
     r"row 4: patient 'P1' is in split 'holdout' here and in split 'train' at row 2"),
    ("source,target,split\na.nii.gz,b.mha,train\nc.nrrd,b.mha,holdout\n",
     r"row 3: target b.mha is in split 'holdout' here and in split 'train' at row 2; one image belongs to one split"),
    ("source,target\na.nii.gz,b.mha,c.nrrd\n", r"row 2: 3 values for the 2 columns"),
    ("", r": empty; a pairs CSV starts with the header"),
    ("\n\n", r": empty"),
    ("source,target\n", r": no pairs below the header"),
    ('source,target\n"a.nii.gz,b.mha\n', r"row 2: not a CSV line"),
    ("source,target\ns3://AKIAKEY:s3cr3t@bucket/a.zarr,b.mha\n", r"row 2: source is an s3:// URI carrying credentials"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), REFUSALS)
def test_every_refusal_names_the_csv_the_row_and_the_rule(files, text, message):
    path = manifest(files, text)
    with pytest.raises(PairsError, match=message) as err:
        read_pairs(path)
    assert str(err.value).startswith(path) and "s3cr3t" not in str(err.value)


def test_missing_files_are_checked_only_when_asked(files):
    path = manifest(files, "source,target\nnot-yet.nii.gz,b.mha\n")
    with pytest.raises(PairsError, match=r"pairs\.csv row 2: source .*not-yet\.nii\.gz does not exist"):
        read_pairs(path)
    assert read_pairs(path, check_files=False)[0].source == str(files / "not-yet.nii.gz")


def test_a_missing_csv_is_refused_by_name(tmp_path):
    with pytest.raises(PairsError, match=r"nope\.csv: no such pairs file"):
        read_pairs(str(tmp_path / "nope.csv"))


def test_the_fingerprint_is_of_the_bytes(files):
    a = pairs_fingerprint(manifest(files, "source,target\na.nii.gz,b.mha\n"))
    b = pairs_fingerprint(manifest(files, "source,target\na.nii.gz,c.nrrd\n", "other.csv"))
    assert re.fullmatch(r"[0-9a-f]{24}", a) and a != b
    assert a == pairs_fingerprint(manifest(files, "source,target\na.nii.gz,b.mha\n", "same.csv"))


# ----------------------------------------------------------------------------- geometry of a pair


def sitk_overlap(source: Geometry, src_shape, target: Geometry, tgt_shape) -> float:
    """An independent measure: the target's ones resampled (nearest) onto the source grid by SimpleITK."""
    ones = to_sitk(np.ones(tgt_shape, np.float32), target)
    ref = to_sitk(np.zeros(src_shape, np.float32), source)
    return float(sitk.GetArrayFromImage(sitk.Resample(ones, ref, sitk.Transform(), sitk.sitkNearestNeighbor)).mean())


def test_same_grid_across_formats(files):
    c = check_pair(Pair(2, vol(files / "s.nii.gz"), vol(files / "t.mha")), dims=3)
    assert c.usable and c.same_grid and c.overlap == 1.0 and c.alignment == "same grid"
    assert "same grid  overlap 100%  ok" in describe(c)


def test_overlap_follows_the_direction_cosines(tmp_path):
    """A target rotated 90 degrees about z covers half the source; read without its direction it would cover 27.5%."""
    src = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), EYE3)
    rot = Geometry((1.0, 1.0, 1.0), (9.0, 0.0, 0.0), (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    c = check_pair(Pair(2, vol(tmp_path / "s.nii.gz", (10, 20, 20), src), vol(tmp_path / "t.mha", (10, 10, 20), rot)))
    assert c.overlap == pytest.approx(0.5) and not c.same_grid and c.alignment == "resample"
    assert c.usable and c.notes == ()
    assert c.overlap == pytest.approx(sitk_overlap(src, (10, 20, 20), rot, (10, 10, 20)))


def test_an_oblique_shifted_target_matches_simpleitks_resampling(tmp_path):
    a = np.deg2rad(30.0)
    src = Geometry((0.8, 0.9, 2.0), (-5.0, 3.0, 10.0), EYE3)
    obl = Geometry(
        (1.1, 0.7, 1.5), (2.0, -4.0, 14.0), (np.cos(a), -np.sin(a), 0.0, np.sin(a), np.cos(a), 0.0, 0.0, 0.0, 1.0)
    )
    s, t = (
        side_info(vol(tmp_path / "s.nii.gz", (16, 24, 20), src)),
        side_info(vol(tmp_path / "t.nii.gz", (14, 22, 26), obl)),
    )
    want = sitk_overlap(src, (16, 24, 20), obl, (14, 22, 26))
    assert 0.2 < want < 0.9
    assert overlap_fraction(s, t) == pytest.approx(want, abs=0.01)


@pytest.mark.parametrize(
    ("shift_mm", "usable", "phrase"),
    [(15.0, True, "overlap 25%: only the overlap trains"), (19.0, False, "overlap 5%, below 10%"),
     (40.0, False, "no physical overlap")],
)  # fmt: skip
def test_little_or_no_overlap(tmp_path, shift_mm, usable, phrase):
    src = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), EYE3)
    moved = Geometry((1.0, 1.0, 1.0), (shift_mm, 0.0, 0.0), EYE3)
    c = check_pair(Pair(7, vol(tmp_path / "s.nii.gz", (4, 4, 20), src), vol(tmp_path / "t.nii.gz", (4, 4, 20), moved)))
    assert c.usable is usable
    assert phrase in (c.problems + c.notes)
    if not usable:
        assert "row 7" in describe(c) and "UNUSABLE: " + phrase in describe(c)


def test_dimensions_must_match_each_other_and_the_model(tmp_path):
    three, two = vol(tmp_path / "v.nii.gz"), vol(tmp_path / "i.nii.gz", (12, 10), Geometry.identity(2))
    assert check_pair(Pair(2, three, two)).problems == ("source is 3D, target 2D",)
    assert check_pair(Pair(2, three, vol(tmp_path / "w.mha")), dims=2).problems == (
        "source is 3D, the model is 2D",
        "target is 3D, the model is 2D",
    )


def test_an_unreadable_side_is_a_problem_naming_it(tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    c = check_pair(Pair(3, vol(tmp_path / "s.nii.gz"), str(tmp_path / "broken.nii.gz")))
    assert not c.usable and c.target is None
    assert c.problems[0].startswith("target unreadable (") and "broken.nii.gz" in c.problems[0]


def test_read_side_refuses_nan(tmp_path):
    bad = np.zeros((4, 5, 6), np.float32)
    bad[1, 2, 3] = np.inf
    write_unchecked(tmp_path / "bad.mha", bad, Geometry.identity(3))
    with pytest.raises(ValueError, match=r"bad\.mha: 1 voxel\(s\) are NaN or infinite"):
        read_side(str(tmp_path / "bad.mha"))


# ----------------------------------------------------------------------------- DICOM and OME-Zarr sides


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two reconstructions (sharp, soft) of one CT study: two series, one frame of reference; and a series of
    another acquisition (another frame of reference) of the same patient."""
    root = tmp_path_factory.mktemp("study")
    _, _, hu = write_ct_series(root / "sharp", seed=1, kernel="B80f", series_name="sharp")
    write_ct_series(root / "soft", image=hu + 1.0, seed=1, kernel="B30f", series_name="soft")
    write_ct_series(root / "later", seed=2, kernel="B30f", series_name="later")
    return root, hu


def test_two_series_of_one_study_are_a_pair_on_one_grid(study):
    root, hu = study
    c = check_pair(Pair(2, str(root / "sharp"), str(root / "soft")), dims=3)
    assert c.usable and c.same_grid and c.alignment == "same grid", c
    assert c.source is not None and c.target is not None
    assert (c.source.modality, c.source.patient) == ("CT", "MSGAN-0001")
    assert c.source.frame_of_reference == c.target.frame_of_reference != ""
    assert c.source.study == c.target.study != ""
    image, info = read_side(str(root / "sharp"))
    assert image.dtype == np.float32 and info.shape == hu.shape
    np.testing.assert_allclose(image, hu, atol=1e-3)  # HU after the rescale


def test_another_frame_of_reference_needs_alignment_but_is_usable(study):
    root, _ = study
    c = check_pair(Pair(2, str(root / "sharp"), str(root / "later")))
    assert c.usable and c.alignment == "different frame of reference: align"
    assert "frames of reference differ: needs data.align: rigid or affine" in c.notes
    assert "different frame of reference: align" in describe(c)


def _retag(folder, **values):
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        for k, v in values.items():
            setattr(ds, k, v)
        ds.save_as(f)


def test_patients_differ_by_dicom_patient_id(study, tmp_path):
    root, _ = study
    shutil.copytree(root / "soft", tmp_path / "other")
    _retag(tmp_path / "other", PatientID="SOMEONE-ELSE")
    c = check_pair(Pair(4, str(root / "sharp"), str(tmp_path / "other")))
    assert c.problems == ("patients differ (the DICOM PatientID of the two sides)",)
    assert "SOMEONE-ELSE" not in describe(c)  # identifiers stay out of the line


def test_padding_value_in_hu(study, tmp_path):
    root, _ = study
    shutil.copytree(root / "sharp", tmp_path / "padded")
    first = pydicom.dcmread(next((tmp_path / "padded").iterdir()))
    slope, intercept = float(first.RescaleSlope), float(first.RescaleIntercept)
    raw = round((-3024.0 - intercept) / slope)
    for f in (tmp_path / "padded").iterdir():
        ds = pydicom.dcmread(f)
        ds.add_new(0x00280120, "SS" if int(ds.PixelRepresentation) else "US", raw)  # PixelPaddingValue
        ds.save_as(f)
    assert side_info(str(tmp_path / "padded")).padding == pytest.approx(raw * slope + intercept)
    assert side_info(str(root / "sharp")).padding is None


def test_a_folder_with_a_gap_or_two_series_is_refused_by_name(study, tmp_path):
    root, _ = study
    shutil.copytree(root / "sharp", tmp_path / "gap")
    sorted((tmp_path / "gap").iterdir())[5].unlink()
    c = check_pair(Pair(2, str(tmp_path / "gap"), str(root / "soft")))
    assert c.problems[0].startswith(f"source unreadable ({tmp_path / 'gap'}: a broken series in this folder")
    assert "non-uniform slice spacing" in c.problems[0]
    shutil.copytree(root / "sharp", tmp_path / "two" / "a")
    shutil.copytree(root / "soft", tmp_path / "two" / "b")
    c = check_pair(Pair(3, str(root / "sharp"), str(tmp_path / "two")))
    assert c.problems == (
        f"target unreadable ({tmp_path / 'two'}: 2 DICOM series in this folder; a side is one series)",
    )


def test_an_ingested_volume_carries_its_identifiers(study, tmp_path):
    from msgan.io.convert import ingest

    root, hu = study
    ingest(root / "soft", tmp_path / "soft.zarr")
    c = check_pair(Pair(2, str(root / "sharp"), str(tmp_path / "soft.zarr")))
    assert c.usable and c.same_grid
    assert c.target is not None and (c.target.modality, c.target.patient) == ("CT", "MSGAN-0001")
    assert c.target.frame_of_reference == c.source.frame_of_reference  # type: ignore[union-attr]
    image, info = read_side(str(tmp_path / "soft.zarr"))
    np.testing.assert_allclose(image, hu + 1.0, atol=1e-3)
    geom = info.geometry
    write_zarr(tmp_path / "mr.zarr", [image], geom, attrs={"dicom": {"Modality": "MR", "PatientID": "MSGAN-0001"}})
    assert check_pair(Pair(3, str(root / "sharp"), str(tmp_path / "mr.zarr"))).problems == (
        "modalities differ (CT -> MR)",
    )


def test_radiograph_files_are_2d_pairs(tmp_path):
    dx1, _, shown1 = write_radiograph(tmp_path / "std", "DX", series_name="standard")
    dx2, _, _ = write_radiograph(tmp_path / "soft", "DX", series_name="soft tissue")
    cr, _, _ = write_radiograph(tmp_path / "cr", "CR", series_name="cr")
    c = check_pair(Pair(2, str(dx1), str(dx2)), dims=2)
    assert c.usable and c.same_grid and c.source is not None and c.source.shape == (64, 48)
    assert check_pair(Pair(2, str(dx1), str(dx2)), dims=3).problems == (
        "source is 2D, the model is 3D",
        "target is 2D, the model is 3D",
    )
    assert check_pair(Pair(3, str(dx1), str(cr)), dims=2).problems == ("modalities differ (DX -> CR)",)
    image, _ = read_side(str(tmp_path / "std"))  # the folder holding the one image reads the same
    np.testing.assert_array_equal(image, shown1)


def test_one_dicom_patient_in_two_splits_is_a_leak(study, tmp_path):
    root, _ = study
    shutil.copytree(root / "soft", tmp_path / "soft2")
    _retag(tmp_path / "soft2", SeriesInstanceUID=pydicom.uid.generate_uid())
    pairs = [Pair(2, str(root / "sharp"), str(root / "soft")), Pair(3, str(root / "later"), str(tmp_path / "soft2"),
             "holdout")]  # fmt: skip
    checks = check_pairs(pairs)
    assert checks[0].usable
    assert any("same DICOM PatientID is in split 'train' at row 2" in p for p in checks[1].problems)
    named = [Pair(2, p.source, p.target, p.split, f"anon-{p.row}") for p in pairs]  # the column says otherwise
    assert all(c.usable for c in check_pairs(named))
    # a row with a patient value (find-pairs writes pseudonyms) and a row without one (added by hand) of the same
    # DICOM PatientID: the bare row is that PatientID's, so it meets the named one, in either order
    for mixed in ([named[0], pairs[1]], [pairs[1], named[0]]):
        later = check_pairs(mixed)[1]
        assert any(f"same DICOM PatientID is in split '{mixed[0].split}'" in p for p in later.problems), later


@pytest.mark.slow
def test_an_s3_manifest_resolves_against_its_prefix(s3_bucket, tmp_path):
    from msgan import storage

    geom = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), EYE3)
    vol(f"s3://{s3_bucket}/data/vols/a.zarr", geom=geom)
    vol(f"s3://{s3_bucket}/data/b.zarr", geom=geom)
    csv_uri = f"s3://{s3_bucket}/data/lists/pairs.csv"
    storage.write_text(csv_uri, "source,target,split\n../vols/a.zarr,../b.zarr,holdout\n")
    (pair,) = read_pairs(csv_uri)
    assert pair == Pair(2, f"s3://{s3_bucket}/data/vols/a.zarr", f"s3://{s3_bucket}/data/b.zarr", "holdout")
    c = check_pair(pair, dims=3)
    assert c.usable and c.same_grid, c
    storage.write_text(csv_uri, "source,target\n../vols/a.zarr,../missing.zarr\n")
    with pytest.raises(PairsError, match=rf"{csv_uri} row 2: target s3://{s3_bucket}/data/missing\.zarr does not"):
        read_pairs(csv_uri)
    assert len(pairs_fingerprint(csv_uri)) == 24
