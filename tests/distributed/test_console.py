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


def test_job_console_is_short_and_free_of_ray_internals(tmp_path, job_env):
    job_env["MSGAN_HOME"] = str(tmp_path / "home")
    cfg = write_config(tmp_path, {"job": {"storage": "store"}})  # relative: under MSGAN_HOME, not the cwd
    r = subprocess.run([sys.executable, str(JOB), "--config", str(cfg)], env=job_env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-4000:]
    noises = ("Failed to query Ray Train Controller", "Checkpoint successfully created", "Reporting training result",
              "(RayTrainWorker", "(TrainController", "INFO", "WARNING", "Warning")  # fmt: skip
    for noise in noises:
        assert noise not in text, (noise, text)
    lines = text.splitlines()
    assert len(lines) <= 30, text
    assert f"storage file://{tmp_path}/home/store" in text and not (tmp_path / "store").exists()
    assert re.search(r"\[scale 1\]: \d+/6 steps \(\s*\d+%\)  [\d.]+ steps/(s|min)  ETA", text), text
    assert "[scale 0] done: 6 steps" in text and "[scale 1] done: 6 steps" in text
    assert "val SSIM" in text and "Outputs: " in text and "picture: " in text

    # every scale's MLflow run carries its sample montage, a readable PNG
    from matplotlib.image import imread
    from mlflow import MlflowClient

    client = MlflowClient(job_env["MLFLOW_TRACKING_URI"])
    (exp,) = [e for e in client.search_experiments() if e.name == "test"]
    children = [r for r in client.search_runs([exp.experiment_id]) if "msgan.scale" in r.data.tags
                or r.data.tags.get("mlflow.parentRunId")]  # fmt: skip
    assert len(children) == 2, [r.data.tags for r in client.search_runs([exp.experiment_id])]
    for run in children:
        (art,) = client.list_artifacts(run.info.run_id, "samples")
        png = imread(client.download_artifacts(run.info.run_id, art.path, str(tmp_path)))
        assert png.shape[0] > 4 * 100 and png.shape[1] > 300 and png.std() > 0.01, png.shape  # 4 rows x 3 panels
