import numpy as np
import pytest
from scipy import stats
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from msgan.metrics import mae, mse, paired_test, psnr, score, ssim


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
