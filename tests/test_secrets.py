"""Secrets never reach output, logs, exception texts or a Ray task's visible environment.

Passwords go into the PACS URL (and MSGAN_PACS_PASSWORD), the MLflow tracking URI and the S3 settings;
real commands run against a real Orthanc and a loopback S3 server, through success and error paths, and
every byte they print or leave behind (the S3 bucket, MSGAN_HOME, Ray's session logs) is searched."""

import os
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import _free_port, s3_keys
from tests.ray_procs import short_temp_dir, stop_ray

pytestmark = pytest.mark.slow

PACS_URL_PW = "s3cret-pw"  # the test Orthanc's real password, given inside the URL
PACS_PW = "pacs-Secret-9f2"  # MSGAN_PACS_PASSWORD (wrong on purpose in the error case)
MLFLOW_PW = "mlflow-Secret-7c1"
S3_SECRET = "s3-Secret-4ab"
SESSION_TOKEN = "session-Token-e55"


def _env(tmp_path, orthanc, s3_server, pacs_port=None, ray_tmp=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_", "MSGAN_"))}
    rest = orthanc["rest"] if pacs_port is None else f"http://127.0.0.1:{pacs_port}"
    host = rest.removeprefix("http://")
    env |= {
        "MSGAN_HOME": str(tmp_path / "home"),
        "MSGAN_PACS_URL": f"http://{orthanc['user']}:{PACS_URL_PW}@{host}/dicom-web",
        "MLFLOW_TRACKING_URI": f"http://mlflow-user:{MLFLOW_PW}@127.0.0.1:{_free_port()}",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_SESSION_TOKEN": SESSION_TOKEN,
        "AWS_DEFAULT_REGION": "us-east-1",
        "RAY_TMPDIR": str(ray_tmp or tmp_path / "ray"),
        "PYTHONUNBUFFERED": "1",
    }
    return env


def _msgan(env, *args, timeout=300):
    r = subprocess.run([sys.executable, "-m", "msgan.cli", *args], env=env, capture_output=True, text=True,
                       timeout=timeout)  # fmt: skip
    return r.returncode, r.stdout + r.stderr


def _job(env, script, *args, timeout=600):
    job = Path(__file__).resolve().parents[1] / "jobs" / script
    r = subprocess.run([sys.executable, str(job), *args], env=env, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def _leaks(text: str) -> list[str]:
    return [s for s in (PACS_URL_PW, PACS_PW, MLFLOW_PW, S3_SECRET, SESSION_TOKEN) if s in text]


def test_no_password_in_output_or_logs(tmp_path, orthanc, s3_bucket, s3_server, request):
    from msgan.cascade import Cascade
    from msgan.io.volume import Geometry, write_volume, write_zarr
    from tests.conftest import tiny_config

    model = str(Cascade.untrained(tiny_config(num_scales=2), seed=1).save(tmp_path / "model"))
    write_volume(tmp_path / "in.mha", np.zeros((8, 8, 8), np.float32), Geometry.identity(3))
    ray_tmp = short_temp_dir()  # Ray's unix sockets need a short path
    request.addfinalizer(lambda: stop_ray(ray_tmp))
    env = _env(tmp_path, orthanc, s3_server, ray_tmp=ray_tmp)
    vols, out = f"s3://{s3_bucket}/vols", f"s3://{s3_bucket}/translated"
    write_zarr(
        f"{vols}/v1.zarr",
        [np.random.default_rng(0).uniform(-1000, 500, (12, 12, 12)).astype(np.float32)],
        Geometry.identity(3),
    )
    store = f"s3://{s3_bucket}/pacs"
    outputs: dict[str, tuple[int, str]] = {
        # all three settings at once: storage and PACS answer, MLflow does not
        "doctor": _msgan(env, "doctor", "--storage", f"s3://{s3_bucket}/probe"),
        # a real pass over the real PACS, state in S3 (nothing matches the kernel: no translation)
        "pacs-sync": _msgan(env, "pacs-sync", "--model", model, "--storage", store, "--kernel", "NO-SUCH-KERNEL"),
        # a batch on a local Ray (its session logs under RAY_TMPDIR), outputs on S3
        "translate_batch": _job(env, "translate_batch.py", "--model", model, "--inputs", vols, "--output", out),
        # error paths: the registry unreachable, the PACS refusing the password, the PACS unreachable
        "translate from the registry": _msgan(
            env, "translate", str(tmp_path / "in.mha"), str(tmp_path / "out.mha"), "--model", "models:/m@champion"
        ),
        "pacs-sync, wrong password": _msgan(
            env | {"MSGAN_PACS_USER": "msgan", "MSGAN_PACS_PASSWORD": PACS_PW},
            "--verbose",
            "pacs-sync",
            "--model",
            model,
            "--storage",
            store,
        ),
        "pacs-sync, unreachable": _msgan(
            _env(tmp_path, orthanc, s3_server, pacs_port=_free_port()),
            "--verbose",
            "pacs-sync",
            "--model",
            model,
            "--storage",
            store,
        ),
    }
    codes = {name: code for name, (code, _) in outputs.items()}
    assert codes["pacs-sync"] == 0, outputs["pacs-sync"][1][-3000:]
    assert codes["translate_batch"] == 0, outputs["translate_batch"][1][-3000:]
    assert all(codes[k] != 0 for k in codes if k not in ("pacs-sync", "translate_batch", "doctor")), codes
    assert "refused the credentials" in outputs["pacs-sync, wrong password"][1]
    assert "***" in outputs["doctor"][1]  # the URIs are shown, with their passwords masked
    for name, (_, text) in outputs.items():
        assert not _leaks(text), f"{name} printed {_leaks(text)}:\n{text[-3000:]}"

    # what the runs left behind: the bucket, MSGAN_HOME, Ray's session logs
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    for key in s3_keys(s3_bucket):
        body = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read().decode(errors="replace")
        assert not _leaks(body), f"s3://{s3_bucket}/{key} holds {_leaks(body)}"
    assert list(ray_tmp.rglob("raylet.out")), "the batch left no Ray session logs to search"
    for root in (tmp_path / "home", ray_tmp):
        for path in (p for p in root.rglob("*") if p.is_file() and not p.is_socket()):
            assert not _leaks(path.read_bytes().decode(errors="replace")), f"{path} holds {_leaks(path.read_text())}"


def test_workers_get_no_credentials_through_runtime_env(monkeypatch):
    """The runtime_env carries where things are, never credentials (Ray shows it and logs it)."""
    from msgan import storage

    for k in ("AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "jobs")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://u:{MLFLOW_PW}@mlflow:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PW)
    for address in ("http://ray-head:8265", None):  # a cluster, and a local Ray the job starts itself
        if address:
            monkeypatch.setenv("RAY_ADDRESS", address)
        else:
            monkeypatch.delenv("RAY_ADDRESS")
        assert storage.env_for_workers() == {"AWS_ENDPOINT_URL": "http://minio:9000"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert storage.env_for_workers()["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_redaction_masks_secret_values_from_the_environment(monkeypatch, capsys):
    from msgan import redact

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("MSGAN_PACS_URL", f"http://u:{PACS_URL_PW}@pacs/dicom-web")
    text = f"botocore said {S3_SECRET}; requests said {PACS_URL_PW}; http://a:{MLFLOW_PW}@m"
    assert not _leaks(redact.redact_text(text))
    stream = redact.RedactingStream(sys.stdout)
    stream.write(text + "\n")
    out = capsys.readouterr().out
    assert not _leaks(out) and out.count("***") == 3


def test_cli_routes_all_output_through_redaction(tmp_path):
    """An error that quotes a secret value from the environment (here in a folder name) shows it masked."""
    secret_dir = tmp_path / f"folder-{S3_SECRET}"
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "MSGAN_HOME": str(tmp_path / "home")}
    code, text = _msgan(env, "--verbose", "info", str(secret_dir))
    assert code != 0 and "***" in text and not _leaks(text), text[-2000:]


def test_a_job_on_a_cluster_shows_no_credentials_in_tasks_actors_or_logs(tmp_path):
    """A batch submitted to a running cluster (RAY_ADDRESS) by a driver holding credentials: neither
    `ray list tasks/actors --detail` nor the cluster's session logs show them."""
    from msgan.cascade import Cascade
    from msgan.io.volume import Geometry, write_zarr
    from tests.conftest import tiny_config
    from tests.ray_procs import free_port, ray_head

    model = str(Cascade.untrained(tiny_config(num_scales=2), seed=1).save(tmp_path / "model"))
    image = np.random.default_rng(0).uniform(-1000, 500, (12, 12, 12)).astype(np.float32)
    write_zarr(tmp_path / "vols" / "v1.zarr", [image], Geometry.identity(3))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    base |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # as Ray 2.60 clusters have it
    gcs = free_port()
    head_args = ["--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
                 f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]  # fmt: skip
    with ray_head(base, *head_args) as ray_tmp:
        driver = base | {
            "RAY_ADDRESS": f"127.0.0.1:{gcs}",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9/visible-endpoint",  # not a secret: it reaches the tasks
            "AWS_ACCESS_KEY_ID": "jobs",
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_SESSION_TOKEN": SESSION_TOKEN,
            "MLFLOW_TRACKING_URI": f"http://u:{MLFLOW_PW}@127.0.0.1:{free_port()}",
            "MSGAN_HOME": str(tmp_path / "home"),
        }
        code, out = _job(driver, "translate_batch.py", "--model", model, "--inputs", str(tmp_path / "vols"),
                         "--output", str(tmp_path / "out"), "--set", "inference.actors=1")  # fmt: skip
        assert code == 0, out[-3000:]
        assert not _leaks(out), out[-3000:]
        cli = base | {"RAY_ADDRESS": f"127.0.0.1:{gcs}"}
        for kind in ("tasks", "actors", "jobs"):
            command = [str(Path(sys.executable).with_name("ray")), "list", kind, "--detail", "--limit", "1000"]
            listed = subprocess.run(command, env=cli, capture_output=True, text=True, timeout=120)
            assert listed.returncode == 0, listed.stderr[-2000:]
            if kind == "tasks":  # the runtime_env's variables are shown here: a secret among them would be too
                assert "visible-endpoint" in listed.stdout, listed.stdout[-2000:]
            assert not _leaks(listed.stdout), f"ray list {kind} --detail shows {_leaks(listed.stdout)}"
        for path in (p for p in ray_tmp.rglob("*") if p.is_file() and not p.is_socket()):
            text = path.read_bytes().decode(errors="replace")
            assert not _leaks(text), f"{path} holds {_leaks(text)}"
