import pytest

from msgan import storage
from msgan.config import ConfigError
from msgan.distributed import prepare as prep
from msgan.io.pyramids import open_pyramid
from msgan.io.volume import write_volume
from tests.conftest import tiny_config
from tests.dicom_data import OBLIQUE, write_ct_series


def test_files_and_dicom_folders_prepare_once(tmp_path):
    _, _, hu = write_ct_series(tmp_path / "dicom" / "s1", seed=3)
    write_volume(tmp_path / "v.nii.gz", hu, OBLIQUE)
    cfg = tiny_config(**{"num_scales": 2, "data.source": "files",
                         "data.paths": [str(tmp_path / "dicom" / "*"), str(tmp_path / "v.nii.gz")]})  # fmt: skip
    srcs = prep.sources(cfg)
    assert [s.kind for s in srcs] == ["dicom", "file"]
    prep.check_shapes(cfg, srcs)
    root = storage.normalize_uri(tmp_path / "store")
    first = prep.prepare(cfg, srcs, root, use_ray=False)
    assert [p["prepared"] for p in first] == [True, True] and first[0]["shape"] == list(hu.shape)
    assert first[0]["uri"] != first[1]["uri"]  # different bytes, different fingerprints
    again = prep.prepare(cfg, srcs, root, use_ray=False)
    assert [p["prepared"] for p in again] == [False, False] and [p["uri"] for p in again] == [p["uri"] for p in first]
    pyr = open_pyramid(first[0]["uri"])
    assert pyr.shapes == [(6, 20, 18), (12, 40, 36)]


def test_missing_or_unusable_data_is_a_config_error(tmp_path):
    cfg = tiny_config(**{"data.source": "files", "data.paths": [str(tmp_path / "nothing*.nii.gz")]})
    with pytest.raises(ConfigError, match="matches no readable file"):
        prep.sources(cfg)
    (tmp_path / "bad.mha").write_bytes(b"garbage")
    cfg = tiny_config(**{"data.source": "files", "data.paths": [str(tmp_path / "bad.mha")]})
    with pytest.raises(ConfigError, match="cannot be read as an image"):
        prep.check_shapes(cfg, prep.sources(cfg))
