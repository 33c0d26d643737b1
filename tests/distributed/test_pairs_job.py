"""The main job on a user's own pairs (data.source: pairs): a pairs manifest of image files, one target on
another grid (resampled), one with padding outside the field of view; the job prepares, trains, registers
and scores the held-out pair without phantom labels; bad pairs fail before any work."""

import csv
import sqlite3
from pathlib import Path

import pytest
from mlflow import MlflowClient

from msgan.data.phantom import kernel_pair
from msgan.io.volume import Geometry, write_volume
from tests.distributed.conftest import run_job, write_config

pytestmark = pytest.mark.slow


def _write_pairs(root: Path) -> Path:
    """Four subjects (sharp source, soft target) as NIfTI: rows 2-3 train, 4 validation, 5 holdout. Subject
    3's target lies on a grid shifted by 2 voxels (resampled onto the source's); subject 2's target has a
    -3024 HU padding band outside the field of view."""
    root.mkdir(parents=True)
    rows = []
    for k, (seed, split) in enumerate([(1, "train"), (2, "train"), (3, "validation"), (4, "holdout")]):
        soft, sharp = kernel_pair((24, 24, 24), seed)
        geom = Geometry.identity(3)
        tgeom = geom
        if seed == 3:
            tgeom = Geometry(origin=(2.0, 0.0, 0.0), spacing=geom.spacing, direction=geom.direction)
        if seed == 2:
            soft = soft.copy()
            soft[:, :3, :] = -3024.0
        write_volume(root / f"s{seed}_sharp.nii.gz", sharp, geom)
        write_volume(root / f"s{seed}_soft.nii.gz", soft, tgeom)
        rows.append({"source": f"s{seed}_sharp.nii.gz", "target": f"s{seed}_soft.nii.gz", "split": split,
                     "patient": f"p{k}"})  # fmt: skip
    path = root / "pairs.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["source", "target", "split", "patient"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_job_trains_on_pairs_and_scores_the_holdout_pair(tmp_path, job_env):
    pairs = _write_pairs(tmp_path / "data")
    storage = tmp_path / "storage"
    extra = {
        "condition": "image+edges", "source_residual": True, "hr_generator": {"residual": False},
        "data": {"source": "pairs", "pairs": str(pairs), "align": "none"}, "job": {"storage": str(storage)},
    }  # fmt: skip
    cfg = write_config(tmp_path, extra)
    proc = run_job(cfg, job_env, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "2 training + 1 validation volumes + 1 held-out pairs" in out  # held-out ones checked before training
    assert "pairs.csv row 3: resample" in out or "pairs.csv row 4: none" in out, out
    assert "translating held-out volumes" in out
    assert "pairs.csv row 5: SSIM input" in out and "body and overlap" in out
    # prepared stores keep each pair's valid voxels; subject 2's padding is outside them
    stores = list((storage / "pyramids").glob("*.zarr"))
    assert len(stores) == 4
    assert sum((s / "valid").exists() for s in stores) == 4
    client = MlflowClient(job_env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("test")
    parent = next(r for r in client.search_runs([exp.experiment_id]) if "msgan.pairs_fingerprint" in r.data.tags)
    assert parent.data.tags["msgan.align"] == "none"
    assert "holdout_mean_ssim" in parent.data.metrics and "align_residual" in parent.data.metrics
    history = client.get_metric_history(parent.info.run_id, "align_overlap")
    assert sorted(m.step for m in history) == [2, 3, 4, 5]
    assert "holdout_input_ssim" in parent.data.metrics
    # no patient path in the registered model
    version = client.get_model_version("tiny", "1")
    art = Path(client.download_artifacts(version.run_id, "", str(tmp_path / "dl")))
    text = "".join(p.read_text(errors="ignore") for p in art.rglob("*.json"))
    assert "s1_sharp" not in text and "pairs.csv" not in text


def test_bad_pairs_fail_before_any_work(tmp_path, job_env):
    pairs = _write_pairs(tmp_path / "data")
    text = pairs.read_text().replace("s2_soft.nii.gz", "missing.nii.gz")
    pairs.write_text(text)
    storage = tmp_path / "storage"
    extra = {
        "condition": "image", "source_residual": True, "hr_generator": {"residual": False},
        "data": {"source": "pairs", "pairs": str(pairs)}, "job": {"storage": str(storage)},
    }  # fmt: skip
    cfg = write_config(tmp_path, extra)
    proc = run_job(cfg, job_env, tmp_path)
    assert proc.returncode != 0
    assert "row 3" in proc.stderr + proc.stdout and "missing.nii.gz" in proc.stderr + proc.stdout
    assert not storage.exists()
    db = Path(job_env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    if db.exists():
        with sqlite3.connect(db) as con:
            assert con.execute("select count(*) from runs").fetchone()[0] == 0
