import hashlib
import json
import os
import pickle
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from msgan import registry
from msgan.cascade import Cascade
from msgan.config import load_config
from tests.conftest import TINY as CONF_TINY

TINY = {**CONF_TINY, "num_scales": 2}


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_job_runs_created_once_and_found_again(tracking, tmp_path):
    cfg = load_config(None, TINY)
    a = registry.job_runs("exp", "job-1", 2, cfg.to_dict(), artifact_root=f"file://{tmp_path}/store")
    b = registry.job_runs("exp", "job-1", 2, cfg.to_dict(), artifact_root=f"file://{tmp_path}/store")
    assert a == b and set(a.children) == {0, 1}
    other = registry.job_runs("exp", "job-2", 2, cfg.to_dict())
    assert other.parent != a.parent
    from mlflow import MlflowClient

    child = MlflowClient(tracking).get_run(a.children[1])
    assert child.data.tags["mlflow.parentRunId"] == a.parent
    parent = MlflowClient(tracking).get_run(a.parent)
    assert parent.data.params["train.hr_patch"] == "8"
    log = registry.RunLogger(tracking, a.children[0])
    log.metric_rows([({"loss_g": 1.0}, 1), ({"loss_g": 0.5}, 2)])
    history = MlflowClient(tracking).get_metric_history(a.children[0], "loss_g")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]


def test_register_load_and_promote(tracking, rng):
    cfg = load_config(None, TINY)
    cascade = Cascade.untrained(cfg, seed=2)
    runs = registry.job_runs("exp", "job-r", 2, cfg.to_dict())
    v1 = registry.register_cascade(cascade, runs.parent, "reg-test")
    v2 = registry.register_cascade(Cascade.untrained(cfg, seed=3), runs.parent, "reg-test")
    assert (v1, v2) == ("1", "2")
    image = rng.uniform(-1000, 500, (24, 20, 26)).astype(np.float32)
    loaded = registry.load_cascade("models:/reg-test@candidate")  # the alias follows the newest version
    np.testing.assert_array_equal(loaded.translate(image), Cascade.untrained(cfg, seed=3).translate(image))
    registry.promote("reg-test", v1, "champion")
    champion = registry.load_cascade("models:/reg-test@champion")
    np.testing.assert_array_equal(champion.translate(image), cascade.translate(image))
    with pytest.raises(ValueError, match="no version '9'"):
        registry.promote("reg-test", "9", "champion")
    with pytest.raises(ValueError, match="models:/reg-test@nope"):
        registry.load_cascade("models:/reg-test@nope")


def test_cli_promote_and_translate_from_registry(tracking, tmp_path, rng):
    from msgan.cli import main
    from msgan.io.volume import Geometry, read_volume, write_volume

    cfg = load_config(None, TINY)
    runs = registry.job_runs("exp", "job-c", 2, cfg.to_dict())
    version = registry.register_cascade(Cascade.untrained(cfg, seed=4), runs.parent, "cli-test")
    assert main(["promote", "cli-test", version, "--alias", "champion"]) == 0
    write_volume(tmp_path / "in.mha", rng.uniform(-1000, 0, (16, 16, 16)).astype(np.float32), Geometry.identity(3))
    assert main(["translate", str(tmp_path / "in.mha"), str(tmp_path / "out.mha"), "--model",
                 "models:/cli-test@champion", "--quiet"]) == 0  # fmt: skip
    assert read_volume(tmp_path / "out.mha")[0].shape == (16, 16, 16)


# ----------------------------------------------------------------------------- the registered artifact is data


