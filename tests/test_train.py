import pickle

import numpy as np
import pytest
import torch

from msgan.config import ConfigError
from msgan.pyramid import build_pyramid
from msgan.train import GANLoss, ScaleData, ScaleTrainer
from tests.conftest import tiny_config


def _cfg(**over):
    base = {
        "lr_generator.noise_channels": 1,
        "train.batch_size": 2,
        "train.checkpoint_every": 1000,
        "data.phantom.shape": [24, 24, 24],
    }
    return tiny_config(**(base | over))


@pytest.fixture(scope="module")
def pyramids():
    from msgan.data.phantom import kernel_pair

    cfg = _cfg()
    return [build_pyramid(kernel_pair((24, 24, 24), s)[0], 3, cfg.intensity, cfg.edges) for s in (1, 2)]


def _params(trainer):
    sd = {f"g.{k}": v for k, v in trainer.generator.state_dict().items()}
    sd |= {f"d.{k}": v for k, v in trainer.discriminator.state_dict().items()}
    return sd


@pytest.mark.parametrize("scale,context", [(0, "upscaled"), (2, "upscaled"), (1, "wide")])
def test_resume_continues_exactly(pyramids, tmp_path, scale, context):
    cfg = _cfg(**{"hr_generator.context": context})
    data = ScaleData.from_pyramids(pyramids, scale, cfg.train.foreground_threshold)
    straight = ScaleTrainer(cfg, scale, data)
    losses_straight = [straight.train_step().loss_g for _ in range(5)]

    first = ScaleTrainer(cfg, scale, data)
    losses = [first.train_step().loss_g for _ in range(2)]
    first.save(tmp_path / "ckpt.pt")
    del first
    torch.manual_seed(999)  # global RNG disturbed between save and resume
    resumed = ScaleTrainer(cfg, scale, data)
    resumed.restore(tmp_path / "ckpt.pt")
    assert resumed.step == 2
    losses += [resumed.train_step().loss_g for _ in range(3)]

    np.testing.assert_allclose(losses, losses_straight, rtol=1e-5)
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_restore_refuses_other_architecture(pyramids, tmp_path):
    cfg = _cfg()
    data = ScaleData.from_pyramids(pyramids, 1, cfg.train.foreground_threshold)
    ScaleTrainer(cfg, 1, data).save(tmp_path / "c.pt")
    other = _cfg(**{"hr_generator.num_blocks": 2})
    with pytest.raises(ValueError, match="hr_generator"):
        ScaleTrainer(other, 1, data).restore(tmp_path / "c.pt")


def test_fit_reports_and_checkpoints(pyramids, tmp_path):
    cfg = _cfg(**{"train.log_every": 2, "train.checkpoint_every": 3})
    data = ScaleData.from_pyramids(pyramids, 1, cfg.train.foreground_threshold)
    seen = []
    t = ScaleTrainer(cfg, 1, data)
    t.fit(5, callback=seen.append, checkpoint=tmp_path / "c.pt")
    assert [m.step for m in seen] == [2, 4, 5]
    assert all(np.isfinite(m.loss_g) and np.isfinite(m.loss_d) for m in seen)
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state["step"] == 5


def test_training_lowers_l1(pyramids):
    cfg = _cfg(**{"train.lr": 1e-3, "train.batch_size": 4})
    data = ScaleData.from_pyramids(pyramids, 1, cfg.train.foreground_threshold)
    t = ScaleTrainer(cfg, 1, data)
    before = t.evaluate(count=6)["val_l1"]
    t.fit(60)
    after = t.evaluate(count=6)["val_l1"]
    assert after < 0.8 * before, (before, after)


def test_patch_larger_than_level_is_refused(pyramids):
    cfg = _cfg(**{"train.hr_patch": 16})
    with pytest.raises(
        ConfigError, match=r"hr_patch=16 is larger than scale 1 of training volume 0, shape \(12, 12, 12\)"
    ):
        ScaleTrainer(cfg, 1, ScaleData.from_pyramids(pyramids, 1, cfg.train.foreground_threshold))


