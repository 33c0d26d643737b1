import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "train_all_scales.py"

TINY = {
    "dims": 3,
    "num_scales": 2,
    "lr_generator": {"width": 4, "depth": 1},
    "hr_generator": {"width": 4, "num_blocks": 1},
    "discriminator": {"width": 4, "num_layers": 1},
    "train": {"steps": 6, "batch_size": 2, "hr_patch": 8, "log_every": 2, "checkpoint_every": 2, "threads": 1},
    "data": {"phantom": {"shape": [24, 24, 24], "seeds": [1, 2], "holdout_seeds": [1000]}},
    "job": {"cpus_per_worker": 0.5, "experiment": "test", "registered_model": "tiny", "max_failures": 2},
}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def job_env(tmp_path):
    """Environment of a job process: its own MLflow store, no Ray cluster address (local Ray)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    env["PYTHONUNBUFFERED"] = "1"
    env["MSGAN_HOME"] = str(tmp_path / "msgan-home")  # relative paths and job outputs: never the user's ~/.msgan
    return env


def write_config(tmp_path: Path, extra: dict | None = None, name: str = "job.yaml") -> Path:
    cfg = merge(TINY, extra or {})
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_job(config: Path, env: dict, cwd: Path, timeout: int = 600, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(JOB), "--config", str(config), *extra],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
