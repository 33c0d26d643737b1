"""The one tile engine: training sees what inference sees, and the bytes are a function of the plan."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from msgan.augment import Augmenter
from msgan.config import AugmentConfig
from msgan.engine import array_writer, feed_box, run_tiles, run_whole, tile_feed
from msgan.nets import HRGenerator, UNet, condition_channels
from msgan.tiling import Tile, batches_of, read_region, sample_patch_starts, tile_grid
from msgan.train import ScaleData, sample_hr_batch, sample_lr_batch
from tests.conftest import randomize_batchnorm

CONTEXTS = ["upscaled", "wide", "none"]
CONDITIONS = ["edges", "image", "image+edges"]
CLEAN = Augmenter(AugmentConfig(noise_p=0.0, blur_p=0.0, resolution_p=0.0, edge_noise_p=0.0))


def _generator(dims, context, condition, seed=0):
    torch.manual_seed(seed)
    g = HRGenerator(dims, width=4, num_blocks=1, norm_kind="batch", context=context, context_layers=2,
                    residual=context != "none", condition=condition).eval()  # fmt: skip
    randomize_batchnorm(g, seed)
    return g


def _scale_data(dims, rng, paired=True, n=2):
    shape = (20, 22, 18)[:dims]
    coarse = tuple(-(-s // 2) for s in shape)
    images = [rng.uniform(-1, 1, shape).astype(np.float32) for _ in range(n)]
    return ScaleData(
        scale=1,
        images=images,
        edges=[rng.uniform(-1, 1, shape).astype(np.float32) for _ in range(n)],
        prev_images=[rng.uniform(-1, 1, coarse).astype(np.float32) for _ in range(n)],
        masks_lr=[np.ones(tuple(-(-s // 2) for s in coarse), bool) for _ in range(n)],
        sources=[rng.uniform(-1, 1, shape).astype(np.float32) for _ in range(n)] if paired else [],
    )


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("condition", CONDITIONS)
def test_training_feed_without_corruption_is_the_inference_feed(dims, context, condition, rng):
    """Random boxes: what training gives the generator (corruptions off) equals, array for array, what
    the tile runner gives it at inference over the same box."""
    g = _generator(dims, context, condition)
    data = _scale_data(dims, rng)
    draw = np.random.default_rng(int(rng.integers(1 << 30)))
    replay = copy.deepcopy(draw)
    batch = sample_hr_batch(data, g, 8, 4, draw, CLEAN)
    for i in range(4):  # replay the sampler's draws to find each patch's volume and box
        v = int(replay.integers(len(data.images)))
        shape = data.images[v].shape
        start = sample_patch_starts(data.masks_lr[v], 2, shape, 8, 1, replay)[0]
        CLEAN.sample_edges(replay)
        if context != "none":
            CLEAN.sample_condition(replay)
        tile = Tile(start, tuple(a + 8 for a in start))
        arrays = {"prev": data.prev_images[v], "edges": data.edges[v], "image": data.sources[v]}
        want = tile_feed(g, arrays)(tile)
        np.testing.assert_array_equal(batch.target[i, 0].numpy(), read_region(data.images[v], tile.start, tile.stop))
        np.testing.assert_array_equal(batch.x[i].numpy(), want.x)
        if context == "wide":
            np.testing.assert_array_equal(batch.coarse[i].numpy(), want.coarse)
        else:
            assert batch.coarse is None and want.coarse is None
    assert batch.x.shape[1] == len(g.channels) == (context == "upscaled") + len(condition_channels(condition))
    assert batch.cond.shape[1] == 1 + len(condition_channels(condition))  # prev over the core + the conditions


def test_corruptions_reach_only_training(rng):
    g = _generator(3, "upscaled", "image+edges")
    data = _scale_data(3, rng)
    always = Augmenter(AugmentConfig(noise_p=1.0, blur_p=0.0, resolution_p=0.0, edge_noise_p=1.0))
    clean = sample_hr_batch(data, g, 8, 2, np.random.default_rng(5), CLEAN)
    noisy = sample_hr_batch(data, g, 8, 2, np.random.default_rng(5), always)
    changed = [bool((clean.x[:, c] != noisy.x[:, c]).any()) for c in range(3)]
    assert changed == [True, False, True]  # prev and edges corrupted, the source image never


@pytest.mark.parametrize("condition", CONDITIONS)
def test_lr_feed_is_the_inference_feed(condition, rng):
    names = condition_channels(condition)
    u = UNet(3, len(names), 1, 4, 1, channels=names).eval()
    data = _scale_data(3, rng)
    data.scale, data.prev_images = 0, []
    b = sample_lr_batch(data, 1, np.random.default_rng(3), CLEAN, u)
    v = int(np.random.default_rng(3).integers(2))
    arrays = {"edges": data.edges[v], "image": data.sources[v]}
    np.testing.assert_array_equal(b.x[0].numpy(), feed_box(u, arrays).x)
    np.testing.assert_array_equal(b.cond, b.x)


def test_image_conditioned_training_refuses_unpaired_data(rng):
    with pytest.raises(ValueError, match="pairs"):
        sample_hr_batch(_scale_data(3, rng, paired=False), _generator(3, "upscaled", "image"), 8, 1, rng, CLEAN)


def test_feed_names_missing_arrays(rng):
    g = _generator(3, "upscaled", "image+edges")
    with pytest.raises(ValueError, match=r"missing \['image'\]"):
        feed_box(g, {"prev": np.zeros((4, 4, 4)), "edges": np.zeros((8, 8, 8))}, [0, 0, 0], [2, 2, 2])


@pytest.mark.parametrize("context", CONTEXTS)
def test_regions_made_by_the_caller_feed_as_read_ones(context, rng):
    """``regions`` (training without pairs: sources synthesized per box) give the very input that reading the
    same values from arrays gives; only the grid's shape is then needed from ``arrays``; a wrong size is refused."""
    from msgan.tiling import input_box

    g = _generator(3, context, "image+edges")
    data = _scale_data(3, rng)
    arrays = data.arrays(0)
    start, stop = [4, 6, 2], [12, 14, 10]
    in0, in1 = input_box(start, stop, g.halo)
    made = {n: read_region(arrays[n], in0, in1) for n in ("image", "edges")}
    read = feed_box(g, arrays, start, stop)
    given = feed_box(g, {"grid": data.images[0], "prev": arrays["prev"]}, start, stop, regions=made)
    np.testing.assert_array_equal(given.x, read.x)
    if read.coarse is not None:
        np.testing.assert_array_equal(given.coarse, read.coarse)
    made["image"] = made["image"][1:]
    with pytest.raises(ValueError, match="input box"):
        feed_box(g, {"grid": data.images[0], "prev": arrays["prev"]}, start, stop, regions=made)


