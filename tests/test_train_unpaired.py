"""Training without pairs (``train.objective: unpaired``): the synthesized sources of the HR scales, the
cycle-consistent scale 0, exact resume, and the whole cascade trained from two sets."""

import numpy as np
import pytest
import torch

from msgan.config import load_config
from msgan.pyramid import build_pyramid
from msgan.train import (
    ScaleData,
    ScaleTrainer,
    Synthesizer,
    fit_forward_models,
    remap_levels,
    sample_hr_batch,
    scale_data,
    train_locally,
)
from tests.conftest import tiny_config

SHAPE = (32, 32, 32)


def _cfg(**over):
    base = {
        "condition": "image+edges",
        "source_residual": True,
        "hr_generator.residual": False,
        "lr_generator.noise_channels": 1,
        "train.batch_size": 2,
        "train.checkpoint_every": 1000,
        "train.objective": "unpaired",
        "data.source": "unpaired",
        "data.sources": "sources.csv",  # never read: these tests train in memory
        "data.targets": "targets.csv",
        "data.phantom.shape": list(SHAPE),
    }
    return tiny_config(**(base | over))


@pytest.fixture(scope="module")
def sets():
    """Sharp sources of subjects 1-2, soft targets of subjects 3-4 (no subject on both sides)."""
    from msgan.data.phantom import kernel_pair

    cfg = _cfg()
    src = [build_pyramid(kernel_pair(SHAPE, s)[1], 3, cfg.intensity, cfg.edges) for s in (1, 2)]
    tgt = [build_pyramid(kernel_pair(SHAPE, s)[0], 3, cfg.intensity, cfg.edges) for s in (3, 4)]
    return src, tgt, fit_forward_models(cfg, src, tgt)


def _params(trainer):
    sd = {f"g.{k}": v for k, v in trainer.generator.state_dict().items()}
    sd |= {f"d.{k}": v for k, v in trainer.discriminator.state_dict().items()}
    for name in ("inverse", "discriminator_source"):
        m = getattr(trainer, name)
        if m is not None:
            sd |= {f"{name}.{k}": v for k, v in m.state_dict().items()}
    return sd


def test_remap_changes_levels_near_its_bumps_only():
    """The ranges are in HU (the window's units): a bump at 300 HU, 50 HU wide, moves 300 HU whatever the window."""
    over = {"train.unpaired.remap_centres": [300, 300], "train.unpaired.remap_width": [50, 50]}
    for window in ([-1024, 1024], [-1024, 3072]):
        cfg = _cfg(**over, **{"intensity.low": window[0], "intensity.high": window[1]})
        hu = np.linspace(-1000, 1000, 2001, dtype=np.float32)
        x = window_units = (hu - window[0]) * 2 / (window[1] - window[0]) - 1
        y = remap_levels(x, np.random.default_rng(3), cfg.train.unpaired, cfg.intensity)
        moved = (y - window_units) * (window[1] - window[0]) / 2  # in HU
        np.testing.assert_allclose(moved[np.abs(hu - 300) > 400], 0, atol=1e-3)  # eight widths away
        assert np.abs(moved[np.abs(hu - 300) < 50]).max() > 10  # the band at the bumps moved
        again = remap_levels(x, np.random.default_rng(3), cfg.train.unpaired, cfg.intensity)
        np.testing.assert_array_equal(y, again)
    none = _cfg(**{"train.unpaired.remap_bumps": 0})
    np.testing.assert_array_equal(remap_levels(x, np.random.default_rng(3), none.train.unpaired, none.intensity), x)


def test_a_synthesized_box_is_the_whole_volume_synthesized_cropped(sets):
    """Without noise and remap, a box's synthesized source (and its edges) equals that of the whole volume
    cropped to the box, away from the volume's border: training memory stays a patch's, not a volume's."""
    _, tgt, forward = sets
    cfg = _cfg(**{"train.unpaired.noise": False, "train.unpaired.remap_p": 0.0})
    synth = Synthesizer(forward[2], cfg.train.unpaired, cfg.edges, cfg.intensity)
    vol = tgt[0].images[2]
    rng = np.random.default_rng(0)
    whole = synth.regions(vol, [0, 0, 0], SHAPE, ("image", "edges"), rng)
    start, stop = (12, 10, 11), (22, 20, 21)
    box = synth.regions(vol, start, stop, ("image", "edges"), rng)
    sl = tuple(slice(a, b) for a, b in zip(start, stop))
    for name in ("image", "edges"):
        assert box[name].shape == (10, 10, 10)
        diff = np.abs(box[name] - whole[name][sl])
        # the sharpening filter's tails beyond the margin's cap (16 voxels): at most ~5 HU here, ~1 HU on average
        assert diff.max() < 1e-2 and diff.mean() < 2e-3, (name, diff.max(), diff.mean())
    assert np.abs(whole["image"] - vol).max() > 0.01  # the forward model changed the target (soft -> sharp)


