import numpy as np
import pytest
import torch

from msgan.augment import Augmenter, Corruption, corrupt, gaussian_blur
from msgan.config import AugmentConfig


@pytest.mark.parametrize("p", [0.0, 0.25, 0.6, 1.0])
def test_each_corruption_fires_at_its_rate(p):
    aug = Augmenter(AugmentConfig(noise_p=p, blur_p=p / 2, resolution_p=1 - p, edge_noise_p=p))
    rng = np.random.default_rng(1)
    n = 4000
    cond = [aug.sample_condition(rng) for _ in range(n)]
    edges = [aug.sample_edges(rng) for _ in range(n)]
    rates = {
        "noise": (np.mean([c.noise_std is not None for c in cond]), p),
        "blur": (np.mean([c.blur_sigma is not None for c in cond]), p / 2),
        "resolution": (np.mean([c.resolution_factor is not None for c in cond]), 1 - p),
        "edge_noise": (np.mean([c.noise_std is not None for c in edges]), p),
    }
    for name, (seen, want) in rates.items():
        tol = 4 * np.sqrt(max(want * (1 - want), 1e-12) / n) + 1e-12
        assert abs(seen - want) <= tol, f"{name}: fired {seen:.3f}, configured {want}"


def test_parameters_drawn_from_ranges():
    aug = Augmenter(AugmentConfig(noise_p=1, noise_std=(0.1, 0.2), blur_p=1, blur_sigma=(0.5, 0.7),
                                  resolution_p=1, resolution_factor=(2, 3)))  # fmt: skip
    rng = np.random.default_rng(0)
    for _ in range(200):
        c = aug.sample_condition(rng)
        assert 0.1 <= c.noise_std <= 0.2 and 0.5 <= c.blur_sigma <= 0.7 and 2 <= c.resolution_factor <= 3


@pytest.mark.parametrize("dims", [2, 3])
def test_corruptions_change_the_image_and_replay(dims):
    x = torch.rand(1, 1, *([16] * dims))
    for params in (Corruption(noise_std=0.1, seed=4), Corruption(blur_sigma=1.0), Corruption(resolution_factor=2.0)):
        y = corrupt(x, params)
        assert y.shape == x.shape
        assert float((y - x).abs().max()) > 1e-3, params
        torch.testing.assert_close(corrupt(x, params), y)  # the same parameters, the same result
    assert torch.equal(corrupt(x, Corruption()), x)


def test_noise_has_its_std_and_blur_keeps_the_mean():
    x = torch.zeros(1, 1, 32, 32, 32)
    y = corrupt(x, Corruption(noise_std=0.05, seed=1))
    assert float(y.std()) == pytest.approx(0.05, rel=0.05)
    b = gaussian_blur(y, 1.5)
    assert float(b.std()) < 0.3 * float(y.std())
    assert float(b.mean()) == pytest.approx(float(y.mean()), abs=1e-3)
