import numpy as np
import pytest

from msgan.data.phantom import LUNG, kernel_pair, radiograph, reconstruct, sample_anatomy, thorax_phantom


@pytest.fixture(scope="module")
def truth():
    return thorax_phantom((48, 64, 64), seed=3)


def test_deterministic_and_seed_dependent(truth):
    np.testing.assert_array_equal(thorax_phantom((48, 64, 64), seed=3), truth)
    assert np.mean(thorax_phantom((48, 64, 64), seed=4) != truth) > 0.01
    assert sample_anatomy(3) == sample_anatomy(3)


def test_anatomy_in_hounsfield_units(truth):
    assert truth.dtype == np.float32
    assert truth.min() >= -1100 and truth.max() <= 800
    fractions = {
        "air": np.mean(truth <= -990),
        "lung": np.mean((truth > -960) & (truth < -700)),
        "soft": np.mean((truth > -150) & (truth < 100)),
        "bone": np.mean(truth >= 200),
    }
    assert all(f > 0.003 for f in fractions.values()), fractions
    lung = truth[(truth > -960) & (truth < -700)]
    assert abs(float(lung.mean()) - LUNG) < 30 and float(lung.std()) > 10  # parenchymal texture


def test_region_equals_slicing_the_whole(truth):
    region = (slice(10, 30), slice(5, 60), slice(20, 64))
    np.testing.assert_array_equal(thorax_phantom((48, 64, 64), seed=3, region=region), truth[region])


def test_any_spacing_keeps_physical_size():
    a = thorax_phantom((32, 32, 32), spacing=(12.5, 12.5, 12.5), seed=1)
    b = thorax_phantom((64, 64, 64), spacing=(6.25, 6.25, 6.25), seed=1)
    assert abs(np.mean(a < -700) - np.mean(b < -700)) < 0.02  # same anatomy, finer grid


def test_kernels_soft_smooth_sharp_noisy(truth):
    r = reconstruct(truth, seed=1)
    flat = (slice(20, 28), slice(2, 8), slice(2, 8))  # air outside the body: pure noise
    soft_noise, sharp_noise = float(r["soft"][flat].std()), float(r["sharp"][flat].std())
    assert sharp_noise > 4 * soft_noise

    # high-frequency energy: sharp > truth-ish > soft
    def hf(v):
        return float(np.mean(np.abs(np.diff(v, axis=2))))

    assert hf(r["sharp"]) > hf(truth) > hf(r["soft"])
    soft, _ = kernel_pair((48, 64, 64), seed=3)
    assert abs(float(soft.mean()) - float(truth.mean())) < 5  # the MTF keeps the mean
    with pytest.raises(ValueError, match="kernel"):
        reconstruct(truth, ("b30f",))


def test_radiograph_small():
    img = radiograph(96, seed=2, depth=48, slab=16)
    assert img.shape == (96, 96) and img.dtype == np.float32
    centre_col = img[:, 40:56].mean()
    outside = img[:, :4].mean()
    assert centre_col > outside + 0.2  # mediastinum and spine attenuate more than air


def test_options_add_dense_bone_metal_emphysema_aorta_and_labels():
    from msgan.data.phantom import ALL_OPTIONS, CORTICAL_RANGE, METAL, TISSUES, Label, thorax_labels

    shape = (48, 64, 64)
    plain, plain_labels = thorax_labels(shape, seed=3)
    np.testing.assert_array_equal(plain, thorax_phantom(shape, seed=3))  # off by default: same phantom
    hu, lab = thorax_labels(shape, seed=3, options=ALL_OPTIONS)
    cortical = hu[lab == Label.CORTICAL]
    assert CORTICAL_RANGE[0] <= cortical.min() and cortical.max() <= CORTICAL_RANGE[1]
    assert (hu[lab == Label.METAL] == METAL).all() and (lab == Label.METAL).sum() > 10
    lung = np.isin(lab, TISSUES["lung"])
    assert 1.0 < 100 * np.mean(hu[lung] < -950) < 25  # emphysema index not zero
    assert (lab == Label.AORTA).sum() > 50 and not (plain_labels == Label.AORTA).any()
    grouped = np.concatenate([np.asarray(v) for v in TISSUES.values()])
    assert len(set(grouped.tolist())) == len(grouped)  # each label in at most one tissue
    region = (slice(10, 30), slice(5, 60), slice(20, 64))
    sub_hu, sub_lab = thorax_labels(shape, seed=3, region=region, options=ALL_OPTIONS)
    np.testing.assert_array_equal(sub_hu, hu[region])
    np.testing.assert_array_equal(sub_lab, lab[region])


def test_noiseless_reconstruction_is_the_mtf_part(truth):
    from msgan.data.phantom import apply_mtf

    r = reconstruct(truth, ("soft",), seed=1)["soft"]
    noise = r - apply_mtf(truth, "soft")
    assert float(noise.std()) == pytest.approx(12.0, rel=1e-3)
    assert abs(float(noise.mean())) < 1.0


def test_phantom_geometry_reverses_to_itk_order():
    from msgan.data.phantom import phantom_geometry

    g = phantom_geometry((10, 20, 40))
    assert g.spacing == (10.0, 10.0, 10.0) and g.origin == (0.0, 0.0, 0.0)
    g = phantom_geometry((10, 20, 40), spacing=(3.0, 2.0, 1.0))
    assert g.spacing == (1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="spacing"):
        phantom_geometry((10, 20, 40), spacing=(1.0, 1.0))
