import numpy as np
import pytest
import requests

from msgan.io.dicom import read_series
from msgan.io.pacs import DicomWebClient, PacsError
from tests.dicom_data import OBLIQUE, write_ct_series


@pytest.fixture
def client(orthanc):
    return DicomWebClient(orthanc["url"], orthanc["user"], orthanc["password"])


def test_store_find_fetch_roundtrip(client, orthanc, tmp_path):
    files, uid, hu = write_ct_series(tmp_path / "src", seed=11, series_name="pacs-rt")
    assert client.store(files) == len(files)
    assert client.store(files[:2]) == 2  # a repeat is accepted, not an error
    found = [s for s in client.find_series(modality="CT") if s.series_uid == uid]
    assert len(found) == 1 and found[0].instances == len(files) and found[0].patient_id == "MSGAN-0001"
    meta = client.series_metadata(found[0].study_uid, uid)
    assert len(meta) == len(files) and meta[0]["00181210"]["Value"] == ["B80f"]
    got = client.fetch_series(found[0].study_uid, uid, tmp_path / "fetched")
    vol = read_series([tmp_path / "fetched"]).volumes[0]
    np.testing.assert_array_equal(vol.image, hu)
    assert vol.geometry.allclose(OBLIQUE, atol=1e-6) and len(got) == len(files)


def test_errors_hold_no_credentials(orthanc):
    bad = DicomWebClient(orthanc["url"], orthanc["user"], "wrong-password")
    with pytest.raises(PacsError, match="refused the credentials") as info:
        bad.find_series()
    assert "wrong-password" not in str(info.value) and "wrong-password" not in repr(bad)
    with pytest.raises(PacsError, match="unreachable"):
        DicomWebClient("http://127.0.0.1:9/dicom-web", "u", "p", timeout=2).find_series()
    with pytest.raises(ValueError, match="DICOMweb root"):
        DicomWebClient("orthanc:8042")
    # Orthanc refuses non-local HTTP and anonymous requests
    assert requests.get(f"{orthanc['rest']}/system", timeout=5).status_code == 401
