import pytest
import torch

from msgan.nets import HRGenerator, PatchDiscriminator, UNet, count_parameters, patchgan_min_size
from tests.conftest import randomize_batchnorm


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("num_blocks", [0, 1, 3])
@torch.no_grad()
def test_halo_matches_receptive_field(dims, num_blocks):
    torch.manual_seed(0)
    g = HRGenerator(dims, width=4, num_blocks=num_blocks, norm_kind="batch").eval()
    randomize_batchnorm(g)
    h = g.halo
    assert h == 2 + 2 * num_blocks
    core = 4
    x = torch.randn(1, 2, *([core + 2 * h] * dims))
    y = g(x)[0, 0]
    assert y.shape == (core,) * dims
    # Input voxel 0 lies exactly `halo` before output voxel 0 (inside its field) and `halo + 1`
    # before output voxel 1 (outside): only output voxel 0 may move, and it must.
    x2 = x.clone()
    x2[(0, slice(None), 0)] += 1.0
    diff = (g(x2)[0, 0] - y).abs()
    assert float(diff[0].max()) > 0.0, "an input change inside the halo did not reach the output"
    assert float(diff[1:].max()) == 0.0, "an input change outside the halo moved the output"


@pytest.mark.parametrize("dims", [2, 3])
def test_wide_context_box_and_shapes(dims):
    g = HRGenerator(dims, width=4, num_blocks=1, context="wide", context_layers=2).eval()
    start, stop = [6] * dims, [14] * dims
    c0, c1 = g.context_box(start, stop)
    x = torch.randn(1, 1, *([8 + 2 * g.halo] * dims))
    coarse = torch.randn(1, 1, *[b - a for a, b in zip(c0, c1)])
    assert g(x, coarse).shape == (1, 1, *([8] * dims))
    # the coarse box covers more than the fine input's footprint: a wider field of view
    assert all((b - a) * 2 > 8 + 2 * g.halo for a, b in zip(c0, c1))
    with pytest.raises(ValueError, match="even"):
        g.context_box([5] * dims, [13] * dims)
    with pytest.raises(ValueError, match="coarse"):
        g(x)


def test_tile_exact_generator_rejects_per_tile_norm():
    with pytest.raises(ValueError, match="per-tile statistics"):
        HRGenerator(3, norm_kind="instance")
    HRGenerator(3, norm_kind="instance", context="none", residual=False, padding="same")  # the baseline may


@pytest.mark.parametrize("dims,size", [(2, (37, 20)), (3, (17, 9, 12))])
@torch.no_grad()
def test_unet_any_size(dims, size):
    u = UNet(dims, 1, 1, width=4, depth=2, norm_kind="batch", noise_channels=1).eval()
    x = torch.randn(2, 1, *size)
    y = u(x)
    assert y.shape == (2, 1, *size)
    assert float(y.abs().max()) <= 1.0
    assert torch.equal(u(x), y), "eval mode must be deterministic (noise channels are zero)"


def test_unet_bottleneck_too_small_for_instance_norm():
    u = UNet(3, 1, width=4, depth=3, norm_kind="instance")
    with pytest.raises(ValueError, match="bottleneck"):
        u(torch.randn(1, 1, 8, 8, 8))


@pytest.mark.parametrize("dims", [2, 3])
def test_patchgan_receptive_field_and_min_size(dims):
    d = PatchDiscriminator(dims, 3, width=4, num_layers=3)
    assert d.receptive_field == 70
    n = patchgan_min_size(3)
    assert d(torch.randn(1, 3, *([n] * dims))).shape == (1, 1, *([1] * dims))
    with pytest.raises(ValueError, match=r"\(receptive field 70\)"):
        d(torch.randn(1, 3, *([n - 1] * dims)))


def test_default_hr_generator_size():
    g = HRGenerator(3)
    assert g.halo == 14
    assert 150_000 < count_parameters(g) < 400_000


