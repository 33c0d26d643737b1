import json

import numpy as np
import pytest
import zarr

from msgan import storage
from msgan.cascade import Cascade
from msgan.io.volume import Geometry, VolumeError, write_zarr
from msgan.volumes import publishing, staging, steps
from msgan.volumes.local import translate_volume
from msgan.volumes.pinning import ModelError, pin
from msgan.volumes.tasks import check_collisions, expand_inputs, is_published, volume_task
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


def test_staged_translation_equals_in_memory_cascade_byte_for_byte(tmp_path, cascade):
    img = _volume(tmp_path, "v1")
    task = volume_task(str(tmp_path / "in" / "v1.zarr"), str(tmp_path / "out"), "m/1")
    manifest = translate_volume(task, cascade, tile=12)
    out = zarr.open_group(str(tmp_path / "out" / "v1.zarr"), mode="r")
    assert out["0"][...].tobytes() == cascade.translate(img, tile=12).tobytes()
    assert [out[str(k)].shape for k in range(3)] == [(37, 29, 41), (19, 15, 21), (10, 8, 11)]
    assert out["0"].chunks == (manifest["tiles"][2],) * 3, "each tile is one output chunk"
    attrs = out.attrs["msgan"]
    assert Geometry.from_dict(attrs["geometry"]) == GEOM and attrs["source"]["patient"] == "p1"
    assert attrs["translated_by"] == "m/1"
    assert (
        json.loads((tmp_path / "out" / "v1.zarr" / "manifest.json").read_text())["checksum_sha256"]
        == (manifest["checksum_sha256"])
    )
    assert not (tmp_path / "out" / ".staging").exists(), "staging cleaned up, its empty folder too"
    assert is_published(task) and manifest["status"] == "translated"
    again = translate_volume(volume_task(task.input, str(tmp_path / "out"), "m/1"), cascade)
    assert again["status"] == "skipped" and again["checksum_sha256"] == manifest["checksum_sha256"]


def test_published_output_does_not_depend_on_tile(tmp_path, cascade):
    _volume(tmp_path, "v2", shape=(30, 22, 26))
    outs = []
    for tile in (6, 16):
        task = volume_task(str(tmp_path / "in" / "v2.zarr"), str(tmp_path / f"out{tile}"), "m/1")
        translate_volume(task, cascade, tile=tile)
        outs.append(zarr.open_group(str(tmp_path / f"out{tile}" / "v2.zarr"), mode="r")["0"][...])
    spread = float(outs[0].max() - outs[0].min())
    assert float(np.abs(outs[0] - outs[1]).max()) <= 1e-5 * spread, "tile sizes differ by float rounding only"


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
    task = volume_task(str(path), str(tmp_path / "out"), "m/1")
    with pytest.raises(VolumeError, match=message) as info:
        translate_volume(task, cascade)
    assert "bad.zarr" in str(info.value)
    assert not (tmp_path / "out" / "bad.zarr").exists()
    assert not any((tmp_path / "out" / ".staging").glob("*")), "staging removed after a failure"


def test_unwritten_tile_blocks_publishing(tmp_path, cascade):
    _volume(tmp_path, "v3")
    task = volume_task(str(tmp_path / "in" / "v3.zarr"), str(tmp_path / "out"), "m/1")
    vplan = staging.plan_volume(task, cascade)
    staging.stage(task, cascade.config, vplan)
    steps.run_scale0(task, cascade)
    for s in (1, 2):
        tiles = vplan.tiles_of(s)
        steps.scale_tiles(task, cascade, s).run(tiles[:-1] if s == 2 else tiles)  # one tile of the last scale lost
    with pytest.raises(VolumeError, match="unwritten voxels"):
        publishing.publish(task, {})
    assert not is_published(task)


def test_s3_volume_published_with_manifest_last(s3_bucket, tmp_path, cascade):
    img = np.random.default_rng(3).uniform(-1000, 500, (24, 20, 22)).astype(np.float32)
    src = f"s3://{s3_bucket}/in/v4.zarr"
    write_zarr(src, [img], GEOM, chunks=8)
    task = volume_task(src, f"s3://{s3_bucket}/out", "m/1")
    translate_volume(task, cascade)
    keys = s3_keys(s3_bucket, "out/")
    assert "out/v4.zarr/manifest.json" in keys and "out/v4.zarr/0/zarr.json" in keys
    assert not [k for k in keys if "/.staging/" in k], "staging removed from the bucket"
    store, opts = storage.zarr_store(task.output)
    out = zarr.open_group(store, mode="r", storage_options=opts)["0"][...]
    np.testing.assert_allclose(out, cascade.translate(img), atol=1e-5 * 1024)


