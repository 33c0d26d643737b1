import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from msgan.cascade import Cascade, CascadeError, run_hr, run_hr_whole
from msgan.nets import HRGenerator
from tests.conftest import randomize_batchnorm, tiny_config

SHAPES = [(37, 53, 41), (20, 17, 33), (61, 45), (32, 19)]


def _generator(dims, context, seed=0):
    torch.manual_seed(seed)
    g = HRGenerator(dims, width=6, num_blocks=2, norm_kind="batch", context=context, context_layers=2).eval()
    randomize_batchnorm(g, seed)
    return g


def _inputs(shape, rng):
    coarse = tuple(-(-s // 2) for s in shape)
    return rng.standard_normal(coarse).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("context", ["upscaled", "wide"])
def test_tiled_equals_whole_volume(shape, context, rng):
    g = _generator(len(shape), context)
    prev, edges = _inputs(shape, rng)
    whole = run_hr_whole(g, prev, edges)
    for core in (6, 16):
        out = np.full(shape, np.nan, np.float32)
        n = run_hr(g, prev, edges, out, core, batch_size=3)
        assert n > 1
        assert not np.isnan(out).any(), "a voxel was never written"
        assert float(np.abs(out - whole).max()) < 1e-5


def test_whole_volume_pass_is_reflect_padding_of_the_upsampled_volume(rng):
    shape = (21, 18, 25)
    g = _generator(3, "upscaled")
    prev, edges = _inputs(shape, rng)
    up = F.interpolate(torch.from_numpy(prev)[None, None], scale_factor=2, mode="trilinear", align_corners=False)
    up = up[0, 0].numpy()[: shape[0], : shape[1], : shape[2]]
    h = g.halo
    x = np.stack([np.pad(up, h, mode="reflect"), np.pad(edges, h, mode="reflect")])
    with torch.no_grad():
        ref = g(torch.from_numpy(x)[None])[0, 0].numpy()
    assert float(np.abs(run_hr_whole(g, prev, edges) - ref).max()) < 1e-5


def test_tiles_stream_between_zarr_arrays(tmp_path, rng):
    shape = (30, 26, 22)
    g = _generator(3, "upscaled")
    prev, edges = _inputs(shape, rng)
    root = zarr.open_group(str(tmp_path / "v.zarr"), mode="w")
    zp = root.create_array("prev", shape=prev.shape, chunks=(8, 8, 8), dtype="f4")
    ze = root.create_array("edges", shape=shape, chunks=(8, 8, 8), dtype="f4")
    zo = root.create_array("out", shape=shape, chunks=(8, 8, 8), dtype="f4", fill_value=np.nan)
    zp[...], ze[...] = prev, edges
    run_hr(g, zp, ze, zo, core=8)
    assert float(np.abs(zo[...] - run_hr_whole(g, prev, edges)).max()) < 1e-5


@pytest.fixture
def tiny_cfg():
    return tiny_config(**{"data.phantom.shape": [24, 20, 28]})


def test_cascade_output_does_not_depend_on_tile(tiny_cfg, rng):
    c = Cascade.untrained(tiny_cfg, seed=3)
    for g in c.generators[1:]:
        randomize_batchnorm(g)
    image = rng.uniform(-1000, 500, size=(27, 22, 30)).astype(np.float32)
    a, b = c.translate(image, tile=4), c.translate(image, tile=64)
    assert a.shape == image.shape
    assert float(np.abs(a - b).max()) < 1e-2  # HU units: 1e-5 in window units * 1024


def test_tile_size_follows_memory_budget(tiny_cfg):
    small = Cascade.untrained(tiny_cfg.replace(**{"inference.memory_budget_mb": 1.0}))
    large = Cascade.untrained(tiny_cfg.replace(**{"inference.memory_budget_mb": 64.0}))
    t_small, t_large = small.tile_size(2, (512, 512, 512)), large.tile_size(2, (512, 512, 512))
    assert 2 <= t_small < t_large <= 512
    assert large.tile_size(2, (20, 21, 22)) == 22  # never beyond the volume
    with pytest.raises(ValueError, match="memory_budget_mb"):
        Cascade.untrained(tiny_cfg.replace(**{"inference.memory_budget_mb": 1e-4})).tile_size(1, (64, 64, 64))


def test_save_load_roundtrip_and_checksum(tiny_cfg, tmp_path, rng):
    c = Cascade.untrained(tiny_cfg, seed=1)
    path = c.save(tmp_path / "model")
    loaded = Cascade.load(path)
    image = rng.uniform(-1000, 500, size=(24, 20, 28)).astype(np.float32)
    np.testing.assert_array_equal(c.translate(image), loaded.translate(image))
    assert loaded.halos == c.halos == [0, 4, 4]
    with (path / "scale_1.pt").open("ab") as f:
        f.write(b"tampered")
    with pytest.raises(CascadeError, match=r"model/scale_1\.pt: checksum does not match the manifest"):
        Cascade.load(path)
    with pytest.raises(FileNotFoundError, match="not a cascade") as err:  # a CascadeNotFoundError
        Cascade.load(tmp_path)
    assert isinstance(err.value, CascadeError)


def test_translate_rejects_nan_and_wrong_dims(tiny_cfg):
    c = Cascade.untrained(tiny_cfg)
    bad = np.zeros((24, 20, 28), np.float32)
    bad[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        c.translate(bad)
    with pytest.raises(ValueError, match="3D"):
        c.translate(np.zeros((24, 20), np.float32))


@pytest.mark.parametrize("condition", ["edges", "image", "image+edges"])
@pytest.mark.parametrize("source_residual", [False, True])
def test_translate_in_every_conditioning_mode(condition, source_residual, rng):
    if source_residual and condition == "edges":
        return  # refused at load (tests/test_config.py)
    over = {"condition": condition, "source_residual": source_residual, "hr_generator.residual": not source_residual}
    c = Cascade.untrained(tiny_config(**over), seed=4)
    assert [g.channels for g in c.generators][-1][1:] == tuple(n for n in ("image", "edges") if n in condition)
    image = rng.uniform(-1000, 500, size=(21, 18, 23)).astype(np.float32)
    a, b = c.translate(image, tile=4), c.translate(image, tile=16)
    assert a.shape == image.shape and np.isfinite(a).all()
    assert float(np.abs(a - b).max()) <= 1e-5 * 2048
    if source_residual:  # an untrained correction is small: the output follows the source
        assert np.corrcoef(a.ravel(), image.ravel())[0, 1] > 0.5


def _bone_and_metal(rng):
    """Soft tissue (40 HU) holding a dense-bone block (1500..2000 HU, a ramp) and a metal block (3000 HU),
    plus noise: the noiseless target and the noisy source."""
    target = np.full((40, 36, 36), 40.0, np.float32)
    target[6:20, 6:20, 6:20] = np.linspace(1500, 2000, 14, dtype=np.float32)[:, None, None]
    target[24:36, 18:30, 18:30] = 3000.0
    return target, target + rng.normal(0, 30, target.shape).astype(np.float32)


@pytest.mark.parametrize("outside", ["clip", "source"])
def test_full_hu_range_survives_translation(outside, rng):
    """Inside dense bone and metal (3 voxels from their borders) the output's mean is within 20 HU of the
    noiseless target's with intensity.outside=source; the paper's clip flattens both."""
    target, source = _bone_and_metal(rng)
    c = Cascade.untrained(tiny_config(**{"condition": "image+edges", "intensity.outside": outside}), seed=5)
    out = c.translate(source, tile=8)
    inner = {"bone": (slice(9, 17),) * 3, "metal": (slice(27, 33), slice(21, 27), slice(21, 27))}
    errors = {k: abs(float(out[sl].mean() - target[sl].mean())) for k, sl in inner.items()}
    if outside == "source":
        assert max(errors.values()) < 20.0, errors
    else:
        assert float(out.max()) <= 1024.0 + 1e-3 and min(errors.values()) > 400, errors


def test_outside_weight_is_one_inside_the_window_and_smooth():
    from msgan.config import IntensityConfig
    from msgan.pyramid import output_units, outside_weight

    cfg = IntensityConfig(outside="source", blend=0.05)  # ramp of 102.4 HU above the window
    s = np.array([-1200, -1024, 0, 1024, 1075.2, 1126.4, 3000], np.float32)
    np.testing.assert_allclose(outside_weight(s, cfg), [1, 1, 1, 1, 0.5, 0, 0], atol=1e-6)
    y = np.zeros_like(s)  # translation says 0 HU everywhere
    np.testing.assert_allclose(output_units(y, cfg, source=s), [0, 0, 0, 0, 537.6, 1126.4, 3000], atol=1e-3)
    with pytest.raises(ValueError, match="needs the source"):
        output_units(y, cfg)


def test_noise_below_the_window_does_not_pass_through():
    """A noisy source dipping below the window (lung, emphysema, air) keeps the translation there:
    the output holds no value below the window's low end."""
    from msgan.config import IntensityConfig
    from msgan.pyramid import output_units, window

    cfg = IntensityConfig(outside="source")
    rng = np.random.default_rng(0)
    src = (-985.0 + 60.0 * rng.standard_normal(10_000)).astype(np.float32)  # emphysema at low dose
    assert (src < cfg.low).mean() > 0.2
    out = output_units(window(src, cfg), cfg, source=src)
    assert out.min() >= cfg.low - 1e-3


def test_a_cascade_saved_before_the_model_spec_still_loads_and_translates_the_same():
    """tests/fixtures/cascade_v1: saved by the code of 2026-12-06; every later manifest format must load it."""
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "cascade_v1"
    cascade = Cascade.load(fixture / "model")
    y = cascade.translate(np.load(fixture / "input.npy"), tile=8)
    np.testing.assert_allclose(y, np.load(fixture / "expected.npy"), rtol=0, atol=1e-3)  # HU
    assert cascade.translate(np.load(fixture / "input.npy"), tile=5).shape == y.shape


# ----------------------------------------------------------------------------- the artifact holds the spec


def _keys(tree):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield k
            yield from _keys(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _keys(v)


def test_a_saved_model_holds_its_spec_and_inference_defaults_never_the_run_settings(tmp_path, rng):
    import json

    from msgan.config import Config

    cfg = tiny_config(**{
        "data.source": "files", "data.paths": ["/patients/doe-jane-1954/ct.nii.gz"],
        "data.holdout_paths": ["/patients/roe-rick/ct.mha"], "job.storage": "s3://hospital-bucket/ward7",
        "job.name": "jane-doe-kernel", "job.experiment": "ward7-exp", "inference.actors": 7,
        "inference.device": "cpu", "train.steps": 11, "augment.noise_p": 0.5,
        "inference.batch_size": 2, "inference.memory_budget_mb": 96.0, "train.amp": True,
    })  # fmt: skip
    c = Cascade.untrained(cfg, seed=1)
    path = c.save(tmp_path / "model")
    text = (path / "manifest.json").read_text()
    manifest = json.loads(text)
    assert manifest["format"] == "msgan-cascade/2" and "config" not in manifest
    assert not {"train", "job", "data", "augment", "paths", "actors", "device"} & set(_keys(manifest))
    for private in ("patients", "doe", "roe-rick", "hospital-bucket", "ward7", "jane", "s3://", ".nii"):
        assert private not in text, private
    assert manifest["spec"]["inference"] == {"memory_budget_mb": 96.0, "batch_size": 2, "amp": True}
    keep = ("format", "code_version", "dims", "num_scales", "halos", "hr_patch", "parameters", "intensity", "meta")
    assert all(k in manifest for k in keep)  # what `msgan info` prints
    loaded = Cascade.load(path)
    assert loaded.spec == c.spec == cfg.spec()
    assert loaded.config == Config.from_spec(cfg.spec())  # the spec plus default run settings
    assert loaded.config.inference.batch_size == 2 and loaded.config.train.amp is True
    assert loaded.config.inference.actors == 2 and loaded.config.data.paths == () and loaded.config.train.steps != 11
    image = rng.uniform(-1000, 500, size=(20, 18, 22)).astype(np.float32)
    np.testing.assert_array_equal(c.translate(image), loaded.translate(image))


def test_a_cascade_v1_folder_loads_as_its_spec_without_its_run_settings(tmp_path, rng):
    """A manifest of msgan-cascade/1 held the whole config: its model part loads, its run settings do not."""
    import json

    from msgan.config import Config

    cfg = tiny_config(**{"data.source": "files", "data.paths": ["/patients/x.nii"], "inference.batch_size": 2})
    c = Cascade.untrained(cfg, seed=2)
    path = c.save(tmp_path / "model")
    m = json.loads((path / "manifest.json").read_text())
    m["format"] = "msgan-cascade/1"
    m["config"] = cfg.to_dict()
    del m["spec"]
    (path / "manifest.json").write_text(json.dumps(m))
    loaded = Cascade.load(path)
    assert loaded.spec == cfg.spec() and loaded.config == Config.from_spec(cfg.spec())
    assert loaded.config.data.paths == () and loaded.config.inference.batch_size == 2
    image = rng.uniform(-1000, 500, size=(20, 18, 22)).astype(np.float32)
    np.testing.assert_array_equal(c.translate(image), loaded.translate(image))
    m["config"]["train"]["hr_patch"] = 7
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CascadeError, match=r"model/manifest\.json: invalid config \(train\.hr_patch=7: must be even"):
        Cascade.load(path)
    m["config"]["train"]["hr_patch"] = 8
    m["config"]["hr_generator"]["width"] = 1 << 16  # ~10^11 parameters: refused on the meta device, never built
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CascadeError, match=r"scale_1\.pt: the weights do not fit scale 1 of the manifest's config"):
        Cascade.load(path)


def test_the_cascade_v1_fixture_loads_with_its_spec():
    from pathlib import Path

    from msgan.config import Config

    cascade = Cascade.load(Path(__file__).parent / "fixtures" / "cascade_v1" / "model")
    spec = cascade.spec
    assert (spec.num_scales, spec.condition, spec.source_residual, spec.hr_patch) == (3, "image+edges", True, 8)
    assert spec.intensity.outside == "source" and spec.hr_generator.norm == "batch"
    assert cascade.config == Config.from_spec(spec)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m.update(format="msgan-cascade/9"),
            r"format 'msgan-cascade/9', expected one of \['msgan-cascade/2'",
        ),
        (lambda m: m.pop("spec"), r"malformed cascade manifest: missing keys spec"),
        (lambda m: m.update(spec=[1]), r"'spec' is a list, expected an object"),
        (lambda m: m["spec"].update(hr_patch=15), r"invalid spec \(hr_patch=15: must be even"),
        (lambda m: m["spec"].update(train={"steps": 1}), r"invalid spec \(unknown key 'train'"),
        (
            lambda m: m["spec"]["inference"].update(batch_size=0),
            r"invalid spec \(inference\.batch_size=0: must be >= 1",
        ),
    ],
)
def test_a_manifest_with_a_bad_spec_is_refused_naming_the_file(tmp_path, tiny_cfg, edit, message):
    import json

    path = Cascade.untrained(tiny_cfg).save(tmp_path / "model")
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CascadeError, match=r"model/manifest\.json: .*" + message):
        Cascade.load(path)


