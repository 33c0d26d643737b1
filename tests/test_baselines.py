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


def test_nlm_with_a_given_noise_level_removes_correlated_noise_the_estimate_misses(rng):
    """Low-frequency (soft-kernel-like) noise: the wavelet estimate sees little of it, so the
    estimated NLM barely filters; told the true level, NLM removes most of it."""
    from scipy import ndimage

    clean = np.zeros((24, 32, 32), np.float32)
    clean[:, 8:24, 8:24] = 1.0
    noise = ndimage.gaussian_filter(rng.normal(size=clean.shape), 1.2)
    noise = (0.15 * noise / noise.std()).astype(np.float32)
    noisy = clean + noise
    err = lambda x: float(np.abs(x - clean).mean())  # noqa: E731
    estimated, told = nlm_filter(noisy), nlm_filter(noisy, h_factor=0.75, sigma=0.15)
    assert err(estimated) > 0.8 * err(noisy)
    assert err(told) < 0.6 * err(noisy)


def test_linear_filter_recovers_a_known_gaussian_blur(rng):
    from scipy import ndimage

    from msgan.baselines import fit_radial_filter

    def pair(shape):
        x = rng.normal(size=shape)
        return x, ndimage.gaussian_filter(x, 1.0, mode="wrap")

    filt = fit_radial_filter([pair((32, 32, 32)) for _ in range(3)], bands=96)
    x, y = pair((24, 40, 32))  # another shape: the filter lives in cycles/voxel
    err = filt.apply(x) - y
    assert float(np.sqrt(np.mean(err**2) / np.mean(y**2))) < 0.03
    centres = (filt.edges[:-1] + filt.edges[1:]) / 2
    mtf = np.exp(-2 * np.pi**2 * centres**2)  # a Gaussian of sigma 1 voxel
    low = centres < 0.3
    np.testing.assert_allclose(filt.gain[low], mtf[low], atol=0.03)
    identity = fit_radial_filter([(x, x)])
    np.testing.assert_allclose(identity.apply(x), x, atol=1e-4)
    with pytest.raises(ValueError, match="differ in shape"):
        fit_radial_filter([(x, y[:4])])
    with pytest.raises(ValueError, match="no training pairs"):
        fit_radial_filter([])


def test_nlm_in_slabs_equals_one_pass(rng):
    img = (0.1 * rng.normal(size=(36, 20, 20))).astype(np.float32)
    img[:, 6:14, 6:14] += 1.0
    np.testing.assert_allclose(nlm_filter(img, workers=3), nlm_filter(img), atol=1e-5)


def test_cnn_budget_training_and_stitching(rng):
    from msgan.baselines import cnn_for_budget, cnn_translate, train_cnn

    torch.manual_seed(0)
    net = cnn_for_budget(3, 5000, depth=1)
    assert sum(p.numel() for p in net.parameters()) >= 5000
    clean = np.full((20, 20, 20), -1000.0, np.float32)
    clean[3:17, 3:17, 3:17] = 40.0
    pairs = [(clean + 100.0, clean), (clean + 100.0, clean)]  # learn to remove a +100 HU offset
    before = np.abs(cnn_translate(net, pairs[0][0], tile=12, overlap=4) - clean).mean()
    train_cnn(net, pairs, steps=60, patch=8, batch_size=2, lr=3e-3)
    out = cnn_translate(net, pairs[0][0], tile=12, overlap=4)
    assert out.shape == clean.shape and out.dtype == np.float32
    assert np.abs(out - clean).mean() < 0.5 * before
    whole = cnn_translate(net, pairs[0][0], tile=20, overlap=4)  # one tile
    assert np.abs(out - whole).max() < 50.0  # blended seams stay close to the one-pass output
    with pytest.raises(ValueError, match="multiple"):
        train_cnn(net, pairs, steps=1, patch=7)


def _cnn_pairs(rng):
    clean = np.full((16, 16, 16), -1000.0, np.float32)
    clean[2:14, 3:13, 4:12] = 40.0
    return [(clean + rng.normal(0, 30, clean.shape).astype(np.float32), clean) for _ in range(2)]


def _fresh_cnn():
    from msgan.baselines import cnn_for_budget

    torch.manual_seed(0)
    return cnn_for_budget(3, 2000, depth=1)


def test_cnn_training_resumes_from_its_checkpoint_on_the_same_patches(rng, tmp_path):
    from msgan.baselines import train_cnn

    pairs = _cnn_pairs(rng)
    whole = _fresh_cnn()
    train_cnn(whole, pairs, steps=7, patch=8, batch_size=2, lr=3e-3)

    class Stop(Exception):
        pass

    def stop_at_5(msg):
        if "step 5/" in msg:
            raise Stop

    ckpt = tmp_path / "new" / "cnn.ckpt"  # its folder is made when the first checkpoint is saved
    stopped = _fresh_cnn()
    with pytest.raises(Stop):  # a run killed after step 5: its last checkpoint is step 4
        train_cnn(stopped, pairs, steps=7, patch=8, batch_size=2, lr=3e-3, log=stop_at_5, log_every=1,
                  checkpoint=ckpt, checkpoint_every=2)  # fmt: skip
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    resumed = _fresh_cnn()
    info = train_cnn(resumed, pairs, steps=7, patch=8, batch_size=2, lr=3e-3, checkpoint=ckpt, checkpoint_every=2)
    assert info["steps"] == 7 and info["seconds"] > 0
    assert torch.load(ckpt, weights_only=True)["step"] == 7  # the end is saved too
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)  # steps 5-7 saw the patches and Adam state of the unbroken run
    with pytest.raises(ValueError, match="another run"):  # a checkpoint of another patch never seeds this one
        train_cnn(_fresh_cnn(), pairs, steps=7, patch=4, batch_size=2, lr=3e-3, checkpoint=ckpt)


def test_cnn_patch_centres_lie_in_the_body(rng):
    from msgan.baselines import body_centres

    target = np.full((5, 6, 7), -1000.0, np.float32)
    target[1, 2, 3] = target[4, 5, 6] = 0.0
    flat = body_centres(target)
    assert flat.dtype == np.int32
    coords = np.stack(np.unravel_index(flat, target.shape), axis=1)
    np.testing.assert_array_equal(coords, np.argwhere(target > -500.0))  # the same order: the same stream