def test_expand_inputs(tmp_path):
    for n in ("a", "b"):
        _volume(tmp_path, n, shape=(8, 8, 8))
    (tmp_path / "in" / "notes.txt").write_text("x")
    got = expand_inputs([str(tmp_path / "in")])
    assert [u.rsplit("/", 1)[1] for u in got] == ["a.zarr", "b.zarr"]
    with pytest.raises(VolumeError, match=r"no \.zarr volumes"):
        expand_inputs([str(tmp_path)])
    with pytest.raises(VolumeError, match="neither"):
        expand_inputs([str(tmp_path / "missing")])


# ----------------------------------------------------------------------------- no silent wrong output


@pytest.fixture(scope="module")
def other_cascade():
    return Cascade.untrained(tiny_config(**{"inference.memory_budget_mb": 1.0}), seed=7)


def _out(tmp_path, name, sub="out"):
    return zarr.open_group(str(tmp_path / sub / f"{name}.zarr"), mode="r")["0"][...]


def test_output_of_another_model_is_translated_again_and_replaced(tmp_path, cascade, other_cascade):
    img = _volume(tmp_path, "v5", shape=(20, 18, 22))
    src = str(tmp_path / "in" / "v5.zarr")
    translate_volume(volume_task(src, str(tmp_path / "out"), "m/1"), cascade)
    logged = []
    manifest = translate_volume(volume_task(src, str(tmp_path / "out"), "m/2"), other_cascade, log=logged.append)
    assert manifest["status"] == "re-translated" and manifest["previous_model"] == "m/1"
    assert "re-translated: model m/1 -> m/2" in logged
    on_disk = json.loads((tmp_path / "out" / "v5.zarr" / "manifest.json").read_text())
    assert on_disk["model"] == "m/2"
    np.testing.assert_allclose(_out(tmp_path, "v5"), other_cascade.translate(img), atol=1e-5 * 1024)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name not in ("v5.zarr", ".staging", ".leases")]


def test_failed_retranslation_keeps_the_old_output(tmp_path, cascade, other_cascade):
    _volume(tmp_path, "v6", shape=(20, 18, 22))
    src = tmp_path / "in" / "v6.zarr"
    first = translate_volume(volume_task(str(src), str(tmp_path / "out"), "m/1"), cascade)
    before = _out(tmp_path, "v6")
    chunk = sorted(p for p in (src / "0" / "c").rglob("*") if p.is_file())[0]
    chunk.unlink()  # the input is now incomplete
    with pytest.raises(VolumeError, match="never written"):
        translate_volume(volume_task(str(src), str(tmp_path / "out"), "m/2"), other_cascade)
    assert json.loads((tmp_path / "out" / "v6.zarr" / "manifest.json").read_text())["model"] == "m/1"
    np.testing.assert_array_equal(_out(tmp_path, "v6"), before)
    assert first["status"] == "translated"


def test_missing_input_chunk_is_an_error_naming_volume_and_chunk(tmp_path, cascade):
    _volume(tmp_path, "holes", shape=(20, 18, 22))
    (tmp_path / "in" / "holes.zarr" / "0" / "c" / "0" / "0" / "0").unlink()
    task = volume_task(str(tmp_path / "in" / "holes.zarr"), str(tmp_path / "out"), "m/1")
    with pytest.raises(VolumeError, match=r"holes\.zarr.*never written \(first: c/0/0/0\)"):
        translate_volume(task, cascade)
    assert not (tmp_path / "out" / "holes.zarr").exists()


