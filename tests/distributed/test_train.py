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