# ----------------------------------------------------------------------------- data without a fixed scale (MR)

MR_OPTIONS = {
    "condition": "image+edges",
    "source_residual": True,
    "hr_generator.residual": False,
    "intensity.normalize": "percentile",
    "intensity.low": -200.0,
    "intensity.high": 1400.0,
}


def _mr(shape, seed=0):
    from tests.test_normalize import mr_like

    return mr_like(shape, seed)


def test_a_normalised_model_translates_a_volume_the_same_at_any_gain_and_offset():
    from msgan.normalize import apply

    c = Cascade.untrained(tiny_config(**MR_OPTIONS), seed=2)
    a = _mr((22, 20, 24))
    b = (a * 5.0 + 120.0).astype(np.float32)  # another scanner's scale
    ya, yb = c.translate(a, tile=8), c.translate(b, tile=8)
    np.testing.assert_allclose(ya, yb, rtol=0, atol=1e-5 * 1600)
    scaling = c.scaling_of(a)
    assert scaling is not None and c.scaling_of(b) != scaling
    assert c.translate(a, tile=8, scaling=scaling).tobytes() == ya.tobytes(), "its own scaling by default"
    normalised = apply(a, scaling, c.config.intensity)
    body = (slice(5, 17), slice(5, 16), slice(5, 19))
    assert np.abs(yb[body] - normalised[body]).mean() < 200.0, "out in normalised units"
    assert np.abs(yb[body] - b[body]).mean() > 1000.0, "not in the input's"
    ct = Cascade.untrained(tiny_config(**{**MR_OPTIONS, "intensity.normalize": "none"}), seed=2)
    assert ct.scaling_of(a) is None
    assert not np.allclose(ct.translate(a, tile=8), ct.translate(b, tile=8), atol=1.0), "without it: scale-bound"