@pytest.mark.parametrize("normalize", ["none", "percentile"])
def test_corrupt_input_chunk_is_an_error_naming_volume_and_chunk(tmp_path, cascade, normalize):
    if normalize == "percentile":  # the plan reads a strided sample of the input to normalise it
        cascade = Cascade.untrained(tiny_config(**MR_OPTIONS), seed=4)
    write_zarr(tmp_path / "in" / "bad.zarr", [np.full((20, 18, 22), 40.0, np.float32)], GEOM, chunks=8)
    (tmp_path / "in" / "bad.zarr" / "0" / "c" / "1" / "0" / "2").write_bytes(b"not zstd at all" * 8)
    task = volume_task(str(tmp_path / "in" / "bad.zarr"), str(tmp_path / "out"), "m/1")
    with pytest.raises(VolumeError, match=r"bad\.zarr: chunk c/1/0/2 of array '0' cannot be read"):
        translate_volume(task, cascade)
    assert not (tmp_path / "out" / "bad.zarr").exists()
    assert not any((tmp_path / "out" / ".staging").glob("*"))


def test_malformed_output_manifest_is_a_clear_error(tmp_path, cascade):
    _volume(tmp_path, "v7", shape=(12, 12, 12))
    task = volume_task(str(tmp_path / "in" / "v7.zarr"), str(tmp_path / "out"), "m/1")
    (tmp_path / "out" / "v7.zarr").mkdir(parents=True)
    (tmp_path / "out" / "v7.zarr" / "manifest.json").write_text(json.dumps({"volume": "v7"}))
    with pytest.raises(VolumeError, match=r"v7\.zarr/manifest\.json: malformed manifest: missing keys model"):
        translate_volume(task, cascade)


def test_malformed_model_manifest_is_a_clear_error(tmp_path, cascade):
    folder = cascade.save(tmp_path / "model")
    (folder / "manifest.json").write_text(json.dumps({"format": "msgan-cascade/1"}))
    with pytest.raises(ModelError, match=r"model/manifest\.json: malformed cascade manifest: missing keys config"):
        pin(str(folder))


def test_os_error_is_one_clear_line_and_nothing_is_published(tmp_path, cascade):
    _volume(tmp_path, "v8", shape=(12, 12, 12))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".staging").write_text("a file where the staging folder goes")
    task = volume_task(str(tmp_path / "in" / "v8.zarr"), str(tmp_path / "out"), "m/1")
    with pytest.raises(VolumeError, match=r"v8: .*\.staging.*nothing published"):
        translate_volume(task, cascade)
    assert not (tmp_path / "out" / "v8.zarr").exists()
    assert not (tmp_path / "out" / ".leases" / "v8.zarr.json").exists(), "lease released"


def test_full_disk_is_one_clear_line_and_nothing_is_published(tmp_path, cascade):
    import subprocess

    _volume(tmp_path, "v9", shape=(40, 40, 40))
    out = tmp_path / "small"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(out)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root) to fill a disk")
    try:
        task = volume_task(str(tmp_path / "in" / "v9.zarr"), str(out), "m/1")
        with pytest.raises(VolumeError, match="No space left on device") as info:
            translate_volume(task, cascade)
        assert "\n" not in str(info.value) and "nothing published" in str(info.value)
        assert not (out / "v9.zarr").exists() and not any((out / ".staging").glob("*"))
    finally:
        subprocess.run(["umount", str(out)], check=False)


# ----------------------------------------------------------------------------- concurrency


def test_another_run_holding_the_lease_is_refused_its_retry_is_not(tmp_path, cascade):
    from msgan import lease

    _volume(tmp_path, "v10", shape=(12, 12, 12))
    src, out = str(tmp_path / "in" / "v10.zarr"), str(tmp_path / "out")
    first = volume_task(src, out, "m/1", run="runA")
    lease.acquire(first.lease, first.output)  # run A is busy with it
    with pytest.raises(VolumeError, match=r"another run is publishing it.*run runA \(host"):
        translate_volume(volume_task(src, out, "m/1", run="runB"), cascade)
    assert not (tmp_path / "out" / "v10.zarr").exists()
    manifest = translate_volume(volume_task(src, out, "m/1", run="runA"), cascade)  # a retry of run A
    assert manifest["run"] == "runA" and not lease.holds(first.lease)