def test_lr_image_too_small_for_discriminator(pyramids):
    """The trainer and the pre-flight (prepare.check_shapes) apply one rule, with one error type and text."""
    from msgan.distributed.prepare import check_shapes, sources

    cfg = _cfg(**{"discriminator.num_layers": 2, "train.hr_patch": 12})
    want = r"LR grid \(6, 6, 6\) is smaller than the 12 voxels per side the discriminator \(num_layers=2\)"
    with pytest.raises(ConfigError, match="training volume 0: " + want):
        ScaleTrainer(cfg, 0, ScaleData.from_pyramids(pyramids, 0, cfg.train.foreground_threshold))
    with pytest.raises(ConfigError, match="phantom seed 1: " + want):
        check_shapes(cfg, sources(cfg))


def test_fit_calls_its_hooks(pyramids, tmp_path):
    """fit's hooks (what the Ray Train worker plugs in): every step, log steps, and a checkpointer that takes
    the place of the checkpoint file; its checkpoints resume exactly."""
    cfg = _cfg(**{"train.log_every": 2, "train.checkpoint_every": 3})
    data = ScaleData.from_pyramids(pyramids, 1, cfg.train.foreground_threshold)
    every, logged, saved = [], [], {}

    def checkpointer(trainer, m):
        saved[m.step] = trainer.to_bytes()

    t = ScaleTrainer(cfg, 1, data)
    last = t.fit(5, callback=logged.append, checkpoint=checkpointer, on_step=every.append)
    assert [m.step for m in every] == [1, 2, 3, 4, 5] and last == every[-1]
    assert [m.step for m in logged] == [2, 4, 5] and logged[0] is every[1]
    assert sorted(saved) == [3, 5] and not list(tmp_path.iterdir())
    assert t.fit(5, on_step=every.append) is None and len(every) == 5  # nothing left to train

    (tmp_path / "c.pt").write_bytes(saved[3])
    resumed = ScaleTrainer(cfg, 1, data)
    resumed.restore(tmp_path / "c.pt")
    again = []
    resumed.fit(5, on_step=again.append)
    np.testing.assert_allclose([m.loss_g for m in again], [m.loss_g for m in every[3:]], rtol=1e-5)


@pytest.mark.parametrize("mode", ["lsgan", "bce"])
def test_gan_loss(mode):
    loss = GANLoss(mode)
    logits = torch.tensor([[2.0, -1.0]])
    if mode == "lsgan":
        assert float(loss(logits, True)) == pytest.approx(((2 - 1) ** 2 + (-1 - 1) ** 2) / 2)
        assert float(loss(logits, False)) == pytest.approx((4 + 1) / 2)
    else:
        want = float(torch.nn.functional.softplus(-logits).mean())
        assert float(loss(logits, True)) == pytest.approx(want)
    with pytest.raises(ValueError):
        GANLoss("wgan")


class _RunsOnUnpickle:
    """An object whose unpickling would call arbitrary code (here: os.getcwd)."""

    def __reduce__(self):
        import os

        return (os.getcwd, ())


def test_restore_refuses_a_checkpoint_that_carries_code(pyramids, tmp_path):
    cfg = _cfg()
    t = ScaleTrainer(cfg, 1, ScaleData.from_pyramids(pyramids, 1, cfg.train.foreground_threshold))
    state = t.state_dict()
    state["payload"] = _RunsOnUnpickle()
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        t.restore(tmp_path / "evil.pt")


def test_image_conditioned_training_reads_pairs_from_prepared_stores(tmp_path):
    """condition=image+edges: the phantom sources become (sharp, soft) pairs, the stores keep the source
    levels, and a scale trains on them."""
    from msgan.distributed.prepare import sources, training_pyramids
    from msgan.io.pyramids import open_pyramid, write_pyramid
    from msgan.io.volume import Geometry

    cfg = _cfg(**{"condition": "image+edges", "data.phantom.seeds": [1]})
    (pyr,) = training_pyramids(cfg)
    assert pyr.sources is not None and [s.shape for s in pyr.sources] == [im.shape for im in pyr.images]
    assert not np.array_equal(pyr.sources[-1], pyr.images[-1])  # sharp source, soft target
    write_pyramid(str(tmp_path / "p.zarr"), pyr, Geometry.identity(3), {"shape": [24, 24, 24]})
    back = open_pyramid(str(tmp_path / "p.zarr"), {1, 2})
    np.testing.assert_array_equal(back.sources[2], pyr.sources[2])
    trainer = ScaleTrainer(cfg, 2, ScaleData.from_pyramids([back], 2, cfg.train.foreground_threshold))
    assert np.isfinite(trainer.train_step().loss_g)
    assert len(sources(cfg)) == 1