# ----------------------------------------------------------------------------- the runner


def _arrays(shape, rng):
    coarse = tuple(-(-s // 2) for s in shape)
    return {
        "prev": rng.standard_normal(coarse).astype(np.float32),
        "edges": rng.standard_normal(shape).astype(np.float32),
        "image": rng.standard_normal(shape).astype(np.float32),
    }


def _run(g, arrays, shape, core, batch_size, order=None):
    out = np.full(shape, np.nan, np.float32)
    tiles = tile_grid(shape, core)
    batches = batches_of(tiles, batch_size)
    for k in order if order is not None else range(len(batches)):  # batches in any order, as Ray's actors would
        run_tiles(g, batches[k], tile_feed(g, arrays), array_writer(out), batch_size)
    return out


@pytest.mark.parametrize("shape", [(23, 19, 21), (29, 34)])
@pytest.mark.parametrize("context", ["upscaled", "wide"])
@pytest.mark.parametrize("condition", CONDITIONS)
def test_tiled_equals_whole_for_every_mode(shape, context, condition, rng):
    g = _generator(len(shape), context, condition)
    arrays = _arrays(shape, rng)
    whole = run_whole(g, arrays)
    for core in (6, 10):
        out = _run(g, arrays, shape, core, 3)
        assert not np.isnan(out).any()
        assert float(np.abs(out - whole).max()) <= 1e-5 * float(whole.max() - whole.min())


def test_bytes_do_not_depend_on_which_worker_runs_which_batch(rng):
    shape = (23, 19, 21)
    g = _generator(3, "upscaled", "image+edges")
    arrays = _arrays(shape, rng)
    a = _run(g, arrays, shape, 8, 4)
    n = len(batches_of(tile_grid(shape, 8), 4))
    b = _run(g, arrays, shape, 8, 4, order=list(range(n))[::-1])
    assert a.tobytes() == b.tobytes()


def test_run_tiles_reports_progress_and_crops_border_tiles(rng):
    shape = (10, 7)
    g = _generator(2, "upscaled", "edges")
    arrays = _arrays(shape, rng)
    seen, written = [], {}
    run_tiles(g, tile_grid(shape, 4), tile_feed(g, arrays), lambda t, y: written.update({t: y.shape}), 2,
              progress=lambda d, n: seen.append((d, n)))  # fmt: skip
    assert seen == [(2, 6), (4, 6), (6, 6)]
    assert all(shape == t.shape for t, shape in written.items())


_TWIN = """
import sys, numpy as np
from tests.test_engine import twin_translation
np.save(sys.argv[1], twin_translation(int(sys.argv[2])))
"""


def twin_translation(tile):
    from msgan.cascade import Cascade
    from tests.conftest import tiny_config

    cfg = tiny_config(**{"hr_generator.width": 6, "condition": "image+edges", "inference.batch_size": 3})
    image = np.random.default_rng(0).uniform(-1000, 2500, (37, 29, 33)).astype(np.float32)
    return Cascade.untrained(cfg, seed=2).translate(image, tile=tile)


def test_translation_is_bit_reproducible_across_processes(tmp_path):
    """Same input, model and tile: identical bytes from another process with another thread count;
    another tile: float rounding only."""
    env = {"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", _TWIN, str(tmp_path / "a.npy"), "8"], check=True, env=env, cwd=root)
    there = np.load(tmp_path / "a.npy")
    here = twin_translation(8)  # this process: one thread (tests/conftest.py)
    assert here.tobytes() == there.tobytes(), "two runs with the same input, model and tile differ"
    other = twin_translation(12)
    assert float(np.abs(here - other).max()) <= 1e-5 * float(here.max() - here.min())


def test_networks_engine_memory_model_and_scale_loop_import_with_torch_and_numpy_alone():
    """A GPU machine with only torch (and numpy) can run them: no dask, zarr, SimpleITK, Ray or MLflow."""
    import subprocess
    import sys

    code = (
        "import sys; import msgan.nets, msgan.engine, msgan.memory, msgan.scale_loop, msgan.tiling\n"
        "print([m for m in ('dask', 'zarr', 'SimpleITK', 'ray', 'mlflow', 'scipy', 'skimage') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
