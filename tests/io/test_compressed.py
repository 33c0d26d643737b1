"""Compressed transfer syntaxes: each lossless twin of a series decodes pixel for pixel like the uncompressed
original (GDCM through SimpleITK), and its ingest -> export round trip gives a valid derived series.

Twins are made with Debian's dcmtk (JPEG-LS, RLE, JPEG lossless, deflated) and with pydicom + pylibjpeg-openjpeg
(JPEG 2000 lossless). A missing tool skips with the reason, except in CI (CI=true), where it fails."""

import os
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from msgan.io.convert import export, ingest
from msgan.io.dicom import read_series
from tests.dicom_data import OBLIQUE, assert_valid_dicom, phantom_ct, write_ct_series

# transfer syntax UID -> dcmtk command (None: pydicom encodes it)
TWINS = {
    "1.2.840.10008.1.2.4.80": ["dcmcjpls", "+el"],  # JPEG-LS lossless
    "1.2.840.10008.1.2.5": ["dcmcrle"],  # RLE lossless
    "1.2.840.10008.1.2.4.70": ["dcmcjpeg", "+e1"],  # JPEG lossless, first-order prediction (SV1)
    "1.2.840.10008.1.2.4.57": ["dcmcjpeg", "+el"],  # JPEG lossless, process 14
    "1.2.840.10008.1.2.1.99": ["dcmconv", "+td"],  # deflated explicit VR little endian
    "1.2.840.10008.1.2.4.90": None,  # JPEG 2000 lossless
}


def _missing(what: str) -> None:
    message = f"{what} is not installed (apt-get install dcmtk; pip install pylibjpeg pylibjpeg-openjpeg)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _twin(src, dst, syntax):
    command = TWINS[syntax]
    if command is None:
        try:
            ds = pydicom.dcmread(src)
            ds.compress(syntax)
        except RuntimeError as err:  # no encoder plugin
            _missing(f"a JPEG 2000 encoder ({err})")
        ds.save_as(dst, enforce_file_format=True)
        return
    if shutil.which(command[0]) is None:
        _missing(command[0])
    subprocess.run([*command, str(src), str(dst)], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    folder = tmp_path_factory.mktemp("original")
    files, uid, hu = write_ct_series(folder, phantom_ct(shape=(4, 40, 36), seed=31), seed=31)
    assert hu.min() < -500  # negative HU: signed pixels, the harder case for lossless codecs
    return files, uid, hu


@pytest.mark.parametrize("syntax", list(TWINS), ids=lambda s: pydicom.uid.UID(s).name)
def test_a_compressed_twin_decodes_like_the_original_and_round_trips(original, tmp_path, syntax):
    files, _, hu = original
    (tmp_path / "twin").mkdir()
    for f in files:
        _twin(f, tmp_path / "twin" / f.name, syntax)
    assert {str(pydicom.dcmread(f).file_meta.TransferSyntaxUID) for f in (tmp_path / "twin").iterdir()} == {syntax}
    res = read_series([tmp_path / "twin"])
    assert not res.errors and not res.skipped and len(res.volumes) == 1, res
    np.testing.assert_array_equal(res.volumes[0].image, hu)  # pixel for pixel
    assert res.volumes[0].geometry.allclose(OBLIQUE, atol=1e-6)

    report = ingest(tmp_path / "twin", tmp_path / "v.zarr")
    out = export(str(next(iter(report.written.values()))), tmp_path / "out").files
    src, got = pydicom.dcmread(files[0]), pydicom.dcmread(out[0])
    assert got.SOPClassUID == src.SOPClassUID and got.PhotometricInterpretation == src.PhotometricInterpretation
    again = read_series([tmp_path / "out"]).volumes[0]
    np.testing.assert_array_equal(again.image, hu)
    assert again.geometry.allclose(OBLIQUE, atol=1e-6)
    assert_valid_dicom(out)
