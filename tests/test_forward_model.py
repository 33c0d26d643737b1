"""The unpaired forward model (target -> source) on the phantom tasks: fitted on sources of some subjects and
targets of others, judged on a held-out subject against what its real source is."""

import json

import numpy as np
import pytest

from msgan import forward_model as fm
from msgan.data.tasks import make_task

SHAPE = (40, 40, 40)
W = 1024.0  # window units: HU / 1024
SOURCES, TARGETS, HELD_OUT = (101, 102, 103), (105, 106, 107), 301


def _mse(a, b):
    return float(np.mean((np.asarray(a, np.float64) - b) ** 2))


def _fit_task(task):
    vols = [make_task(task, s, SHAPE, workers=1) for s in SOURCES]
    tgt = [make_task(task, s, SHAPE, workers=1).target / W for s in TARGETS]
    held = make_task(task, HELD_OUT, SHAPE, workers=1)
    return {"model": fm.fit([v.input / W for v in vols], tgt), "source_volumes": vols, "held": held}


@pytest.fixture(scope="module")
def kernels():
    """sharp-to-soft and soft-to-sharp share their acquisitions: fit both from one set of volumes."""
    vols = {s: make_task("sharp-to-soft", s, SHAPE, workers=1) for s in (*SOURCES, *TARGETS, HELD_OUT)}
    sharp_nl = make_task("soft-to-sharp", HELD_OUT, SHAPE, workers=1).noiseless / W
    out = {}
    for task, (i, t) in {"sharp-to-soft": ("input", "target"), "soft-to-sharp": ("target", "input")}.items():
        src = [getattr(vols[s], i) / W for s in SOURCES]
        tgt = [getattr(vols[s], t) / W for s in TARGETS]
        h = vols[HELD_OUT]
        nl = {"sharp-to-soft": (h.noiseless / W, sharp_nl), "soft-to-sharp": (sharp_nl, h.noiseless / W)}[task]
        out[task] = {
            "model": fm.fit(src, tgt),
            "sources": src,
            "input": getattr(h, i) / W,
            "target": getattr(h, t) / W,
            "target_noiseless": nl[0],
            "input_noiseless": nl[1],
        }
    return out


@pytest.fixture(scope="module")
def low_dose():
    return _fit_task("low-dose")


@pytest.fixture(scope="module")
def contrast():
    return _fit_task("contrast")


def _band_ratio(image, reference_power, lo=0.1, hi=0.45):
    """Per band in [lo, hi) cycles/voxel: the image's power over the reference's."""
    edges, p = fm.mean_power([image])
    c = (edges[:-1] + edges[1:]) / 2
    sel = (c >= lo) & (c < hi)
    return p[sel] / reference_power[sel]


def test_sharp_to_soft_degrades_the_soft_target_into_a_sharp_image(kernels):
    k = kernels["sharp-to-soft"]
    m, target, source = k["model"], k["target"], k["input"]
    g = m.summary()
    assert g["gain_0.25"] > 1.8 and g["gain_0.4"] > 4.0, g  # true MTF ratio: 2.8 and 6.6
    filt = m.filter_only().degrade(target, np.random.default_rng(0))
    assert _mse(filt, source) < 0.35 * _mse(target, source)  # noise: the filter alone cannot make it
    # the noise-free part: the filter maps the soft kernel's signal onto the sharp kernel's
    nl = m.filter_only().degrade(k["target_noiseless"], np.random.default_rng(0))
    assert _mse(nl, k["input_noiseless"]) < 0.1 * _mse(k["target_noiseless"], k["input_noiseless"])
    # with its noise, the synthesized source has the subject's sharp image's spectrum; the soft target is far off
    _, p_src = fm.mean_power([source])
    deg = m.degrade(target, np.random.default_rng(1))
    assert np.all(np.abs(_band_ratio(deg, p_src) - 1) < 0.35)
    assert np.median(np.abs(_band_ratio(deg, p_src) - 1)) < 0.25
    assert np.median(_band_ratio(target, p_src)) < 0.2
    # and the sharp kernel's noise level (90 HU): the soft target holds 12 HU
    assert fm.noise_sigma(deg) * W == pytest.approx(fm.noise_sigma(source) * W, rel=0.2)


def test_soft_to_sharp_blurs_the_sharp_target_into_the_soft_input(kernels):
    k = kernels["soft-to-sharp"]
    m, target, source = k["model"], k["target"], k["input"]
    g = m.summary()
    assert g["gain_0.25"] < 0.6 and g["gain_0.4"] < 0.25, g  # true MTF ratio: 0.36 and 0.12
    deg = m.degrade(target, np.random.default_rng(0))
    # the filtered sharp noise (90 HU) is about the soft noise (12 HU): little is added, the level matches
    assert m.summary()["noise_std"] * W < 15.0
    assert fm.noise_sigma(deg) * W == pytest.approx(fm.noise_sigma(source) * W, rel=0.25)
    assert _mse(deg, source) < 0.02 * _mse(target, source)
    nl = m.filter_only().degrade(k["target_noiseless"], np.random.default_rng(0))
    assert _mse(nl, k["input_noiseless"]) < 0.01 * _mse(k["target_noiseless"], k["input_noiseless"])


