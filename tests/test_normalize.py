"""Per-volume intensity normalisation (msgan.normalize): MR has no fixed scale, so each volume is mapped by the
percentiles of its own body, computed from one strided sample whatever holds the array."""

import json

import dask.array as da
import numpy as np
import pytest
import zarr

from msgan.normalize import (
    MAX_SAMPLE_VOXELS,
    NORMALISED_HIGH,
    NORMALISED_LOW,
    Scaling,
    apply,
    apply_chunked,
    sample_stride,
    scaling_of,
)
from msgan.spec import IntensityConfig

MR = IntensityConfig(normalize="percentile", low=-200.0, high=1400.0)
RANGE = NORMALISED_HIGH - NORMALISED_LOW


def mr_like(shape=(24, 20, 22), seed=0):
    """Air at 0 with Rician-like noise around a box of tissue at two intensity levels."""
    rng = np.random.default_rng(seed)
    img = np.abs(rng.normal(0.0, 4.0, shape)).astype(np.float32)
    body = tuple(slice(s // 6, s - s // 6) for s in shape)
    img[body] += rng.uniform(300.0, 500.0, img[body].shape).astype(np.float32)
    half = tuple(slice(s // 3, s - s // 3) for s in shape)
    img[half] += 400.0  # brighter tissue inside
    return img


def test_a_gain_and_an_offset_change_nothing_in_normalised_values():
    a = mr_like()
    b = (a * 3.7 + 250.0).astype(np.float32)  # another scanner: same tissue, another scale
    sa, sb = scaling_of(a, MR), scaling_of(b, MR)
    assert sb.high_value > 3 * sa.high_value, "the two volumes really have different scales"
    na, nb = apply(a, sa, MR), apply(b, sb, MR)
    assert na.dtype == np.float32
    np.testing.assert_allclose(na, nb, rtol=0, atol=1e-5 * RANGE)
    body = na[4:20, 4:17, 4:19]  # the box of tissue
    p1, p99 = np.percentile(body, [1.0, 99.0])
    assert abs(p1 - NORMALISED_LOW) < 0.02 * RANGE and abs(p99 - NORMALISED_HIGH) < 0.02 * RANGE
    assert float(na[0, 0, 0]) < -0.5 * RANGE, "the air lies well below the body's low percentile"


def test_the_body_not_the_air_decides_the_percentiles():
    a = mr_like()
    more_air = np.zeros((40, 20, 22), np.float32)
    more_air[:24] = a  # the same body in a larger field of view of air
    s, s_air = scaling_of(a, MR), scaling_of(more_air, MR)
    assert abs(s.low_value - s_air.low_value) < 0.02 * (s.high_value - s.low_value)
    assert s.low_value > 250.0, "the low percentile is tissue, not air"


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.full((16, 16, 16), 7.0, np.float32), r"volume-7: flat volume \(every sampled voxel is 7\)"),
        (
            np.pad(np.full((8, 8, 8), 500.0, np.float32), 4),
            r"volume-7: flat body: its percentiles 1 and 99 are both 500",
        ),
        (np.where(np.eye(16, dtype=bool)[None], np.nan, 1.0).astype(np.float32), r"volume-7: holds NaN or inf"),
    ],
)
def test_a_volume_without_contrast_or_with_nan_is_refused_by_name(image, message):
    with pytest.raises(ValueError, match=message):
        scaling_of(image, MR, name="volume-7")


def test_numpy_zarr_and_dask_give_the_same_scaling_from_a_strided_sample(tmp_path):
    shape = (130, 130, 130)  # 2.2 M voxels: above the sample's cap, so every 2nd voxel per axis
    assert sample_stride(shape) == 2 and sample_stride((512,) * 3) == 4 and sample_stride((64,) * 3) == 1
    assert (512 // 4) ** 3 <= MAX_SAMPLE_VOXELS < (-(-512 // 3)) ** 3
    img = mr_like(shape, seed=3)
    z = zarr.create_array(str(tmp_path / "v.zarr"), shape=shape, chunks=(32, 32, 32), dtype="float32")
    z[...] = img
    want = scaling_of(img, MR)
    assert scaling_of(zarr.open_array(str(tmp_path / "v.zarr"), mode="r"), MR) == want
    assert scaling_of(da.from_array(img, chunks=40), MR) == want
    assert want != scaling_of(img[1:, 1:, 1:], MR), "another sample gives another scaling: the stride is fixed"


def test_normalise_none_keeps_the_input_untouched_and_mismatches_are_refused():
    ct = IntensityConfig()
    img = mr_like()
    assert scaling_of(img, ct) is None
    assert apply(img, None, ct) is img and apply_chunked(img, None, ct) is img
    with pytest.raises(ValueError, match=r"no scaling given for intensity.normalize='percentile'"):
        apply(img, None, MR)
    with pytest.raises(ValueError, match=r"a scaling given for intensity.normalize='none'"):
        apply(img, Scaling(0.0, 1.0), ct)


def test_block_by_block_equals_whole_volume_byte_for_byte():
    img = mr_like((37, 29, 41))
    s = scaling_of(img, MR)
    blocks = apply_chunked(da.from_array(img, chunks=(8, 16, 5)), s, MR).compute()
    assert blocks.dtype == np.float32 and blocks.tobytes() == apply(img, s, MR).tobytes()


def test_a_scaling_round_trips_through_json_exactly_and_a_bad_one_is_named():
    s = scaling_of(mr_like(), MR)
    assert Scaling.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert s.percentiles == (1.0, 99.0)
    with pytest.raises(ValueError, match=r"plan\.json: not an intensity scaling \(KeyError"):
        Scaling.from_dict({"low_value": 1.0}, "plan.json")
    with pytest.raises(ValueError, match=r"plan\.json: not an intensity scaling \(ValueError: .*high > low"):
        Scaling.from_dict({"low_value": 2.0, "high_value": 2.0}, "plan.json")
    with pytest.raises(ValueError, match=r"plan\.json: not an intensity scaling \(TypeError"):
        Scaling.from_dict({"low_value": "2", "high_value": 3.0}, "plan.json")
