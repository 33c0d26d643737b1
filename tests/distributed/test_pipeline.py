"""The main job end to end on real components: local Ray (or a `ray start` cluster with `ray job submit`),
a loopback S3 server, an MLflow sqlite store."""

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import s3_keys
from tests.distributed.conftest import JOB, REPO, read_json, run_job, write_config
from tests.ray_procs import short_temp_dir, stop_ray

pytestmark = pytest.mark.slow


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scale1_status_when(storage: Path, proc: subprocess.Popen, ready) -> dict | None:
    """Poll scale 1's status.json of the running job until ``ready(status)``; None if the job ends first."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        for status_path in storage.glob("runs/*/scale_1/status.json"):
            try:
                status = read_json(status_path)
            except json.JSONDecodeError:  # caught between write and rename on another filesystem
                continue
            if ready(status):
                return status
    return None


def _job_dirs(storage: Path) -> list[Path]:
    return sorted((storage / "runs").iterdir())


def test_bad_config_fails_before_training(tmp_path, job_env):
    cases = {
        "unknown key": ({"train": {"stpes": 3}}, "unknown key train.'stpes'"),
        "patch larger than a level": ({"train": {"hr_patch": 30}}, "hr_patch=30 is larger than scale 1"),
        "missing data": ({"data": {"source": "files", "paths": [str(tmp_path / "nope*.nii.gz")]}}, "matches no"),
    }
    for name, (extra, message) in cases.items():
        storage = tmp_path / name.replace(" ", "_")
        cfg = write_config(tmp_path, extra | {"job": {"storage": str(storage)}}, name=f"{storage.name}.yaml")
        t0 = time.perf_counter()
        r = run_job(cfg, job_env, tmp_path, 120)
        assert r.returncode == 2, (name, r.stdout[-2000:], r.stderr[-2000:])
        assert message in r.stderr, (name, r.stderr[-2000:])
        assert not storage.exists(), f"{name}: work started before the configuration was rejected"
        assert time.perf_counter() - t0 < 60


def test_ray_job_submit_registers_a_cascade_that_translates(tmp_path, job_env, monkeypatch):
    """`ray start --head` on loopback, `ray job submit` of the job, then the registry's cascade translates."""
    port, dash = _free_port(), _free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # token authentication, as Ray 2.60 enables for clusters: the head and the submitting client share it
    env = {**job_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # its own temp dir and ports, stopped by exactly those processes after (never `ray stop`: other clusters run here)
    ray_tmp = short_temp_dir()
    start = subprocess.run(
        [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--temp-dir={ray_tmp}", f"--ray-client-server-port={_free_port()}",
         f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        storage = tmp_path / "storage"
        cfg = write_config(tmp_path, {"job": {"storage": str(storage)}})
        runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"]}})
        submit = subprocess.run(
            [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--submission-id=msgan-test",
             f"--runtime-env-json={runtime_env}", "--", sys.executable, str(JOB), "--config", str(cfg)],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        out = submit.stdout + submit.stderr
        assert submit.returncode == 0, out[-4000:]
        status = subprocess.run(
            [ray_bin, "job", "status", f"--address=http://127.0.0.1:{dash}", "msgan-test"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "job 'msgan-test' succeeded" in (status.stdout + status.stderr).lower()
        assert "registering the cascade" in out and "[scale 1] done" in out

        # the batch translation through the same cluster, with the model just registered
        from msgan.data.phantom import kernel_pair
        from msgan.io.volume import Geometry, write_zarr

        write_zarr(tmp_path / "vols" / "v1.zarr", [kernel_pair((20, 26, 22), seed=5)[1]], Geometry.identity(3))
        batch = subprocess.run(
            [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}", f"--runtime-env-json={runtime_env}",
             "--", sys.executable, str(REPO / "jobs" / "translate_batch.py"), "--model", "models:/tiny@candidate",
             "--inputs", str(tmp_path / "vols"), "--output", str(tmp_path / "translated")],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert batch.returncode == 0, (batch.stdout + batch.stderr)[-4000:]
        assert (tmp_path / "translated" / "v1.zarr" / "manifest.json").is_file()
    finally:
        stop_ray(ray_tmp)

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert str(client.get_model_version_by_alias("tiny", "candidate").version) == "1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    from msgan.registry import load_cascade

    cascade = load_cascade("models:/tiny@candidate")
    from msgan.data.phantom import kernel_pair

    _, sharp = kernel_pair((20, 26, 22), seed=5)
    out_img = cascade.translate(sharp)
    assert out_img.shape == sharp.shape and np.isfinite(out_img).all()
    assert cascade.meta["steps"] == [6, 6]


def test_s3_storage_and_resubmission(tmp_path, job_env, s3_bucket):
    env = {**job_env, **{k: os.environ[k] for k in os.environ if k.startswith(("AWS_", "MLFLOW_S3"))}}
    cfg = write_config(tmp_path, {"job": {"storage": f"s3://{s3_bucket}/msgan"}})
    first = run_job(cfg, env, tmp_path)
    assert first.returncode == 0, (first.stdout[-3000:], first.stderr[-3000:])
    keys = s3_keys(s3_bucket, "msgan/")
    assert sum(k.endswith(".zarr/zarr.json") and "/pyramids/" in k for k in keys) == 3  # 2 training + 1 held out
    assert any("/ray/" in k and "/checkpoint_" in k and k.endswith("state.pt") for k in keys)
    assert sum(k.endswith("/final/done.json") for k in keys) == 2
    assert any(k.startswith("msgan/mlflow-artifacts/") and "cascade" in k for k in keys), "model artifacts in S3"

    again = run_job(cfg, env, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 prepared, 3 already there" in again.stdout
    assert again.stdout.count("(done before)") == 2
    assert "version 1," in again.stdout  # registered once


def test_killed_worker_resumes_from_its_checkpoint(tmp_path, job_env):
    storage = tmp_path / "storage"
    cfg = write_config(
        tmp_path,
        {"train": {"steps_per_scale": [6, 600], "checkpoint_every": 25, "log_every": 25},
         "job": {"storage": str(storage)}},
    )  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, str(JOB), "--config", str(cfg)], env=job_env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout or []), daemon=True)
    reader.start()
    killed = _scale1_status_when(storage, proc, lambda st: st["attempt"] == 1 and 50 <= st["step"] < 500)
    assert killed is not None, "the scale-1 worker never reached a checkpoint to kill it after"
    os.kill(killed["pid"], signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, "".join(output)[-4000:]
    run = _job_dirs(storage)[0]
    s1, s0 = read_json(run / "scale_1" / "status.json"), read_json(run / "scale_0" / "status.json")
    assert s1["attempt"] == 2
    # it resumed from a checkpoint, not from zero: the last one Ray committed before the kill (the one
    # reported just before may not have been committed yet)
    assert 0 < s1["resumed_from"] <= killed["step"] and s1["resumed_from"] % 25 == 0, (killed, s1)
    assert s1["resumed_from"] >= killed["step"] - 25, (killed, s1)
    assert read_json(run / "scale_1" / "final" / "done.json")["steps"] == 600
    assert s0["attempt"] == 1 and read_json(run / "scale_0" / "final" / "done.json")["attempt"] == 1
    print(f"killed scale 1 at step {killed['step']} (pid {killed['pid']}); it resumed from step {s1['resumed_from']}")


def test_data_parallel_scales(tmp_path, job_env):
    """Two DDP workers per scale (gloo on CPU): both train, rank 0 checkpoints and finishes."""
    storage = tmp_path / "storage"
    cfg = write_config(tmp_path, {"job": {"storage": str(storage), "workers_per_scale": 2, "cpus_per_worker": 0.5}})
    r = run_job(cfg, job_env, tmp_path)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "world_size=2" in r.stdout + r.stderr
    run = _job_dirs(storage)[0]
    for s in (0, 1):
        assert read_json(run / f"scale_{s}" / "final" / "done.json")["steps"] == 6


def test_resubmitted_job_resumes_an_interrupted_scale(tmp_path, job_env):
    """The whole job dies mid-run (driver and local Ray killed); the same job again resumes, not restarts."""
    storage = tmp_path / "storage"
    cfg = write_config(
        tmp_path,
        {"train": {"steps_per_scale": [6, 400], "checkpoint_every": 25, "log_every": 25},
         "job": {"storage": str(storage)}},
    )  # fmt: skip
    ray_tmp = short_temp_dir()  # the job's local Ray lives here, so the test stops that Ray and no other
    proc = subprocess.Popen(
        [sys.executable, str(JOB), "--config", str(cfg)], env={**job_env, "RAY_TMPDIR": str(ray_tmp)}, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        seen = _scale1_status_when(storage, proc, lambda st: st["step"] >= 75)
        assert seen is not None, "scale 1 never reached step 75"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        stop_ray(ray_tmp)

    again = run_job(cfg, job_env, tmp_path)
    assert again.returncode == 0, (again.stdout[-3000:], again.stderr[-3000:])
    run = _job_dirs(storage)[0]
    s1 = read_json(run / "scale_1" / "status.json")
    assert s1["attempt"] == 2 and 0 < s1["resumed_from"] <= seen["step"], (seen, s1)
    assert read_json(run / "scale_1" / "final" / "done.json")["steps"] == 400
    print(f"job killed with scale 1 at step {seen['step']}; the resubmitted job resumed it from {s1['resumed_from']}")