def test_staging_is_per_run_and_dead_runs_staging_is_swept(tmp_path, cascade):
    from msgan import lease

    _volume(tmp_path, "v11", shape=(12, 12, 12))
    src, out = str(tmp_path / "in" / "v11.zarr"), str(tmp_path / "out")
    a, b = volume_task(src, out, "m/1", run="r1"), volume_task(src, out, "m/1", run="r2")
    assert a.staging != b.staging
    for t in (a, b):
        staging.stage(t, cascade.config, staging.plan_volume(t, cascade))
    lease.acquire(b.lease, b.output)  # r2 is alive, r1 was killed
    removed = publishing.sweep_staging(storage.normalize_uri(tmp_path / "out"))
    assert removed == [a.staging]
    assert storage.exists(b.staging) and not storage.exists(a.staging)


@pytest.mark.parametrize(
    "record",
    [b"\xff\xfe{}", b"[1, 2]", b'{"run": "r1", "output": "translated/v.zarr"}', b'{"run": "r1", "output": "http://x/v.zarr"}',
     b'{"run": 7, "output": ["a"]}'],
)  # fmt: skip
def test_a_malformed_run_record_in_staging_neither_stops_the_sweep_nor_names_a_lease(tmp_path, record):
    """A run.json is a file in the staging folder, so untrusted: bytes that are not UTF-8 JSON, or an output outside
    this folder (a relative path, another scheme), stopped the sweep that every batch runs before any lease is
    taken; now such a record is no record, and the folder's age decides (a fresh one is kept)."""
    folder = tmp_path / "out" / ".staging" / "v-r1"
    folder.mkdir(parents=True)
    (folder / staging.RUN_FILE).write_bytes(record)
    assert publishing.sweep_staging(storage.normalize_uri(tmp_path / "out")) == []
    assert folder.exists()
    assert publishing.sweep_staging(storage.normalize_uri(tmp_path / "out"), ttl_s=-1) == [
        storage.normalize_uri(folder)
    ]


def test_publish_fallback_puts_the_old_output_back_when_the_new_cannot_take_its_place(tmp_path, monkeypatch):
    """Where the filesystem cannot exchange two folders, the old output steps aside first; if the new one then
    cannot be moved in, the old one goes back: a failed publish leaves the previous good output."""
    import os

    new, dest = tmp_path / "stage" / "o.zarr", tmp_path / "out" / "o.zarr"
    for d, text in ((new, "new"), (dest, "old")):
        d.mkdir(parents=True)
        (d / "f").write_text(text)
    monkeypatch.setattr(publishing, "exchange", lambda a, b: False)
    rename = os.rename

    def failing(a, b):
        if str(a) == str(new):
            raise OSError(28, "No space left on device", str(b))
        rename(a, b)

    monkeypatch.setattr(publishing.os, "rename", failing)
    with pytest.raises(OSError, match="No space left"):
        publishing.replace_dir(new, dest)
    assert (dest / "f").read_text() == "old" and sorted(os.listdir(tmp_path / "out")) == ["o.zarr"]


def test_publish_exchanges_the_old_output_for_the_new(tmp_path):
    new, dest = tmp_path / "stage" / "o.zarr", tmp_path / "out" / "o.zarr"
    for d, text in ((new, "new"), (dest, "old")):
        d.mkdir(parents=True)
        (d / "f").write_text(text)
    (dest / "only-old").write_text("x")
    publishing.replace_dir(new, dest)
    assert (dest / "f").read_text() == "new" and not (dest / "only-old").exists() and not new.exists()


def test_two_inputs_for_one_output_are_refused(tmp_path):
    tasks = [volume_task(str(tmp_path / d / "v.zarr"), str(tmp_path / "out"), "m/1") for d in ("a", "b")]
    with pytest.raises(VolumeError, match=r"2 inputs map to one output .*out/v\.zarr: .*a/v\.zarr, .*b/v\.zarr"):
        check_collisions(tasks)


# ----------------------------------------------------------------------------- the pinned plan


def test_folder_plan_refuses_a_cascade_changed_after_pinning(tmp_path, cascade, other_cascade):
    folder = cascade.save(tmp_path / "model")
    plan = pin(str(folder), {"batch_size": 3})
    assert plan.model_id.startswith("model/") and plan.load().config.inference.batch_size == 3
    other_cascade.save(folder, replace=True)
    with pytest.raises(ModelError, match="changed since this batch pinned it"):
        plan.load()


