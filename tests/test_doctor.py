import os
import socket

import pytest

from msgan.cli import main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens there


@pytest.fixture
def env(tmp_path, monkeypatch):
    for k in ("RAY_ADDRESS", "MSGAN_PACS_URL", "MSGAN_PACS_USER", "MSGAN_PACS_PASSWORD", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MSGAN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


def test_doctor_passes_on_real_storage_and_mlflow(env, capsys):
    assert main(["doctor", "--storage", str(env / "store")]) == 0
    out = capsys.readouterr().out
    assert f"ok    storage  file://{env}/store writable" in out
    assert f"ok    mlflow   sqlite:///{env}/mlflow.db answers" in out
    assert out.rstrip().endswith("everything a job needs is in place")
    assert list((env / "store").iterdir()) == []  # the probe is removed


def test_doctor_names_each_problem_in_one_line(env, capsys, monkeypatch):
    port = _closed_port()
    monkeypatch.setenv("MSGAN_PACS_URL", f"http://doc:s3cret@127.0.0.1:{port}/dicom-web")
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{port}")
    (env / "file").write_text("not a folder")
    assert main(["doctor", "--storage", str(env / "file" / "store")]) == 1
    out = capsys.readouterr().out
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith(("ok", "FAIL", "warn"))}
    assert lines["pacs"].startswith("FAIL") and f"127.0.0.1:{port}/dicom-web unreachable" in lines["pacs"]
    assert lines["ray"].startswith("FAIL") and "unreachable" in lines["ray"]
    assert lines["storage"].startswith("FAIL") and "not writable" in lines["storage"]
    assert lines["mlflow"].startswith("ok") and lines["python"].startswith("ok")
    assert "s3cret" not in out and "doc:***@" in lines["pacs"]
    assert out.rstrip().splitlines()[-1] == "3 problem(s): ray, storage, pacs"


def test_doctor_reaches_a_real_pacs_and_names_refused_credentials(env, orthanc, monkeypatch, capsys):
    monkeypatch.setenv("MSGAN_PACS_URL", orthanc["url"])
    monkeypatch.setenv("MSGAN_PACS_USER", orthanc["user"])
    monkeypatch.setenv("MSGAN_PACS_PASSWORD", orthanc["password"])
    assert main(["doctor", "--storage", str(env / "store")]) == 0
    assert f"ok    pacs     {orthanc['url']} answers QIDO-RS" in capsys.readouterr().out
    monkeypatch.setenv("MSGAN_PACS_PASSWORD", "wrong-" + orthanc["password"])
    assert main(["doctor", "--storage", str(env / "store")]) == 1
    out = capsys.readouterr().out
    assert "FAIL  pacs" in out and "refused the credentials (HTTP 401)" in out and "wrong-" not in out


def test_doctor_names_a_cpu_torch_on_a_gpu_machine(env, tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"  # what the driver's tool prints on a GPU node
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0000)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert main(["doctor", "--storage", str(env / "store"), "--gpu", "gpu"]) == 1
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if " gpu " in ln]
    assert line.startswith("FAIL") and "nvidia-smi lists NVIDIA H200 but torch" in line and "CPU build" in line
