"""Hostile pairs manifests: huge or binary CSVs, FIFOs and devices, symlink loops, formula cells, and remote manifests
that name this machine's files. Each is refused by name (CSV and row) or read as plain text, never evaluated,
never hanging."""

import os
import time

import numpy as np
import pytest

from msgan import storage
from msgan.data.pairs import MAX_CSV_BYTES, Pair, PairsError, check_pair, read_pairs
from msgan.io.volume import Geometry, write_volume


@pytest.fixture
def folder(tmp_path):
    for name in ("a.nii.gz", "b.nii.gz"):
        write_volume(tmp_path / name, np.zeros((4, 5, 6), np.float32), Geometry.identity(3))
    return tmp_path


def test_a_100_mb_csv_is_refused_before_it_is_read(folder):
    path = folder / "huge.csv"
    with open(path, "wb") as f:
        f.write(b"source,target\n")
        f.truncate(100 * 2**20)
    t0 = time.perf_counter()
    with pytest.raises(PairsError, match=rf"huge\.csv: {100 * 2**20} bytes, above the {MAX_CSV_BYTES}"):
        read_pairs(str(path))
    assert time.perf_counter() - t0 < 1.0


def test_a_fifo_or_a_device_as_the_csv_is_refused_without_blocking(folder):
    os.mkfifo(folder / "pipe.csv")
    with pytest.raises(PairsError, match=r"pipe\.csv: not a regular file"):
        read_pairs(str(folder / "pipe.csv"))
    with pytest.raises(PairsError, match=r"/dev/zero: not a regular file"):
        read_pairs("/dev/zero")


def test_a_fifo_or_a_device_as_a_side_is_a_problem_not_a_hang(folder):
    os.mkfifo(folder / "pipe.nii.gz")
    for side in (str(folder / "pipe.nii.gz"), "/dev/zero"):
        c = check_pair(Pair(2, str(folder / "a.nii.gz"), side))
        assert c.problems == (f"target unreadable ({side}: not a regular file or folder (a FIFO or device); refused)",)


def test_nul_bytes_and_invalid_utf8_are_refused_with_their_row(folder):
    (folder / "nul.csv").write_bytes(b"source,target\na.nii.gz,b.nii.gz\nb.nii.gz,a\x00.nii.gz\n")
    with pytest.raises(PairsError, match=r"nul\.csv row 3: a NUL byte"):
        read_pairs(str(folder / "nul.csv"))
    (folder / "latin1.csv").write_bytes(b"source,target\nk\xf6rper.nii.gz,b.nii.gz\n")
    with pytest.raises(PairsError, match=r"latin1\.csv row 2: not UTF-8 \(byte 0xf6\)"):
        read_pairs(str(folder / "latin1.csv"))


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ('"a\x1b[2J.nii.gz"', "row 2: source holds a control character"),
        ('"a.nii.gz\nb"', "row 2: source holds a control character"),  # a quoted newline inside a path
        ("x" * 5000, "row 2: source has 5000 characters"),
        ("y" * 200_000, "row 2: not a CSV line"),  # above the csv module's field limit
        ("http://example.org/a.nii.gz", "row 2: source 'http://example.org/a.nii.gz': only local paths and s3://"),
        ("s3://../x.zarr", "row 2: source 's3://../x.zarr' is not an s3://bucket/key URI"),
    ],
)
def test_odd_cells_are_refused_by_row(folder, cell, message):
    (folder / "p.csv").write_text(f"source,target\n{cell},b.nii.gz\n")
    with pytest.raises(PairsError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        read_pairs(str(folder / "p.csv"), check_files=False)


def test_formula_looking_cells_are_plain_paths_never_evaluated(folder):
    cells = ["=1+2", "@SUM(A1:A2)", "+cmd|' /C calc'!A0", "-2+3"]
    rows = "".join(f'"{c.replace(chr(34), chr(34) * 2)}",b.nii.gz,,"=HYPERLINK(1)"\n' for c in cells)
    (folder / "f.csv").write_text("source,target,split,patient\n" + rows)
    pairs = read_pairs(str(folder / "f.csv"), check_files=False)
    assert [p.source for p in pairs] == [str(folder / c) for c in cells]
    assert {p.patient for p in pairs} == {"=HYPERLINK(1)"}
    with pytest.raises(PairsError, match=r"f\.csv row 2: source .*=1\+2 does not exist"):
        read_pairs(str(folder / "f.csv"))


def test_local_paths_are_the_users_choice_dotdot_and_symlinks_included(folder):
    (folder / "lists").mkdir()
    os.symlink(folder / "b.nii.gz", folder / "lists" / "link.nii.gz")
    (folder / "lists" / "p.csv").write_text("source,target\n../a.nii.gz,link.nii.gz\n")
    (pair,) = read_pairs(str(folder / "lists" / "p.csv"))
    assert pair.source == str(folder / "a.nii.gz") and pair.target == str(folder / "lists" / "link.nii.gz")
    assert check_pair(pair).usable
    (folder / "lists" / "same.csv").write_text("source,target\nlink.nii.gz,../b.nii.gz\n")
    with pytest.raises(PairsError, match=r"same\.csv row 2: the source and the target are the same image"):
        read_pairs(str(folder / "lists" / "same.csv"))  # a symlink to the target is the target


def test_symlink_loops_are_missing_files_not_hangs(folder):
    os.symlink(folder / "loop1", folder / "loop2.nii.gz")
    os.symlink(folder / "loop2.nii.gz", folder / "loop1")
    (folder / "p.csv").write_text("source,target\na.nii.gz,loop2.nii.gz\n")
    with pytest.raises(PairsError, match=r"p\.csv row 2: target .*loop2\.nii\.gz does not exist"):
        read_pairs(str(folder / "p.csv"))
    (pair,) = read_pairs(str(folder / "p.csv"), check_files=False)
    assert check_pair(pair).problems[0].startswith("target unreadable (")
    os.symlink(folder / "loopcsv", folder / "loopcsv")
    with pytest.raises(PairsError, match=r"loopcsv"):
        read_pairs(str(folder / "loopcsv"))


@pytest.mark.slow
def test_a_remote_manifest_never_names_local_files(s3_bucket, folder):
    csv_uri = f"s3://{s3_bucket}/lists/pairs.csv"
    local = str(folder / "a.nii.gz")
    for cell in (local, f"file://{local}", "~/a.nii.gz", "../../escape.zarr", "/etc/passwd"):
        storage.write_text(csv_uri, f"source,target\ns3://{s3_bucket}/x.zarr,{cell}\n")
        with pytest.raises(PairsError, match=rf"{csv_uri} row 2: target '{cell}' (is a local path|leaves the bucket)"):
            read_pairs(csv_uri, check_files=False)
    storage.write_bytes(csv_uri, b"source,target\n" + b"x" * (MAX_CSV_BYTES + 1))
    with pytest.raises(PairsError, match=rf"{csv_uri}: {MAX_CSV_BYTES + 15} bytes, above the {MAX_CSV_BYTES}"):
        read_pairs(csv_uri)
