"""Batch translation on a real local Ray cluster (Ray Data actor pool), file:// and a loopback S3 server."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr

from msgan import storage
from msgan.cascade import Cascade
from msgan.io.volume import Geometry, write_zarr
from tests.conftest import randomize_batchnorm, s3_keys, tiny_config

pytestmark = pytest.mark.slow

GEOM = Geometry((0.7, 0.7, 1.5), (1.0, 2.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
SHAPES = {"a": (37, 29, 41), "b": (24, 24, 24)}  # a: not a multiple of the tile


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)  # its own cluster, never another's
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = tiny_config(
        **{
            "hr_generator.norm": "batch",
            "inference.memory_budget_mb": 0.5,
            "inference.actors": 2,
            "inference.batch_size": 2,
        }
    )
    cascade = Cascade.untrained(cfg, seed=2)
    for g in cascade.generators[1:]:
        randomize_batchnorm(g)
    return str(cascade.save(tmp_path_factory.mktemp("model") / "cascade")), cascade


def _inputs(root: Path) -> dict[str, np.ndarray]:
    images = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        images[name] = np.random.default_rng(i).uniform(-1000, 500, shape).astype(np.float32)
        write_zarr(root / f"{name}.zarr", [images[name]], GEOM)
    return images


def _read(uri: str, level: str = "0") -> np.ndarray:
    store, opts = storage.zarr_store(uri)
    return zarr.open_group(store, mode="r", storage_options=opts)[level][...]


def test_distributed_equals_local_bytes_for_any_actor_count_rerun_skips_new_model_retranslates(
    tmp_path, ray_local, model
):
    from msgan.distributed.translate import translate_batch
    from msgan.volumes.local import translate_volume
    from msgan.volumes.tasks import volume_task

    path, cascade = model
    images = _inputs(tmp_path / "in")
    report = translate_batch([str(tmp_path / "in")], str(tmp_path / "out"), path, log=lambda _: None)
    assert sorted(m["volume"] for m in report.published) == ["a", "b"] and not report.failed
    one = translate_batch([str(tmp_path / "in")], str(tmp_path / "out1"), path, {"actors": 1}, log=lambda _: None)
    assert len(one.published) == 2 and report.model == one.model and report.run != one.run
    for name, img in images.items():
        out = _read(storage.normalize_uri(tmp_path / "out" / f"{name}.zarr"))
        assert float(np.abs(out - cascade.translate(img)).max()) < 1e-5 * 1024  # window units -> HU
        task = volume_task(str(tmp_path / "in" / f"{name}.zarr"), str(tmp_path / "local"), report.model)
        translate_volume(task, cascade)
        local = _read(task.output)
        assert out.tobytes() == local.tobytes(), f"{name}: 2 actors differ from the local path"
        assert _read(storage.normalize_uri(tmp_path / "out1" / f"{name}.zarr")).tobytes() == local.tobytes()
    tiles = report.tiles_computed
    assert tiles == sum(s["tiles"] for s in report.scales[1:]) > 20
    # the node's 2 CPUs shared by the pool: 2 actors run 1 torch thread each, 1 actor both cores (as in-process)
    assert [s["threads"] for s in report.scales[1:]] == [1, 1] and [s["threads"] for s in one.scales[1:]] == [2, 2]
    assert set(one.steps) == {"ray", "stage", "publish"} and all(s["busy_seconds"] > 0 for s in one.scales[1:])
    assert "Mvox/s" in report.summary()
    manifest = json.loads((tmp_path / "out" / "a.zarr" / "manifest.json").read_text())
    assert manifest["model"] == report.model and manifest["model_uri"] == str(Path(path).resolve())

    again = translate_batch([str(tmp_path / "in")], str(tmp_path / "out"), path, log=lambda _: None)
    assert again.skipped == ["a", "b"] and again.tiles_computed == 0 and not again.published

    other = Cascade.untrained(cascade.config, seed=5).save(tmp_path / "other")
    lines: list[str] = []
    new = translate_batch([str(tmp_path / "in" / "b.zarr")], str(tmp_path / "out"), str(other), log=lines.append)
    assert [m["volume"] for m in new.published] == ["b"] and not new.skipped
    assert new.retranslated == {"b": f"{report.model} -> {new.model}"}
    assert f"re-translated b: model {report.model} -> {new.model}" in new.summary()
    assert any("scale 2:" in line and "tiles/s" in line and "ETA" in line for line in lines), lines
    assert json.loads((tmp_path / "out" / "b.zarr" / "manifest.json").read_text())["model"] == new.model


def test_cpu_threads_share_the_node_among_the_actors_that_fit_on_it():
    from msgan.distributed.translate import cpu_threads

    assert cpu_threads(0.5, 1, 2) == 2  # one actor: the whole node, as msgan translate
    assert cpu_threads(0.5, 2, 2) == 1
    assert cpu_threads(0.5, 8, 2) == 1  # more actors than cores: never 0
    assert cpu_threads(0.5, 8, 16) == 2
    assert cpu_threads(4, 8, 16) == 4  # 4 of 8 actors fit on the node: its reservation each
    assert cpu_threads(2, 1, 1) == 2  # never below its own reservation


def test_batch_job_console_hides_ray_data_info_lines_unless_verbose(tmp_path, model):
    """The piped console of ``jobs/translate_batch.py``: our progress lines, not Ray Data's per-dataset
    "Starting execution" / "Execution plan" / "Dataset ... finished" lines (nor its progress-bar notes);
    ``--verbose`` shows them (they are still in Ray Data's session log)."""
    import subprocess
    import sys

    path, _ = model
    write_zarr(tmp_path / "in" / "v.zarr", [np.zeros((20, 20, 20), np.float32)], GEOM)
    repo = Path(__file__).resolve().parents[2]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(repo)}  # its own Ray

    def console(*extra: str) -> str:
        cmd = [sys.executable, str(repo / "jobs" / "translate_batch.py"), "--model", path, "--inputs",
               str(tmp_path / "in"), "--set", "inference.actors=1", *extra]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout + r.stderr

    quiet = console("--output", str(tmp_path / "out"))
    assert "[4/4] publishing 1 volumes" in quiet and "scale 2:" in quiet, quiet
    for noise in ("Execution plan", "execution finished", "Starting execution", "Progress bars disabled"):
        assert noise not in quiet, quiet
    verbose = console("--output", str(tmp_path / "out-verbose"), "--verbose")
    assert "Execution plan" in verbose and "execution finished" in verbose, verbose  # what quiet hides