def test_a_flat_volume_is_refused_by_a_normalised_model():
    c = Cascade.untrained(tiny_config(**MR_OPTIONS), seed=2)
    with pytest.raises(ValueError, match=r"image: flat volume"):
        c.translate(np.zeros((16, 16, 16), np.float32))


def test_a_normalised_model_saves_its_rule_and_an_older_v2_manifest_loads_as_unnormalised(tmp_path, tiny_cfg, rng):
    import json

    c = Cascade.untrained(tiny_config(**MR_OPTIONS), seed=2)
    path = c.save(tmp_path / "mr")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["spec"]["intensity"]["normalize"] == "percentile"
    assert manifest["spec"]["intensity"]["percentiles"] == [1.0, 99.0]
    assert manifest["intensity"]["normalize"] == "percentile"
    img = _mr((20, 18, 22))
    assert Cascade.load(path).translate(img).tobytes() == c.translate(img).tobytes()

    ct = Cascade.untrained(tiny_cfg, seed=1)
    old = ct.save(tmp_path / "ct")
    m = json.loads((old / "manifest.json").read_text())
    for key in ("normalize", "percentiles"):  # a msgan-cascade/2 manifest written before these keys
        del m["spec"]["intensity"][key]
    m["intensity"].pop("normalize")
    (old / "manifest.json").write_text(json.dumps(m))
    loaded = Cascade.load(old)
    assert loaded.config.intensity.normalize == "none" and loaded.spec == ct.spec
    image = rng.uniform(-1000, 500, size=(20, 18, 22)).astype(np.float32)
    assert loaded.translate(image).tobytes() == ct.translate(image).tobytes()


