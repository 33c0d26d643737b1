import numpy as np
import pytest
import torch

from msgan.baselines import nlm_filter, patch_generator, patchwise_translate, upscale_small
from msgan.config import load_config


def test_upscale_small_reaches_the_full_shape(rng):
    lr = rng.normal(size=(10, 14, 11)).astype(np.float32)
    up = upscale_small(lr, (37, 53, 41))
    assert up.shape == (37, 53, 41)
    assert up.mean() == pytest.approx(lr.mean(), abs=0.1)
    with pytest.raises(ValueError, match="doubling"):
        upscale_small(lr, (30, 30, 30))


def test_patchwise_stitching_has_seams_where_the_cascade_has_none(rng):
    cfg = load_config(None, {"hr_generator.width": 4, "hr_generator.num_blocks": 1})
    torch.manual_seed(0)
    g = patch_generator(cfg)
    edges = rng.uniform(-1, 1, (20, 20, 20)).astype(np.float32)
    a = patchwise_translate(g, edges, patch=12, overlap=5)
    b = patchwise_translate(g, edges, patch=20, overlap=5)  # one patch: no stitching
    assert a.shape == edges.shape
    assert float(np.abs(a - b).max()) > 1e-3, "per-patch padding and norm make patch-wise output tile-dependent"
    with pytest.raises(ValueError, match="overlap"):
        patchwise_translate(g, edges, patch=4, overlap=5)


def test_nlm_reduces_noise(rng):
    clean = np.zeros((24, 32, 32), np.float32)
    clean[:, 8:24, 8:24] = 1.0
    noisy = clean + rng.normal(0, 0.2, clean.shape).astype(np.float32)
    filtered = nlm_filter(noisy)
    assert np.abs(filtered - clean).mean() < 0.5 * np.abs(noisy - clean).mean()
