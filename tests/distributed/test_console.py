"""What a person reads from the main job: our progress, no Ray chatter, and failures with their cause."""

import io
import re
import subprocess
import sys

import pytest

from tests.distributed.conftest import JOB, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from msgan.console import ray_init_kwargs

    ray.init(num_cpus=2, include_dashboard=False, **ray_init_kwargs(verbose=False))
    yield
    ray.shutdown()


def test_a_failing_worker_shows_its_cause_on_the_quiet_console(local_ray, tmp_path):
    """Workers' output is not forwarded in quiet mode; the failure's cause still reaches the console,
    through the progress board while the scale runs and in the summary when it ends."""
    from msgan import console, storage
    from msgan.distributed.pipeline import TrainingConsole, summary_table
    from msgan.distributed.train import train_all_scales
    from tests.conftest import tiny_config

    cfg = tiny_config(**{"num_scales": 2, "train.steps": 2, "job.max_failures": 0, "job.cpus_per_worker": 0.5})
    missing = storage.normalize_uri(tmp_path / "pyramids" / "gone-0123.zarr")  # prepared, then lost
    out = io.StringIO()
    view = TrainingConsole(cfg, print, console.Progress(out, tty=False))
    board = console.ProgressBoard()
    stop = board.follow(view.handle, interval=0.2)
    try:
        outcomes = train_all_scales(
            cfg, "fails", [missing], [], storage.normalize_uri(tmp_path / "store"), None, None, scales=[1],
            board=board.handle,
        )  # fmt: skip
    finally:
        stop()
    (outcome,) = outcomes
    assert outcome.summary is None and "gone-0123.zarr" in outcome.error, outcome.error
    assert "\n" not in outcome.error and "Traceback" not in outcome.error
    assert re.search(r"\[scale 1\] worker \(rank 0\) failed: .*gone-0123\.zarr", out.getvalue()), out.getvalue()
    assert re.search(r"1  FAILED: .*gone-0123\.zarr", summary_table(outcomes))


def test_ray_job_submit_keeps_storage_and_mlflow_under_msgan_home_and_stays_quiet(tmp_path, job_env):
    """The issue's case: under `ray job submit --working-dir`, a relative storage path and the default MLflow
    store resolved inside Ray's temporary package folder. Now both live under MSGAN_HOME; `msgan doctor`
    checks the same cluster's address and token first."""
    import secrets

    from tests.ray_procs import RAY, free_port, ray_head

    home = tmp_path / "home"
    env = {k: v for k, v in job_env.items() if k != "MLFLOW_TRACKING_URI"}  # the default store
    env |= {"MSGAN_HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    port, dash = free_port(), free_port()
    args = ("--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}")  # fmt: skip
    with ray_head(env, *args) as ray_tmp:
        address = f"http://127.0.0.1:{dash}"
        doctor = [sys.executable, "-m", "msgan.cli", "doctor", "--storage", str(tmp_path / "probe")]
        ok = subprocess.run(doctor, env=env | {"RAY_ADDRESS": address}, capture_output=True, text=True, timeout=120)
        assert f"ok    ray      job server at {address}, token set" in ok.stdout, ok.stdout + ok.stderr
        bad = subprocess.run(doctor, env=env | {"RAY_ADDRESS": address, "RAY_AUTH_TOKEN": "0" * 64},
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        (ray_line,) = [ln for ln in bad.stdout.splitlines() if ln.startswith("FAIL  ray")]
        assert bad.returncode == 1 and "RAY_AUTH_TOKEN is wrong" in ray_line, ray_line

        wd = tmp_path / "wd"
        wd.mkdir()
        write_config(wd, {"job": {"storage": "store"}})  # relative, as a user writes it
        submit = subprocess.run(
            [RAY, "job", "submit", f"--address={address}", "--working-dir", str(wd), "--",
             sys.executable, str(JOB), "--config", "job.yaml"],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        out = submit.stdout + submit.stderr
        assert submit.returncode == 0, out[-4000:]
        assert f"storage file://{home}/store" in out and f"MLflow  sqlite:///{home}/runs/mlflow.db" in out
        assert (home / "store" / "pyramids").is_dir() and (home / "runs" / "mlflow.db").is_file()
        assert not list(ray_tmp.rglob("store")), "storage inside Ray's temporary folders"
    # what the job printed, from its first line to the end of its log (before it: `ray job submit`'s own
    # header and the job manager's "Runtime env is setting up", Ray's, not the job's)
    job_log = out[out.index("storage file://") : out.rindex("Job '")].splitlines()
    ours = [ln for ln in job_log if ln.strip() and not set(ln.strip()) <= {"-"}]
    for noise in ("Failed to query Ray Train Controller", "Checkpoint successfully created", "(RayTrainWorker"):
        assert noise not in out, (noise, out)
    for noise in ("Reporting training result", "(TrainController", "(raylet)", "INFO", "WARNING", "Warning"):
        assert not [ln for ln in ours if noise in ln], (noise, out)
    assert len(ours) <= 30, out
    assert re.search(r"\[scale 1\]: \d+/6 steps \(\s*\d+%\)  [\d.]+ steps/(s|min)  ETA", out), out
    assert "[scale 0] done: 6 steps" in out and "[scale 1] done: 6 steps" in out
    assert "val SSIM" in out and "Outputs: " in out and "picture: " in out

    # every scale's MLflow run carries its sample montage, a readable PNG
    from matplotlib.image import imread
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{home}/runs/mlflow.db")
    (exp,) = [e for e in client.search_experiments() if e.name == "test"]
    children = [r for r in client.search_runs([exp.experiment_id]) if "msgan.scale" in r.data.tags
                or r.data.tags.get("mlflow.parentRunId")]  # fmt: skip
    assert len(children) == 2, [r.data.tags for r in client.search_runs([exp.experiment_id])]
    for run in children:
        (art,) = client.list_artifacts(run.info.run_id, "samples")
        png = imread(client.download_artifacts(run.info.run_id, art.path, str(tmp_path)))
        assert png.shape[0] > 4 * 100 and png.shape[1] > 300 and png.std() > 0.01, png.shape  # 4 rows x 3 panels
