import numpy as np
import pytest

from msgan.config import EdgeConfig, IntensityConfig
from msgan.pyramid import build_pyramid, downsample2, edges, image_pyramid, unwindow, upsample2, window


def test_window_maps_and_clips():
    w = IntensityConfig(low=-1000, high=1000)
    x = np.array([-2000, -1000, 0, 500, 1000, 3000], np.float32)
    np.testing.assert_allclose(window(x, w), [-1, -1, 0, 0.5, 1, 1], atol=1e-6)
    np.testing.assert_allclose(unwindow(window(x[1:5], w), w), x[1:5], atol=1e-3)


def test_window_rejects_nan():
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        window(np.array([0.0, np.nan]), IntensityConfig())


def test_downsample_is_block_mean_with_odd_edges():
    x = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    d = downsample2(x)
    assert d.shape == (3, 2)
    assert d[0, 0] == np.mean(x[:2, :2])
    assert d[2, 1] == np.mean(x[4, 2:4])  # the odd row repeats its last voxel


def test_downsample_then_upsample_keeps_smooth_images(rng):
    z, y, x = np.meshgrid(*(np.linspace(0, 1, n) for n in (16, 18, 20)), indexing="ij")
    smooth = np.sin(2 * z) + y * x
    back = upsample2(downsample2(smooth), smooth.shape)
    inner = (slice(2, -2),) * 3
    assert float(np.abs(back - smooth)[inner].max()) < 0.02


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("method", ["gradient", "canny"])
def test_edges_mark_boundaries(dims, method):
    img = -np.ones((32,) * dims, np.float32)
    img[(slice(8, 24),) * dims] = 0.5
    e = edges(img, EdgeConfig(method=method, sigma=1.0))
    assert e.shape == img.shape and e.min() >= -1 and e.max() <= 1
    centre = (16,) * dims
    boundary = (8,) + (16,) * (dims - 1)
    assert e[boundary] > e[centre] + 0.5
    assert e[(1,) * dims] == pytest.approx(-1, abs=1e-3)  # flat background carries no edge


def test_pyramid_levels_lr_first():
    img = np.random.default_rng(0).uniform(-1000, 1000, (37, 20, 24)).astype(np.float32)
    p = build_pyramid(img, 3, IntensityConfig(), EdgeConfig())
    assert p.shapes == [(10, 5, 6), (19, 10, 12), (37, 20, 24)]
    np.testing.assert_allclose(p.images[1], downsample2(p.images[2]))
    assert [e.shape for e in p.edges] == p.shapes
    with pytest.raises(ValueError, match="too small for num_scales=7"):
        build_pyramid(img, 7, IntensityConfig(), EdgeConfig())
    assert len(image_pyramid(window(img, IntensityConfig()), 1)) == 1