class _Payload:
    """Unpickling this object creates ``marker``: a stand-in for code an attacker stores in an artifact."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _registered(tmp_path, name="safe", seed=2):
    cfg = load_config(None, TINY)
    runs = registry.job_runs("exp", f"job-{name}", 2, cfg.to_dict(), artifact_root=f"file://{tmp_path}/store")
    version = registry.register_cascade(Cascade.untrained(cfg, seed=seed), runs.parent, name)
    client = MlflowClient(registry.tracking_uri())
    mv = client.get_model_version(name, version)
    run_dir = Path(client.get_run(runs.parent).info.artifact_uri.removeprefix("file://"))
    return cfg, runs, mv, run_dir / mv.source.split("/", 2)[2]


def test_registered_cascade_is_weights_manifest_and_checksums(tracking, tmp_path, rng):
    cfg, _, mv, folder = _registered(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "scale_0.pt", "scale_1.pt"]
    assert mv.tags[registry.FORMAT_TAG] == "msgan-cascade/2"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert "spec" in manifest and not {"config", "train", "job", "data"} & set(manifest)
    assert mv.tags[registry.MANIFEST_TAG] == hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    assert registry.pin_model("models:/safe@candidate") == f"models:/safe/{mv.version}"
    assert registry.pin_model("/some/folder") == "/some/folder"
    image = rng.uniform(-1000, 500, (16, 18, 20)).astype(np.float32)
    want = Cascade.untrained(cfg, seed=2).translate(image)
    np.testing.assert_array_equal(registry.load_cascade(f"models:/safe/{mv.version}").translate(image), want)
    with pytest.raises(registry.ModelLoadError, match="expected models:/NAME@ALIAS or models:/NAME/VERSION"):
        registry.load_cascade("models:/safe")


def test_code_stored_with_a_registered_model_is_never_run(tracking, tmp_path):
    marker = tmp_path / "code-ran"
    # 1. a version logged as an MLflow pyfunc from code (what main registered): its code file runs on load
    code = tmp_path / "model_code.py"
    code.write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from mlflow.models import set_model\nfrom mlflow.pyfunc import PythonModel\n"
        "class M(PythonModel):\n    def predict(self, context, model_input, params=None):\n        return model_input\n"
        "set_model(M())\n"
    )
    exp = MlflowClient(tracking).create_experiment("pyfunc", artifact_location=f"file://{tmp_path}/pyfunc")
    with mlflow.start_run(experiment_id=exp):  # MLflow's fluent API follows MLFLOW_TRACKING_URI (the fixture's)
        info = mlflow.pyfunc.log_model(name="cascade", python_model=str(code))
    marker.unlink(missing_ok=True)  # logging itself ran the code once, on the attacker's side
    mlflow.register_model(info.model_uri, "pyfunc-model")
    with pytest.raises(registry.ModelLoadError, match="not an msgan cascade artifact"):
        registry.load_cascade("models:/pyfunc-model/1")
    assert not marker.exists(), "loading the registered model ran code stored with it"

    # 2. a sound cascade whose artifact directory also holds a python file, an MLmodel and a pickle
    cfg, _, mv, folder = _registered(tmp_path)
    (folder / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    (folder / "payload.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    (folder / "MLmodel").write_text("python_function:\n  loader_module: evil\n")
    assert registry.load_cascade("models:/safe@candidate").config.num_scales == 2
    assert not marker.exists()

    # 3. a version whose weight file is a pickled object (manifest and registry tags made to match it)
    bad = tmp_path / "bad"
    Cascade.untrained(cfg, seed=1).save(bad)
    torch.save({"weight": _Payload(marker)}, bad / "scale_1.pt")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["weights"][1]["sha256"] = hashlib.sha256((bad / "scale_1.pt").read_bytes()).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(manifest))
    client = MlflowClient(tracking)
    client.log_artifacts(mv.run_id, str(bad), "cascade/bad")
    digest = hashlib.sha256((bad / "manifest.json").read_bytes()).hexdigest()
    tags = {registry.FORMAT_TAG: "msgan-cascade/1", registry.MANIFEST_TAG: digest}
    client.create_model_version("safe", f"runs:/{mv.run_id}/cascade/bad", run_id=mv.run_id, tags=tags)
    with pytest.raises(registry.ModelLoadError, match="not a weights file torch can load weights-only") as err:
        registry.load_cascade("models:/safe/2")
    assert not marker.exists()
    assert "models:/safe/2: scale_1.pt" in str(err.value) and "GLOBAL posix.system" in str(err.value)
    assert "weights_only=False" not in str(err.value) and "weights_only` set to `False" not in str(err.value)


def test_tampered_artifacts_fail_their_checksums(tracking, tmp_path):
    _, _, mv, folder = _registered(tmp_path)
    weights = folder / "scale_1.pt"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(registry.ModelLoadError, match=r"scale_1.pt: checksum does not match the manifest"):
        registry.load_cascade("models:/safe@candidate")
    manifest = folder / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"scale_1.pt"', '"../../../etc/passwd"'))
    with pytest.raises(registry.ModelLoadError, match="does not match the sha256 recorded at registration"):
        registry.load_cascade(f"models:/safe/{mv.version}")


def test_oversized_or_misshapen_artifacts_are_refused_before_download(tracking, tmp_path):
    _, _, _, folder = _registered(tmp_path)
    with (folder / "scale_0.pt").open("r+b") as f:  # sparse: 2 GiB + 1 byte on paper, nothing on disk
        f.truncate(registry.WEIGHTS_MAX_BYTES + 1)
    with pytest.raises(
        registry.ModelLoadError, match=r"models:/safe/1: scale_0.pt: 2147483649 bytes, above the cap of 2147483648"
    ) as err:
        registry.load_cascade("models:/safe/1")
    assert "refused before downloading it" in str(err.value)
    (folder / "scale_0.pt").unlink()
    (folder / "scale_0.pt").mkdir()
    (folder / "scale_0.pt" / "big.bin").write_bytes(b"x" * 10)
    with pytest.raises(registry.ModelLoadError, match=r"scale_0.pt: a directory in the artifact directory"):
        registry.load_cascade("models:/safe@candidate")


@pytest.mark.slow
def test_round_trip_through_an_mlflow_server_with_basic_auth(tmp_path, monkeypatch, rng):
    """MLflow as infra/compose.yaml runs it (basic auth, its auth config): 401 without credentials; the
    cascade registers, pins and loads over HTTP (artifacts proxied) with MLFLOW_TRACKING_USERNAME/PASSWORD."""
    import configparser
    import secrets
    import signal
    import socket
    import subprocess
    import sys
    import time

    import requests
    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parents[1] / "infra" / "compose.yaml").read_text())
    ini = configparser.ConfigParser()
    ini.read_string(compose["configs"]["mlflow-auth"]["content"])
    ini["mlflow"]["database_uri"] = f"sqlite:///{tmp_path}/auth.db"
    with (tmp_path / "auth.ini").open("w") as f:
        ini.write(f)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    password = secrets.token_hex(12)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(tmp_path / "auth.ini")
    env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"] = "jobs", password
    env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(16)
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
         "--artifacts-destination", f"file://{tmp_path}/artifacts", "--serve-artifacts"],
        env=env, stdout=(tmp_path / "server.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and server.poll() is None:
            try:
                if requests.get(f"{base}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        else:
            pytest.fail(f"MLflow did not start: {(tmp_path / 'server.log').read_text()[-3000:]}")
        search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        assert requests.get(search, timeout=30).status_code == 401
        assert requests.get(search, auth=("jobs", "wrong"), timeout=30).status_code == 401

        monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "jobs")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        cfg = load_config(None, TINY)
        runs = registry.job_runs("exp", "job-http", 2, cfg.to_dict())
        version = registry.register_cascade(Cascade.untrained(cfg, seed=7), runs.parent, "http-cascade")
        pinned = registry.pin_model("models:/http-cascade@candidate")
        assert pinned == f"models:/http-cascade/{version}"
        image = rng.uniform(-1000, 500, (16, 18, 20)).astype(np.float32)
        want = Cascade.untrained(cfg, seed=7).translate(image)
        np.testing.assert_array_equal(registry.load_cascade(pinned).translate(image), want)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-123")
        with pytest.raises(registry.ModelLoadError, match="401") as err:
            registry.load_cascade(pinned)
        assert "wrong-password-123" not in str(err.value)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def test_default_tracking_store_is_the_settings_one(tmp_path, monkeypatch):
    """One definition of the default MLflow store (msgan.settings); registry makes its folder."""
    from msgan import settings

    monkeypatch.setenv("MSGAN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(settings, "DEFAULT_DB", "elsewhere/tracking.db")
    assert (
        registry.tracking_uri() == settings.default_tracking_uri() == f"sqlite:///{tmp_path}/home/elsewhere/tracking.db"
    )
    assert (tmp_path / "home" / "elsewhere").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/given/mlflow.db")
    assert registry.tracking_uri() == f"sqlite:///{tmp_path}/given/mlflow.db"
    assert not (tmp_path / "given").exists()  # a given store is used as given


# ----------------------------------------------------------------------------- the spec in, the run settings out


def test_a_model_registered_before_the_model_spec_still_loads(tracking, tmp_path):
    """tests/fixtures/cascade_v1 (manifest format msgan-cascade/1, the whole config), registered as the old
    code registered it: its artifact, the format tag and the manifest's sha256. The new code loads it and
    translates the same."""
    fixture = Path(__file__).parent / "fixtures" / "cascade_v1"
    client = MlflowClient(tracking)
    exp = client.create_experiment("old", artifact_location=f"file://{tmp_path}/old")
    run_id = client.create_run(exp).info.run_id
    client.log_artifacts(run_id, str(fixture / "model"), "cascade/0123456789abcdef")
    client.create_registered_model("old-cascade")
    digest = hashlib.sha256((fixture / "model" / "manifest.json").read_bytes()).hexdigest()
    tags = {registry.FORMAT_TAG: "msgan-cascade/1", registry.MANIFEST_TAG: digest}
    client.create_model_version("old-cascade", f"runs:/{run_id}/cascade/0123456789abcdef", run_id=run_id, tags=tags)
    cascade = registry.load_cascade("models:/old-cascade/1")
    assert cascade.spec.condition == "image+edges" and cascade.config.data == load_config(None).data
    y = cascade.translate(np.load(fixture / "input.npy"), tile=8)
    np.testing.assert_allclose(y, np.load(fixture / "expected.npy"), rtol=0, atol=1e-3)


def test_run_settings_are_the_runs_params_and_tags_never_a_data_path(tracking, tmp_path):
    paths = ["/patients/doe-jane/ct.nii.gz", "/patients/roe-rick/ct.nii.gz"]
    over = {"data.source": "files", "data.paths": paths, "data.holdout_paths": ["/patients/x/ct.mha"]}
    cfg = load_config(None, {**TINY, **over, "train.steps": 17, "inference.actors": 5})
    runs = registry.job_runs("exp", "job-p", 2, cfg.to_dict())
    cascade = Cascade.untrained(cfg, seed=2)
    cascade.meta["data_fingerprint"] = "f00d"
    registry.register_cascade(cascade, runs.parent, "params-test")
    run = MlflowClient(tracking).get_run(runs.parent)
    params = run.data.params
    assert params["train.steps"] == "17" and params["inference.actors"] == "5" and params["job.experiment"] == "msgan"
    assert params["data.paths.count"] == "2" and params["data.holdout_paths.count"] == "1"
    assert "data.paths" not in params and not any("patients" in v for v in params.values())
    assert run.data.tags["msgan.data_fingerprint"] == "f00d"
    mv = MlflowClient(tracking).get_model_version("params-test", "1")
    assert mv.tags["msgan.data_fingerprint"] == "f00d"
    loaded = registry.load_cascade("models:/params-test/1")
    assert loaded.spec == cfg.spec() and loaded.config.train.steps != 17 and loaded.config.data.paths == ()


def test_a_version_whose_source_leaves_its_own_run_is_refused(tracking, tmp_path):
    """The registry names where a version's weights are: only the version's own run's artifact directory is read,
    never an absolute path, a file:// URI, another run or a path that climbs out of the run (a registry entry
    edited to point at a cascade from anywhere loaded it, as long as the copy matched)."""
    _, _, mv, folder = _registered(tmp_path)
    client = MlflowClient(tracking)
    tags = {registry.FORMAT_TAG: "msgan-cascade/1", registry.MANIFEST_TAG: mv.tags[registry.MANIFEST_TAG]}
    other = client.create_run(client.get_run(mv.run_id).info.experiment_id).info.run_id
    sources = [
        f"runs:/{mv.run_id}/cascade/../../{folder.name}",
        f"runs:/{other}/cascade",
        str(folder),
        f"file://{folder}",
    ]
    refused = []
    for source in sources:
        try:
            version = client.create_model_version("safe", source, run_id=mv.run_id, tags=tags).version
        except mlflow.exceptions.MlflowException:
            continue  # MLflow itself refused to register it: nothing to load
        with pytest.raises(registry.ModelLoadError, match="is not an artifact directory of its own run"):
            registry.load_cascade(f"models:/safe/{version}")
        refused.append(source)
    assert len(refused) >= 2, refused  # the registry took them: the check above is what stopped them
    assert registry.load_cascade(f"models:/safe/{mv.version}").config.num_scales == 2  # its own run: loads
