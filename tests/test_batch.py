import json

import numpy as np
import pytest
import zarr

from msgan import batch, storage
from msgan.cascade import Cascade
from msgan.io.volume import Geometry, write_zarr
from tests.conftest import randomize_batchnorm, s3_keys, tiny_config

GEOM = Geometry((0.8, 0.8, 2.0), (-10.0, 5.0, 100.0), (1, 0, 0, 0, 0, 1, 0, -1, 0))


@pytest.fixture(scope="module")
def cascade():
    cfg = tiny_config(**{"hr_generator.norm": "batch", "inference.memory_budget_mb": 1.0})
    c = Cascade.untrained(cfg, seed=1)
    for g in c.generators[1:]:
        randomize_batchnorm(g)
    return c


def _volume(tmp_path, name, shape=(37, 29, 41), seed=0):
    img = np.random.default_rng(seed).uniform(-1000, 500, shape).astype(np.float32)
    write_zarr(tmp_path / "in" / f"{name}.zarr", [img], GEOM, attrs={"patient": "p1"})
    return img


def test_staged_translation_equals_in_memory_cascade(tmp_path, cascade):
    img = _volume(tmp_path, "v1")
    task = batch.volume_task(str(tmp_path / "in" / "v1.zarr"), str(tmp_path / "out"), "m/1")
    manifest = batch.translate_volume(task, cascade)
    out = zarr.open_group(str(tmp_path / "out" / "v1.zarr"), mode="r")
    np.testing.assert_allclose(out["0"][...], cascade.translate(img), atol=1e-5 * 1024)
    assert [out[str(k)].shape for k in range(3)] == [(37, 29, 41), (19, 15, 21), (10, 8, 11)]
    assert out["0"].chunks == (manifest["tiles"][2],) * 3, "each tile is one output chunk"
    attrs = out.attrs["msgan"]
    assert Geometry.from_dict(attrs["geometry"]) == GEOM and attrs["source"]["patient"] == "p1"
    assert attrs["translated_by"] == "m/1"
    assert (
        json.loads((tmp_path / "out" / "v1.zarr" / "manifest.json").read_text())["checksum_sha256"]
        == (manifest["checksum_sha256"])
    )
    assert not list((tmp_path / "out" / ".staging").iterdir()), "staging cleaned up"
    assert batch.is_published(task)


def test_published_output_does_not_depend_on_tile(tmp_path, cascade):
    _volume(tmp_path, "v2", shape=(30, 22, 26))
    outs = []
    for tile in (6, 16):
        task = batch.volume_task(str(tmp_path / "in" / "v2.zarr"), str(tmp_path / f"out{tile}"), "m/1")
        batch.translate_volume(task, cascade, tile=tile)
        outs.append(zarr.open_group(str(tmp_path / f"out{tile}" / "v2.zarr"), mode="r")["0"][...])
    assert float(np.abs(outs[0] - outs[1]).max()) < 1e-2


@pytest.mark.parametrize(
    "breakage,message",
    [
        ("nan", "NaN"),
        ("missing", "missing array '0'"),
        ("dims", "translates 3D volumes"),
        ("nogeometry", "no msgan geometry"),
    ],
)
def test_bad_volume_fails_clearly_and_publishes_nothing(tmp_path, cascade, breakage, message):
    path = tmp_path / "in" / "bad.zarr"
    img = np.zeros((20, 20, 20), np.float32)
    if breakage == "nan":
        img[3, 4, 5] = np.nan
        write_zarr(path, [img], GEOM)
    elif breakage == "dims":
        write_zarr(path, [img[0]], Geometry.identity(2))
    else:
        write_zarr(path, [img], GEOM)
        g = zarr.open_group(str(path), mode="r+")
        if breakage == "missing":
            del g["0"]
        else:
            del g.attrs["msgan"]
    task = batch.volume_task(str(path), str(tmp_path / "out"), "m/1")
    with pytest.raises(batch.VolumeError, match=message) as info:
        batch.translate_volume(task, cascade)
    assert "bad.zarr" in str(info.value)
    assert not (tmp_path / "out" / "bad.zarr").exists()
    assert not any((tmp_path / "out" / ".staging").glob("*")), "staging removed after a failure"


def test_unwritten_tile_blocks_publishing(tmp_path, cascade):
    _volume(tmp_path, "v3")
    task = batch.volume_task(str(tmp_path / "in" / "v3.zarr"), str(tmp_path / "out"), "m/1")
    plan = batch.stage(task, cascade)
    batch.run_scale0(task, cascade)
    for s in (1, 2):
        tiles = batch.tiles_of(plan, s)
        batch.translate_tiles(task, cascade, s, tiles[:-1] if s == 2 else tiles)  # one tile of the last scale lost
    with pytest.raises(batch.VolumeError, match="unwritten voxels"):
        batch.publish(task, cascade, {})
    assert not batch.is_published(task)


def test_s3_volume_published_with_manifest_last(s3_bucket, tmp_path, cascade):
    img = np.random.default_rng(3).uniform(-1000, 500, (24, 20, 22)).astype(np.float32)
    src = f"s3://{s3_bucket}/in/v4.zarr"
    import zarr as z

    store, opts = storage.zarr_store(src)
    g = z.open_group(store, mode="w", storage_options=opts)
    g.create_array("0", shape=img.shape, chunks=(8, 8, 8), dtype="float32")[...] = img
    g.attrs["msgan"] = {"geometry": GEOM.as_dict()}
    task = batch.volume_task(src, f"s3://{s3_bucket}/out", "m/1")
    batch.translate_volume(task, cascade)
    keys = s3_keys(s3_bucket, "out/")
    assert "out/v4.zarr/manifest.json" in keys and "out/v4.zarr/0/zarr.json" in keys
    assert not [k for k in keys if "/.staging/" in k], "staging removed from the bucket"
    store, opts = storage.zarr_store(task.output)
    out = z.open_group(store, mode="r", storage_options=opts)["0"][...]
    np.testing.assert_allclose(out, cascade.translate(img), atol=1e-5 * 1024)


def test_expand_inputs(tmp_path):
    for n in ("a", "b"):
        _volume(tmp_path, n, shape=(8, 8, 8))
    (tmp_path / "in" / "notes.txt").write_text("x")
    got = batch.expand_inputs([str(tmp_path / "in")])
    assert [u.rsplit("/", 1)[1] for u in got] == ["a.zarr", "b.zarr"]
    with pytest.raises(batch.VolumeError, match=r"no \.zarr volumes"):
        batch.expand_inputs([str(tmp_path)])
    with pytest.raises(batch.VolumeError, match="neither"):
        batch.expand_inputs([str(tmp_path / "missing")])
