"""msgan.io.limits: every size rule refuses what a file declares before anything is allocated."""

import pytest

from msgan.io import limits
from msgan.io.limits import LimitError


@pytest.mark.parametrize(("raw", "want"), [("", limits.DEFAULT_MAX_VOXELS), ("1000", 1000), ("2048**3", 2048**3),
                                           (" 64**3 ", 64**3)])  # fmt: skip
def test_the_voxel_cap_is_a_setting(monkeypatch, raw, want):
    monkeypatch.setenv("MSGAN_MAX_VOXELS", raw)
    assert limits.max_voxels() == want


@pytest.mark.parametrize(("raw", "match"), [("lots", "not an integer"), ("2**x", "not an integer"),
                                            ("0", "must be positive"), ("-5", "must be positive")])  # fmt: skip
def test_a_bad_voxel_cap_is_refused_by_name(monkeypatch, raw, match):
    monkeypatch.setenv("MSGAN_MAX_VOXELS", raw)
    with pytest.raises(LimitError, match=rf"MSGAN_MAX_VOXELS=.*{match}"):
        limits.max_voxels()


def test_frames_need_positive_sides_under_the_caps():
    limits.check_frame(4300, 4300, "a detector")  # a real 43 cm detector at 100 um
    for rows, columns, match in ((0, 10, "must be positive"), (limits.MAX_FRAME_SIDE + 1, 1, "above the cap"),
                                 (10000, 10000, "above the cap")):  # fmt: skip
        with pytest.raises(LimitError, match=rf"^f\.dcm: declares a frame of {rows} x {columns} .*{match}"):
            limits.check_frame(rows, columns, "f.dcm")


def test_a_volume_over_the_cap_is_refused_with_its_shape(monkeypatch):
    assert limits.check_shape((4, 5, 6), "v.nii") == 120
    assert limits.check_shape((10, 10, 10), "v.nii", cap=1000) == 1000
    with pytest.raises(LimitError, match=r"v\.nii: declares shape \(10, 10, 11\) .*above the cap of 1e\+03"):
        limits.check_shape((10, 10, 11), "v.nii", cap=1000)
    monkeypatch.setenv("MSGAN_MAX_VOXELS", "999")
    with pytest.raises(LimitError, match="above the cap"):
        limits.check_shape((10, 10, 10), "v.nii")
    for shape in ((), (3, 0, 3), (3, -1, 3)):
        with pytest.raises(LimitError, match="every side must be positive"):
            limits.check_shape(shape, "v.nii")


def test_chunks_are_counted_not_enumerated_and_a_huge_chunk_is_refused():
    assert limits.check_chunks((100, 100, 100), (64, 64, 64), "a.zarr") == 8
    assert limits.check_chunks((10**6,) * 3, (64,) * 3, "a.zarr") == 15625**3  # declared, never listed
    assert limits.check_chunks((8, 8), (10**5, 10**5), "a.zarr") == 1  # a chunk larger than the array: its size
    with pytest.raises(LimitError, match="one positive size per axis"):
        limits.check_chunks((8, 8, 8), (8, 8), "a.zarr")
    with pytest.raises(LimitError, match="one positive size per axis"):
        limits.check_chunks((8, 8), (8, 0), "a.zarr")
    with pytest.raises(LimitError, match=r"a\.zarr: chunk shape \(1024, 1024, 1024\) decodes to .*rechunk"):
        limits.check_chunks((2048,) * 3, (1024,) * 3, "a.zarr")


def test_a_decompression_bomb_is_refused_small_frames_are_not_checked():
    limits.check_ratio(limits.RATIO_FLOOR_BYTES, 1, "small")  # at the floor: cheap whatever it claims
    stored = limits.RATIO_FLOOR_BYTES // limits.MAX_COMPRESSION_RATIO * 4
    big = stored * limits.MAX_COMPRESSION_RATIO
    limits.check_ratio(big, stored, "ok")  # exactly at the cap
    with pytest.raises(LimitError, match="decompression bomb"):
        limits.check_ratio(big, stored - 1, "just.above")
    with pytest.raises(LimitError, match=r"bomb\.dcm: declares .* stored in 10 bytes .*decompression bomb"):
        limits.check_ratio(big, 10, "bomb.dcm")
    with pytest.raises(LimitError, match="decompression bomb"):
        limits.check_ratio(big, 0, "empty.gz")