def test_plan_pins_the_registry_version_the_alias_named(tmp_path, monkeypatch, cascade, other_cascade):
    from mlflow import MlflowClient

    from msgan import registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient(registry.tracking_uri())
    exp = client.create_experiment("pin")
    for c in (cascade, other_cascade):
        registry.register_cascade(c, client.create_run(exp).info.run_id, "pinned", alias="champion")
    registry.promote("pinned", "1", "champion")
    img = _volume(tmp_path, "v12", shape=(20, 18, 22))
    plan = pin("models:/pinned@champion")
    assert plan.model == "models:/pinned/1" and plan.model_id == "pinned/1"
    registry.promote("pinned", "2", "champion")  # promoted while the batch runs
    task = volume_task(str(tmp_path / "in" / "v12.zarr"), str(tmp_path / "out"), plan.model_id, run=plan.run)
    manifest = translate_volume(task, plan.load())
    assert manifest["model"] == "pinned/1"
    np.testing.assert_allclose(_out(tmp_path, "v12"), cascade.translate(img), atol=1e-5 * 1024)


def test_a_chunk_equal_to_the_fill_value_is_stored_and_not_mistaken_for_a_missing_one(tmp_path, cascade):
    img = np.random.default_rng(4).uniform(-1000, 500, (20, 18, 22)).astype(np.float32)
    img[:8, :8, :8] = 0.0  # an MR-like empty background chunk equals zarr's default fill value
    write_zarr(tmp_path / "in" / "mr.zarr", [img], GEOM, chunks=8)
    task = volume_task(str(tmp_path / "in" / "mr.zarr"), str(tmp_path / "out"), "m/1")
    assert translate_volume(task, cascade)["status"] == "translated"


def test_outside_the_window_outputs_blend_to_the_source_as_in_memory(tmp_path):
    c = Cascade.untrained(tiny_config(**{"intensity.outside": "source", "inference.memory_budget_mb": 1.0}), seed=3)
    img = np.random.default_rng(5).uniform(-1000, 500, (20, 18, 22)).astype(np.float32)
    img[4:12, 4:12, 4:12] = 3000.0  # metal: far above the window
    write_zarr(tmp_path / "in" / "metal.zarr", [img], GEOM)
    task = volume_task(str(tmp_path / "in" / "metal.zarr"), str(tmp_path / "out"), "m/1")
    translate_volume(task, c)
    out = _out(tmp_path, "metal")
    np.testing.assert_allclose(out, c.translate(img), atol=1e-5 * 4000)
    assert float(np.abs(out[6:10, 6:10, 6:10] - 3000.0).max()) < 1.0, "the metal passes through"


@pytest.mark.parametrize(
    "options",
    [
        {"condition": "image"},
        {"condition": "image+edges"},
        {"condition": "image+edges", "source_residual": True, "hr_generator.residual": False},
    ],
)
def test_image_conditioned_cascade_translates_staged_byte_for_byte(tmp_path, options):
    c = Cascade.untrained(tiny_config(**options), seed=4)
    img = _volume(tmp_path, "cond", shape=(21, 18, 20))
    task = volume_task(str(tmp_path / "in" / "cond.zarr"), str(tmp_path / "out"), "m/1")
    translate_volume(task, c, tile=8)
    assert _out(tmp_path, "cond").tobytes() == c.translate(img, tile=8).tobytes()


def test_s3_lease_is_a_conditional_write(s3_bucket):
    from msgan import lease

    uri = f"s3://{s3_bucket}/out/.leases/v.zarr.json"
    lease.acquire(lease.Lease(uri, "run1"), "v.zarr")
    lease.acquire(lease.Lease(uri, "run1"), "v.zarr")  # a retry of the same run
    with pytest.raises(lease.LeaseError, match="run run1"):
        lease.acquire(lease.Lease(uri, "run2"), "v.zarr")
    lease.release(lease.Lease(uri, "run2"))  # not its lease: kept
    assert lease.holder(uri)["run"] == "run1"
    lease.release(lease.Lease(uri, "run1"))
    lease.acquire(lease.Lease(uri, "run2"), "v.zarr")
    assert lease.holder(uri)["run"] == "run2"


