"""The CycleGAN baseline: Zhu et al.'s generator at our size, the FFT single-channel layers, unpaired
training (deterministic, learns a domain shift it can only learn from the adversarial loss), blended
tiled translation, refusals."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from msgan.cyclegan import (
    CycleGANConfig,
    _ImagePool,
    _SingleChannelConv3d,
    cyclegan_translate,
    parameter_count,
    resnet_generator,
    train_cyclegan,
)


def test_generator_has_zhus_layout_at_our_size_and_keeps_the_shape():
    g3 = resnet_generator(3, 8, 6)
    assert 300_000 < parameter_count(g3) < 500_000  # the "about 0.4 M per generator"
    convs = [m for m in g3.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(convs) == 2 + 2 + 2 * 6  # c7s1 head and tail, two downsamplings, 6 blocks of two
    assert sum(isinstance(m, torch.nn.ConvTranspose3d) for m in g3.modules()) == 2
    assert sum(isinstance(m, torch.nn.ReflectionPad3d) for m in g3.modules()) == 2 + 2 * 6
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    y = g3(x).detach()
    assert y.shape == x.shape and float(y.abs().max()) <= 1.0
    assert parameter_count(resnet_generator(2, 8, 6)) < parameter_count(g3)  # 3^2 and 7^2 kernels in 2D
    assert resnet_generator(2, 4, 1)(torch.zeros(2, 1, 12, 20)).shape == (2, 1, 12, 20)
    with pytest.raises(ValueError, match="multiple of 4"):
        g3(torch.zeros(1, 1, 16, 16, 18))
    with pytest.raises(ValueError, match="dims"):
        resnet_generator(4)


def test_fft_single_channel_layers_equal_plain_convolutions_and_their_gradients():
    torch.manual_seed(0)
    for cin, cout in ((1, 4), (4, 1)):
        fast = _SingleChannelConv3d(cin, cout, 7)
        plain = torch.nn.Conv3d(cin, cout, 7)
        plain.load_state_dict(fast.state_dict())
        xa = torch.randn(2, cin, 13, 11, 12, requires_grad=True)
        xb = xa.detach().clone().requires_grad_(True)
        ya, yb = fast(xa), plain(xb)
        assert ya.shape == yb.shape == (2, cout, 7, 5, 6)
        torch.testing.assert_close(ya, yb, atol=1e-4, rtol=1e-4)
        g = torch.randn_like(ya)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast.weight.grad, plain.weight.grad, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(fast.bias.grad, plain.bias.grad, atol=1e-3, rtol=1e-4)


def test_image_pool_returns_new_fakes_until_full_then_mixes_in_older_ones():
    pool = _ImagePool(3, np.random.default_rng(0))
    first = torch.arange(3.0)[:, None]
    assert torch.equal(pool.query(first), first)  # filling: the new fakes themselves
    seen = torch.cat([pool.query(torch.full((4, 1), 10.0 + i)) for i in range(10)])
    old = seen < 10 + torch.arange(10).repeat_interleave(4)[:, None]  # an earlier fake came back
    assert 0 < int(old.sum()) < 40 and len(pool.items) == 3
    assert torch.equal(_ImagePool(0, np.random.default_rng(0)).query(first), first)


def _blobs(seed: int, shift: float, shape: tuple[int, ...]) -> np.ndarray:
    """A smooth 'body' (about -0.5 + shift, textured) in air (-1), window units."""
    v = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.5)
    v = v / v.std()
    out = np.full(shape, -1.0, np.float32)
    out[v > -0.3] = (-0.5 + 0.15 * v[v > -0.3] + shift).astype(np.float32)
    return out


def _state(m: torch.nn.Module) -> list[np.ndarray]:
    return [t.detach().numpy().copy() for t in m.state_dict().values()]


def test_training_is_deterministic_and_follows_the_schedule():
    src = [_blobs(i, 0.0, (24, 24, 20)) for i in range(2)]
    tgt = [_blobs(10 + i, 0.3, (20, 24, 24)) for i in range(3)]
    cfg = CycleGANConfig(width=4, blocks=1, patch=16, batch_size=2, steps=4, pool_size=2, threads=1)
    lines: list[str] = []
    a = train_cyclegan(src, tgt, cfg, log=lines.append, log_every=1)
    b = train_cyclegan(src, tgt, cfg)
    c = train_cyclegan(src, tgt, CycleGANConfig(**{**cfg.__dict__, "seed": 1}))
    for x, y in zip(_state(a.g_st) + _state(a.g_ts), _state(b.g_st) + _state(b.g_ts)):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(_state(a.g_st), _state(c.g_st)))
    assert not np.array_equal(_state(a.g_st)[0], _state(a.g_ts)[0])  # two generators, not one
    # Zhu's schedule scaled: constant over the first half, then linearly towards 0
    assert [h["lr"] for h in a.history] == pytest.approx([2e-4, 2e-4, 2e-4 * 2 / 3, 2e-4 / 3])
    assert len(b.history) == 1 and b.history[0]["step"] == 4  # the last window is always recorded
    assert len(lines) == 5 and "cycle L1" in lines[0]
    assert not a.g_st.training  # handed back in eval mode


def test_a_stopped_training_resumes_exactly_from_its_checkpoint(tmp_path):
    """Killed after the checkpoint of step 3 of 6, a rerun resumes there and ends with the very weights of a
    training that never stopped; a checkpoint of another config is refused."""
    src = [_blobs(i, 0.0, (24, 24, 20)) for i in range(2)]
    tgt = [_blobs(10 + i, 0.3, (20, 24, 24)) for i in range(2)]
    cfg = CycleGANConfig(width=4, blocks=1, patch=16, batch_size=2, steps=6, pool_size=1, threads=1)
    straight = train_cyclegan(src, tgt, cfg, log_every=2)
    ckpt = tmp_path / "cg.pt"
    _stop_after(src, tgt, cfg, ckpt, 3)
    lines: list[str] = []
    resumed = train_cyclegan(src, tgt, cfg, log=lines.append, log_every=1, checkpoint=ckpt, checkpoint_every=3)
    assert lines[0] == "cyclegan: resumed at step 3 from cg.pt" and "step 4/6" in lines[1]
    for x, y in zip(_state(straight.g_st) + _state(straight.g_ts), _state(resumed.g_st) + _state(resumed.g_ts)):
        np.testing.assert_array_equal(x, y)
    other = CycleGANConfig(**{**cfg.__dict__, "cycle_weight": 5.0})
    with pytest.raises(ValueError, match="another CycleGAN config"):
        train_cyclegan(src, tgt, other, checkpoint=ckpt)


def _stop_after(src, tgt, cfg, path, steps):
    """Train ``cfg`` with checkpoints every ``steps`` steps, stopped (by an exception from the log) right after
    the checkpoint of step ``steps`` is written: what a killed process leaves."""

    class Stop(Exception):
        pass

    def log(line):
        if f"step {steps + 1}/" in line:
            raise Stop

    with pytest.raises(Stop):
        train_cyclegan(src, tgt, cfg, log=log, log_every=1, checkpoint=path, checkpoint_every=steps)


def test_learns_an_unpaired_brightness_shift_both_ways():
    """Targets are other subjects' bodies, 0.3 brighter: only the adversarial loss can teach the shift
    (cycle and identity losses alone are satisfied by the identity)."""
    src = [_blobs(i, 0.0, (40, 40)) for i in range(3)]
    tgt = [_blobs(10 + i, 0.3, (40, 40)) for i in range(3)]
    cfg = CycleGANConfig(dims=2, width=8, blocks=2, patch=16, batch_size=4, steps=80, pool_size=10, threads=1)
    m = train_cyclegan(src, tgt, cfg, log_every=20)
    assert m.history[-1]["cycle_l1"] < 0.7 * m.history[0]["cycle_l1"]
    a, b = _blobs(99, 0.0, (40, 40)), _blobs(98, 0.3, (40, 40))
    fa, fb = cyclegan_translate(m.g_st, a), cyclegan_translate(m.g_ts, b)
    assert fa[a > -0.8].mean() - a[a > -0.8].mean() > 0.1  # source -> target: brighter
    assert fb[b > -0.8].mean() - b[b > -0.8].mean() < -0.1  # target -> source: darker


def test_translate_one_tile_is_one_forward_pass_and_tiles_blend():
    torch.manual_seed(0)
    g = resnet_generator(3, 4, 1)
    vol = _blobs(5, 0.0, (32, 32, 32))
    with torch.no_grad():
        whole = g(torch.from_numpy(vol)[None, None]).numpy()[0, 0]
    one = cyclegan_translate(g, vol, tile=32)
    assert one.dtype == np.float32 and one.shape == vol.shape
    np.testing.assert_allclose(one, whole, atol=1e-5)
    # odd sides, shorter than the tile: reflect-padded at the borders to a multiple of 4, cropped back
    odd = vol[:29, :31, :27]
    with torch.no_grad():
        padded = np.pad(odd, ((1, 2), (0, 1), (0, 1)), mode="reflect")
        ref = g(torch.from_numpy(padded)[None, None]).numpy()[0, 0][1:30, :31, :27]
    np.testing.assert_allclose(cyclegan_translate(g, odd, tile=48), ref, atol=1e-5)
    assert cyclegan_translate(g, vol[:3, :5, :1], tile=16).shape == (3, 5, 1)
    tiled = cyclegan_translate(g, odd, tile=16, overlap=8)
    assert tiled.shape == odd.shape and np.isfinite(tiled).all() and float(np.abs(tiled).max()) <= 1.0


def test_translate_stitches_exactly_where_the_network_is_tile_invariant():
    """A pointwise network gives every tile the whole pass's values: blending must reproduce them for
    any shape, tile and overlap (weights normalised, every voxel covered, crops in place)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.Tanh())
    img = np.random.default_rng(0).uniform(-1, 1, (37, 21)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(img)[None, None]).numpy()[0, 0]
    for tile, overlap in ((8, 0), (12, 5), (16, 8), (24, 3)):
        np.testing.assert_allclose(cyclegan_translate(net, img, tile, overlap), ref, atol=1e-6)
    assert net.training  # the caller's mode is restored