def _masked_pair(garbage: float, valid_half: bool = True):
    """A (source, target) pair pyramid whose target holds ``garbage`` where the mask says invalid."""
    from msgan.data.phantom import kernel_pair
    from msgan.pyramid import build_pair_pyramid

    cfg = _cfg(**{"condition": "image+edges", "source_residual": True, "hr_generator.residual": False})
    soft, sharp = kernel_pair((24, 24, 24), 1)
    valid = np.ones(soft.shape, bool)
    if valid_half:
        valid[:, :, :10] = False  # outside the overlap
    target = np.where(valid, soft, garbage).astype(np.float32)
    return cfg, build_pair_pyramid(sharp, target, 3, cfg.intensity, cfg.edges, valid=valid)


@pytest.mark.parametrize("scale", [0, 2])
def test_voxels_outside_the_valid_mask_never_enter_a_loss(scale):
    """Two pairs that differ only outside their valid voxels train to the very same weights (generator and
    discriminator): nothing there reaches the L1 loss, the discriminator or the patch sampling. Without
    the mask they do not."""
    cfg, a = _masked_pair(-1000.0)
    _, b = _masked_pair(900.0)
    assert a.masks is not None and not a.masks[0].all() and a.masks[0].any()
    runs = []
    for pyr in (a, b):
        data = ScaleData.from_pyramids([pyr], scale, cfg.train.foreground_threshold)
        if scale > 0:  # the previous scale is an input (not a loss): the same for both, as a prepared pair's is
            data.prev_images = [a.images[scale - 1]]
        trainer = ScaleTrainer(cfg, scale, data)
        trainer.fit(3)
        runs.append(_params(trainer))
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=0, atol=0, msg=k)
    unmasked = []
    for pyr in (a, b):
        data = ScaleData.from_pyramids([pyr], scale, cfg.train.foreground_threshold)
        data.valid = []
        if scale > 0:
            data.prev_images = [a.images[scale - 1]]
        trainer = ScaleTrainer(cfg, scale, data)
        trainer.fit(3)
        unmasked.append(_params(trainer))
    assert any(not torch.equal(unmasked[0][k], unmasked[1][k]) for k in unmasked[0])


def test_masks_survive_the_prepared_store_and_coarse_voxels_need_every_fine_one(tmp_path):
    from msgan.io.pyramids import open_pyramid, write_pyramid
    from msgan.io.volume import Geometry

    cfg, pyr = _masked_pair(0.0)
    assert not pyr.masks[2][:, :, :10].any() and pyr.masks[2][:, :, 10:].all()
    assert not pyr.masks[1][:, :, 4].any() and pyr.masks[1][:, :, 5:].all()  # fine 8, 9 invalid; 10, 11 valid
    assert not pyr.masks[0][:, :, 2].any() and pyr.masks[0][:, :, 3:].all()  # fine 8-11 hold invalid ones
    write_pyramid(str(tmp_path / "p.zarr"), pyr, Geometry.identity(3), {"shape": [24, 24, 24]})
    back = open_pyramid(str(tmp_path / "p.zarr"))
    for s in range(3):
        np.testing.assert_array_equal(np.asarray(back.masks[s], bool), pyr.masks[s])
    data = ScaleData.from_pyramids([back], 2, cfg.train.foreground_threshold)
    batch = ScaleTrainer(cfg, 2, data).sample_batch()
    assert batch.valid is not None and batch.valid.shape == batch.target.shape
