"""benchmarks/unpaired.py and unpaired_levels.py: the pieces that run without training."""

import numpy as np
import pytest


@pytest.mark.parametrize(("shape", "lr_shape"), [((32, 32, 32), (8, 8, 8)), ((70, 33, 32), (18, 9, 8))])
def test_lr_labels_take_each_lr_voxels_centre_even_on_a_padded_grid(shape, lr_shape):
    from benchmarks.unpaired_levels import lr_labels

    labels = np.zeros(shape, np.uint8)
    labels[shape[0] // 2 :] = 7  # the upper half of the first axis
    lab = lr_labels(labels, lr_shape)
    assert lab.shape == lr_shape
    centres = (np.arange(lr_shape[0]) * -(-shape[0] // lr_shape[0]) + -(-shape[0] // lr_shape[0]) // 2).clip(
        max=shape[0] - 1
    )
    np.testing.assert_array_equal(lab[:, 0, 0], labels[centres, 0, 0])
    assert lab[0].max() == 0 and lab[-1].min() == 7


def test_a_scale_job_checkpoints_into_its_folder(tmp_path):
    from benchmarks.unpaired import ours_config, scale_job

    cfg = ours_config("low-dose", 32, True, [])
    job = scale_job("ours", 1, cfg, "low-dose", {"heldout": [301]}, (32, 32, 32), None, tmp_path / "ours")
    assert job["checkpoint"] == str(tmp_path / "ours" / "scale_1.ckpt") and job["shape"] == [32, 32, 32]
    assert job["config"] == cfg.to_dict() and (job["variant"], job["scale"], job["task"]) == ("ours", 1, "low-dose")


def test_load_cascade_waits_for_every_scale(tmp_path):
    import torch

    from benchmarks.tasks import load_cascade
    from benchmarks.unpaired import ours_config
    from msgan.nets import build_generator

    cfg = ours_config("low-dose", 32, True, [])
    for s in range(cfg.num_scales - 1):
        torch.save(build_generator(cfg, s).state_dict(), tmp_path / f"scale_{s}.pt")
    assert load_cascade(cfg, tmp_path) is None  # the last scale is missing
    s = cfg.num_scales - 1
    torch.save(build_generator(cfg, s).state_dict(), tmp_path / f"scale_{s}.pt")
    cascade = load_cascade(cfg, tmp_path)
    assert cascade is not None and len(cascade.generators) == cfg.num_scales


def test_engine_efficiency_imports_gpu_checks_inputs_from_the_tests_too():
    from benchmarks import engine_efficiency  # its `from gpu_check import ...` must work outside benchmarks/

    assert engine_efficiency.batch_inputs.__module__ == "gpu_check"