class _TileMean(torch.nn.Module):
    """The most tile-dependent network there is (what instance norm does in part): each tile's mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True).expand_as(x)


def test_overlaps_are_blended_linearly_instead_of_seamed():
    ramp = np.repeat(np.linspace(-1, 1, 40, dtype=np.float32)[:, None], 8, axis=1)
    hard = cyclegan_translate(_TileMean(), ramp, tile=16, overlap=0)[:, 0]
    blended = cyclegan_translate(_TileMean(), ramp, tile=16, overlap=8)[:, 0]
    assert np.abs(np.diff(hard)).max() > 0.5  # abutting tiles: a step from one tile's mean to the next
    assert np.diff(blended).min() >= 0  # a ramp between the tiles' means, monotone as the input
    assert np.abs(np.diff(blended)).max() < 0.2 * np.abs(np.diff(hard)).max()


def test_bad_inputs_are_refused_with_the_input_named():
    ok = [np.zeros((20, 20, 20), np.float32)]
    cfg = CycleGANConfig(width=2, blocks=1, patch=16, steps=1)
    with pytest.raises(ValueError, match="no source volumes"):
        train_cyclegan([], ok, cfg)
    with pytest.raises(ValueError, match="no target volumes"):
        train_cyclegan(ok, [], cfg)
    with pytest.raises(ValueError, match=r"target 1 is 2D .*dims is 3"):
        train_cyclegan(ok, [ok[0], np.zeros((20, 20))], cfg)
    with pytest.raises(ValueError, match=r"source 1 of shape .* smaller than the training patch of 16"):
        train_cyclegan([ok[0], np.zeros((20, 12, 20))], ok, cfg)
    with pytest.raises(ValueError, match="source 0 holds non-finite"):
        train_cyclegan([np.full((20, 20, 20), np.nan)], ok, cfg)
    for field, value in (("patch", 18), ("patch", 4), ("dims", 1), ("steps", 0), ("decay_from", 1.5)):
        with pytest.raises(ValueError, match=f"CycleGANConfig.{field}"):
            train_cyclegan(ok, ok, CycleGANConfig(**{**cfg.__dict__, field: value}))
    g = resnet_generator(3, 2, 1)
    with pytest.raises(ValueError, match="tile 18"):
        cyclegan_translate(g, ok[0], tile=18)
    with pytest.raises(ValueError, match="overlap 16"):
        cyclegan_translate(g, ok[0], tile=16, overlap=16)
    with pytest.raises(ValueError, match="2D; the generator is 3D"):
        cyclegan_translate(g, np.zeros((20, 20)))