def test_low_dose_adds_noise_and_keeps_the_signal(low_dose):
    m, held = low_dose["model"], low_dose["held"]
    edges = np.asarray(m.edges)
    c = (edges[:-1] + edges[1:]) / 2
    mid = c < 0.2  # above, the low-dose source's signal drowns in its noise: gain 0.94 at 0.25, 0.8 at 0.3
    assert np.all(np.abs(np.asarray(m.gain)[mid] - 1) < 0.1), np.asarray(m.gain)[mid]
    assert m.summary()["noise_std"] * W > 15.0  # the inputs hold 12 HU x sqrt(k), k in [4, 10]
    # the noise of the synthesized source (what the filter did not make) matches the real inputs' noise
    deg = m.degrade(held.target / W, np.random.default_rng(0))
    synth_noise = deg - m.filter_only().degrade(held.noiseless / W, np.random.default_rng(0))
    true_noise = low_dose["source_volumes"]
    true_std = np.mean([np.std(v.input - v.noiseless) / W for v in true_noise])
    assert np.std(synth_noise) == pytest.approx(true_std, rel=0.25)
    # each source subject was scanned at its own dose: the scales follow sqrt(k - 1)
    k = np.array([v.params["dose_factor"] for v in true_noise])
    scales = np.asarray(m.noise_scales)
    assert np.ptp(scales) > 0.15
    assert np.corrcoef(scales, np.sqrt(k - 1))[0, 1] > 0.9


def test_contrast_is_nearly_the_identity(contrast):
    m, held = contrast["model"], contrast["held"]
    g = m.summary()
    assert abs(g["gain_0.1"] - 1) < 0.05 and abs(g["gain_0.25"] - 1) < 0.1, g
    assert g["noise_std"] * W < 5.0  # both sides hold 12 HU of soft-kernel noise
    deg = m.degrade(held.target / W, np.random.default_rng(0))
    assert _mse(deg, held.target / W) < 0.1 * _mse(held.input / W, held.target / W)


def test_degrading_a_region_with_its_margin_matches_the_whole_volume(kernels, low_dose):
    for m in (kernels["sharp-to-soft"]["model"].filter_only(), low_dose["model"].filter_only()):
        vol = kernels["sharp-to-soft"]["target"]
        whole = m.degrade(vol, np.random.default_rng(0))
        mg = m.margin()
        assert 0 < mg <= 16
        a, b = 20 - mg - 2, 20 + 2 + mg  # a region whose inside (beyond the margin) is [18, 22)^3
        part = m.degrade(vol[a:b, a:b, a:b], np.random.default_rng(0))
        inner = part[mg:-mg, mg:-mg, mg:-mg]
        err = np.abs(inner - whole[18:22, 18:22, 18:22]).max()
        assert err < 0.02 * np.abs(whole).max(), (mg, err)
        naive = m.degrade(vol[18:22, 18:22, 18:22], np.random.default_rng(0))  # no margin: edges differ
        assert np.abs(naive - whole[18:22, 18:22, 18:22]).max() > 2 * err


def test_degrade_is_reproducible_and_keeps_shape_and_type(low_dose):
    m = low_dose["model"]
    x = low_dose["held"].target[:20, :24, :18] / W
    a, b = m.degrade(x, np.random.default_rng(5)), m.degrade(x, np.random.default_rng(5))
    assert a.shape == x.shape and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, m.degrade(x, np.random.default_rng(6)))
    assert np.array_equal(
        m.filter_only().degrade(x, np.random.default_rng(5)), m.degrade(x, np.random.default_rng(9), noise=False)
    )


def test_round_trip_through_json(low_dose):
    m = low_dose["model"]
    back = fm.ForwardModel.from_dict(json.loads(json.dumps(m.to_dict())))
    assert back == m
    bad = m.to_dict()
    bad["gain"] = bad["gain"][:-1]
    with pytest.raises(ValueError, match="gains"):
        fm.ForwardModel.from_dict(bad)
    bad = m.to_dict()
    bad["noise"][3] = -1.0
    with pytest.raises(ValueError, match="noise holds negative"):
        fm.ForwardModel.from_dict(bad)
    bad = m.to_dict()
    bad["gain"][0] = float("nan")
    with pytest.raises(ValueError, match="gain holds NaN"):
        fm.ForwardModel.from_dict(bad)
    with pytest.raises(ValueError, match="missing"):
        fm.ForwardModel.from_dict({"dims": 3})


