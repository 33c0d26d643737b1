import numpy as np
import pytest
from scipy import stats
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from msgan.data.phantom import Label
from msgan.metrics import (
    body_outline,
    contrast_hu,
    ct_metrics,
    emphysema_index,
    hallucination_ml,
    holm,
    mae,
    mse,
    paired_test,
    psnr,
    score,
    ssim,
)


@pytest.mark.parametrize("shape", [(64, 48), (24, 30, 28)])
def test_ssim_matches_scikit_image(shape, rng):
    a = rng.uniform(-1, 1, shape)
    b = np.clip(a + rng.normal(0, 0.3, shape), -1, 1)
    want = structural_similarity(a, b, data_range=2.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim(a, b, data_range=2.0) == pytest.approx(want, abs=1e-6)
    assert ssim(a, a, data_range=2.0) == pytest.approx(1.0)


def test_pixel_metrics_and_mask(rng):
    a, b = rng.uniform(0, 1, (10, 12)), rng.uniform(0, 1, (10, 12))
    assert mae(a, b) == pytest.approx(np.abs(a - b).mean())
    assert mse(a, b) == pytest.approx(((a - b) ** 2).mean())
    assert psnr(a, b, 1.0) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0))
    mask = np.zeros_like(a, bool)
    mask[2:5] = True
    assert mae(a, b, mask) == pytest.approx(np.abs(a - b)[2:5].mean())
    s = score(a, b, data_range=1.0, mask=mask)
    assert s.mse == pytest.approx(((a - b)[2:5] ** 2).mean())
    with pytest.raises(ValueError, match="shape"):
        mae(a, b[:5])
    with pytest.raises(ValueError, match="empty"):
        mae(a, b, np.zeros_like(mask))


def test_paired_test_matches_scipy():
    a, b = [0.7, 0.8, 0.75, 0.9], [0.6, 0.65, 0.7, 0.8]
    r = paired_test(a, b)
    ref = stats.ttest_rel(a, b)
    assert r.t == pytest.approx(ref.statistic) and r.p == pytest.approx(ref.pvalue) and r.n == 4
    assert r.mean_difference == pytest.approx(0.1)
    with pytest.raises(ValueError, match="at least 2"):
        paired_test([1.0], [2.0])


# ----------------------------------------------------------------------------- the field's CT metrics


def _blob(shape, start, count):
    """A mask of ``count`` face-connected voxels in a row starting at ``start`` (along the last axis)."""
    m = np.zeros(shape, bool)
    z, y, x = start
    m[z, y, x : x + count] = True
    return m


def test_hallucination_counts_a_planted_blob_and_ignores_noise_and_small_blobs(rng):
    shape = (20, 20, 24)
    clean = np.zeros(shape)
    out = clean + rng.normal(0, 25, shape)  # noise: |diff| > 100 HU is a 4-sigma event, isolated voxels
    assert hallucination_ml(out, clean, (1.0, 1.0, 1.0)) == 0.0
    blob = _blob(shape, (5, 5, 2), 10)
    nine = _blob(shape, (12, 12, 2), 9)
    out[blob] = 150.0
    out[nine] = 150.0
    assert hallucination_ml(out, clean, (1.0, 1.0, 1.0)) == pytest.approx(10 / 1000.0)
    assert hallucination_ml(out, clean, (2.0, 1.0, 0.5)) == pytest.approx(10 / 1000.0)  # 1 mm^3 voxels
    assert hallucination_ml(out, clean, (2.0, 2.0, 2.0)) == pytest.approx(80 / 1000.0)  # mL from spacing
    out[blob] = -150.0  # lost anatomy counts as well
    assert hallucination_ml(out, clean, (1.0, 1.0, 1.0)) == pytest.approx(0.01)
    out[blob] = 90.0  # under the threshold
    assert hallucination_ml(out, clean, (1.0, 1.0, 1.0)) == 0.0


def test_hallucination_uses_26_connectivity_and_the_mask():
    shape = (12, 12, 12)
    clean = np.zeros(shape)
    out = clean.copy()
    for k in range(10):  # a diagonal line: only corner-connected
        out[1 + k % 10, 1 + k, 1 + k] = 200.0
    assert hallucination_ml(out, clean, (1, 1, 1)) == pytest.approx(0.01)
    mask = np.zeros(shape, bool)
    mask[:6] = True
    assert hallucination_ml(out, clean, (1, 1, 1), mask=mask) == 0.0  # 5 voxels left inside
    with pytest.raises(ValueError, match="spacing"):
        hallucination_ml(out, clean, (1, 1))


def test_emphysema_index_and_contrast():
    hu = np.full((4, 5, 5), -850.0)
    hu[0, 0, :4] = -960.0
    lung = np.ones(hu.shape, bool)
    assert emphysema_index(hu, lung) == pytest.approx(100 * 4 / hu.size)
    with pytest.raises(ValueError, match="empty"):
        emphysema_index(hu, np.zeros_like(lung))
    inside = np.zeros(hu.shape, bool)
    inside[2, 2, 2] = True
    hu[2, 2, 2] = 40.0
    assert contrast_hu(hu, inside, ~inside & (hu == -850.0)) == pytest.approx(890.0)
    assert np.isnan(contrast_hu(hu, np.zeros_like(inside), inside))