@pytest.mark.parametrize("dims", [2, 3])
@torch.no_grad()
def test_source_residual_is_the_source_plus_a_correction(dims):
    """With the last layer zeroed the correction vanishes: the output is exactly the source image."""
    from msgan.nets import build_discriminator, build_generator, discriminator_channels
    from tests.conftest import tiny_config

    hr = HRGenerator(dims, width=4, num_blocks=1, norm_kind="none", residual=False, condition="image+edges",
                     source_residual=True)  # fmt: skip
    assert hr.channels == ("prev", "image", "edges")
    hr.tail.weight.zero_()
    hr.tail.bias.zero_()
    x = torch.randn(1, 3, *([8 + 2 * hr.halo] * dims))
    torch.testing.assert_close(hr(x), x[:, 1:2, *([slice(hr.halo, -hr.halo)] * dims)], rtol=0, atol=0)
    u = UNet(dims, 1, 1, width=4, depth=1, channels=("image",), source_residual=True)
    u.head.weight.zero_()
    u.head.bias.zero_()
    img = torch.randn(1, 1, *([12] * dims))
    torch.testing.assert_close(u(img), img, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs the source image"):
        HRGenerator(dims, residual=False, condition="edges", source_residual=True)
    cfg = tiny_config(**{"condition": "image", "dims": 3})
    assert [discriminator_channels(s, "image") for s in (0, 1)] == [2, 3]
    assert build_discriminator(cfg, 1).net[0].in_channels == 3
    assert build_generator(cfg, 0).channels == ("image",)


@pytest.mark.parametrize("dims", [2, 3])
@torch.no_grad()
def test_levels_from_the_previous_scale_keep_the_source_detail_on_the_previous_levels(dims):
    """levels='previous', correction zeroed: a flat previous scale at 0.5 under a source at -0.2 with a voxel of
    detail gives 0.5 plus that detail, less only what the level Gaussian smooths of it; and a whole image
    through it equals the image cut into tiles (valid convolutions: tile-exact)."""
    from msgan.netrules import LEVELS_RADIUS

    hr = HRGenerator(dims, width=4, num_blocks=1, norm_kind="none", residual=False, condition="image",
                     source_residual=True, levels="previous")  # fmt: skip
    assert "_levels_kernel" not in hr.state_dict()  # fixed, never trained nor saved
    hr.tail.weight.zero_()
    hr.tail.bias.zero_()
    h, n = hr.halo, 9
    x = torch.zeros(1, 2, *([n + 2 * h] * dims))
    x[:, 0], x[:, 1] = 0.5, -0.2
    centre = (0, 1, *([h + n // 2] * dims))
    x[centre] += 1.0
    y = hr(x)[0, 0]
    mid = (n // 2,) * dims
    kernel = hr._levels_kernel
    peak = float(kernel[LEVELS_RADIUS]) ** dims  # the Gaussian's share of the detail voxel that it removes
    assert float(y[mid]) == pytest.approx(0.5 + 1.0 - peak, abs=1e-5)
    far = (0,) * dims
    assert float(y[far]) == pytest.approx(0.5, abs=1e-5)  # away from the detail: the previous scale's level
    torch.manual_seed(0)
    hr = HRGenerator(dims, width=4, num_blocks=1, norm_kind="none", residual=False, condition="image",
                     source_residual=True, levels="previous")  # fmt: skip
    x = torch.randn(1, 2, *([2 * n + 2 * h] * dims))
    whole = hr(x)
    for start in (0, n):
        box = (slice(None), slice(None), *([slice(start, start + n + 2 * h)] * dims))
        out = (slice(None), slice(None), *([slice(start, start + n)] * dims))
        torch.testing.assert_close(hr(x[box]), whole[out], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"levels='previous'.*needs source_residual=True, context='upscaled'"):
        HRGenerator(dims, residual=False, condition="image", source_residual=False, levels="previous")
    with pytest.raises(ValueError, match=r"levels='previous'.*context='upscaled'"):
        HRGenerator(dims, context="wide", residual=False, condition="image", source_residual=True, levels="previous")
    with pytest.raises(ValueError, match="levels='elsewhere': must be one of"):
        HRGenerator(dims, residual=False, condition="image", source_residual=True, levels="elsewhere")


@pytest.mark.parametrize("dims", [2, 3])
def test_cpu_inference_convolution_takes_onednn_and_training_does_not(dims, monkeypatch):
    from msgan.nets import conv, onednn_applies

    torch.manual_seed(0)
    c = conv(dims, 3, 4, 3)
    x = torch.randn(1, 3, *([9] * dims))  # small, single-sample, 3 channels: PyTorch would unfold it
    assert x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3] <= 20480
    with torch.no_grad():
        assert onednn_applies(c, x)
        calls = []
        real = torch.ops.aten.mkldnn_convolution
        monkeypatch.setattr(torch.ops.aten, "mkldnn_convolution", lambda *a: calls.append(1) or real(*a))
        y = c(x)
    assert calls, "inference did not go through oneDNN"
    ref = (torch.nn.functional.conv2d if dims == 2 else torch.nn.functional.conv3d)(x, c.weight, c.bias)
    assert torch.allclose(y, ref, atol=1e-5)
    assert not onednn_applies(c, x)  # grad mode: PyTorch's own path, autograd as usual
    c(x).sum().backward()
    assert c.weight.grad is not None and c.weight.grad.abs().sum() > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn_applies(c, x)


def test_network_rules_are_the_torch_free_ones():
    """nets builds on msgan.netrules (which the config checks at load), not on copies of its rules."""
    from msgan import netrules, nets

    for name in ("check_hr_options", "condition_channels", "discriminator_channels", "patchgan_min_size"):
        assert getattr(nets, name) is getattr(netrules, name)
    with pytest.raises(ValueError, match=r"context='side': must be one of \['upscaled', 'wide', 'none'\]"):
        HRGenerator(3, context="side")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"condition='edge': must be one of \['edges', 'image', 'image\+edges'\]"):
        netrules.condition_channels("edge")
    assert [netrules.condition_channels(c) for c in netrules.CONDITIONS] == [("edges",), ("image",), ("image", "edges")]


@pytest.mark.parametrize("condition", ["edges", "image+edges"])
def test_the_model_spec_alone_defines_the_networks(condition):
    """build_generator / build_discriminator read only the spec's part of a config: the spec a cascade saves
    (msgan.spec.ModelSpec) builds the same networks as the config it came from."""
    from msgan.config import Config
    from msgan.nets import build_discriminator, build_generator
    from tests.conftest import tiny_config

    cfg = tiny_config(**{"condition": condition, "hr_generator.context": "wide", "train.steps": 3})
    spec = cfg.spec()
    for scale in range(cfg.num_scales):
        for build in (build_generator, build_discriminator):
            with torch.device("meta"):
                a = {k: tuple(v.shape) for k, v in build(cfg, scale).state_dict().items()}
                b = {k: tuple(v.shape) for k, v in build(spec, scale).state_dict().items()}
                c = {k: tuple(v.shape) for k, v in build(Config.from_spec(spec), scale).state_dict().items()}
            assert a == b == c and a
