"""msgan find-pairs: pairs of series found in DICOM study folders (and a PACS), split by patient, ingested."""

import argparse
import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from msgan import find_pairs as fp
from msgan.io.dicom import derived_uid
from msgan.io.outputs import OutputError
from msgan.io.patterns import PatternError
from msgan.io.volume import read_level
from tests.dicom_data import write_ct_series

SOURCE = ["ConvolutionKernel=B70f|Br64d"]
TARGET = ["ConvolutionKernel=B30f|Br40d"]
SHAPE = (3, 12, 10)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """MSGAN_HOME in the test's folder: the pseudonym key and the default storage go there."""
    monkeypatch.setenv("MSGAN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def write_study(folder: Path, patient: str, seed: int, kernels=("B70f", "B30f"), **tags) -> dict[str, str]:
    """One study of ``patient``: one series per kernel (a kernel may be a list: Siemens' ['Br64d', '3']), every
    file in one folder (a study folder mixes series); returns {kernel name: SeriesInstanceUID}."""
    image = np.random.default_rng(seed).normal(0.0, 100.0, SHAPE).round().astype(np.float32)
    study = derived_uid("study", patient, str(seed))
    folder.mkdir(parents=True, exist_ok=True)
    uids = {}
    for n, kernel in enumerate(kernels):
        name = kernel if isinstance(kernel, str) else kernel[0]
        stage = folder.parent / f".stage-{folder.name}-{n}"
        files, uid, _ = write_ct_series(stage, image=image, seed=seed, kernel=name, study_uid=study,
                                        series_name=f"{patient}-{seed}-{n}")  # fmt: skip
        for f in files:
            ds = pydicom.dcmread(f)
            ds.PatientID = patient
            ds.ConvolutionKernel = kernel
            for k, v in tags.items():
                setattr(ds, k, v)
            ds.save_as(folder / f"{n}-{f.name}")
        shutil.rmtree(stage)
        uids[name] = uid
    return uids


def add_junk(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    junk = [folder / "README.txt", folder / "empty.dcm", folder / "random.bin"]
    junk[0].write_text("exported by the scanner\n")
    junk[1].write_bytes(b"")
    junk[2].write_bytes(np.random.default_rng(0).bytes(3000))
    return junk


def rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def cli(*argv) -> int:
    from msgan.cli import main

    return main(["find-pairs", *map(str, argv)])


def test_pairs_of_mixed_study_folders_are_ingested_and_listed_in_the_manifest(tmp_path):
    dicom = tmp_path / "dicom"
    studies = {
        "PAT-A": write_study(dicom / "a", "PAT-A", 1),
        "PAT-B": write_study(dicom / "b", "PAT-B", 2, kernels=(["Br64d", "3"], ["Br40d", "3"])),  # Siemens-style
    }
    junk = add_junk(dicom / "b" / "extras")
    out = tmp_path / "pairs.csv"
    lines: list[str] = []
    result = fp.find_pairs(dicom, SOURCE, TARGET, out=out, storage_uri=str(tmp_path / "volumes"), log=lines.append)

    assert len(result.pairs) == 2 and not result.failed and result.ingested == 4 and result.reused == 0
    assert set(result.skipped_files) == {str(j) for j in junk}  # listed, never fatal
    assert "not a DICOM file" in result.skipped_files[str(junk[0])]
    got = rows(out)
    assert list(got[0]) == ["source", "target", "split", "patient"] and len(got) == 2
    by_source = {r["source"]: r for r in got}
    text = out.read_text()
    for patient, uids in studies.items():
        (src_kernel, src), (tgt_kernel, tgt) = uids.items()
        study = derived_uid("study", patient, str(1 if patient == "PAT-A" else 2))
        row = by_source[f"volumes/{study}/{src}.zarr"]  # relative to the manifest's folder: the storage is below it
        assert row["target"] == f"volumes/{study}/{tgt}.zarr" and row["split"] == "train"
        assert re.fullmatch(r"[0-9a-f]{12}", row["patient"]) and patient not in text  # a pseudonym, never the ID
        for uid, kernel, column in ((src, src_kernel, "source"), (tgt, tgt_kernel, "target")):
            arr, _, meta = read_level(str(tmp_path / row[column]), 0)
            assert arr.shape == SHAPE and meta["dicom"]["SeriesInstanceUID"] == uid  # this series' files only
            assert kernel in str(meta["dicom"]["ConvolutionKernel"])
    assert len({r["patient"] for r in got}) == 2
    paired = [ln for ln in lines if "paired" in ln and "study" in ln]
    assert len(paired) == 2 and any("-> target" in ln for ln in paired)
    assert any(ln.startswith("find-pairs: paired 2") for ln in lines)
    assert any("3 file(s) skipped" in ln for ln in lines)


def test_ambiguous_unmatched_and_two_patient_studies_are_listed_and_skipped(tmp_path):
    dicom = tmp_path / "dicom"
    good = write_study(dicom / "good", "P1", 1)
    write_study(dicom / "twice", "P2", 2, kernels=("B70f", "B70f", "B30f"))  # two series match --source
    write_study(dicom / "lonely", "P3", 3, kernels=("B70f",))  # nothing matches --target
    write_study(dicom / "both", "P5", 5, kernels=("B70f", "B50f"))
    mixed = write_study(dicom / "mixed", "P4", 4)
    intruder = sorted((dicom / "mixed").glob("1-*.dcm"))[0]  # one file of another patient in this study
    ds = pydicom.dcmread(intruder)
    ds.PatientID = "P9"
    ds.save_as(intruder)
    lines: list[str] = []
    result = fp.find_pairs(dicom, SOURCE, TARGET, out=tmp_path / "p.csv", storage_uri=str(tmp_path / "v"),
                           log=lines.append)  # fmt: skip

    assert [p.source.series_uid for p in result.pairs] == [good["B70f"]]
    status = {o.study_uid: o for o in result.outcomes}
    ambiguous = status[derived_uid("study", "P2", "2")]
    assert ambiguous.status == "ambiguous" and "2 series match --source" in ambiguous.reason
    lonely = status[derived_uid("study", "P3", "3")]
    assert lonely.status == "unmatched" and "no series matches --target ConvolutionKernel=B30f|Br40d" in lonely.reason
    assert status[derived_uid("study", "P5", "5")].status == "unmatched"
    refused = [o for o in result.outcomes if o.study_uid == derived_uid("study", "P4", "4")]
    assert [o.status for o in refused] == ["refused"] and "patients" in refused[0].reason
    assert mixed["B70f"] not in {p.source.series_uid for p in result.pairs}
    for word in ("ambiguous", "unmatched", "refused"):
        assert any(ln.strip().startswith(word) for ln in lines), word
    assert any("1 ambiguous, 2 unmatched" in ln for ln in lines)
    assert "P9" not in "\n".join(lines) and "P4" not in "\n".join(lines)  # no PatientID on the console either
    assert len(rows(tmp_path / "p.csv")) == 1


def test_splits_are_by_patient_seeded_and_honour_each_requested_split():
    patients = [f"P{i:02d}" for i in range(20)]
    splits, notes = fp.split_patients(patients, validation=0.1, holdout=0.2, seed=0)
    assert set(splits) == set(patients) and not notes
    counts = {s: sum(v == s for v in splits.values()) for s in fp.SPLITS}
    assert counts == {"train": 14, "validation": 2, "holdout": 4}
    assert fp.split_patients(reversed(patients), 0.1, 0.2, seed=0)[0] == splits  # the same patients, the same draw
    assert fp.split_patients(patients, 0.1, 0.2, seed=1)[0] != splits

    few, notes = fp.split_patients(["a", "b", "c"], validation=0.05, holdout=0.05)
    assert sorted(few.values()) == ["holdout", "train", "validation"] and not notes  # at least one each
    two, notes = fp.split_patients(["a", "b"], validation=0.1, holdout=0.2)
    assert sorted(two.values()) == ["holdout", "train"]
    assert len(notes) == 1 and notes[0].startswith("validation: no patient")
    one, notes = fp.split_patients(["a"], holdout=0.5)
    assert one == {"a": "train"} and "holdout: no patient" in notes[0]
    for bad in ({"validation": 1.0}, {"holdout": -0.1}, {"validation": 0.5, "holdout": 0.5}):
        with pytest.raises(ValueError, match=r"--validation|--holdout"):
            fp.split_patients(patients, **bad)


def test_one_patients_studies_share_a_split(tmp_path):
    dicom = tmp_path / "dicom"
    for i in range(6):
        write_study(dicom / f"s{i}", f"P{i % 3}", 10 + i)  # three patients, two studies each
    result = fp.find_pairs(dicom, SOURCE, TARGET, validation=0.34, holdout=0.34, seed=3, dry_run=True,
                           storage_uri=str(tmp_path / "v"), log=lambda _: None)  # fmt: skip
    assert len(result.pairs) == 6
    split_of: dict[str, set[str]] = {}
    for p in result.pairs:
        split_of.setdefault(p.patient_id, set()).add(p.split)
    assert all(len(s) == 1 for s in split_of.values())
    assert sorted(next(iter(s)) for s in split_of.values()) == ["holdout", "train", "validation"]


def test_a_rerun_reuses_the_volumes_and_refuses_the_existing_manifest(tmp_path):
    dicom = tmp_path / "dicom"
    uids = write_study(dicom / "a", "PAT-A", 1)
    out, store = tmp_path / "pairs.csv", tmp_path / "v"
    first = fp.find_pairs(dicom, SOURCE, TARGET, out=out, storage_uri=str(store), log=lambda _: None)
    assert first.ingested == 2
    volume = next(store.rglob(f"{uids['B70f']}.zarr"))
    stamp = volume.stat().st_mtime_ns
    before = out.read_text()

    with pytest.raises(OutputError, match="pass --replace"):  # refused before any work
        fp.find_pairs(dicom, SOURCE, TARGET, out=out, storage_uri=str(store), log=lambda _: None)
    again = fp.find_pairs(dicom, SOURCE, TARGET, out=out, storage_uri=str(store), replace=True, log=lambda _: None)
    assert again.ingested == 0 and again.reused == 2 and volume.stat().st_mtime_ns == stamp
    assert out.read_text() == before  # the same pseudonym (the same key), the same rows

    # the series changed (a slice deleted at the source): the volume holds other instances now
    next((dicom / "a").glob("0-*.dcm")).unlink()
    kept = fp.find_pairs(dicom, SOURCE, TARGET, out=tmp_path / "p2.csv", storage_uri=str(store), log=lambda _: None)
    assert not kept.pairs and "other content" in kept.failed[0].error and volume.stat().st_mtime_ns == stamp
    assert not (tmp_path / "p2.csv").exists()
    replaced = fp.find_pairs(dicom, SOURCE, TARGET, out=tmp_path / "p2.csv", storage_uri=str(store), replace=True,
                             log=lambda _: None)  # fmt: skip
    assert replaced.ingested == 1 and replaced.reused == 1
    assert read_level(str(volume), 0)[0].shape == (SHAPE[0] - 1, *SHAPE[1:])


def test_what_msgan_did_not_write_is_never_replaced(tmp_path):
    dicom = tmp_path / "dicom"
    uids = write_study(dicom / "a", "PAT-A", 1)
    study = derived_uid("study", "PAT-A", "1")
    foreign = tmp_path / "v" / study / f"{uids['B30f']}.zarr"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("someone's file")
    result = fp.find_pairs(dicom, SOURCE, TARGET, out=tmp_path / "p.csv", storage_uri=str(tmp_path / "v"),
                           replace=True, log=lambda _: None)  # fmt: skip
    assert not result.pairs and "not a volume msgan wrote" in result.failed[0].error
    assert (foreign / "mine.txt").read_text() == "someone's file"

    (tmp_path / "notes.csv").write_text("my own notes\n")
    with pytest.raises(OutputError, match="not an output msgan published"):
        fp.find_pairs(dicom, SOURCE, TARGET, out=tmp_path / "notes.csv", log=lambda _: None)
    with pytest.raises(OutputError, match="is the input"):  # never into the DICOM folder
        fp.find_pairs(dicom, SOURCE, TARGET, out=dicom / "pairs.csv", log=lambda _: None)


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    dicom = tmp_path / "dicom"
    write_study(dicom / "a", "PAT-A", 1)
    with pytest.raises(PatternError, match="'Kernel=B70f'"):
        fp.find_pairs(dicom, ["Kernel=B70f"], TARGET, out=tmp_path / "p.csv")
    with pytest.raises(ValueError, match="--holdout"):
        fp.find_pairs(dicom, SOURCE, TARGET, out=tmp_path / "p.csv", holdout=1.5)
    with pytest.raises(ValueError, match="no such folder"):
        fp.find_pairs(tmp_path / "nowhere", SOURCE, TARGET, out=tmp_path / "p.csv")
    with pytest.raises(ValueError, match=r"--out s3://bucket/p.csv is in the object store but --storage .* is local"):
        fp.find_pairs(dicom, SOURCE, TARGET, out="s3://bucket/p.csv", storage_uri=str(tmp_path / "vols"))
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "home").exists()


def test_the_command_line_states_the_syntax_and_uses_the_default_storage(tmp_path, capsys, home):
    parser = argparse.ArgumentParser(prog="msgan find-pairs")
    fp.add_arguments(parser)
    usage = parser.format_help()
    assert "KEYWORD=REGEX" in usage and "WHOLE value, ignoring case" in usage and "Br40d" in usage

    dicom = tmp_path / "dicom"
    write_study(dicom / "a", "PAT-A", 1)
    write_study(dicom / "b", "PAT-B", 2)
    out = tmp_path / "manifests" / "pairs.csv"  # the storage is not below its folder: absolute paths
    assert cli(dicom, "--source", SOURCE[0], "--target", TARGET[0], "--holdout", "0.5", "--out", out) == 0
    printed = capsys.readouterr().out
    assert "train 1 (1 patient), validation 0 (0 patients), holdout 1 (1 patient)" in printed
    got = rows(out)
    assert sorted(r["split"] for r in got) == ["holdout", "train"]
    assert all(Path(r["source"]).is_absolute() and Path(r["source"]).is_relative_to(home / "pairs") for r in got)
    assert (home / "pseudonym.key").stat().st_mode & 0o077 == 0  # the key: its owner's only
    assert cli(dicom, "--source", SOURCE[0], "--target", "ConvolutionKernel=nothing", "--dry-run") == 1
    capsys.readouterr()
    assert cli(dicom, "--source", "Kernel=B70f", "--target", TARGET[0], "--out", tmp_path / "x.csv") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msgan find-pairs: 'Kernel=B70f': 'Kernel' is not a DICOM keyword") and "\n" not in err


# ------------------------------------------------------------------------------------------------ the PACS


@pytest.fixture
def empty_orthanc(orthanc):
    """The session's Orthanc, emptied: this test owns everything the PACS holds."""
    import requests

    auth = (orthanc["user"], orthanc["password"])
    for pid in requests.get(f"{orthanc['rest']}/patients", auth=auth, timeout=30).json():
        requests.delete(f"{orthanc['rest']}/patients/{pid}", auth=auth, timeout=30).raise_for_status()
    return orthanc


@pytest.mark.slow
def test_pairs_from_the_pacs_with_a_dry_run_that_fetches_nothing(empty_orthanc, tmp_path, monkeypatch, capsys):
    from msgan.io.pacs import DicomWebClient

    orthanc = empty_orthanc
    client = DicomWebClient(orthanc["url"], orthanc["user"], orthanc["password"])
    dicom = tmp_path / "dicom"
    a = write_study(dicom / "a", "PAT-A", 1, kernels=(["Br64d", "3"], ["Br40d", "3"]))
    write_study(dicom / "b", "PAT-B", 2, kernels=("B70f", "B70f", "B30f"))  # ambiguous
    client.store(sorted(p for p in dicom.rglob("*.dcm")))
    store, out = tmp_path / "v", tmp_path / "pairs.csv"
    for key, value in {"MSGAN_PACS_URL": orthanc["url"], "MSGAN_PACS_USER": orthanc["user"],
                       "MSGAN_PACS_PASSWORD": orthanc["password"]}.items():  # fmt: skip
        monkeypatch.setenv(key, value)

    args = ["--pacs", "--modality", "CT", "--source", SOURCE[0], "--target", TARGET[0], "--storage", store]
    assert cli(*args, "--dry-run", "--out", out) == 0
    printed = capsys.readouterr().out
    study = derived_uid("study", "PAT-A", "1")
    assert f"would fetch      study {study} series {a['Br64d']} (source, {SHAPE[0]} instances, train)" in printed
    assert f"series {a['Br40d']} (target, {SHAPE[0]} instances" in printed
    assert "ambiguous" in printed and "nothing fetched" in printed
    assert not store.exists() and not out.exists()  # fetched nothing, wrote nothing

    assert cli(*args, "--out", out) == 0
    got = rows(out)
    assert len(got) == 1 and got[0]["source"] == f"v/{study}/{a['Br64d']}.zarr"
    assert read_level(str(tmp_path / got[0]["target"]), 0)[0].shape == SHAPE
    assert orthanc["password"] not in capsys.readouterr().out

    again = fp.find_pairs(None, SOURCE, TARGET, client=client, modality="CT", storage_uri=str(store),
                          out=out, replace=True, log=lambda _: None)  # fmt: skip
    assert again.reused == 2 and again.ingested == 0  # the same instances: nothing fetched again


@pytest.mark.slow
def test_volumes_in_s3_are_named_by_their_uris_in_the_manifest(s3_bucket, tmp_path):
    dicom = tmp_path / "dicom"
    uids = write_study(dicom / "a", "PAT-A", 1)
    out = tmp_path / "pairs.csv"
    result = fp.find_pairs(dicom, SOURCE, TARGET, out=out, storage_uri=f"s3://{s3_bucket}/pairs", log=lambda _: None)
    study = derived_uid("study", "PAT-A", "1")
    assert rows(out)[0]["source"] == f"s3://{s3_bucket}/pairs/{study}/{uids['B70f']}.zarr"
    assert read_level(rows(out)[0]["target"], 0)[0].shape == SHAPE and result.ingested == 2
    again = fp.find_pairs(dicom, SOURCE, TARGET, out=out, storage_uri=f"s3://{s3_bucket}/pairs", replace=True,
                          log=lambda _: None)  # fmt: skip
    assert again.reused == 2 and again.ingested == 0


def test_only_the_searched_instances_reach_the_ingest(tmp_path):
    """A fetch that brings more than was asked (a PACS answering with another series' instances, a folder
    changed since it was read): the other series' files and unlisted instances are dropped before the ingest,
    so the volume written is this series alone, at its own place."""
    import pydicom

    dicom = tmp_path / "dicom"
    uids = write_study(dicom / "a", "PAT-A", 1)
    files = sorted((dicom / "a").iterdir())
    mine = [f for f in files if pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID == uids["B70f"]]
    listed = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in mine[:-1])
    series = fp.Series(study_uid="1.2.3", series_uid=uids["B70f"], frame_uid="", patient_id="", instances=listed)
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    for k, f in enumerate(files):  # every file of the study, both series
        shutil.copy(f, fetched / f"{k}.dcm")
    (fetched / "junk.txt").write_text("not dicom")
    fp._keep_own_instances(fetched, series)
    kept = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(fetched.iterdir())]
    assert len(kept) == len(listed) and {d.SeriesInstanceUID for d in kept} == {uids["B70f"]}
    assert sorted(str(d.SOPInstanceUID) for d in kept) == listed


def test_the_default_pseudonym_key_must_be_its_owners_alone(home):
    key = fp.pseudonym_key()
    assert len(key) == 32 and (home / "pseudonym.key").stat().st_mode & 0o777 == 0o600
    assert not [p for p in home.iterdir() if p.name.startswith(".pseudonym")]  # no temporary left
    assert fp.pseudonym_key() == key  # the same key on every run
    (home / "pseudonym.key").chmod(0o644)
    with pytest.raises(ValueError, match="must belong to you and be readable by you alone"):
        fp.pseudonym_key()