def test_two_inputs_for_one_output_are_refused_before_any_work(tmp_path, model):
    from msgan.distributed.translate import translate_batch
    from msgan.io.volume import VolumeError

    path, _ = model
    for d in ("x", "y"):
        write_zarr(tmp_path / d / "same.zarr", [np.zeros((12, 12, 12), np.float32)], GEOM)
    with pytest.raises(VolumeError, match="2 inputs map to one output"):
        translate_batch([str(tmp_path / "x"), str(tmp_path / "y")], str(tmp_path / "out"), path, log=lambda _: None)
    assert not (tmp_path / "out").exists(), "nothing staged, leased or written"


def test_bad_volumes_are_reported_and_the_rest_published(tmp_path, ray_local, model):
    from msgan.distributed.translate import translate_batch

    path, _ = model
    _inputs(tmp_path / "in")
    bad = np.zeros((20, 20, 20), np.float32)
    bad[5, 5, 5] = np.nan
    write_zarr(tmp_path / "in" / "nan.zarr", [bad], GEOM)
    write_zarr(tmp_path / "in" / "flat.zarr", [bad[0]], Geometry.identity(2))
    write_zarr(tmp_path / "in" / "empty.zarr", [bad], GEOM)
    del zarr.open_group(str(tmp_path / "in" / "empty.zarr"), mode="r+")["0"]
    write_zarr(tmp_path / "in" / "bomb.zarr", [bad], GEOM)  # declares 1500^3, stores one chunk
    meta = json.loads((tmp_path / "in" / "bomb.zarr" / "0" / "zarr.json").read_text())
    meta["shape"] = [1500, 1500, 1500]
    (tmp_path / "in" / "bomb.zarr" / "0" / "zarr.json").write_text(json.dumps(meta))
    write_zarr(tmp_path / "in" / "foreign.zarr", [bad[:8] * 0], GEOM)
    (tmp_path / "out" / "foreign.zarr").mkdir(parents=True)  # someone's folder where an output would go
    (tmp_path / "out" / "foreign.zarr" / "notes.txt").write_text("keep")
    report = translate_batch([str(tmp_path / "in")], str(tmp_path / "out"), path, log=lambda _: None)
    assert sorted(m["volume"] for m in report.published) == ["a", "b"]
    assert set(report.failed) == {"nan", "flat", "empty", "bomb", "foreign"}
    assert "NaN" in report.failed["nan"] and "3D" in report.failed["flat"] and "missing array" in report.failed["empty"]
    assert "never written" in report.failed["bomb"] and "notes.txt" in report.failed["foreign"]
    for name in ("nan", "flat", "empty", "bomb"):
        assert not (tmp_path / "out" / f"{name}.zarr").exists()
    assert os.listdir(tmp_path / "out" / "foreign.zarr") == ["notes.txt"]
    assert sorted(os.listdir(tmp_path / "out")) == ["a.zarr", "b.zarr", "foreign.zarr"], "no empty .staging/.leases"