def test_s3_retranslation_replaces_the_output_and_the_manifest_names_what_is_there(s3_bucket, cascade, other_cascade):
    img = np.random.default_rng(6).uniform(-1000, 500, (16, 14, 18)).astype(np.float32)
    src = f"s3://{s3_bucket}/in/v.zarr"
    write_zarr(src, [img], GEOM, chunks=8)
    translate_volume(volume_task(src, f"s3://{s3_bucket}/out", "m/1"), cascade, tile=8)
    many = len(s3_keys(s3_bucket, "out/v.zarr/"))
    task = volume_task(src, f"s3://{s3_bucket}/out", "m/2")
    manifest = translate_volume(task, other_cascade, tile=16)  # fewer, larger chunks than before
    keys = s3_keys(s3_bucket, "out/v.zarr/")
    assert manifest["status"] == "re-translated" and manifest["objects"] == len(keys) < many
    store, opts = storage.zarr_store(task.output)
    out = zarr.open_group(store, mode="r", storage_options=opts)["0"][...]
    assert out.tobytes() == other_cascade.translate(img, tile=16).tobytes()


def test_job_with_a_malformed_model_manifest_exits_with_one_line_naming_the_file(tmp_path, cascade):
    import subprocess
    import sys
    from pathlib import Path

    folder = cascade.save(tmp_path / "model")
    (folder / "manifest.json").write_text(json.dumps({"format": "msgan-cascade/1", "weights": []}))
    _volume(tmp_path, "v", shape=(12, 12, 12))
    job = Path(__file__).resolve().parents[2] / "jobs" / "translate_batch.py"
    args = ["--model", str(folder), "--inputs", str(tmp_path / "in"), "--output", str(tmp_path / "o")]
    out = subprocess.run([sys.executable, str(job), *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model/manifest.json: malformed cascade manifest: missing keys config" in lines[0]
    assert not (tmp_path / "o").exists()


def test_tile_actor_loads_the_pinned_plan_with_its_overrides(tmp_path, cascade):
    from msgan.distributed.translate import TileWorker

    plan = pin(str(cascade.save(tmp_path / "model")), {"batch_size": 3})
    worker = TileWorker(plan, [], {}, scale=1, gpus=0.0, cpus=1.0, actors=1)  # what Ray Data constructs, once per actor
    assert worker.cascade.config.inference.batch_size == 3, "the batch's override reaches the actor"


# ----------------------------------------------------------------------------- the volume plan and the one loop


def test_volume_plan_is_typed_round_trips_through_staging_and_a_bad_one_is_named(tmp_path, cascade):
    _volume(tmp_path, "v13", shape=(20, 18, 22))
    task = volume_task(str(tmp_path / "in" / "v13.zarr"), str(tmp_path / "out"), "m/1")
    vplan = staging.plan_volume(task, cascade, tile=8)
    assert vplan.shapes[-1] == (20, 18, 22) and vplan.tiles == (0, 8, 8) and vplan.num_scales == 3
    assert vplan.geometry == GEOM and vplan.source["patient"] == "p1"
    assert staging.VolumePlan.from_dict(json.loads(json.dumps(vplan.to_dict()))) == vplan, "JSON and back"
    staging.stage(task, cascade.config, vplan)
    assert staging.VolumePlan.staged(task) == vplan, "the staged attribute holds the same plan"
    assert [len(b) for b in vplan.batches(2, 4)] == [4] * 6 + [3] and len(vplan.tiles_of(2)) == 27
    zarr.open_group(str(tmp_path / "out" / ".staging" / f"v13-{task.run}" / "inputs.zarr"), mode="r+").attrs["plan"] = {
        "shapes": [[5, 5, 6]],
        "tiles": [0, 8],
        "geometry": GEOM.as_dict(),
    }
    with pytest.raises(VolumeError, match=r"v13: staged plan: not a volume plan \(ValueError: shapes, tiles"):
        publishing.publish(task, {})
    assert not (tmp_path / "out" / "v13.zarr").exists()


def test_local_translation_runs_every_scale_through_the_one_loop(tmp_path, cascade):
    _volume(tmp_path, "v14", shape=(20, 18, 22))
    task = volume_task(str(tmp_path / "in" / "v14.zarr"), str(tmp_path / "out"), "m/1")
    seen: list[tuple[int, int, int]] = []
    lines: list[str] = []
    manifest = translate_volume(task, cascade, tile=8, progress=lambda *a: seen.append(a), log=lines.append)
    assert seen[:2] == [(0, 0, 1), (0, 1, 1)] and {s: (d, n) for s, d, n in seen} == {0: (1, 1), 1: (8, 8), 2: (27, 27)}
    timings = manifest["timings"]
    assert [(t["scale"], t["tiles"], t.get("tile")) for t in timings] == [(0, 1, None), (1, 8, 8), (2, 27, 8)]
    assert [line.split(" in ")[0] for line in lines] == ["  scale 1: 8 tiles of 8", "  scale 2: 27 tiles of 8"]


def test_a_batch_may_override_the_inference_defaults_amp_included(tmp_path, cascade):
    from msgan.volumes.pinning import pin

    folder = cascade.save(tmp_path / "model")
    loaded = pin(str(folder), {"amp": True, "batch_size": 5}).load()
    assert loaded.config.train.amp is True and loaded.config.inference.batch_size == 5


# ----------------------------------------------------------------------------- data without a fixed scale (MR)

MR_OPTIONS = {"condition": "image+edges", "source_residual": True, "hr_generator.residual": False,
              "intensity.normalize": "percentile", "intensity.low": -200.0, "intensity.high": 1400.0}  # fmt: skip


def test_a_normalised_volume_translates_staged_byte_for_byte_and_records_its_scaling(tmp_path):
    from msgan.normalize import Scaling
    from tests.test_normalize import mr_like

    c = Cascade.untrained(tiny_config(**MR_OPTIONS), seed=4)
    img = (mr_like((21, 18, 20), seed=2) * 2.5 + 40.0).astype(np.float32)
    write_zarr(tmp_path / "in" / "t1.zarr", [img], GEOM, chunks=8)
    task = volume_task(str(tmp_path / "in" / "t1.zarr"), str(tmp_path / "out"), "m/1")
    vplan = staging.plan_volume(task, c, tile=8)
    assert vplan.scaling == c.scaling_of(img), "one strided sample: the zarr input's scaling is the array's"
    assert staging.VolumePlan.from_dict(json.loads(json.dumps(vplan.to_dict()))) == vplan, "to Ray and back"
    manifest = translate_volume(task, c, tile=8)
    assert _out(tmp_path, "t1").tobytes() == c.translate(img, tile=8).tobytes()
    attrs = zarr.open_group(str(tmp_path / "out" / "t1.zarr"), mode="r").attrs["msgan"]
    assert Scaling.from_dict(attrs["intensity"]["source_scaling"]) == vplan.scaling
    assert attrs["intensity"]["units"].startswith("normalised")
    assert Scaling.from_dict(manifest["source_scaling"]) == vplan.scaling


def test_a_ct_volume_plan_and_output_hold_no_scaling(tmp_path, cascade):
    _volume(tmp_path, "ct", shape=(20, 18, 22))
    task = volume_task(str(tmp_path / "in" / "ct.zarr"), str(tmp_path / "out"), "m/1")
    assert staging.plan_volume(task, cascade, tile=8).scaling is None
    manifest = translate_volume(task, cascade, tile=8)
    assert "source_scaling" not in manifest
    assert "intensity" not in zarr.open_group(str(tmp_path / "out" / "ct.zarr"), mode="r").attrs["msgan"]


def test_a_flat_volume_is_refused_by_name_before_staging_and_a_plan_of_another_model_is_refused(tmp_path, cascade):
    c = Cascade.untrained(tiny_config(**MR_OPTIONS), seed=4)
    write_zarr(tmp_path / "in" / "flat.zarr", [np.full((20, 18, 22), 3.0, np.float32)], GEOM)
    task = volume_task(str(tmp_path / "in" / "flat.zarr"), str(tmp_path / "out"), "m/1")
    with pytest.raises(VolumeError, match=r"flat\.zarr: flat volume \(every sampled voxel is 3\)"):
        translate_volume(task, c)
    assert not (tmp_path / "out" / "flat.zarr").exists() and not (tmp_path / "out" / ".staging").exists()
    _volume(tmp_path, "v", shape=(20, 18, 22))
    task = volume_task(str(tmp_path / "in" / "v.zarr"), str(tmp_path / "out"), "m/1")
    ct_plan = staging.plan_volume(task, cascade, tile=8)
    with pytest.raises(VolumeError, match=r"v\.zarr: the volume plan has no intensity scaling; the model's "):
        staging.stage(task, c.config, ct_plan)
