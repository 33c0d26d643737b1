"""One pass of the scheduled PACS translation against a real Orthanc and a local Ray."""

import json

import numpy as np
import pydicom
import pytest

from msgan.cascade import Cascade
from msgan.io.dicom import read_series
from msgan.io.pacs import DicomWebClient
from msgan.pacs_sync import SyncConfig, run_once
from tests.conftest import tiny_config
from tests.dicom_data import OBLIQUE, PATIENT, assert_valid_dicom, write_ct_series, write_radiograph
from tests.ngff import assert_valid_ome_zarr

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture
def model(tmp_path):
    cfg = tiny_config(**{"num_scales": 2, "inference.memory_budget_mb": 1.0, "inference.actors": 1})
    return str(Cascade.untrained(cfg, seed=5).save(tmp_path / "model"))


@pytest.fixture
def empty_orthanc(orthanc):
    """The session's Orthanc, emptied: this test owns everything the PACS holds."""
    import requests

    auth = (orthanc["user"], orthanc["password"])
    for pid in requests.get(f"{orthanc['rest']}/patients", auth=auth, timeout=30).json():
        requests.delete(f"{orthanc['rest']}/patients/{pid}", auth=auth, timeout=30).raise_for_status()
    return orthanc


def test_pacs_pass_translates_new_series_once(empty_orthanc, ray_local, model, tmp_path):
    orthanc = empty_orthanc
    client = DicomWebClient(orthanc["url"], orthanc["user"], orthanc["password"])
    files, src_uid, hu = write_ct_series(tmp_path / "good", seed=21, series_name="sync-good")
    client.store(files)
    bad, bad_uid, _ = write_ct_series(tmp_path / "tilted", seed=22, series_name="sync-tilted")
    for k, f in enumerate(bad):
        ds = pydicom.dcmread(f)
        p = [float(x) for x in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [p[0], p[1] + 0.7 * k, p[2]]
        ds.GantryDetectorTilt = 15.0
        ds.save_as(f)
    client.store(bad)
    soft, soft_uid, _ = write_ct_series(tmp_path / "soft", seed=23, kernel="B20f", series_name="sync-soft")
    client.store(soft)

    cfg = SyncConfig(model=model, storage=str(tmp_path / "store"), kernel="B80f")
    report = run_once(cfg, client, log=lambda _: None)
    assert set(report.translated) == {src_uid}, report.summary()
    assert "gantry tilt" in report.skipped[bad_uid]
    assert soft_uid not in report.translated and soft_uid not in report.skipped  # filtered out by kernel

    derived_uid = report.translated[src_uid]
    found = [s for s in client.find_series("CT") if s.series_uid == derived_uid]
    assert len(found) == 1 and found[0].description.startswith("msgan ") and found[0].instances == len(files)
    got = client.fetch_series(found[0].study_uid, derived_uid, tmp_path / "derived")
    vol = read_series([tmp_path / "derived"]).volumes[0]
    assert vol.image.shape == hu.shape and vol.geometry.allclose(OBLIQUE, atol=1e-5)
    ds = pydicom.dcmread(got[0])
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src_uid
    src = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == src.SOPClassUID and ds.PhotometricInterpretation == src.PhotometricInterpretation
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert_valid_dicom(got)
    assert ds.PatientID == PATIENT["PatientID"] and ds.StudyInstanceUID == vol.identifiers["StudyInstanceUID"]
    assert ds.SOPInstanceUID not in {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert np.isfinite(vol.image).all()

    translated = list((tmp_path / "store" / "pacs-sync" / "translated").glob(f"*/{src_uid}.zarr"))
    assert len(translated) == 1
    assert_valid_ome_zarr(str(translated[0]))  # the batch output: NGFF 0.5, opens with ome-zarr
    assert_valid_ome_zarr(str(tmp_path / "store" / "pacs-sync" / "ingested" / f"{src_uid}.zarr"))

    again = run_once(cfg, client, log=lambda _: None)
    assert not again.translated and again.already == 2  # the good series and the refused one; ours is not a source
    state = json.loads((tmp_path / "store" / "pacs-sync" / "state.json").read_text())
    assert state["series"][src_uid]["derived_series_uid"] == derived_uid
    assert state["series"][bad_uid]["status"] == "failed"


@pytest.mark.parametrize("bad", ["../../escaped", "1..2", "/abs", "1." + "2" * 63, "1.02.3"])
def test_a_pacs_series_with_an_invalid_uid_names_nothing(empty_orthanc, model, tmp_path, bad):
    """A UID from the PACS is checked before it names a request, a folder, a key or a state entry."""
    orthanc = empty_orthanc
    client = DicomWebClient(orthanc["url"], orthanc["user"], orthanc["password"])
    files, _, _ = write_ct_series(tmp_path / "bad", seed=24, series_uid=bad)
    client.store(files)
    assert bad in {s.series_uid for s in client.find_series("CT")}  # the PACS holds it under that UID

    store = tmp_path / "a" / "b" / "store"
    report = run_once(SyncConfig(model=model, storage=str(store)), client, log=lambda _: None)
    assert not report.translated and list(report.skipped) == [f"(invalid UID {bad!r})"], report.summary()
    assert "is not a valid DICOM UID" in report.skipped[f"(invalid UID {bad!r})"]
    leftovers = [
        p for p in tmp_path.rglob("*") if p.is_file() and p.relative_to(tmp_path).parts[0] not in ("bad", "model")
    ]
    state = store / "pacs-sync" / "state.json"
    assert leftovers in ([], [state]), leftovers  # no volume, no export, nothing outside the store
    if state.exists():
        assert bad not in json.loads(state.read_text())["series"]
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        client.fetch_series("1.2.3", bad, tmp_path / "f")  # the client refuses it as a URL path too


def test_pacs_pass_with_a_2d_model_translates_a_radiograph(empty_orthanc, ray_local, tmp_path):
    """A DX radiograph (256^2, MONOCHROME1) goes PACS -> ingest -> 2D cascade -> derived DX -> PACS."""
    cfg2d = tiny_config(**{"dims": 2, "num_scales": 2, "data.phantom.shape": [64, 64],
                           "intensity": {"low": 0.0, "high": 4095.0}, "inference.memory_budget_mb": 1.0,
                           "inference.actors": 1})  # fmt: skip
    model2d = str(Cascade.untrained(cfg2d, seed=6).save(tmp_path / "model2d"))
    client = DicomWebClient(empty_orthanc["url"], empty_orthanc["user"], empty_orthanc["password"])
    src_file, src_uid, _ = write_radiograph(tmp_path / "dx", "DX", size=(256, 256), monochrome1=True)
    client.store([src_file])

    report = run_once(
        SyncConfig(model=model2d, storage=str(tmp_path / "store"), modality="DX"), client, log=lambda _: None
    )
    assert set(report.translated) == {src_uid}, report.summary()
    derived = report.translated[src_uid]
    found = [s for s in client.find_series("DX") if s.series_uid == derived]
    assert len(found) == 1 and found[0].instances == 1
    got = client.fetch_series(found[0].study_uid, derived, tmp_path / "derived")
    src, ds = pydicom.dcmread(src_file), pydicom.dcmread(got[0])
    assert ds.SOPClassUID == src.SOPClassUID and ds.PhotometricInterpretation == "MONOCHROME1"
    assert ds.ImagerPixelSpacing == src.ImagerPixelSpacing and (ds.Rows, ds.Columns) == (256, 256)
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    back = read_series([tmp_path / "derived"]).volumes[0]
    source = read_series([tmp_path / "dx"]).volumes[0]
    assert back.geometry.allclose(source.geometry) and np.isfinite(back.image).all()
    assert_valid_dicom(got)


def test_the_filters_match_any_kernel_value_and_take_the_shared_pattern_syntax(empty_orthanc, tmp_path):
    """kernel/description keep their rule (searched, case counts), now on any value of a multi-valued kernel;
    ``match`` takes find-pairs' Keyword=REGEX patterns; a bad pattern is refused before the PACS is asked."""
    from msgan import storage
    from msgan.io.patterns import PatternError
    from msgan.pacs_sync import State, SyncReport, _select

    client = DicomWebClient(empty_orthanc["url"], empty_orthanc["user"], empty_orthanc["password"])
    siemens, siemens_uid, _ = write_ct_series(tmp_path / "siemens", seed=31, kernel="Br64d", series_name="f-siemens")
    for f in siemens:
        ds = pydicom.dcmread(f)
        ds.ConvolutionKernel = ["Br64d", "3"]
        ds.save_as(f)
    client.store(siemens)
    soft, soft_uid, _ = write_ct_series(tmp_path / "soft", seed=32, kernel="B30f", series_name="f-soft")
    client.store(soft)

    def selected(**kw):
        cfg = SyncConfig(model="unused", storage=str(tmp_path / "store"), **kw)
        state = State(storage.normalize_uri(cfg.storage))
        return {s.series_uid for s in _select(cfg, client, state, "m", SyncReport())}

    assert selected() == {siemens_uid, soft_uid}
    assert selected(kernel="^3$") == {siemens_uid}  # the kernel's second value (only the first was looked at before)
    assert selected(kernel="Br6") == {siemens_uid} and selected(kernel="br6") == set()  # searched; case counts
    assert selected(description="B30") == {soft_uid}
    assert selected(match=("ConvolutionKernel=br64D",)) == {siemens_uid}  # whole value, any case
    assert selected(match=("ConvolutionKernel=br64",)) == set()
    assert selected(match=("SeriesDescription=thorax .*", "ConvolutionKernel=B30F")) == {soft_uid}
    with pytest.raises(PatternError, match="'Kernel=B30f'"):
        run_once(SyncConfig(model="unused", storage=str(tmp_path / "store"), match=("Kernel=B30f",)), client)
    assert not (tmp_path / "store").exists()


def test_one_series_whose_metadata_cannot_be_read_is_skipped_and_the_others_go_on(tmp_path):
    """A filter on an attribute QIDO-RS does not return (the kernel) reads each series' WADO-RS metadata: one
    series answering something that is not DICOM JSON stopped the whole pass and recorded nothing. A unit test: the
    PACS is faked where it answers, the selection is the real one."""
    from msgan import pacs_sync
    from msgan.io.pacs import PacsError, SeriesInfo

    class Client(DicomWebClient):
        def find_series(self, *args, **kwargs):
            return [SeriesInfo("1.2.3", f"1.2.3.{i}", "CT", "chest", "20260101", "P", 10) for i in (1, 2, 3)]

        def series_metadata(self, study_uid, series_uid):
            if series_uid == "1.2.3.2":
                raise PacsError(f"WADO-RS metadata of series {series_uid} answered JSON that is not a list")
            return [{"00181210": {"vr": "SH", "Value": ["B70f"]}}]

    cfg = SyncConfig(model="m", storage=str(tmp_path), kernel="B70f")
    report = pacs_sync.SyncReport(model="m/1")
    state = pacs_sync.State(f"file://{tmp_path}")
    todo = pacs_sync._select(cfg, Client("http://pacs.example/dicom-web"), state, "m/1", report)
    assert [s.series_uid for s in todo] == ["1.2.3.1", "1.2.3.3"]
    assert list(report.skipped) == ["1.2.3.2"] and "study 1.2.3" in report.skipped["1.2.3.2"]


@pytest.mark.parametrize("text", ['{"series": ', "[]", "{}", '{"series": {"1.2.3": "translated"}}', "\udcff"])
def test_a_damaged_state_file_is_refused_naming_it(tmp_path, text):
    from msgan.pacs_sync import State

    path = tmp_path / "pacs-sync" / "state.json"
    path.parent.mkdir()
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=r"pacs-sync/state\.json: not a pacs-sync state file"):
        State(f"file://{tmp_path}")