def test_killed_actor_mid_batch_gives_the_clean_result(tmp_path, ray_local, model):
    from msgan.distributed.translate import translate_batch

    path, cascade = model
    images = _inputs(tmp_path / "in")
    result = {}

    def run() -> None:
        result["r"] = translate_batch([str(tmp_path / "in")], str(tmp_path / "out"), path, {"batch_size": 1})

    worker = threading.Thread(target=run)
    worker.start()
    killed = None
    deadline = time.time() + 300
    while killed is None and worker.is_alive() and time.time() < deadline:
        time.sleep(0.05)
        written = list((tmp_path / "out" / ".staging").glob("*/output.zarr/0/c/*/*/*"))
        if not written:
            continue
        ours = psutil.Process().children(recursive=True)  # this test's Ray only, never another's actors
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if proc in ours and "TileWorker" in " ".join(proc.info["cmdline"] or []):
                os.kill(proc.info["pid"], signal.SIGKILL)
                killed = (proc.info["pid"], len(written))
                break
    worker.join(timeout=600)
    assert killed is not None, "no tile actor was caught mid-batch"
    report = result["r"]
    last = report.scales[-1]["tiles"]
    print(f"killed tile actor {killed[0]} with {killed[1]} of {last} last-scale tiles written")
    assert killed[1] < last, "the kill came after the last tile"
    assert not report.failed and len(report.published) == 2
    for name, img in images.items():
        out = _read(storage.normalize_uri(tmp_path / "out" / f"{name}.zarr"))
        assert float(np.abs(out - cascade.translate(img)).max()) < 1e-5 * 1024


def test_s3_inputs_staging_outputs_and_manifests(s3_bucket, ray_local, model, tmp_path):
    """The S3 server's address reaches the actors through the environment they inherit."""
    from msgan.distributed.translate import translate_batch

    path, cascade = model
    img = np.random.default_rng(9).uniform(-1000, 500, (30, 26, 22)).astype(np.float32)
    src = f"s3://{s3_bucket}/exports/v.zarr"
    write_zarr(src, [img], GEOM, chunks=16)
    seen: list[str] = []
    report = translate_batch([f"s3://{s3_bucket}/exports/"], f"s3://{s3_bucket}/translated", path,
                             log=seen.append)  # fmt: skip
    assert [m["volume"] for m in report.published] == ["v"], report.summary()
    keys = s3_keys(s3_bucket)
    assert "translated/v.zarr/manifest.json" in keys and "translated/v.zarr/2/zarr.json" in keys
    assert not [k for k in keys if "/.staging/" in k]
    out = _read(f"s3://{s3_bucket}/translated/v.zarr")
    assert float(np.abs(out - cascade.translate(img)).max()) < 1e-5 * 1024
