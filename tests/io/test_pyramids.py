import numpy as np
import pytest

from msgan import storage
from msgan.config import EdgeConfig, IntensityConfig
from msgan.io.pyramids import open_pyramid, pyramid_meta, write_pyramid
from msgan.io.volume import Geometry
from msgan.pyramid import build_pyramid
from tests.conftest import s3_keys
from tests.ngff import assert_valid_ome_zarr


@pytest.fixture
def pyramid(rng):
    return build_pyramid(rng.uniform(-1000, 500, (20, 18, 22)).astype(np.float32), 3, IntensityConfig(), EdgeConfig())


def _check(uri, pyramid):
    assert pyramid_meta(uri)["complete"] and pyramid_meta(uri)["fingerprint"] == "abc"
    full = open_pyramid(uri)
    for s in range(3):
        np.testing.assert_array_equal(np.asarray(full.images[s]), pyramid.images[s])
        np.testing.assert_array_equal(np.asarray(full.edges[s]), pyramid.edges[s])
    part = open_pyramid(uri, scales={2}, cache_bytes=0)  # streamed, not cached
    assert part.images[1] is None and part.images[0] is not None
    assert part.images[2][3:5, 0, 0].tolist() == pyramid.images[2][3:5, 0, 0].tolist()
    assert_valid_ome_zarr(uri, groups=("image", "edges"))  # NGFF 0.5, and ome-zarr's reader on local stores


def test_local_store(tmp_path, pyramid):
    uri = storage.normalize_uri(tmp_path / "v.zarr")
    assert pyramid_meta(uri) is None
    write_pyramid(uri, pyramid, Geometry.identity(3), {"fingerprint": "abc"})
    _check(uri, pyramid)
    with pytest.raises(ValueError, match="scale 5"):
        open_pyramid(uri, scales={5})


def test_s3_store(s3_bucket, pyramid):
    uri = f"s3://{s3_bucket}/pyramids/v.zarr"
    write_pyramid(uri, pyramid, Geometry.identity(3), {"fingerprint": "abc"})
    _check(uri, pyramid)
    keys = s3_keys(s3_bucket, "pyramids/")
    assert "pyramids/v.zarr/zarr.json" in keys and any(k.startswith("pyramids/v.zarr/edges/2/") for k in keys)


def test_incomplete_store_is_not_trusted(tmp_path, pyramid):
    import zarr

    uri = storage.normalize_uri(tmp_path / "v.zarr")
    zarr.open_group(str(tmp_path / "v.zarr"), mode="w").attrs["msgan"] = {"complete": False}
    assert pyramid_meta(uri) is None
    with pytest.raises(FileNotFoundError, match="prepare"):
        open_pyramid(uri)