def test_holm_matches_the_step_down_rule():
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, float("nan")])[0] == pytest.approx(0.5)
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1


def test_body_outline_keeps_the_lungs():
    hu = np.full((3, 30, 30), -1000.0)
    yy, xx = np.mgrid[:30, :30]
    body = (yy - 15) ** 2 + (xx - 15) ** 2 < 12**2
    lung = (yy - 15) ** 2 + (xx - 12) ** 2 < 5**2
    hu[:, body] = 40.0
    hu[:, lung] = -850.0
    hu[:, 0, 0] = 50.0  # a speck outside: not the largest component
    m = body_outline(hu)
    assert m[:, lung].all() and m[:, body].all() and not m[:, 0, 0].any()


def test_ct_metrics_exact_on_a_tiny_fixture():
    shape = (12, 12, 12)
    labels = np.full(shape, Label.SOFT, np.uint8)
    labels[:, :, :2] = Label.OUTSIDE
    labels[:, 2:10, 6:11] = Label.LUNG
    labels[6, 6, 8] = Label.LUNG_VESSEL
    target = np.where(labels == Label.LUNG, -850.0, 40.0)
    target[labels == Label.OUTSIDE] = -1000.0
    target[labels == Label.LUNG_VESSEL] = 40.0
    out = target.copy()
    out[labels == Label.SOFT] += 10.0  # soft tissue 10 HU too bright
    r = ct_metrics(out, target, target, labels, (1.0, 1.0, 1.0))
    body = labels != Label.OUTSIDE
    assert r["mae_hu"] == pytest.approx(10.0 * np.mean(labels[body] == Label.SOFT))
    assert r["mae_hu_soft"] == pytest.approx(10.0) and r["rmse_hu_soft"] == pytest.approx(10.0)
    assert r["mae_hu_lung"] == 0.0 and r["mae_hu_blood"] == 0.0 and np.isnan(r["mae_hu_bone"])
    assert r["noise_hu"] == 0.0 and r["noise_target_hu"] == 0.0
    assert r["emphysema_index"] == 0.0 and r["vessel_contrast_error"] == pytest.approx(0.0)
    assert r["hallucination_ml"] == 0.0 and r["ssim"] < 1.0
    assert np.isnan(r["nodule_contrast_error"])
    r = ct_metrics(target, target, target, labels, (1.0, 1.0, 1.0))
    assert r["ssim"] == pytest.approx(1.0) and r["mae_hu"] == 0.0


def test_hold_out_scoring_lives_in_metrics(tmp_path, rng):
    """score_against_truth (demo and training job): window units inside the body, and a preview PNG."""
    from msgan.config import Config
    from msgan.metrics import score_against_truth

    cfg = Config()
    truth = np.full((16, 16, 16), -1024.0, dtype=np.float32)  # air, outside the body
    truth[4:12, 4:12, 4:12] = 40.0  # the body
    noisy = truth + rng.normal(0, 50, truth.shape).astype(np.float32)
    png = tmp_path / "scores.png"
    s_in, s_ours = score_against_truth(cfg, noisy, truth.copy(), truth, (1.0, 1.0, 1.0), png)
    assert s_ours.mae == 0 and s_ours.ssim == pytest.approx(1.0) and s_ours.psnr == float("inf")
    body = truth > -1024.0
    assert s_in.mae == pytest.approx(np.abs(noisy[body] - truth[body]).mean() / 1024.0, rel=1e-5)
    assert png.read_bytes().startswith(b"\x89PNG")


def test_pair_scores_see_nothing_outside_the_valid_voxels(tmp_path):
    """score_pair: a translation equal to the target inside the pair's valid voxels scores SSIM 1 and MAE 0,
    whatever lies outside them (SSIM's windows reaching across the overlap's edge included)."""
    from msgan.io.volume import Geometry
    from msgan.metrics import score_pair
    from tests.conftest import tiny_config

    rng = np.random.default_rng(0)
    truth = rng.normal(0.0, 200.0, (24, 24, 24)).astype(np.float32)
    valid = np.zeros(truth.shape, bool)
    valid[:, :, 8:] = True
    ours = np.where(valid, truth, 900.0).astype(np.float32)
    cfg = tiny_config()
    spacing = Geometry.identity(3).numpy_spacing()
    s_in, s_ours = score_pair(cfg, truth + 50.0, ours, truth, valid, spacing, tmp_path / "p.png")
    assert s_ours.ssim == pytest.approx(1.0) and s_ours.mae == 0.0 and s_ours.voxels == int(valid.sum())
    assert s_in.mae == pytest.approx(50.0, rel=1e-4) and s_in.ssim < 1.0
    _, unmasked = score_pair(cfg, truth, ours, truth, None, spacing, tmp_path / "q.png")
    assert unmasked.ssim < 0.99 and unmasked.mae > 0
