"""Hostile inputs, run as a user would (issue 19: nothing lost, nothing leaked, nothing exhausted).

    .venv/bin/python benchmarks/hostile_inputs.py                   # every case (~60), resumable
    .venv/bin/python benchmarks/hostile_inputs.py --cases zarr      # the cases whose name holds "zarr"
    .venv/bin/python benchmarks/hostile_inputs.py --list            # the cases, one a line

Each case builds its hostile input in a sandbox folder of its own (``<workdir>/cases/<name>/sandbox``,
the command's working directory), runs the ``msgan`` CLI (or ``jobs/translate_batch.py`` /
``jobs/translate_pacs_exports.py``) in a fresh process under a timeout and an RSS cap, and records:

- the outcome: ``refused`` (non-zero exit, a message on stderr naming the hostile input, no traceback
  and no "unexpected error" line) or ``handled`` (exit 0 and a case-specific check); a case expects one
  of them (a few accept either);
- wall seconds and the peak RSS of the command's whole process tree (psutil, every ~20 ms; the tree is
  killed above ``--rss-cap-mib`` and after ``--timeout`` seconds, both failures);
- files touched outside the case's declared output(s): (path, size, mtime_ns, inode) of the sandbox, of
  the case's ``precious`` folder (what a symlink points at, files beside the inputs) and of the shared
  inputs (models, phantoms) before and after; ``.staging``/``.leases`` left beside an output count;
- secrets found: every command runs with fake secrets in its environment (PACS user/password, AWS,
  MLflow, Ray token); stdout, stderr and every file in the sandbox are searched for each one, plain,
  percent-encoded and base64 (alone, and ``user:password``).

A case passes when its outcome is the expected one, nothing outside its output was touched, no secret
was found and no marker file of a malicious pickle exists. Each record is appended to
``docs/results/hostile_inputs.json`` as the case finishes; a rerun skips the cases already recorded for
the same code (git HEAD plus a hash of uncommitted changes under msgan/ and jobs/) unless ``--fresh``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import hashlib
import http.server
import json
import os
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "hostile_inputs.json"
VENV_PY = ROOT / ".venv" / "bin" / "python"
PY = str(VENV_PY) if VENV_PY.exists() else sys.executable
MSGAN = (
    [str(ROOT / ".venv" / "bin" / "msgan")] if (ROOT / ".venv" / "bin" / "msgan").exists() else [PY, "-m", "msgan.cli"]
)
BATCH_JOB = [PY, str(ROOT / "jobs" / "translate_batch.py")]
PACS_JOB = [PY, str(ROOT / "jobs" / "translate_pacs_exports.py")]

PACS_USER = "hx-pacs-user-7Q4e"
SECRETS = {
    "MSGAN_PACS_USER": PACS_USER,
    "MSGAN_PACS_PASSWORD": "hx:Pw/7Q4e@b%Z+r&s",
    "AWS_SECRET_ACCESS_KEY": "hxAWS7Q4eSecretKq9Zr2LmNp0VwYt6KdJf3HsUc",
    "MLFLOW_TRACKING_PASSWORD": "hx-mlflow-7Q4e-Vq8Lr",
    "RAY_AUTH_TOKEN": "hx-ray-token-7Q4e-Zk3Mw9Pq",
}
CRASH_HINTS = ("Traceback (most recent call last)", "--verbose shows the traceback", "--verbose for the traceback")

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_2000 = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"


# ----------------------------------------------------------------------------- cases


@dataclass
class Ctx:
    """Where a case lives: ``sandbox`` (the command's cwd), ``precious`` (must stay untouched), ``shared``."""

    name: str
    sandbox: Path
    precious: Path
    shared: Path
    server: str  # http://127.0.0.1:PORT of the loopback PACS
    before_out: tuple[int, int] | None = None  # (inode, mtime_ns) of the output's manifest/file after setup
    before_count: int = 0  # .dcm files in the output folder after setup

    def p(self, rel: str) -> Path:
        return self.sandbox / rel

    @property
    def model_a(self) -> str:
        return str(self.shared / "modelA")

    @property
    def model_b(self) -> str:
        return str(self.shared / "modelB")

    @property
    def ph_zarr(self) -> str:
        return str(self.shared / "ph.zarr")

    @property
    def ph_nii(self) -> str:
        return str(self.shared / "ph.nii.gz")


@dataclass
class Run:
    argv: list[str]
    rc: int | None
    wall: float
    peak_rss: int
    stdout: str
    stderr: str
    killed: str | None = None


Check = Callable[[Ctx, list[Run]], str | None]


@dataclass
class Plan:
    commands: list[list[str]]  # run in order (measured) until one exits non-zero
    outputs: list[str]  # declared outputs, relative to the sandbox: changes there are the case's business
    needles: list[str]  # a refusal names the hostile input: one of these appears on stderr
    setup: list[list[str]] = field(default_factory=list)  # before the snapshot; each must exit 0
    check: Check | None = None  # for exit 0: None when the result is right, else why not
    keep: list[str] = field(default_factory=list)  # sandbox paths whose content must not change
    markers: list[str] = field(default_factory=list)  # sandbox paths that must not exist afterwards
    env: dict[str, str | None] = field(default_factory=dict)  # None removes the variable
    interrupt: list[str] | None = None  # started and killed with SIGKILL (process group) before commands
    timeout_factor: float = 1.0
    generic_error_ok: bool = False  # a failing server, not a bad file: the generic one-line error path is fine
    report_on_stdout: bool = False  # a batch job reports a failed volume in its summary (stdout)


@dataclass
class Case:
    name: str
    group: str
    expect: str  # refused | handled | either
    what: str
    build: Callable[[Ctx], Plan]


CASES: list[Case] = []


def case(name: str, group: str, expect: str, what: str) -> Callable[[Callable[[Ctx], Plan]], Callable[[Ctx], Plan]]:
    def deco(fn: Callable[[Ctx], Plan]) -> Callable[[Ctx], Plan]:
        CASES.append(Case(name, group, expect, what, fn))
        return fn

    return deco


def translate(src: str, out: str, model: str, *extra: str) -> list[str]:
    return [*MSGAN, "translate", src, out, "--model", model, "--quiet", *extra]


# -- checks for "handled"


def has_files(*rels: str) -> Check:
    def check(ctx: Ctx, runs: list[Run]) -> str | None:
        missing = [r for r in rels if not ctx.p(r).exists()]
        return f"missing after exit 0: {', '.join(missing)}" if missing else None

    return check


def readable_volume(rel: str) -> Check:
    def check(ctx: Ctx, runs: list[Run]) -> str | None:
        import SimpleITK as sitk

        try:
            img = sitk.ReadImage(str(ctx.p(rel)))
        except RuntimeError as err:
            return f"{rel} unreadable: {str(err).strip().splitlines()[-1]}"
        a = sitk.GetArrayViewFromImage(img)
        return None if np.isfinite(a).all() else f"{rel} holds non-finite values"

    return check


def manifest_of(ctx: Ctx, rel: str) -> dict[str, Any] | None:
    try:
        return json.loads((ctx.p(rel) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


# -- builders of inputs


def plain_folder(path: Path, text: str = "my notes: do not delete\n") -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text(text)


def copy_zarr(ctx: Ctx, rel: str, src: str | None = None) -> Path:
    dest = ctx.p(rel)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src or ctx.ph_zarr, dest)
    return dest


def level0_chunk(zarr_dir: Path) -> Path:
    found = sorted(p for p in (zarr_dir / "0" / "c").rglob("*") if p.is_file())
    return found[0]


def edit_array_json(zarr_dir: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    meta_path = zarr_dir / "0" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    fn(meta)
    meta_path.write_text(json.dumps(meta, indent=2))


def big_zarr(ctx: Ctx, rel: str, shape: tuple[int, ...], chunks: tuple[int, ...], write_one: bool) -> Path:
    """A copy of the phantom whose level 0 declares ``shape`` (chunks ``chunks``); at most one chunk stored."""
    import zarr

    dest = copy_zarr(ctx, rel)
    shutil.rmtree(dest / "0")
    arr = zarr.create_array(
        store=str(dest / "0"), shape=shape, chunks=chunks, dtype="float32", fill_value=0.0,
        dimension_names=["z", "y", "x"],
    )  # fmt: skip
    if write_one:
        src = np.asarray(zarr.open_array(str(Path(ctx.ph_zarr) / "0"), mode="r")[...])
        block = np.tile(src, [max(1, c // s) for c, s in zip(chunks, src.shape, strict=True)])
        c = tuple(min(a, b) for a, b in zip(chunks, block.shape, strict=True))
        arr[: c[0], : c[1], : c[2]] = block[: c[0], : c[1], : c[2]]
    return dest


def sitk_copy(ctx: Ctx, rel: str, edit: Callable[[np.ndarray], None] | None = None) -> Path:
    import SimpleITK as sitk

    img = sitk.ReadImage(ctx.ph_nii)
    a = sitk.GetArrayFromImage(img).astype(np.float32)
    if edit is not None:
        edit(a)
    out = sitk.GetImageFromArray(a)
    out.CopyInformation(img)
    dest = ctx.p(rel)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(out, str(dest))
    return dest


def nifti_header(shape: tuple[int, int, int], datatype: int = 16, bitpix: int = 32) -> bytes:
    """A NIfTI-1 single-file header (348 bytes) plus the 4-byte extension flag; data starts at 352."""
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, *shape, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, datatype, bitpix)
    struct.pack_into("<8f", hdr, 76, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", hdr, 108, 352.0)  # vox_offset
    struct.pack_into("<f", hdr, 112, 1.0)  # scl_slope
    struct.pack_into("<hh", hdr, 252, 1, 0)  # qform_code scanner, sform_code 0
    struct.pack_into("<4f", hdr, 256, 0.0, 0.0, 0.0, 1.0)  # quatern b, c, d = 0 (identity)
    hdr[344:348] = b"n+1\0"
    return bytes(hdr) + b"\0\0\0\0"


def mha(ctx: Ctx, rel: str, data_file: str, dims: tuple[int, int, int]) -> Path:
    dest = ctx.p(rel)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"DimSize = {dims[2]} {dims[1]} {dims[0]}\nElementSpacing = 1 1 1\nOffset = 0 0 0\n"
        f"ElementType = MET_FLOAT\nElementDataFile = {data_file}\n"
    )
    return dest


def _uid(*parts: object) -> str:
    digest = int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:30], 16)
    return f"2.25.{digest}"


def dicom_file(
    path: Path,
    *,
    k: int = 0,
    series_uid: str | None = None,
    patient_id: str = "HX-0001",
    sop_class: str = CT,
    modality: str = "CT",
    ts: str = EXPLICIT_LE,
    rows: int = 32,
    cols: int = 32,
    bits: int = 16,
    pixel_data: bytes | None = None,
    frames: int | None = None,
    pad: int = 0,
) -> None:
    """One DICOM file; defaults give slice ``k`` of a clean 32x32 CT series (int16 HU)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset

    series = series_uid or _uid("series", path.parent.name)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = _uid("sop", path, k)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.PatientName = modality, patient_id, "Hostile^Input"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid("study", path.parent.name), series
    ds.FrameOfReferenceUID = _uid("for", path.parent.name)
    ds.StudyDate, ds.StudyTime, ds.SeriesNumber, ds.InstanceNumber = "20261101", "101500", 3, k + 1
    ds.SeriesDescription, ds.ImageType = "HOSTILE", ["ORIGINAL", "PRIMARY", "AXIAL"]
    if modality == "DX":
        ds.ImagerPixelSpacing, ds.PixelSpacing = [0.1, 0.1], [0.1, 0.1]
        ds.PresentationIntentType = "FOR PRESENTATION"
    else:
        ds.ImagePositionPatient = [-12.8, -12.8, 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 2.5
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 1 if bits == 16 and ts == EXPLICIT_LE else 0
    if frames is not None:
        ds.NumberOfFrames = frames
    if pixel_data is None:
        rng = np.random.default_rng(k)
        pixel_data = rng.integers(-1000, 1000, size=(rows, cols), dtype=np.int16).tobytes()
    ds.PixelData = pixel_data
    if ts == EXPLICIT_LE:
        ds["PixelData"].VR = "OW" if bits > 8 else "OB"
    else:
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    if pad:
        ds.private_block(0x0009, "HOSTILE", create=True).add_new(0x01, "OB", b"\0" * pad)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the hostile values: they are the point
        ds.save_as(path, enforce_file_format=True)


def dicom_series(folder: Path, n: int = 8, **kw: Any) -> list[Path]:
    files = [folder / f"slice_{k:03d}.dcm" for k in range(n)]
    for k, f in enumerate(files):
        dicom_file(f, k=k, **kw)
    return files


def bomb_fragment(ts: str) -> bytes:
    from pydicom.encaps import encapsulate

    frag = {
        JPEG_BASELINE: b"\xff\xd8\xff\xd9",  # SOI EOI
        JPEG_2000: b"\xff\x4f\xff\x51",  # SOC SIZ
        RLE: struct.pack("<16L", 1, 64, *([0] * 14)) + b"\x00\x00",  # one segment, one literal byte
    }[ts]
    return encapsulate([frag])


def model_copy(ctx: Ctx, rel: str) -> tuple[Path, dict[str, Any]]:
    dest = ctx.p(rel)
    shutil.copytree(ctx.model_a, dest)
    return dest, json.loads((dest / "manifest.json").read_text())


def write_manifest(model: Path, manifest: dict[str, Any]) -> None:
    (model / "manifest.json").write_text(json.dumps(manifest, indent=2))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- controls (the harness works)


@case("control-translate-zarr", "control", "handled", "a clean zarr -> zarr translation (harness check)")
def _control_zarr(ctx: Ctx) -> Plan:
    return Plan([translate(ctx.ph_zarr, "out.zarr", ctx.model_a)], ["out.zarr"], ["out.zarr"],
                check=has_files("out.zarr/manifest.json"))  # fmt: skip


@case("control-translate-nifti", "control", "handled", "a clean NIfTI -> NIfTI translation (harness check)")
def _control_nifti(ctx: Ctx) -> Plan:
    return Plan([translate(ctx.ph_nii, "out.nii.gz", ctx.model_a)], ["out.nii.gz"], ["out.nii.gz"],
                check=readable_volume("out.nii.gz"))  # fmt: skip


@case("control-dicom-ingest", "control", "handled", "a clean 8-slice CT series ingested (harness check)")
def _control_dicom(ctx: Ctx) -> Plan:
    dicom_series(ctx.p("ct_series"))
    return Plan([[*MSGAN, "ingest", "ct_series", "vol.zarr"]], ["vol.zarr"], ["ct_series"],
                check=has_files("vol.zarr/zarr.json"))  # fmt: skip


# ----------------------------------------------------------------------------- outputs


@case("out-plain-folder-zarr", "outputs", "refused", "translate into plain.zarr, a folder holding notes.txt")
def _plain_zarr(ctx: Ctx) -> Plan:
    plain_folder(ctx.p("plain.zarr"))
    return Plan([translate(ctx.ph_zarr, "plain.zarr", ctx.model_a)], ["plain.zarr"], ["plain.zarr"],
                keep=["plain.zarr/notes.txt"])  # fmt: skip


@case("out-plain-folder-from-nifti", "outputs", "refused", "NIfTI input translated into plain.zarr holding notes.txt")
def _plain_zarr_nifti(ctx: Ctx) -> Plan:
    plain_folder(ctx.p("plain.zarr"))
    return Plan([translate(ctx.ph_nii, "plain.zarr", ctx.model_a)], ["plain.zarr"], ["plain.zarr"],
                keep=["plain.zarr/notes.txt"])  # fmt: skip


@case("out-symlink-elsewhere", "outputs", "refused", "output out.zarr is a symlink to a folder elsewhere")
def _symlink_out(ctx: Ctx) -> Plan:
    plain_folder(ctx.precious / "elsewhere")
    ctx.p("out.zarr").symlink_to(ctx.precious / "elsewhere")
    return Plan([translate(ctx.ph_zarr, "out.zarr", ctx.model_a)], ["out.zarr"], ["out.zarr", "elsewhere"])


@case("out-self", "outputs", "refused", "translate self.zarr self.zarr")
def _self(ctx: Ctx) -> Plan:
    copy_zarr(ctx, "self.zarr")
    return Plan([translate("self.zarr", "self.zarr", ctx.model_a)], ["self.zarr"], ["self.zarr"], keep=["self.zarr"])


@case("out-nifti-exists", "outputs", "refused", "NIfTI output that exists (not msgan's), no --replace")
def _nifti_exists(ctx: Ctx) -> Plan:
    sitk_copy(ctx, "out.nii.gz")
    return Plan([translate(ctx.ph_nii, "out.nii.gz", ctx.model_a)], ["out.nii.gz"], ["out.nii.gz"],
                keep=["out.nii.gz"])  # fmt: skip


@case("out-nifti-replace", "outputs", "handled", "NIfTI output msgan published, translated again with --replace")
def _nifti_replace(ctx: Ctx) -> Plan:
    def replaced(c: Ctx, runs: list[Run]) -> str | None:
        st = c.p("out.nii.gz").stat()
        if (st.st_ino, st.st_mtime_ns) == c.before_out:
            return "out.nii.gz not rewritten"
        return readable_volume("out.nii.gz")(c, runs)

    return Plan(
        [translate(ctx.ph_nii, "out.nii.gz", ctx.model_b, "--replace")], ["out.nii.gz"], ["out.nii.gz"],
        setup=[translate(ctx.ph_nii, "out.nii.gz", ctx.model_a)], check=replaced,
    )  # fmt: skip


@case("out-rerun-other-model", "outputs", "refused", "our published output, another model without --replace")
def _rerun_other_no_flag(ctx: Ctx) -> Plan:
    return Plan([translate(ctx.ph_zarr, "out.zarr", ctx.model_b)], [], ["out.zarr"],
                setup=[translate(ctx.ph_zarr, "out.zarr", ctx.model_a)], keep=["out.zarr"])  # fmt: skip


@case("out-rerun-other-model-replace", "outputs", "handled", "our published output, another model with --replace")
def _rerun_other(ctx: Ctx) -> Plan:
    def retranslated(c: Ctx, runs: list[Run]) -> str | None:
        m = manifest_of(c, "out.zarr")
        if m is None or not str(m.get("model", "")).startswith("modelB/"):
            return f"manifest model {m and m.get('model')!r}, expected modelB/..."
        return None if "re-translated" in runs[-1].stdout else "stdout does not say re-translated"

    return Plan([translate(ctx.ph_zarr, "out.zarr", ctx.model_b, "--replace")], ["out.zarr"], ["out.zarr"],
                setup=[translate(ctx.ph_zarr, "out.zarr", ctx.model_a)], check=retranslated)  # fmt: skip


@case("out-rerun-same-model", "outputs", "handled", "our published output, same model again: skipped")
def _rerun_same(ctx: Ctx) -> Plan:
    def skipped(c: Ctx, runs: list[Run]) -> str | None:
        st = (c.p("out.zarr") / "manifest.json").stat()
        if (st.st_ino, st.st_mtime_ns) != c.before_out:
            return "out.zarr was rewritten (expected: skipped)"
        return None

    return Plan([translate(ctx.ph_zarr, "out.zarr", ctx.model_a)], ["out.zarr"], ["out.zarr"],
                setup=[translate(ctx.ph_zarr, "out.zarr", ctx.model_a)], check=skipped)  # fmt: skip


@case("export-into-other-series", "outputs", "refused", "export DICOM into a folder holding another series")
def _export_other(ctx: Ctx) -> Plan:
    dicom_file(ctx.p("dcm_out/other.dcm"), series_uid=_uid("other-series"))
    return Plan([[*MSGAN, "export", ctx.ph_zarr, "dcm_out"]], ["dcm_out"], ["dcm_out"], keep=["dcm_out/other.dcm"])


@case("export-twice", "outputs", "refused", "export DICOM twice into one folder, no --replace")
def _export_twice(ctx: Ctx) -> Plan:
    cmd = [*MSGAN, "export", ctx.ph_zarr, "dcm_out"]
    return Plan([cmd], ["dcm_out"], ["dcm_out"], setup=[cmd], keep=["dcm_out"])


@case("export-twice-replace", "outputs", "handled", "export DICOM twice into one folder with --replace")
def _export_replace(ctx: Ctx) -> Plan:
    cmd = [*MSGAN, "export", ctx.ph_zarr, "dcm_out"]

    def same_count(c: Ctx, runs: list[Run]) -> str | None:
        n = len(list(c.p("dcm_out").rglob("*.dcm")))
        return None if n == c.before_count else f"{n} .dcm files after --replace, {c.before_count} before"

    return Plan([[*cmd, "--replace"]], ["dcm_out"], ["dcm_out"], setup=[cmd], check=same_count)


@case("ingest-into-folder-with-files", "outputs", "refused", "ingest into dest.zarr, a folder holding notes.txt")
def _ingest_plain(ctx: Ctx) -> Plan:
    plain_folder(ctx.p("dest.zarr"))
    return Plan([[*MSGAN, "ingest", ctx.ph_nii, "dest.zarr"]], ["dest.zarr"], ["dest.zarr"],
                keep=["dest.zarr/notes.txt"])  # fmt: skip


@case("ingest-twice", "outputs", "refused", "ingest into an existing msgan volume, no --replace")
def _ingest_twice(ctx: Ctx) -> Plan:
    cmd = [*MSGAN, "ingest", ctx.ph_nii, "vol.zarr"]
    return Plan([cmd], ["vol.zarr"], ["vol.zarr"], setup=[cmd], keep=["vol.zarr"])


@case("ingest-twice-replace", "outputs", "handled", "ingest into an existing msgan volume with --replace")
def _ingest_replace(ctx: Ctx) -> Plan:
    cmd = [*MSGAN, "ingest", ctx.ph_nii, "vol.zarr"]
    return Plan([[*cmd, "--replace"]], ["vol.zarr"], ["vol.zarr"], setup=[cmd], check=has_files("vol.zarr/zarr.json"))


@case("out-kill9-rerun", "outputs", "handled", "kill -9 a running translate; the rerun succeeds, no leftovers")
def _kill9(ctx: Ctx) -> Plan:
    ctx.p("out").mkdir()

    def clean(c: Ctx, runs: list[Run]) -> str | None:
        if not (c.p("out/kill.zarr") / "manifest.json").exists():
            return "out/kill.zarr has no manifest.json"
        left = sorted(p.name for p in c.p("out").iterdir() if p.name != "kill.zarr")
        return f"left beside the output: {', '.join(left)}" if left else None

    src = str(ctx.shared / "ph96.zarr")
    return Plan(
        [translate(src, "out/kill.zarr", ctx.model_a)], ["out/kill.zarr"], ["kill.zarr"],
        interrupt=translate(src, "out/kill.zarr", ctx.model_a, "--tile", "8"), check=clean, timeout_factor=2,
    )  # fmt: skip


@case(
    "batch-out-plain-folder", "outputs", "refused", "translate_batch.py whose output <prefix>/ph.zarr is a plain folder"
)
def _batch_plain(ctx: Ctx) -> Plan:
    plain_folder(ctx.p("batch_out/ph.zarr"))
    cmd = [*BATCH_JOB, "--model", ctx.model_a, "--inputs", ctx.ph_zarr, "--output", "batch_out"]
    return Plan([cmd], ["batch_out"], ["ph.zarr", "batch_out"], keep=["batch_out/ph.zarr/notes.txt"],
                env={"RAY_ADDRESS": None}, timeout_factor=3, report_on_stdout=True)  # fmt: skip


# ----------------------------------------------------------------------------- memory bombs


def _dicom_bomb(ctx: Ctx, folder: str, n: int, **kw: Any) -> Plan:
    for k in range(n):
        dicom_file(ctx.p(f"{folder}/bomb_{k}.dcm"), k=k, pad=11500, **kw)
    return Plan([[*MSGAN, "ingest", folder, "vol.zarr"]], ["vol.zarr"], [folder, "bomb_0.dcm"])


@case("dicom-jpeg-65535", "memory", "refused", "two 12 KB CT files declaring 65535^2 JPEG Baseline")
def _bomb_jpeg(ctx: Ctx) -> Plan:
    return _dicom_bomb(ctx, "jpeg_bomb", 2, ts=JPEG_BASELINE, rows=65535, cols=65535, bits=8,
                       pixel_data=bomb_fragment(JPEG_BASELINE))  # fmt: skip


@case("dicom-dx-jpeg-65535", "memory", "refused", "a 12 KB DX radiograph declaring 65535^2 JPEG Baseline")
def _bomb_dx(ctx: Ctx) -> Plan:
    return _dicom_bomb(ctx, "dx_bomb", 1, ts=JPEG_BASELINE, rows=65535, cols=65535, bits=8, sop_class=DX,
                       modality="DX", pixel_data=bomb_fragment(JPEG_BASELINE))  # fmt: skip


@case("dicom-j2k-65535", "memory", "refused", "two 12 KB CT files declaring 65535^2 JPEG 2000")
def _bomb_j2k(ctx: Ctx) -> Plan:
    return _dicom_bomb(ctx, "j2k_bomb", 2, ts=JPEG_2000, rows=65535, cols=65535, bits=16,
                       pixel_data=bomb_fragment(JPEG_2000))  # fmt: skip


@case("dicom-rle-65535", "memory", "refused", "two 12 KB CT files declaring 65535^2 RLE")
def _bomb_rle(ctx: Ctx) -> Plan:
    return _dicom_bomb(ctx, "rle_bomb", 2, ts=RLE, rows=65535, cols=65535, bits=8, pixel_data=bomb_fragment(RLE))


@case("dicom-frames-65535x100000", "memory", "refused", "uncompressed Enhanced CT declaring 65535^2 x 100000 frames")
def _bomb_frames(ctx: Ctx) -> Plan:
    return _dicom_bomb(ctx, "frames_bomb", 1, rows=65535, cols=65535, frames=100000, sop_class=ENHANCED_CT,
                       pixel_data=b"\0" * 4)  # fmt: skip


@case("zarr-declared-100000^3", "memory", "refused", "zarr declaring 100000^3 (chunks 64), one chunk stored")
def _zarr_huge(ctx: Ctx) -> Plan:
    big_zarr(ctx, "huge.zarr", (100000,) * 3, (64,) * 3, write_one=True)
    return Plan([translate("huge.zarr", "out.zarr", ctx.model_a)], ["out.zarr"], ["huge.zarr"])


@case("zarr-one-huge-chunk", "memory", "refused", "zarr declaring 100000^3 in one 100000^3 chunk")
def _zarr_huge_chunk(ctx: Ctx) -> Plan:
    big_zarr(ctx, "hugechunk.zarr", (100000,) * 3, (100000,) * 3, write_one=False)
    return Plan([translate("hugechunk.zarr", "out.zarr", ctx.model_a)], ["out.zarr"], ["hugechunk.zarr"])


@case("zarr-1500^3-export-nifti", "memory", "refused", "1500^3 zarr with one stored chunk -> export --format nifti")
def _zarr_1500_export(ctx: Ctx) -> Plan:
    big_zarr(ctx, "big.zarr", (1500,) * 3, (64,) * 3, write_one=True)
    return Plan([[*MSGAN, "export", "big.zarr", "big.nii.gz", "--format", "nifti"]], ["big.nii.gz"], ["big.zarr"])


@case("zarr-1500^3-ingest", "memory", "refused", "1500^3 zarr with one stored chunk -> ingest")
def _zarr_1500_ingest(ctx: Ctx) -> Plan:
    big_zarr(ctx, "big.zarr", (1500,) * 3, (64,) * 3, write_one=True)
    return Plan([[*MSGAN, "ingest", "big.zarr", "vol.zarr"]], ["vol.zarr"], ["big.zarr"])


@case("zarr-1500^3-translate-nifti", "memory", "refused", "1500^3 zarr with one stored chunk -> translate to .nii.gz")
def _zarr_1500_translate(ctx: Ctx) -> Plan:
    big_zarr(ctx, "big.zarr", (1500,) * 3, (64,) * 3, write_one=True)
    return Plan([translate("big.zarr", "out.nii.gz", ctx.model_a)], ["out.nii.gz"], ["big.zarr"])


@case("zarr-chunk-shape-0", "memory", "refused", "zarr.json with chunk_shape [0, 0, 0]")
def _zarr_chunk0(ctx: Ctx) -> Plan:
    dest = copy_zarr(ctx, "chunk0.zarr")

    def zero(meta: dict[str, Any]) -> None:
        meta["chunk_grid"]["configuration"]["chunk_shape"] = [0, 0, 0]

    edit_array_json(dest, zero)
    return Plan([translate("chunk0.zarr", "out.zarr", ctx.model_a)], ["out.zarr"], ["chunk0.zarr"])


@case("nifti-header-4000^3", "memory", "refused", "a 1 KB NIfTI whose header declares 4000^3 float32")
def _nifti_huge(ctx: Ctx) -> Plan:
    ctx.p("huge.nii").write_bytes(nifti_header((4000, 4000, 4000)) + b"\0" * 1024)
    return Plan([translate("huge.nii", "out.nii.gz", ctx.model_a)], ["out.nii.gz"], ["huge.nii"])


@case("nifti-gz-header-4000^3", "memory", "refused", "a gzipped NIfTI whose header declares 4000^3 float32")
def _nifti_gz_huge(ctx: Ctx) -> Plan:
    ctx.p("huge.nii.gz").write_bytes(gzip.compress(nifti_header((4000, 4000, 4000)) + b"\0" * 1024))
    return Plan([[*MSGAN, "ingest", "huge.nii.gz", "vol.zarr"]], ["vol.zarr"], ["huge.nii.gz"])


@case("mha-data-dev-zero", "memory", "refused", "MHA (1024^3 float) whose ElementDataFile is /dev/zero")
def _mha_zero(ctx: Ctx) -> Plan:
    mha(ctx, "zero.mha", "/dev/zero", (1024, 1024, 1024))
    return Plan([[*MSGAN, "ingest", "zero.mha", "vol.zarr"]], ["vol.zarr"], ["zero.mha"])


@case("mha-data-outside", "memory", "refused", "MHA whose ElementDataFile is ../outside.raw")
def _mha_outside(ctx: Ctx) -> Plan:
    ctx.p("outside.raw").write_bytes(np.zeros((32, 32, 32), np.float32).tobytes())
    mha(ctx, "in/x.mha", "../outside.raw", (32, 32, 32))
    return Plan([translate("in/x.mha", "out.nii.gz", ctx.model_a)], ["out.nii.gz"], ["x.mha", "outside.raw"])


def _zarr_bad_chunk(ctx: Ctx, rel: str, make: Callable[[Path], None]) -> Plan:
    dest = copy_zarr(ctx, rel)
    chunk = level0_chunk(dest)
    chunk.unlink()
    make(chunk)
    return Plan([translate(rel, "out.zarr", ctx.model_a)], ["out.zarr"], [rel])


@case("zarr-chunk-symlink-outside", "memory", "refused", "a zarr chunk that is a symlink to a file outside the store")
def _chunk_symlink(ctx: Ctx) -> Plan:
    outside = ctx.precious / "outside_chunk"
    outside.write_bytes(level0_chunk(Path(ctx.ph_zarr)).read_bytes())
    return _zarr_bad_chunk(ctx, "link.zarr", lambda c: c.symlink_to(outside))


@case("zarr-chunk-fifo", "memory", "refused", "a zarr chunk that is a FIFO (must not hang)")
def _chunk_fifo(ctx: Ctx) -> Plan:
    return _zarr_bad_chunk(ctx, "fifo.zarr", lambda c: os.mkfifo(c))


@case("zarr-chunk-dev-zero", "memory", "refused", "a zarr chunk that is a symlink to /dev/zero")
def _chunk_zero(ctx: Ctx) -> Plan:
    return _zarr_bad_chunk(ctx, "zero.zarr", lambda c: c.symlink_to("/dev/zero"))


# ----------------------------------------------------------------------------- bad values


@case("nan-nifti", "values", "refused", "NIfTI input with a NaN voxel")
def _nan_nifti(ctx: Ctx) -> Plan:
    sitk_copy(ctx, "nan.nii.gz", lambda a: a.__setitem__((5, 6, 7), np.nan))
    return Plan([translate("nan.nii.gz", "out.nii.gz", ctx.model_a)], ["out.nii.gz"], ["nan.nii.gz"])


@case("nan-mha", "values", "refused", "MHA input with a NaN voxel")
def _nan_mha(ctx: Ctx) -> Plan:
    sitk_copy(ctx, "nan.mha", lambda a: a.__setitem__((5, 6, 7), np.nan))
    return Plan([translate("nan.mha", "out.mha", ctx.model_a)], ["out.mha"], ["nan.mha"])


@case("inf-zarr", "values", "refused", "zarr input with an inf voxel")
def _inf_zarr(ctx: Ctx) -> Plan:
    import zarr

    dest = copy_zarr(ctx, "inf.zarr")
    arr = zarr.open_array(str(dest / "0"), mode="r+")
    arr[5, 6, 7] = np.inf
    return Plan([translate("inf.zarr", "out.zarr", ctx.model_a)], ["out.zarr"], ["inf.zarr"])


@case("zarr-truncated-chunk", "values", "refused", "a zarr chunk cut to half its bytes")
def _chunk_truncated(ctx: Ctx) -> Plan:
    def cut(c: Path) -> None:
        data = level0_chunk(Path(ctx.ph_zarr)).read_bytes()
        c.write_bytes(data[: len(data) // 2])

    return _zarr_bad_chunk(ctx, "trunc.zarr", cut)


@case("zarr-garbage-chunk", "values", "refused", "a zarr chunk of random bytes")
def _chunk_garbage(ctx: Ctx) -> Plan:
    size = level0_chunk(Path(ctx.ph_zarr)).stat().st_size
    return _zarr_bad_chunk(ctx, "garbage.zarr", lambda c: c.write_bytes(np.random.default_rng(0).bytes(size)))


def _dicom_ids(ctx: Ctx, folder: str, **kw: Any) -> Plan:
    """A series with a hostile identifier: refused at ingest or at export, never truncated."""
    dicom_series(ctx.p(folder), **kw)
    return Plan(
        [[*MSGAN, "ingest", folder, "vol.zarr"], [*MSGAN, "export", "vol.zarr", "dcm_out"]],
        ["vol.zarr", "dcm_out"], [folder, "slice_000.dcm", "vol.zarr"],
    )  # fmt: skip


@case("dicom-patientid-10000", "values", "refused", "PatientID of 10,000 characters (ingest, then export)")
def _pid_long(ctx: Ctx) -> Plan:
    return _dicom_ids(ctx, "pid_long", patient_id="P" * 10000)


@case("dicom-patientid-nul", "values", "refused", "PatientID with a NUL inside (ingest, then export)")
def _pid_nul(ctx: Ctx) -> Plan:
    return _dicom_ids(ctx, "pid_nul", patient_id="HX\x00EVIL")


def _dicom_uid(ctx: Ctx, folder: str, uid: str) -> Plan:
    dicom_series(ctx.p(folder), series_uid=uid)
    return Plan([[*MSGAN, "ingest", folder, "vols"]], ["vols"], [folder, "slice_000.dcm"])


@case("dicom-uid-dotdot", "values", "refused", "SeriesInstanceUID '../../escaped', ingested into a folder")
def _uid_dotdot(ctx: Ctx) -> Plan:
    return _dicom_uid(ctx, "uid_dotdot", "../../escaped")


@case("dicom-uid-absolute", "values", "refused", "SeriesInstanceUID an absolute path (into precious/)")
def _uid_abs(ctx: Ctx) -> Plan:
    return _dicom_uid(ctx, "uid_abs", str(ctx.precious / "escaped"))


@case("dicom-uid-nul", "values", "refused", "SeriesInstanceUID with a NUL inside")
def _uid_nul(ctx: Ctx) -> Plan:
    return _dicom_uid(ctx, "uid_nul", "1.2.840.99\x00.1")


@case("dicom-uid-10000", "values", "refused", "SeriesInstanceUID of 10,000 characters")
def _uid_long(ctx: Ctx) -> Plan:
    return _dicom_uid(ctx, "uid_long", "1" + ".2" * 4999 + "3")


def _dicomdir(folder: Path) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.file_meta.MediaStorageSOPInstanceUID = _uid("dicomdir", folder)
    ds.FileSetID = "HOSTILE"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    rec = pydicom.Dataset()
    rec.OffsetOfTheNextDirectoryRecord, rec.RecordInUseFlag = 0, 0xFFFF
    rec.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec.DirectoryRecordType, rec.ReferencedFileID = "IMAGE", ["..", "..", "etc", "passwd"]
    ds.DirectoryRecordSequence = [rec]
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # '..' is no valid CS value: that is the point
        ds.save_as(folder / "DICOMDIR", enforce_file_format=True)


@case("dicomdir-only", "values", "refused", "a folder holding only a DICOMDIR (referencing ../../etc/passwd)")
def _dicomdir_only(ctx: Ctx) -> Plan:
    _dicomdir(ctx.p("dicomdir_only"))
    return Plan([[*MSGAN, "ingest", "dicomdir_only", "vol.zarr"]], ["vol.zarr"], ["dicomdir_only", "DICOMDIR"])


@case("dicomdir-beside-series", "values", "handled", "a DICOMDIR beside a clean series: the series is ingested")
def _dicomdir_series(ctx: Ctx) -> Plan:
    dicom_series(ctx.p("with_dicomdir"))
    _dicomdir(ctx.p("with_dicomdir"))
    return Plan([[*MSGAN, "ingest", "with_dicomdir", "vol.zarr"]], ["vol.zarr"], ["with_dicomdir"],
                check=has_files("vol.zarr/zarr.json"))  # fmt: skip


@case("dicom-not-dicom", "values", "refused", "a folder whose only .dcm file is not DICOM")
def _not_dicom(ctx: Ctx) -> Plan:
    ctx.p("not_dicom").mkdir()
    ctx.p("not_dicom/scan.dcm").write_bytes(b"this is not a DICOM file\n" * 100)
    return Plan([[*MSGAN, "ingest", "not_dicom", "vol.zarr"]], ["vol.zarr"], ["not_dicom", "scan.dcm"])


@case("dicom-byte-flips", "values", "either", "a series with 16 bytes flipped in every file (no crash, no hang)")
def _byte_flips(ctx: Ctx) -> Plan:
    for k, f in enumerate(dicom_series(ctx.p("flipped"))):
        data = bytearray(f.read_bytes())
        rng = np.random.default_rng(k)
        for pos in rng.integers(132, len(data), size=16):
            data[pos] ^= 0xFF
        f.write_bytes(bytes(data))
    return Plan([[*MSGAN, "ingest", "flipped", "vol.zarr"]], ["vol.zarr"], ["flipped", "slice_0"],
                check=has_files("vol.zarr/zarr.json"))  # fmt: skip


# ----------------------------------------------------------------------------- models


def _model_case(ctx: Ctx, folder: str, edit: Callable[[Path, dict[str, Any]], None], *needles: str) -> Plan:
    model, manifest = model_copy(ctx, folder)
    edit(model, manifest)
    write_manifest(model, manifest)
    return Plan([translate(ctx.ph_zarr, "out.zarr", folder)], ["out.zarr"], [folder, *needles])


@case("model-weights-dotdot", "models", "refused", "manifest names ../outside/w1.pt (checksum matches)")
def _model_dotdot(ctx: Ctx) -> Plan:
    def edit(model: Path, m: dict[str, Any]) -> None:
        ctx.p("outside").mkdir()
        shutil.copy(model / "scale_0.pt", ctx.p("outside/w1.pt"))
        m["weights"][0]["file"] = "../outside/w1.pt"

    return _model_case(ctx, "model_dotdot", edit, "w1.pt")


@case("model-weights-etc-passwd", "models", "refused", "manifest names /etc/passwd (checksum matches)")
def _model_passwd(ctx: Ctx) -> Plan:
    def edit(model: Path, m: dict[str, Any]) -> None:
        m["weights"][0].update(file="/etc/passwd", sha256=sha256_file("/etc/passwd"))

    return _model_case(ctx, "model_passwd", edit, "/etc/passwd")


@case("model-weights-dev-zero", "models", "refused", "manifest names /dev/zero (must not hang)")
def _model_zero(ctx: Ctx) -> Plan:
    def edit(model: Path, m: dict[str, Any]) -> None:
        m["weights"][0].update(file="/dev/zero", sha256="0" * 64)

    return _model_case(ctx, "model_zero", edit, "/dev/zero")


@case("model-weights-truncated", "models", "refused", "scale_1.pt cut in half, manifest checksum updated to match")
def _model_truncated(ctx: Ctx) -> Plan:
    def edit(model: Path, m: dict[str, Any]) -> None:
        w = model / "scale_1.pt"
        data = w.read_bytes()
        w.write_bytes(data[: len(data) // 2])
        m["weights"][1]["sha256"] = sha256_file(w)

    return _model_case(ctx, "model_truncated", edit, "scale_1.pt")


def _pickle_payload(kind: str, marker: str) -> object:
    import builtins
    import subprocess as sp

    calls: dict[str, tuple[Any, tuple[Any, ...]]] = {
        "os-system": (os.system, (f"touch {shlex.quote(marker)}",)),
        "eval": (builtins.eval, (f"open({marker!r}, 'w').close()",)),
        "subprocess": (sp.call, (["touch", marker],)),
        "exec": (builtins.exec, (f"open({marker!r}, 'w').close()",)),
    }
    fn, args = calls[kind]

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
            return fn, args

    return {"weight": Payload()}


def _pickle_case(kind: str) -> Callable[[Ctx], Plan]:
    def build(ctx: Ctx) -> Plan:
        import torch

        marker = str(ctx.p(f"PWNED-{kind}"))

        def edit(model: Path, m: dict[str, Any]) -> None:
            torch.save(_pickle_payload(kind, marker), model / "scale_0.pt")  # pickling runs nothing
            m["weights"][0]["sha256"] = sha256_file(model / "scale_0.pt")

        plan = _model_case(ctx, f"model_pickle_{kind.replace('-', '_')}", edit, "scale_0.pt")
        plan.markers.append(f"PWNED-{kind}")
        return plan

    return build


for _kind, _what in (("os-system", "os.system via __reduce__"), ("eval", "builtins.eval"),
                     ("subprocess", "subprocess.call"), ("exec", "builtins.exec")):  # fmt: skip
    case(f"model-pickle-{_kind}", "models", "refused", f"scale_0.pt a pickle calling {_what} (checksum matches)")(
        _pickle_case(_kind)
    )


# ----------------------------------------------------------------------------- secrets (loopback PACS)


class PacsHandler(http.server.BaseHTTPRequestHandler):
    """``/echo500/...``: HTTP 500 whose body echoes the request line and headers (Authorization included);
    ``/pages/.../series``: endless QIDO pages of 100 series with path-like UIDs (never to be fetched)."""

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path.startswith("/pages/") and url.path.rstrip("/").endswith("/series"):
            q = urllib.parse.parse_qs(url.query)
            offset = int((q.get("offset") or ["0"])[0])
            items = [
                {
                    "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
                    "0020000E": {"vr": "UI", "Value": [f"../pg{offset + i}"]},
                    "00080060": {"vr": "CS", "Value": ["CT"]},
                }
                for i in range(100)
            ]
            self._send(200, json.dumps(items).encode(), "application/dicom+json")
            return
        auth = self.headers.get("Authorization", "")  # first: a client that keeps only the body's start sees it
        echo = f"Authorization: {auth}\ninternal error while serving {self.command} {self.path}\n{self.headers}"
        self._send(500, echo.encode(), "text/plain")

    do_GET = do_POST = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _pacs_case(ctx: Ctx, url: str, job: bool = False) -> Plan:
    argv = [*(PACS_JOB if job else [*MSGAN, "pacs-sync"]), "--model", ctx.model_a, "--storage", "pacs_state",
            "--no-push"]  # fmt: skip
    host = urllib.parse.urlsplit(ctx.server).netloc
    env: dict[str, str | None] = {"MSGAN_PACS_URL": url, "RAY_ADDRESS": None}
    return Plan([argv], ["pacs_state"], [host], env=env, generic_error_ok=True)


@case("pacs-500-echoes-auth", "secrets", "refused", "pacs-sync: QIDO answers 500 echoing the Authorization header")
def _pacs_echo(ctx: Ctx) -> Plan:
    return _pacs_case(ctx, f"{ctx.server}/echo500/dicom-web")


@case("pacs-url-userinfo", "secrets", "refused", "pacs-sync: percent-encoded password in the URL's userinfo, 500 echo")
def _pacs_userinfo(ctx: Ctx) -> Plan:
    user = urllib.parse.quote(SECRETS["MSGAN_PACS_USER"], safe="")
    pw = urllib.parse.quote(SECRETS["MSGAN_PACS_PASSWORD"], safe="")
    netloc = urllib.parse.urlsplit(ctx.server).netloc
    plan = _pacs_case(ctx, f"http://{user}:{pw}@{netloc}/echo500/dicom-web")
    plan.env.update(MSGAN_PACS_USER=None, MSGAN_PACS_PASSWORD=None)  # the URL is the only place they are
    return plan


@case("pacs-job-500-echoes-auth", "secrets", "refused", "translate_pacs_exports.py: QIDO 500 echoing Authorization")
def _pacs_job(ctx: Ctx) -> Plan:
    return _pacs_case(ctx, f"{ctx.server}/echo500/dicom-web", job=True)


@case("pacs-endless-paging", "secrets", "either", "pacs-sync: QIDO pages that never end, path-like UIDs (must stop)")
def _pacs_pages(ctx: Ctx) -> Plan:
    return _pacs_case(ctx, f"{ctx.server}/pages/dicom-web")


# ----------------------------------------------------------------------------- running a command


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_measured(argv: list[str], cwd: Path, env: dict[str, str], timeout: float, rss_cap: int, log: Path) -> Run:
    """Run ``argv`` in its own process group, polling the tree's RSS every ~20 ms; killed at the cap/timeout."""
    with open(log.with_suffix(".out"), "wb") as out, open(log.with_suffix(".err"), "wb") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                             start_new_session=True)  # fmt: skip
        proc = psutil.Process(p.pid)
        peak, killed = 0, None
        while p.poll() is None:
            rss = tree_rss(proc)
            peak = max(peak, rss)
            if rss > rss_cap:
                killed = f"killed at the RSS cap ({rss / 2**20:.0f} MiB > {rss_cap / 2**20:.0f} MiB)"
            elif time.perf_counter() - t0 > timeout:
                killed = f"killed after the {timeout:.0f} s timeout"
            if killed:
                kill_group(p.pid)
                break
            time.sleep(0.02)
        rc = p.wait()
        wall = time.perf_counter() - t0
        kill_group(p.pid)  # whatever it left running in its group
    read = lambda suffix: log.with_suffix(suffix).read_bytes().decode("utf-8", "replace")  # noqa: E731
    return Run(argv, None if killed else rc, wall, peak, read(".out"), read(".err"), killed)


def interrupt(argv: list[str], cwd: Path, env: dict[str, str], watch: Path, log: Path) -> tuple[str | None, list[str]]:
    """Start ``argv``; once anything appears in ``watch`` (or after 30 s) wait ~2 s and SIGKILL its group.
    Returns (why the interruption did not happen as planned or None, what ``watch`` held at the kill)."""
    with open(log.with_suffix(".killed.out"), "wb") as out, open(log.with_suffix(".killed.err"), "wb") as err:
        p = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                             start_new_session=True)  # fmt: skip
        t0 = time.perf_counter()
        while p.poll() is None and time.perf_counter() - t0 < 30 and not any(watch.iterdir()):
            time.sleep(0.05)
        time.sleep(2.0)
        finished = p.poll() is not None
        held = sorted(str(q.relative_to(watch)) for q in watch.glob("*/*"))
        kill_group(p.pid)
        p.wait()
    why = f"the run to interrupt ended by itself (rc {p.returncode}) before the kill" if finished else None
    return why, held


# ----------------------------------------------------------------------------- what changed, what leaked


Snap = dict[str, tuple[Any, ...]]


def snapshot(roots: dict[str, Path]) -> Snap:
    """(kind, size, mtime_ns, inode) of every entry under each root, by lstat (links and FIFOs not followed;
    a folder records existence only: its mtime changes whenever an output appears in it)."""
    snap: Snap = {}
    for label, root in roots.items():
        if not os.path.lexists(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            for n in dirnames + filenames:
                full = os.path.join(dirpath, n)
                key = f"{label}/{os.path.relpath(full, root)}"
                try:
                    st = os.lstat(full)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    snap[key] = ("dir",)
                elif stat.S_ISLNK(st.st_mode):
                    snap[key] = ("link", os.readlink(full), st.st_ino)
                else:
                    snap[key] = ("file", st.st_size, st.st_mtime_ns, st.st_ino, stat.S_IFMT(st.st_mode))
    return snap


def touched(before: Snap, after: Snap, outputs: list[str]) -> list[str]:
    """Entries added, removed or changed outside the declared outputs (sandbox-relative)."""
    outs = [f"sandbox/{o.rstrip('/')}" for o in outputs]

    def exempt(key: str) -> bool:
        if any(key == o or key.startswith(o + "/") for o in outs):
            return True
        return after.get(key, before.get(key, ("",)))[0] == "dir" and any(o.startswith(key + "/") for o in outs)

    changes = []
    for key in sorted(set(before) | set(after)):
        if exempt(key) or before.get(key) == after.get(key):
            continue
        what = "added" if key not in before else "removed" if key not in after else "changed"
        changes.append(f"{what} {key}")
    return changes


def content_hash(path: Path) -> str:
    """sha256 over the regular files (and link targets) under ``path``; '' when it is gone."""
    if not os.path.lexists(path):
        return ""
    h = hashlib.sha256()
    items = [path] if not path.is_dir() or path.is_symlink() else sorted(path.rglob("*"))
    for p in items:
        st = os.lstat(p)
        h.update(str(p.relative_to(path) if p != path else "").encode())
        if stat.S_ISLNK(st.st_mode):
            h.update(b"link:" + os.readlink(p).encode())
        elif stat.S_ISREG(st.st_mode):
            h.update(sha256_file(p).encode())
    return h.hexdigest()


def secret_forms(env: dict[str, str]) -> list[tuple[str, bytes]]:
    """(label, bytes) for every form of every secret in ``env``: plain, percent-encoded, base64."""
    forms: list[tuple[str, bytes]] = []
    b64 = lambda s: base64.b64encode(s.encode()).decode().rstrip("=")  # noqa: E731
    for key, value in SECRETS.items():
        for label, form in (("plain", value), ("percent-encoded", urllib.parse.quote(value, safe="")),
                            ("percent-encoded", urllib.parse.quote(value)), ("base64", b64(value))):  # fmt: skip
            if all(form.encode() != f for _, f in forms):
                forms.append((f"{key} {label}", form.encode()))
    pair = f"{SECRETS['MSGAN_PACS_USER']}:{SECRETS['MSGAN_PACS_PASSWORD']}"
    forms.append(("PACS user:password base64", b64(pair).encode()))
    return forms


def find_secrets(runs: list[Run], roots: list[Path], forms: list[tuple[str, bytes]]) -> list[str]:
    found = []
    for i, r in enumerate(runs):
        for stream, text in (("stdout", r.stdout), ("stderr", r.stderr)):
            data = text.encode("utf-8", "replace")
            found += [f"{label} in {stream} of command {i + 1}" for label, f in forms if f in data]
    for root in roots:
        for dirpath, _, filenames in os.walk(root, followlinks=False):
            for n in filenames:
                full = os.path.join(dirpath, n)
                st = os.lstat(full)
                if not stat.S_ISREG(st.st_mode) or st.st_size > 256 * 2**20:
                    continue
                data = Path(full).read_bytes()
                found += [f"{label} in {os.path.relpath(full, root.parent)}" for label, f in forms if f in data]
    return found


def mask(text: str, forms: list[tuple[str, bytes]]) -> str:
    for _, f in forms:
        text = text.replace(f.decode(), "***")
    return text


# ----------------------------------------------------------------------------- one case


def case_env(ctx: Ctx, extra: dict[str, str | None]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MSGAN_", "AWS_", "MLFLOW_", "RAY_"))}
    env.update(SECRETS)
    env.update(AWS_ACCESS_KEY_ID="HXFAKEACCESSKEY7Q4E", MSGAN_HOME=str(ctx.sandbox / "home"),
               PYTHONDONTWRITEBYTECODE="1", PYTHONWARNINGS="ignore")  # fmt: skip
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def evaluate(c: Case, plan: Plan, ctx: Ctx, runs: list[Run]) -> tuple[str, list[str]]:
    """(outcome, why it differs from what the case expects)."""
    last = runs[-1]
    if last.killed:
        return ("timeout" if "timeout" in last.killed else "RSS cap"), [last.killed]
    err = last.stderr
    if last.rc != 0:
        hints = CRASH_HINTS[:1] if plan.generic_error_ok else CRASH_HINTS
        if any(h in err for h in hints):
            outcome, why = "crashed", [f"exit {last.rc} with an unexpected error or traceback"]
        elif not any(n in err or (plan.report_on_stdout and n in last.stdout) for n in plan.needles):
            outcome, why = "refused, unnamed", [f"exit {last.rc}, but stderr names none of {plan.needles}"]
        else:
            outcome, why = "refused", []
        if c.expect == "handled" and outcome == "refused":
            why = [f"refused (exit {last.rc}); expected handled"]
        return outcome, why
    problem = plan.check(ctx, runs) if plan.check is not None else None
    if c.expect == "refused":
        return "NOT refused", ["exit 0; expected a refusal naming the input"]
    return ("handled", []) if problem is None else ("wrong result", [problem])


def run_case(c: Case, workdir: Path, shared: Path, server: str, timeout: float, rss_cap: int) -> dict[str, Any]:
    base = workdir / "cases" / c.name.replace("^", "_")
    if os.path.lexists(base):
        shutil.rmtree(base)
    ctx = Ctx(c.name, base / "sandbox", base / "precious", shared, server)
    (logs := base / "logs").mkdir(parents=True)
    ctx.sandbox.mkdir()
    ctx.precious.mkdir()
    (ctx.sandbox / "home").mkdir()
    record: dict[str, Any] = {"name": c.name, "group": c.group, "expect": c.expect, "what": c.what}
    forms = secret_forms(SECRETS)
    try:
        plan = c.build(ctx)
    except Exception as err:  # the harness or a library refused to build the input: a failure of this case
        why = [f"building the input: {type(err).__name__}: {err}"]
        empty = {"commands": [], "rc": [], "wall_s": 0.0, "peak_rss_mib": 0.0, "touched": 0, "secrets": 0}
        return record | empty | {"outcome": "not built", "ok": False, "why": why}
    env = case_env(ctx, plan.env)
    why: list[str] = []
    for i, argv in enumerate(plan.setup):
        r = run_measured(argv, ctx.sandbox, env, timeout, rss_cap, logs / f"setup{i}")
        if r.rc != 0:
            why.append(f"setup `{shlex.join(argv[len(MSGAN) :])}` failed: {(r.killed or r.stderr.strip()[-300:])}")
    if plan.outputs and plan.setup:  # what the checks compare with (the output the setup published)
        first = ctx.p(plan.outputs[0])
        mf = first / "manifest.json" if first.is_dir() else first
        if mf.exists():
            st = mf.stat()
            ctx.before_out = (st.st_ino, st.st_mtime_ns)
        ctx.before_count = len(list(first.rglob("*.dcm"))) if first.is_dir() else 0
    roots = {"sandbox": ctx.sandbox, "precious": ctx.precious, "shared": shared}
    kept = {k: content_hash(ctx.p(k)) for k in plan.keep}
    before = snapshot(roots)
    runs: list[Run] = []
    if plan.interrupt and not why:
        note, held = interrupt(plan.interrupt, ctx.sandbox, env, ctx.p(plan.outputs[0]).parent, logs / "interrupt")
        record["killed_while"] = held[:10]  # what lay beside the output when the first run was killed
        if note:
            why.append(note)
    if not why:
        for i, argv in enumerate(plan.commands):
            runs.append(run_measured(argv, ctx.sandbox, env, timeout * plan.timeout_factor, rss_cap, logs / f"cmd{i}"))
            if runs[-1].rc != 0:
                break
    after = snapshot(roots)
    changes = touched(before, after, plan.outputs)
    for k, h in kept.items():
        if content_hash(ctx.p(k)) != h:
            changes.append(f"{'removed' if not os.path.lexists(ctx.p(k)) else 'changed'} kept {k}")
    secrets = find_secrets(runs, [ctx.sandbox, ctx.precious], forms)
    if runs:
        outcome, why = evaluate(c, plan, ctx, runs)
    else:
        outcome = "not run"
    ok = not why and outcome in ({"refused", "handled"} if c.expect == "either" else {c.expect})
    if changes:
        why.append(f"{len(changes)} path(s) touched outside the output: {'; '.join(changes[:3])}")
    if secrets:
        why.append(f"{len(secrets)} secret form(s) found: {'; '.join(secrets[:3])}")
    made = [m for m in plan.markers if os.path.lexists(ctx.p(m))]
    if made:
        why.append(f"marker file(s) created by the payload: {', '.join(made)}")
    last_err = ""
    if runs:  # the line that names the input (stderr, then a batch report on stdout), else stderr's last line
        lines = [ln for ln in runs[-1].stderr.splitlines() if ln.strip()]
        if plan.report_on_stdout:
            lines += [ln for ln in runs[-1].stdout.splitlines() if ln.strip()]
        named = [ln for ln in lines if any(n in ln for n in plan.needles)]
        last_err = named[-1] if named else (lines[-1] if lines else "")
    return record | {
        "outcome": outcome,
        "ok": ok and not changes and not secrets and not made,
        "why": [mask(w, forms)[:400] for w in why],
        "commands": [shlex.join(r.argv) for r in runs],
        "rc": [r.rc for r in runs],
        "message": mask(last_err, forms)[:400],
        "stderr_lines": len([ln for ln in runs[-1].stderr.splitlines() if ln.strip()]) if runs else 0,
        "wall_s": round(sum(r.wall for r in runs), 2),
        "peak_rss_mib": round(max((r.peak_rss for r in runs), default=0) / 2**20, 1),
        "touched": len(changes),
        "touched_paths": [mask(t, forms) for t in changes[:20]],
        "secrets": len(secrets),
        "secrets_found": secrets[:20],
    }


# ----------------------------------------------------------------------------- the run


def code_version() -> tuple[str, str]:
    """(git HEAD, hash of uncommitted changes to msgan/ and jobs/ or '') without touching git's index."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, env=env, capture_output=True, check=False).stdout  # noqa: E731
    head = git("rev-parse", "HEAD").decode().strip() or "unknown"
    h = hashlib.sha256(git("diff", "HEAD", "--", "msgan", "jobs"))
    untracked = git("ls-files", "--others", "--exclude-standard", "--", "msgan", "jobs").decode().split()
    for rel in sorted(untracked):
        h.update(rel.encode())
        with open(ROOT / rel, "rb") as f:
            h.update(f.read())
    dirty = bool(untracked) or bool(git("diff", "HEAD", "--stat", "--", "msgan", "jobs").strip())
    return head, h.hexdigest()[:16] if dirty else ""


def prepare_shared(shared: Path, timeout: float) -> None:
    """Models and phantoms every case reads (made once per workdir, through the CLI)."""
    if (shared / ".ready").exists():
        return
    if shared.exists():
        shutil.rmtree(shared)
    shared.mkdir(parents=True)
    demo = str(ROOT / "configs" / "demo.yaml")
    steps = [
        [*MSGAN, "new-model", "--config", demo, str(shared / "modelA")],
        [*MSGAN, "new-model", "--config", demo, str(shared / "modelB"), "--seed", "1"],
        [*MSGAN, "phantom", str(shared / "ph.zarr"), "--shape", "32", "32", "32", "--kernel", "sharp"],
        [*MSGAN, "phantom", str(shared / "ph.nii.gz"), "--shape", "32", "32", "32", "--kernel", "sharp"],
        [*MSGAN, "phantom", str(shared / "ph96.zarr"), "--shape", "96", "96", "96", "--kernel", "sharp"],
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MSGAN_", "AWS_", "MLFLOW_", "RAY_"))}
    env["MSGAN_HOME"] = str(shared.parent / "home")
    for argv in steps:
        r = subprocess.run(argv, cwd=shared, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        if r.returncode != 0:
            raise SystemExit(f"hostile_inputs: preparing {argv[-1]} failed: {r.stderr.strip()[-500:]}")
    if not (shared / "ph.zarr" / "0" / "zarr.json").exists():
        raise SystemExit("hostile_inputs: `msgan phantom X.zarr` did not write an OME-Zarr with level 0")
    (shared / ".ready").write_text("")


def load_results() -> dict[str, Any]:
    try:
        data = json.loads(RESULTS.read_text())
        if isinstance(data, dict) and isinstance(data.get("records"), list):
            return data
    except (OSError, ValueError):
        pass
    return {"about": __doc__.strip().splitlines()[0], "records": []}


def save_results(data: dict[str, Any], head: str, tree: str) -> None:
    """Keep this code version's records and those of committed code (a clean tree); drop other dirty-tree runs."""
    data["records"] = [
        r for r in data["records"] if (r.get("commit"), r.get("tree")) == (head, tree) or not r.get("tree")
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, RESULTS)


def line(r: dict[str, Any]) -> str:
    status = "ok" if r["ok"] else "FAIL"
    rc = ",".join("-" if x is None else str(x) for x in r["rc"]) or "-"
    detail = "; ".join(r["why"]) if not r["ok"] else r.get("message", "")
    return (
        f"{status:4} {r['name']:30} {r['outcome']:16} rc {rc:5} {r['wall_s']:6.1f}s {r['peak_rss_mib']:6.0f} MiB"
        f"  touched {r['touched']}  secrets {r['secrets']}  {detail[:160]}"
    )


def summary(records: list[dict[str, Any]]) -> list[str]:
    refused = [r["name"] for r in records if r["outcome"] == "refused" and r["ok"]]
    handled = [r["name"] for r in records if r["outcome"] == "handled" and r["ok"]]
    failed = [r["name"] for r in records if not r["ok"]]
    worst = max(records, key=lambda r: r["peak_rss_mib"], default=None)
    out = [
        f"cases tried: {len(records)}",
        f"refused as expected: {len(refused)}: {', '.join(refused) or '-'}",
        f"handled as expected: {len(handled)}: {', '.join(handled) or '-'}",
        f"failed: {len(failed)}: {', '.join(failed) or '-'}",
    ]
    if worst is not None:
        out.append(f"peak RSS, worst case: {worst['peak_rss_mib']:.0f} MiB ({worst['name']})")
    out.append(f"files touched outside outputs: {sum(r['touched'] for r in records)} "
               f"(in {sum(1 for r in records if r['touched'])} cases)")  # fmt: skip
    out.append(
        f"secrets found: {sum(r['secrets'] for r in records)} (in {sum(1 for r in records if r['secrets'])} cases)"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="", metavar="PATTERN", help="only cases whose name contains PATTERN")
    p.add_argument("--workdir", default=None, help="where sandboxes go (default: a new temporary folder)")
    p.add_argument("--fresh", action="store_true", help="rerun cases already recorded for this code version")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="per command (default 60 s)")
    p.add_argument("--rss-cap-mib", type=float, default=3072, help="kill a command tree above this RSS (default 3072)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    args = p.parse_args(argv)
    chosen = [c for c in CASES if args.cases in c.name]
    if args.list:
        for c in chosen:
            print(f"{c.name:32} {c.group:8} {c.expect:8} {c.what}")
        return 0
    if not chosen:
        raise SystemExit(f"hostile_inputs: no case name contains {args.cases!r} (--list shows them)")
    head, tree = code_version()
    data = load_results()
    done = {r["name"]: r for r in data["records"] if r.get("commit") == head and r.get("tree") == tree}
    workdir = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="msgan-hostile-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"code {head[:12]}{'+' + tree if tree else ''}; workdir {workdir}; results {RESULTS.relative_to(ROOT)}")
    todo = [c for c in chosen if args.fresh or c.name not in done]
    if len(todo) < len(chosen):
        print(f"{len(chosen) - len(todo)} case(s) already recorded for this code: skipped (--fresh reruns them)")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PacsHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    records = [done[c.name] for c in chosen if c not in todo]
    try:
        if todo:
            prepare_shared(workdir / "shared", max(args.timeout, 120))
        for c in todo:
            r = run_case(c, workdir, workdir / "shared", url, args.timeout, int(args.rss_cap_mib * 2**20))
            r.update(commit=head, tree=tree, when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            data["records"] = [x for x in data["records"] if not (x["name"] == c.name and x.get("commit") == head
                                                                   and x.get("tree") == tree)] + [r]  # fmt: skip
            save_results(data, head, tree)
            records.append(r)
            print(line(r), flush=True)
    finally:
        server.shutdown()
    lines = summary(records)
    if len(todo) < len(chosen):
        lines[0] += f" ({len(chosen) - len(todo)} recorded by an earlier run of this code)"
    print("\n".join(lines))
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