def test_hr_batches_read_the_synthesized_source_never_the_target(sets):
    src, tgt, forward = sets
    cfg = _cfg(**{"train.unpaired.remap_p": 0.0})
    data = scale_data(cfg, tgt, 2, src, forward)
    assert data.synth is not None and "image" not in data.arrays(0) and "edges" not in data.arrays(0)
    trainer = ScaleTrainer(cfg, 2, data)
    b = sample_hr_batch(data, trainer.generator, cfg.train.hr_patch, 2, np.random.default_rng(1), trainer.augmenter)
    img = trainer.generator.channels.index("image")
    h = trainer.generator.halo
    core = tuple(slice(h, -h) if h else slice(None) for _ in range(3))
    seen = b.x[:, img][(slice(None), *core)]
    assert seen.shape == b.target[:, 0].shape
    assert not torch.allclose(seen, b.target[:, 0], atol=1e-3)  # the source is made, not the target passed on
    assert (seen - b.target[:, 0]).abs().mean() < 0.2  # but it is the same anatomy


def test_paired_and_unpaired_data_are_not_mixed_up(sets):
    src, tgt, forward = sets
    paired = tiny_config(**{"condition": "image+edges", "data.phantom.shape": list(SHAPE)})
    with pytest.raises(ValueError, match="objective=unpaired"):
        ScaleTrainer(paired, 1, scale_data(_cfg(), tgt, 1, src, forward))
    with pytest.raises(ValueError, match="synthesizer"):
        ScaleTrainer(_cfg(), 1, ScaleData.from_pyramids(tgt, 1, -0.8))
    with pytest.raises(ValueError, match="both sets"):
        fit_forward_models(_cfg(), [], tgt)
    with pytest.raises(ValueError, match="one forward model per scale"):
        scale_data(_cfg(), tgt, 1, src, forward[:1])


def test_the_objective_needs_a_model_that_reads_the_source():
    with pytest.raises(Exception, match=r"train\.objective"):
        load_config(None, {"train.objective": "unpaired", "condition": "edges"})


@pytest.mark.parametrize("scale", [0, 2])
def test_unpaired_training_resumes_exactly(sets, tmp_path, scale):
    """Scale 0 (G, F and both discriminators, their optimizers) and an HR scale resume bit-exactly."""
    src, tgt, forward = sets
    cfg = _cfg()
    data = scale_data(cfg, tgt, scale, src, forward)
    straight = ScaleTrainer(cfg, scale, data)
    losses_straight = [straight.train_step().loss_g for _ in range(4)]
    first = ScaleTrainer(cfg, scale, data)
    losses = [first.train_step().loss_g for _ in range(2)]
    first.save(tmp_path / "c.pt")
    torch.manual_seed(7)
    resumed = ScaleTrainer(cfg, scale, data)
    resumed.restore(tmp_path / "c.pt")
    losses += [resumed.train_step().loss_g for _ in range(2)]
    np.testing.assert_allclose(losses, losses_straight, rtol=1e-5)
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    assert (scale == 0) == any(k.startswith("inverse.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    paired_cfg = tiny_config(**{"condition": "image+edges", "data.phantom.shape": list(SHAPE)})
    if scale == 0:  # a cycle checkpoint never resumes a paired trainer
        from msgan.pyramid import build_pair_pyramid

        pair = build_pair_pyramid(
            np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32), 3, paired_cfg.intensity, paired_cfg.edges
        )
        other = ScaleTrainer(paired_cfg, 0, ScaleData.from_pyramids([pair], 0, -0.8))
        with pytest.raises(ValueError):
            other.restore(tmp_path / "c.pt")


def test_scale_zero_learns_the_cycle(sets):
    """Thirty steps lower scale 0's cycle + identity L1 (the objective trains, it is not a stub)."""
    src, tgt, forward = sets
    cfg = _cfg(**{"train.lr": 1e-3})
    trainer = ScaleTrainer(cfg, 0, scale_data(cfg, tgt, 0, src, forward))
    l1 = [trainer.train_step().loss_g_l1 for _ in range(30)]
    assert np.mean(l1[-5:]) < 0.7 * np.mean(l1[:5])


def test_a_cascade_trains_from_two_sets_and_translates(sets):
    src, tgt, _ = sets
    cfg = _cfg(**{"train.steps": 2, "train.hr_patch": 8, "inference.memory_budget_mb": 64})
    cascade = train_locally(cfg, tgt, log=lambda _: None, sources=src)
    assert len(cascade.meta["forward_models"]) == 3
    from msgan.data.phantom import kernel_pair

    out = cascade.translate(kernel_pair(SHAPE, 9)[1])
    assert out.shape == SHAPE and np.isfinite(out).all()


def test_forward_models_fit_noise_at_the_finest_scale_and_downsample_it_for_the_coarser(sets, monkeypatch):
    """The finest scale's model is fitted with its noise; every coarser one is derived from it (levels below the
    finest), each on its own scale's images; the list is LR first."""
    import msgan.train as tr

    src, tgt, _ = sets
    cfg = _cfg()
    calls = []

    def fake_fit(sources, targets, source_masks=None, target_masks=None):
        calls.append(("fit", sources[0].shape))
        return "finest"

    def fake_coarser(finest, levels, sources, targets):
        calls.append(("coarser", finest, levels, sources[0].shape))
        return f"coarse {levels}"

    monkeypatch.setattr(tr, "fit_forward_model", fake_fit)
    monkeypatch.setattr(tr, "coarser_forward_model", fake_coarser)
    assert tr.fit_forward_models(cfg, src, tgt) == ["coarse 2", "coarse 1", "finest"]
    shapes = [tuple(im.shape) for im in src[0].images]
    assert calls == [("fit", shapes[2]), ("coarser", "finest", 2, shapes[0]), ("coarser", "finest", 1, shapes[1])]
