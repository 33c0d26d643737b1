"""The Ray Train worker trains through ScaleTrainer.fit: the same weights as the local loop, and a scale
resumed from Ray's checkpoint continues exactly, on a real local Ray cluster."""

import shutil

import pytest
import torch

from msgan import storage
from msgan.distributed import prepare as prep
from msgan.distributed.train import load_generator, read_json, scale_root, train_all_scales
from msgan.io.pyramids import open_pyramid
from msgan.train import ScaleData, ScaleTrainer
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)  # its own cluster, never another's
    yield
    ray.shutdown()


def _cfg(steps: int):
    return tiny_config(
        **{
            "num_scales": 2,
            "data.phantom.shape": [24, 24, 24],
            "data.phantom.seeds": [1, 2],
            "train.steps": steps,
            "train.hr_patch": 8,
            "train.log_every": 2,
            "train.checkpoint_every": 3,
            "train.threads": 1,
            "job.device": "cpu",
            "job.cpus_per_worker": 1,
        }
    )


def _assert_same_weights(got: torch.nn.Module, want: torch.nn.Module) -> None:
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].cpu(), b[k].detach().cpu(), rtol=1e-5, atol=1e-6, msg=k)


def test_ray_worker_trains_and_resumes_like_the_local_loop(tmp_path, ray_local):
    cfg = _cfg(6)
    root = storage.normalize_uri(tmp_path / "store")
    run_root = storage.join(root, "runs", "t")
    volumes = [p["uri"] for p in prep.prepare(cfg, prep.sources(cfg), root, use_ray=False)]
    data = ScaleData.from_pyramids([open_pyramid(u, {1}) for u in volumes], 1, cfg.train.foreground_threshold)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (train.threads)
    try:
        local = ScaleTrainer(cfg, 1, data)
        local.fit(6)

        (first,) = train_all_scales(cfg, "t", volumes, [], root, None, None, scales=[1])
        assert first.error is None and first.summary is not None and first.summary["steps"] == 6, first
        _assert_same_weights(load_generator(cfg, run_root, 1), local.generator)

        # asked for 9 steps, the scale resumes from Ray's last checkpoint (step 6) through ScaleTrainer.restore
        shutil.rmtree(tmp_path / "store" / "runs" / "t" / "scale_1" / "final")
        (second,) = train_all_scales(_cfg(9), "t", volumes, [], root, None, None, scales=[1])
        local.fit(9)
    finally:
        torch.set_num_threads(threads)
    assert second.error is None and second.summary is not None, second
    assert (second.summary["resumed_from"], second.summary["attempt"], second.summary["steps"]) == (6, 2, 9)
    assert read_json(storage.join(scale_root(run_root, 1), "status.json"))["step"] == 9
    _assert_same_weights(load_generator(_cfg(9), run_root, 1), local.generator)


@pytest.mark.slow
def test_a_local_cluster_shares_its_cpus_out_so_every_scale_starts_at_once(monkeypatch):
    """Three scales x 1 CPU each on a 2-CPU local cluster would leave one scale waiting (and failing at Ray
    Train's start timeout): the reservation is shared out; a cluster named by RAY_ADDRESS keeps its setting."""
    import ray

    from msgan.distributed.pipeline import fit_local_cluster
    from tests.ray_procs import short_temp_dir

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = tiny_config(**{"num_scales": 3, "job.cpus_per_worker": 1.0, "job.device": "cpu"})
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(short_temp_dir()), log_to_driver=False)
    try:
        lines: list[str] = []
        fitted = fit_local_cluster(cfg, lines.append)
        assert fitted.job.cpus_per_worker == 0.66 and "each reserves 0.66 instead" in lines[0]
        assert fit_local_cluster(cfg.replace(**{"job.cpus_per_worker": 0.5}), lines.append).job.cpus_per_worker == 0.5
        monkeypatch.setenv("RAY_ADDRESS", "ray://elsewhere:10001")
        assert fit_local_cluster(cfg, lines.append).job.cpus_per_worker == 1.0
    finally:
        ray.shutdown()
