"""Image sets for training without pairs (issue 22): the image-set CSV and its refusals by row, a folder as a set,
and the checks of both sets together and against the scored pairs."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from msgan.data.images import Image, ImagesError, check_sets, describe, read_folder, read_images, read_manifest
from msgan.data.pairs import Pair, check_pairs
from msgan.io.dicom import derived_uid, write_series
from msgan.io.volume import Geometry, write_volume, write_zarr
from tests.dicom_data import OBLIQUE, PATIENT, phantom_ct, write_ct_series

EYE3 = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def vol(path, shape=(8, 12, 10)):
    geom = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), EYE3) if len(shape) == 3 else Geometry.identity(2)
    image = np.zeros(shape, np.float32) + np.arange(shape[-1], dtype=np.float32)
    if str(path).endswith(".zarr"):
        write_zarr(path, [image], geom)
    else:
        write_volume(path, image, geom)
    return str(path)


def manifest(folder, text, name="sources.csv"):
    path = folder / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def files(tmp_path):
    for n in ("a.nii.gz", "b.mha", "c.nrrd", "d.nii"):
        vol(tmp_path / n)
    return tmp_path


# ----------------------------------------------------------------------------- the CSV


def test_rows_resolve_against_the_csvs_folder_with_defaults(files, monkeypatch):
    monkeypatch.chdir(files.parent)  # the working directory is not where relative paths point
    text = "\ufeffImage , split,patient\r\na.nii.gz,,P1\r\n\r\n./x/../b.mha,Holdout,P2\r\nc.nrrd,train,\r\n"
    images = read_images(manifest(files, text))
    assert images == [
        Image(2, str(files / "a.nii.gz"), "train", "P1", "sources.csv row 2"),
        Image(4, str(files / "b.mha"), "holdout", "P2", "sources.csv row 4"),
        Image(5, str(files / "c.nrrd"), "train", "", "sources.csv row 5"),
    ]
    assert read_images(manifest(files, "image\nd.nii\n")) == [Image(2, str(files / "d.nii"), label="sources.csv row 2")]


REFUSALS = [
    ("image,kernel\na.nii.gz,B70f\n", r"row 1: unknown column 'kernel' \(column 2\); the columns are image, split"),
    ("source,target\na.nii.gz,b.mha\n", r"row 1: unknown column 'source'.*this looks like a pairs manifest"),
    ("image,image\na.nii.gz,b.mha\n", r"row 1: column 'image' appears twice"),
    ("split,patient\ntrain,P1\n", r"row 1: no 'image' column"),
    ("image\na.nii.gz\nb.mha,c.nrrd\n", r"row 3: 2 values for the 1 columns"),
    ("image,split\na.nii.gz,\n,train\n", r"row 3: no image"),
    ("image,split\na.nii.gz,validation\n", r"row 2: split 'validation'.*validation pairs go in a pairs manifest"),
    ("image,split\na.nii.gz,test\n", r"row 2: split 'test' is not one of train, holdout"),
    ("image\na.nii.gz\nb.mha\n./a.nii.gz\n", r"row 4: the same image as row 2"),
    ("image\na.nii.gz\nmissing.nii.gz\n", r"row 3: image .*missing\.nii\.gz does not exist"),
    ("image,split,patient\na.nii.gz,train,P1\nb.mha,holdout,P1\n",
     r"row 3: patient 'P1' is in split 'holdout' here and in split 'train' at row 2"),
    ("image\nhttp://host/a.nii.gz\n", r"row 2: image 'http://host/a.nii.gz': only local paths and s3:// URIs"),
    ("image\na.nii.gz\x01\n", r"row 2: image holds a control character"),
    ("", r": empty; an image-set CSV starts with the header"),
    ("image\n", r": no images below the header"),
    ('image\n"a.nii.gz\n', r"row 2: not a CSV line"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), REFUSALS)
def test_every_refusal_names_the_csv_the_row_and_the_rule(files, text, message):
    path = manifest(files, text)
    with pytest.raises(ImagesError, match=message) as err:
        read_images(path)
    assert str(err.value).startswith(path)


def test_file_level_refusals_name_an_image_set_csv(files):
    with pytest.raises(ImagesError, match=r"nope\.csv: no such image-set CSV"):
        read_images(str(files / "nope.csv"))
    bad = files / "bad.csv"
    bad.write_bytes(b"image\na\x00.nii.gz\n")
    with pytest.raises(ImagesError, match=r"bad\.csv row 2: a NUL byte; an image-set CSV is UTF-8 text"):
        read_images(str(bad))


def test_missing_files_are_checked_only_when_asked(files):
    path = manifest(files, "image\nnot-yet.nii.gz\n")
    with pytest.raises(ImagesError, match="does not exist"):
        read_manifest(path)
    assert read_manifest(path, check_files=False)[0].ref == str(files / "not-yet.nii.gz")


# ----------------------------------------------------------------------------- a folder


def test_a_folder_is_a_set_of_its_images_in_name_order(tmp_path):
    folder = tmp_path / "sharp"
    folder.mkdir()
    for n in ("c.nrrd", "a.nii.gz", "B.mha", "e.zarr"):
        vol(folder / n)
    write_ct_series(folder / "d_series", image=phantom_ct((4, 16, 16)))  # a DICOM series folder: one image
    (folder / "notes.txt").write_text("not an image")
    (folder / "list.csv").write_text("image\n")
    (folder / ".hidden.nii.gz").write_bytes(b"")
    images = read_images(str(folder))
    assert [Path(i.ref).name for i in images] == ["B.mha", "a.nii.gz", "c.nrrd", "d_series", "e.zarr"]
    assert [i.row for i in images] == [1, 2, 3, 4, 5]
    assert all(i.split == "train" and i.in_folder for i in images)
    assert images[3].label == "sharp/d_series"
    assert read_images(f"file://{folder}") == images  # deterministic, however named
    infos = check_sets(images[:3], images[3:], dims=3)
    assert [c.usable for c in infos] == [True] * 5, [describe(c) for c in infos]


def test_an_empty_folder_or_one_volume_is_not_a_set(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ImagesError, match=r"empty: no image in this folder"):
        read_folder(str(tmp_path / "empty"))
    with pytest.raises(ImagesError, match="one OME-Zarr volume; a set is a folder of images or a CSV"):
        read_images(vol(tmp_path / "v.zarr"))


def test_a_link_to_a_missing_image_refuses_the_folder_set_naming_it(tmp_path):
    """A set never trains on fewer images than it holds without saying so: an image whose link leads nowhere (an
    archive not mounted) refuses the folder, naming the entry; a link to an image that exists is an image."""
    soft = tmp_path / "soft"
    soft.mkdir()
    vol(soft / "case1.zarr")
    vol(tmp_path / "elsewhere.zarr")
    (soft / "case2.zarr").symlink_to(tmp_path / "elsewhere.zarr")
    assert [im.label for im in read_folder(str(soft))] == ["soft/case1.zarr", "soft/case2.zarr"]
    (soft / "case3.nii.gz").symlink_to(tmp_path / "archive_not_mounted" / "case3.nii.gz")
    with pytest.raises(ImagesError, match=r"soft: case3\.nii\.gz is a link to .*archive_not_mounted.* does not exist"):
        read_folder(str(soft))


# ----------------------------------------------------------------------------- both sets together


def test_sets_are_checked_together_and_against_the_scored_pairs(tmp_path):
    for n in ("s1", "s2", "t1", "t2", "vs", "vt"):
        vol(tmp_path / f"{n}.nii.gz")
    vol(tmp_path / "flat.nii.gz", shape=(12, 10))
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    src = read_manifest(manifest(tmp_path, "image,patient\ns1.nii.gz,P1\ns2.nii.gz,P2\nflat.nii.gz,\n"))
    tgt = read_manifest(
        manifest(tmp_path, "image,split,patient\nt1.nii.gz,train,P1\ns2.nii.gz,train,\nbroken.nii.gz,,\n", "t.csv")
    )
    scored = [Pair(2, str(tmp_path / "vs.nii.gz"), str(tmp_path / "vt.nii.gz"), "validation", "P2"),
              Pair(3, str(tmp_path / "t1.nii.gz"), str(tmp_path / "t2.nii.gz"), "holdout", "")]  # fmt: skip
    pairs = check_pairs(scored, 3)
    checks = check_sets(src, tgt, dims=3, pairs=pairs, pairs_name="pairs.csv")
    problems = {c.image.label + " " + c.role: "; ".join(c.problems) for c in checks}
    assert problems["sources.csv row 2 sources"] == ""
    # a patient in training here and in a validation pair: a leak
    assert "same patient is in split 'validation' at pairs.csv row 2" in problems["sources.csv row 3 sources"]
    assert "a 2D image, the model is 3D" in problems["sources.csv row 4 sources"]
    assert "one image per entry" not in problems["sources.csv row 4 sources"]  # a folder's hint only
    # the same patient in the training split of both sets is fine; the image is also a scored pair's side
    assert "patient" not in problems["t.csv row 2 targets"]
    assert "also a side of pairs.csv row 3 (holdout)" in problems["t.csv row 2 targets"]
    assert "the same image as sources.csv row 3 (sources)" in problems["t.csv row 3 targets"]
    assert problems["t.csv row 4 targets"].startswith("unreadable (")
    assert "UNUSABLE" in describe(checks[-1]) and describe(checks[0]).endswith("10x12x8 @ 1x1x2 mm  ok")


def series(folder, patient, modality="CT"):
    """A small DICOM series of ``patient`` in ``modality``."""
    sop = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}[modality]
    ids = PATIENT | {"PatientID": patient, "Modality": modality, "StudyInstanceUID": derived_uid("study", patient),
                     "FrameOfReferenceUID": derived_uid("for", patient), "SOPClassUID": sop}  # fmt: skip
    write_series(phantom_ct((4, 16, 16)), OBLIQUE, folder, ids, derived_uid("series", patient), "T", series_number=3)


def test_one_modality_and_one_split_per_dicom_patient(tmp_path):
    series(tmp_path / "ct", "PAT1")
    series(tmp_path / "mr", "PAT2", "MR")
    shutil.copytree(tmp_path / "ct", tmp_path / "ct_again")
    src = read_manifest(manifest(tmp_path, "image,split\nct,train\nct_again,holdout\n"))
    tgt = read_manifest(manifest(tmp_path, "image\nmr\n", "t.csv"))
    problems = ["; ".join(c.problems) for c in check_sets(src, tgt, dims=3)]
    assert problems[0] == ""
    assert "the same DICOM PatientID is in split 'train' at sources.csv row 2" in problems[1]
    assert "modality MR, but sources.csv row 2 is CT" in problems[2]
    # a patient value on one row does not hide the PatientID of a row without one
    src = read_manifest(manifest(tmp_path, "image,split,patient\nct,train,7f3a9c01\nct_again,holdout,\n"))
    problems = ["; ".join(c.problems) for c in check_sets(src, tgt, dims=3)]
    assert problems[0] == "" and "the same DICOM PatientID is in split 'train' at sources.csv row 2" in problems[1]