def test_bad_inputs_are_refused_with_the_image_named(rng):
    good = [rng.normal(size=(24, 24, 24)) for _ in range(2)]
    with pytest.raises(ValueError, match="no source images"):
        fm.fit([], good)
    with pytest.raises(ValueError, match="target 1 is 2D"):
        fm.fit(good, [good[0], rng.normal(size=(24, 24))])
    nan = good[1].copy()
    nan[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="source 1 holds 1 NaN"):
        fm.fit([good[0], nan], good)
    with pytest.raises(ValueError, match="patches"):
        fm.noise_power(good[0], mask=np.zeros((24, 24, 24), bool))


def test_noise_sigma_finds_the_noise_of_each_kernel():
    """Within 20 % of the true std (target - noiseless), for the soft kernel's low-frequency noise too."""
    for task, seed in (("sharp-to-soft", 302), ("soft-to-sharp", 302), ("low-dose", 303)):
        v = make_task(task, seed, SHAPE, workers=1)
        for image, noiseless in ((v.target, v.noiseless),):
            true = float(np.std(image - noiseless))
            assert fm.noise_sigma(image / W) * W == pytest.approx(true, rel=0.2), task


def test_noise_power_of_white_noise_is_its_variance(rng):
    x = rng.normal(0, 0.3, (32, 32, 32))
    everywhere = np.ones(x.shape, bool)  # no body to find in pure noise: the mask says where to look
    edges, nps = fm.noise_power(x, everywhere)
    c = (edges[:-1] + edges[1:]) / 2
    assert np.median(nps[(c > 0.1) & (c < 0.8)]) == pytest.approx(0.09, rel=0.1)
    assert fm.noise_sigma(x, everywhere) == pytest.approx(0.3, rel=0.1)
    assert fm.noise_sigma(2 * x, everywhere) == pytest.approx(0.6, rel=0.1)


def test_spectral_ratio_gain_and_apply_radial_undo_a_known_blur(rng):
    from scipy import ndimage

    sharp = [ndimage.gaussian_filter(rng.normal(size=(32, 32, 32)), 0.6, mode="wrap") for _ in range(3)]
    soft = [ndimage.gaussian_filter(rng.normal(size=(32, 32, 32)), 1.5) for _ in range(3)]
    edges, gain = fm.spectral_ratio_gain(sharp, soft)
    c = (edges[:-1] + edges[1:]) / 2
    truth = np.exp(-2 * np.pi**2 * (1.5**2 - 0.6**2) * c**2)  # the Gaussians' transfer functions' ratio
    sel = c < 0.25
    rel = np.abs(gain[sel] / truth[sel] - 1)
    assert np.median(rel) < 0.15 and rel.max() < 0.45, rel
    out = fm.apply_radial(sharp[0], edges, gain)
    assert out.dtype == np.float32 and out.shape == sharp[0].shape
    soft0 = ndimage.gaussian_filter(sharp[0], np.sqrt(1.5**2 - 0.6**2), mode="wrap")  # the same field, softer
    assert _mse(out, soft0) < 0.1 * _mse(sharp[0], soft0)


def test_downsampled_white_noise_loses_the_block_mean_variance():
    """White noise of variance s2 averaged over 2^3 blocks is white with variance s2 / 8, per level."""
    edges = fm.band_edges(3, 64)
    model = fm.ForwardModel(3, tuple(edges), (1.0,) * 64, (0.09,) * 64, (0.5, 1.5))
    for levels in (0, 1, 2):
        power = fm.downsampled_noise(model, levels)
        assert float(np.mean(power)) == pytest.approx(0.09 / 8**levels, rel=0.15), levels
    assert not np.any(fm.downsampled_noise(model.filter_only(), 2))


def test_a_coarse_scale_takes_the_finest_noise_downsampled_not_anatomy_read_as_noise():
    """Two x2 levels down a low-dose set, the coarse model's noise is the fine model's block-averaged, and it has
    the real added noise's std there (on 24^3 no patch is flat: a patch estimate would read anatomy as noise)."""
    from msgan.pyramid import downsample2

    def down(x):
        return downsample2(downsample2(x))

    shape = (96, 96, 96)  # the fine NPS estimate needs 9^3 patches to resolve a soft kernel's low frequencies
    src = [make_task("low-dose", s, shape, workers=1) for s in SOURCES]
    tgt = [make_task("low-dose", s, shape, workers=1).target / W for s in TARGETS]
    fine = fm.fit([v.input / W for v in src], tgt)
    coarse = fm.coarser(fine, 2, [down(v.input / W) for v in src], [down(t) for t in tgt])
    assert coarse.noise_scales == fine.noise_scales
    # low-dose sources are their subject's target plus the added noise: its true std on the coarse grid
    true = np.mean([np.std(down((v.input - v.target) / W)) for v in src])
    e = np.asarray(fine.edges)
    assert np.sqrt(fm._variance(e, np.asarray(coarse.noise), 3)) == pytest.approx(true, rel=0.25)
    g = coarse.summary()
    assert abs(g["gain_0.1"] - 1) < 0.1, g  # a dose keeps the signal on the coarse grid too
