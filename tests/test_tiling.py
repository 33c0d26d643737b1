import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from msgan.tiling import (
    batches_of,
    context_box,
    input_box,
    plan_core,
    pyramid_shapes,
    read_region,
    reflect_index,
    run_voxels,
    sample_patch_starts,
    tile_grid,
    upsample_region,
)


@pytest.mark.parametrize("shape,core", [((37, 53, 41), 16), ((10, 7), 3), ((5,), 8)])
def test_tile_grid_covers_each_voxel_once(shape, core):
    count = np.zeros(shape, int)
    for t in tile_grid(shape, core):
        assert all(a % core == 0 for a in t.start), "tiles start on multiples of the core (chunk-aligned)"
        count[t.slices] += 1
    assert (count == 1).all()


def test_tile_grid_rejects_bad_core():
    with pytest.raises(ValueError, match="axes"):
        tile_grid((4, 4), [2, 2, 2])
    with pytest.raises(ValueError, match=">= 1"):
        tile_grid((4, 4), 0)


@pytest.mark.parametrize("size", [1, 2, 5, 9])
def test_reflect_index_matches_numpy_pad(size):
    base = np.arange(size)
    pad = 3 * size + 2  # reflections repeat past one mirror
    expected = np.pad(base, pad, mode="reflect") if size > 1 else np.zeros(size + 2 * pad, int)
    got = base[reflect_index(np.arange(-pad, size + pad), size)]
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dims", [2, 3])
def test_read_region_equals_reflect_padding(dims, rng):
    shape = (9, 6, 7)[:dims]
    a = rng.standard_normal(shape)
    padded = np.pad(a, 4, mode="reflect")
    start, stop = [-4, 2, -1][:dims], [3, 10, 11][:dims]
    want = padded[tuple(slice(s + 4, e + 4) for s, e in zip(start, stop))]
    np.testing.assert_array_equal(read_region(a, start, stop), want)


def test_read_region_reads_only_a_bounding_box_from_zarr(tmp_path, rng):
    a = rng.standard_normal((20, 20, 20)).astype(np.float32)
    z = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=a.shape, chunks=(5, 5, 5), dtype="f4")
    z[...] = a
    np.testing.assert_array_equal(read_region(z, [-2, 3, 15], [4, 9, 22]), read_region(a, [-2, 3, 15], [4, 9, 22]))


@pytest.mark.parametrize("fine_shape", [(8, 6), (7, 9), (5, 6, 7)])
def test_upsample_region_equals_torch_interpolate(fine_shape, rng):
    coarse = rng.standard_normal(tuple(-(-s // 2) for s in fine_shape)).astype(np.float32)
    mode = "bilinear" if len(fine_shape) == 2 else "trilinear"
    full = F.interpolate(torch.from_numpy(coarse)[None, None], scale_factor=2, mode=mode, align_corners=False)
    full = full[0, 0].numpy()[tuple(slice(0, s) for s in fine_shape)]
    np.testing.assert_allclose(upsample_region(coarse, fine_shape, [0] * len(fine_shape), fine_shape), full, atol=1e-6)
    # a region reaching outside is the reflect-padded whole
    start, stop = [-3] * len(fine_shape), [s + 2 for s in fine_shape]
    want = np.pad(full, [(3, 2)] * len(fine_shape), mode="reflect")
    np.testing.assert_allclose(upsample_region(coarse, fine_shape, start, stop), want, atol=1e-6)


def test_upsample_region_rejects_wrong_coarse_shape():
    with pytest.raises(ValueError, match="not half"):
        upsample_region(np.zeros((3, 3)), (8, 6), [0, 0], [8, 6])


def test_pyramid_shapes():
    assert pyramid_shapes((37, 53, 41), 3) == [(10, 14, 11), (19, 27, 21), (37, 53, 41)]


def test_batches_are_a_fixed_function_of_the_plan():
    tiles = tile_grid((10, 10), 4)  # cores 4x4, 4x2, 2x4, 2x2 ..., all run at 4x4
    assert {t.run_shape for t in tiles} == {(4, 4)}
    assert {t.shape for t in tiles} == {(4, 4), (4, 2), (2, 4), (2, 2)}
    batches = batches_of(tiles, 4)
    assert [len(b) for b in batches] == [4, 4, 1]
    assert [t for b in batches for t in b] == tiles  # plan order
    with pytest.raises(ValueError, match="one shape"):
        batches_of([*tiles, *tile_grid((10, 10), 3)], 2)
    with pytest.raises(ValueError, match="batch_size"):
        batches_of(tiles, 0)


def test_border_tiles_run_at_the_full_core_and_crop():
    tiles = tile_grid((10, 3), 4)
    last = tiles[-1]
    assert last.start == (8, 0) and last.stop == (10, 3) and last.run == (4, 3)  # axis of 3 < core: runs at 3
    assert last.run_stop == (12, 3)
    assert np.zeros(last.run_shape)[last.crop].shape == last.shape


def test_plan_core_picks_the_least_work_under_the_budget():
    assert plan_core((128, 128, 128), 96, 6) == 64  # not 96: a 32-voxel border tile would run at 96
    assert run_voxels((128,) * 3, 64, 6) < run_voxels((128,) * 3, 96, 6)
    assert plan_core((128, 128, 128), 200, 6) == 128  # one tile when it fits
    assert plan_core((20, 21, 22), 22, 4) == 22
    assert plan_core((50,), 8, 0) == 2  # no halo: the smallest waste
    assert plan_core((50,), 8, 3) == 8  # a halo: fewer, larger tiles
    with pytest.raises(ValueError, match="max_core"):
        plan_core((8,), 0, 1)


@pytest.mark.parametrize("dims", [2, 3])
def test_context_box_covers_the_heads_footprint(dims):
    start, stop = [6] * dims, [14] * dims
    c0, c1 = context_box(start, stop, halo=4, head_halo=1, context_halo=2)
    # head output spans fine [start - 3, stop + 3) = [3, 17): coarse voxels 1..8, plus 2 per side
    assert c0 == [-1] * dims and c1 == [11] * dims
    assert input_box(start, stop, 4) == ([2] * dims, [18] * dims)
    with pytest.raises(ValueError, match="even"):
        context_box([5] * dims, [13] * dims, 4, 1, 2)


def test_patches_are_centred_in_the_foreground(rng):
    mask = np.zeros((8, 8, 8), bool)
    mask[2:4, 5:7, 1:3] = True
    starts = sample_patch_starts(mask, 4, (32, 32, 32), 6, 500, rng)
    for s in starts:
        assert all(a % 2 == 0 for a in s)
        centre = [a + 3 for a in s]
        lr = [c // 4 for c in centre]
        # the even rounding of the start may move the centre by one voxel
        assert all(lo - 1 <= v <= hi for v, lo, hi in zip(lr, (2, 5, 1), (3, 6, 2))), (s, lr)
    with pytest.raises(ValueError, match="larger than the level"):
        sample_patch_starts(mask, 4, (32, 32, 5), 6, 1, rng)