@pytest.mark.parametrize("damage", ["nan", "inf", "meta", "complex", "sparse", "persistent id"])
def test_damaged_weights_are_refused_naming_the_file(tiny_cfg, damage):
    """Weights of the right names and shapes that cannot be a trained generator's are refused when loaded, naming
    the file: NaN/inf (a diverged run) used to load and fail later as a NaN output or 'a tile was lost'; a meta,
    sparse or complex tensor and a malformed pickle escaped as bare RuntimeError/AssertionError."""
    import io
    import zipfile

    from msgan.cascade import CascadeError, load_generator
    from msgan.nets import build_generator

    state = build_generator(tiny_cfg, 1).state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.ndim > 1)
    t = state[name]
    state[name] = {
        "nan": t.clone().fill_(float("nan")),
        "inf": t.clone().fill_(float("inf")),
        "meta": torch.empty(t.shape, device="meta"),
        "complex": t.to(torch.complex64),
        "sparse": t.to_sparse(),
        "persistent id": t,
    }[damage]
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    if damage == "persistent id":  # a pickle of only weights-only-safe opcodes whose persistent id is not a tuple
        out = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                zout.writestr(info, b"\x80\x02K\x05Q." if info.filename.endswith("/data.pkl") else zin.read(info))
        data = out.getvalue()
    with pytest.raises(CascadeError, match=r"model/scale_1\.pt: "):
        load_generator(tiny_cfg, 1, data, "model/scale_1.pt")


@pytest.mark.parametrize(
    "edit",
    [{"dims": 2}, {"num_scales": 7}, {"halos": [0, 99, 99]}, {"intensity": {"low": 0, "high": 1, "normalize": "none"}}],
)
def test_a_manifest_whose_summary_contradicts_its_spec_is_refused_by_load_and_info(tiny_cfg, tmp_path, capsys, edit):
    """``msgan info`` showed the manifest's summary as it stood and loading never compared it with the spec that
    actually builds the networks: an edited summary misdescribed the model. Both now refuse it, naming the file."""
    import json

    from msgan.cascade import CascadeError
    from msgan.cli import main

    folder = Cascade.untrained(tiny_cfg, seed=0).save(tmp_path / "m")
    assert main(["info", str(folder)]) == 0
    capsys.readouterr()
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, **edit}))
    with pytest.raises(CascadeError, match=r"m/manifest\.json: its summary says .*an edited manifest"):
        Cascade.load(folder)
    assert main(["info", str(folder)]) == 2
    assert "its summary says" in capsys.readouterr().err
