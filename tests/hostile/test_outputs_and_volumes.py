"""Hostile inputs for the output rules, the declared sizes of volumes and the leases (issue: nothing lost,
nothing exhausted). Each case builds the input in tmp_path, runs the library or the CLI in-process, and
checks the named refusal and that nothing outside the output changed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from msgan import lease, storage
from msgan.cli import main
from msgan.io import outputs
from msgan.io.volume import VolumeError, read_level, read_volume, write_volume
from msgan.volumes.local import translate_volume
from msgan.volumes.tasks import volume_task
from tests.conftest import write_unchecked
from tests.hostile.conftest import GEOM, small_volume, snapshot

# ----------------------------------------------------------------------------- outputs never destroy


def _cli(*args: str) -> int:
    return main(list(args))


def test_translate_into_a_plain_folder_refuses_and_keeps_its_files(tmp_path, hostile_model, capsys):
    small_volume(tmp_path / "in.zarr")
    plain = tmp_path / "plain.zarr"
    plain.mkdir()
    (plain / "notes.txt").write_text("keep")
    before = snapshot(tmp_path)
    assert _cli("translate", str(tmp_path / "in.zarr"), str(plain), "--model", hostile_model, "--quiet") == 2
    err = capsys.readouterr().err
    assert "plain.zarr" in err and "notes.txt" in err and "never replaced" in err
    assert snapshot(tmp_path) == before, "nothing created, changed or removed (no .leases, no .staging)"


def test_translate_from_nifti_into_a_plain_folder_refuses(tmp_path, hostile_model, capsys):
    write_volume(tmp_path / "in.nii.gz", np.zeros((16, 16, 16), np.float32), GEOM)
    plain = tmp_path / "plain.zarr"
    plain.mkdir()
    (plain / "notes.txt").write_text("keep")
    assert _cli("translate", str(tmp_path / "in.nii.gz"), str(plain), "--model", hostile_model, "--replace") == 2
    assert "notes.txt" in capsys.readouterr().err and (plain / "notes.txt").read_text() == "keep"


def test_output_symlink_leaving_its_folder_is_refused_and_its_target_untouched(tmp_path, hostile_model, capsys):
    small_volume(tmp_path / "in.zarr")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "o.zarr").symlink_to(elsewhere / "new.zarr")  # dangling: the output would appear there
    before = snapshot(elsewhere)
    code = _cli("translate", str(tmp_path / "in.zarr"), str(tmp_path / "out" / "o.zarr"), "--model", hostile_model)
    assert code == 2 and "symlink" in capsys.readouterr().err
    assert snapshot(elsewhere) == before and sorted(os.listdir(tmp_path / "out")) == ["o.zarr"]


def test_symlink_inside_its_own_folder_is_followed(tmp_path, hostile_model):
    small_volume(tmp_path / "in.zarr")
    (tmp_path / "real.zarr").symlink_to(tmp_path / "target.zarr")  # dangling, but in the same folder
    uri = outputs.resolve_output(str(tmp_path / "real.zarr"), [str(tmp_path / "in.zarr")])
    assert uri.endswith("/target.zarr")


@pytest.mark.parametrize("same", ["plain", "symlink", "nested"])
def test_input_and_output_may_never_be_one_volume(tmp_path, hostile_model, capsys, same):
    img = small_volume(tmp_path / "self.zarr")
    output = {
        "plain": tmp_path / "self.zarr",
        "symlink": tmp_path / "alias.zarr",
        "nested": tmp_path / "self.zarr" / "inner.zarr",
    }[same]
    if same == "symlink":
        output.symlink_to(tmp_path / "self.zarr")
    assert _cli("translate", str(tmp_path / "self.zarr"), str(output), "--model", hostile_model) == 2
    assert "is the input" in capsys.readouterr().err
    assert np.array_equal(read_volume(tmp_path / "self.zarr")[0], img)


def test_single_file_output_is_replaced_only_with_the_flag(tmp_path, hostile_model, capsys):
    write_volume(tmp_path / "in.nii.gz", np.zeros((16, 16, 16), np.float32), GEOM)
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"someone's file")
    assert _cli("translate", str(tmp_path / "in.nii.gz"), str(out), "--model", hostile_model, "--quiet") == 2
    assert "--replace" in capsys.readouterr().err and out.read_bytes() == b"someone's file"
    assert _cli("translate", str(tmp_path / "in.nii.gz"), str(out), "--model", hostile_model, "--replace") == 0
    assert read_volume(out)[0].shape == (16, 16, 16)


def test_phantom_never_overwrites_without_the_flag(tmp_path, capsys):
    out = tmp_path / "p.nii.gz"
    out.write_bytes(b"keep")
    assert _cli("phantom", str(out), "--shape", "16", "16", "16") == 2
    assert out.read_bytes() == b"keep"


def test_our_own_output_of_another_model_is_replaced_by_translate_only_with_the_flag(
    tmp_path, hostile_cascade, hostile_model, capsys
):
    small_volume(tmp_path / "in.zarr")
    out = tmp_path / "out.zarr"
    task = volume_task(str(tmp_path / "in.zarr"), "", "other/1", output=str(out))
    translate_volume(task, hostile_cascade)  # msgan's own output, of another model version
    assert _cli("translate", str(tmp_path / "in.zarr"), str(out), "--model", hostile_model, "--quiet") == 2
    assert "other/1" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["model"] == "other/1"
    assert _cli("translate", str(tmp_path / "in.zarr"), str(out), "--model", hostile_model, "--replace") == 0
    assert json.loads((out / "manifest.json").read_text())["model"] != "other/1"
    assert sorted(os.listdir(tmp_path)) == ["in.zarr", "out.zarr"], "no empty .leases / .staging left beside it"


def test_batch_refuses_a_foreign_output_and_goes_on(tmp_path, hostile_cascade):
    small_volume(tmp_path / "in.zarr")
    out = tmp_path / "out" / "in.zarr"
    out.mkdir(parents=True)
    (out / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')  # a zarr store, not ours
    task = volume_task(str(tmp_path / "in.zarr"), str(tmp_path / "out"), "m/1")
    with pytest.raises(outputs.OutputError, match="not an output msgan published"):
        translate_volume(task, hostile_cascade)
    assert os.listdir(out) == ["zarr.json"]


# ----------------------------------------------------------------------------- declared sizes


def _edit_array(p: Path, shape=None, chunks=None) -> None:
    meta = json.loads((p / "0" / "zarr.json").read_text())
    if shape is not None:
        meta["shape"] = shape
    if chunks is not None:
        meta["chunk_grid"]["configuration"]["chunk_shape"] = chunks
    (p / "0" / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("shape", "chunks", "rule"),
    [
        ([100000] * 3, [64] * 3, "cap of .* voxels per volume"),
        ([100000] * 3, [100000] * 3, "cap of .* voxels per volume"),
        ([1024] * 3, [1024] * 3, r"per chunk"),
        ([1500] * 3, [16] * 3, r"830583 of the 830584 chunk\(s\) .* never written"),
        (None, [0, 16, 16], "positive size per axis"),
        ([0, 16, 16], None, "every side must be positive"),
    ],
)
def test_zarr_declared_sizes_are_checked_before_reading(tmp_path, shape, chunks, rule):
    p = tmp_path / "v.zarr"
    small_volume(p)
    _edit_array(p, shape, chunks)
    t0 = time.perf_counter()
    with pytest.raises(VolumeError, match=rule) as info:
        read_level(str(p))
    assert str(p) in str(info.value) and time.perf_counter() - t0 < 5.0


def test_zarr_bomb_is_refused_by_translate_export_and_ingest(tmp_path, hostile_model, capsys):
    p = tmp_path / "bomb.zarr"
    small_volume(p)
    _edit_array(p, [1500] * 3, [16] * 3)
    for args in (
        ["translate", str(p), str(tmp_path / "o.zarr"), "--model", hostile_model],
        ["translate", str(p), str(tmp_path / "o.nii.gz"), "--model", hostile_model],
        ["preview", str(p), str(tmp_path / "p.png")],
    ):
        assert _cli(*args) == 2, args
        assert "never written" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["bomb.zarr"]


@pytest.mark.parametrize("kind", ["symlink", "fifo", "devzero"])
def test_chunk_files_that_are_not_regular_files_are_refused(tmp_path, kind):
    p = tmp_path / "v.zarr"
    small_volume(p)
    chunk = p / "0" / "c" / "0" / "0" / "0"
    chunk.unlink()
    if kind == "fifo":
        os.mkfifo(chunk)
    else:
        (tmp_path / "other").write_bytes(b"x" * 10)
        chunk.symlink_to("/dev/zero" if kind == "devzero" else tmp_path / "other")
    with pytest.raises(VolumeError, match=r"c/0/0/0 of array '0' is (a symlink|a FIFO)"):
        read_level(str(p))


def _nifti_header(shape, path: Path) -> None:
    """A real NIfTI file, then its header's dims rewritten: the header claims ``shape``, the file holds 8^3."""
    write_volume(path, np.zeros((8, 8, 8), np.float32), GEOM)
    raw = bytearray(path.read_bytes())
    dims = np.frombuffer(bytes(raw[40:56]), "<i2").copy()
    dims[1:4] = shape[::-1]
    raw[40:56] = dims.tobytes()
    path.write_bytes(bytes(raw))


def test_nifti_header_declaring_more_than_the_file_holds_is_refused(tmp_path):
    big = tmp_path / "big.nii"
    _nifti_header((4000, 4000, 4000), big)
    with pytest.raises(VolumeError, match=r"big\.nii: declares shape .* above the cap"):
        read_volume(big)
    short = tmp_path / "short.nii"
    _nifti_header((200, 200, 200), short)
    with pytest.raises(VolumeError, match=r"short\.nii: its header declares .* truncated or forged"):
        read_volume(short)


@pytest.mark.parametrize("target", ["/dev/zero", "../outside.raw", "missing.raw", "LIST"])
def test_mha_data_file_outside_its_folder_is_refused(tmp_path, target):
    (tmp_path / "outside.raw").write_bytes(b"\0" * 4096)
    (tmp_path / "d").mkdir()
    mhd = tmp_path / "d" / "x.mha"
    mhd.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_FLOAT\n"
        f"ElementSpacing = 1 1 1\nElementDataFile = {target}\n"
    )
    with pytest.raises(VolumeError, match=r"x\.mha: .*data file"):
        read_volume(mhd)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".zarr"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_are_refused_in_every_format(tmp_path, suffix, bad):
    img = np.zeros((8, 8, 8), np.float32)
    img[3, 4, 5] = bad
    path = tmp_path / f"v{suffix}"
    _write_unchecked(path, img)
    with pytest.raises(VolumeError, match=f"v{suffix}: 1 voxel.* NaN or infinite"):
        read_volume(path)


def _write_unchecked(path: Path, img: np.ndarray) -> None:
    """A file as another program writes it: msgan's own writer refuses non-finite voxels."""
    from msgan.io.volume import write_zarr

    if path.suffix == ".zarr":
        write_zarr(path, [img], GEOM)
    else:
        write_unchecked(path, img, GEOM)


def test_nan_nifti_is_refused_by_translate(tmp_path, hostile_model, capsys):
    img = np.zeros((16, 16, 16), np.float32)
    img[0, 0, 0] = np.nan
    _write_unchecked(tmp_path / "in.nii.gz", img)
    assert _cli("translate", str(tmp_path / "in.nii.gz"), str(tmp_path / "o.nii.gz"), "--model", hostile_model) == 2
    assert "NaN" in capsys.readouterr().err and not (tmp_path / "o.nii.gz").exists()


# ----------------------------------------------------------------------------- leases know their holder


def _lease_uri(tmp_path: Path) -> str:
    return storage.normalize_uri(tmp_path / ".leases" / "x.zarr.json")


def test_a_killed_runs_lease_on_this_host_is_taken_over_at_once(tmp_path):
    uri = _lease_uri(tmp_path)
    code = "import sys, time; from msgan import lease; lease.acquire(lease.Lease(sys.argv[1], 'dead'), 'x'); " \
           "print('held', flush=True); time.sleep(60)"  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(lease.LeaseError, match=rf"run dead \(host .*pid {proc.pid}"):
            lease.acquire(lease.Lease(uri, "mine"), "x")  # alive: refused, naming who and how to clear it
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lease.acquire(lease.Lease(uri, "mine"), "x")  # dead: taken over at once, no 6 h wait
    assert lease.holder(uri)["run"] == "mine"


def test_a_recycled_pid_does_not_keep_a_lease_alive(tmp_path):
    uri = _lease_uri(tmp_path)
    Path(storage.local_path(uri)).parent.mkdir(parents=True)
    import socket

    body = {"run": "old", "time": time.time(), "host": socket.gethostname(), "pid": os.getpid(), "started": 1.0}
    Path(storage.local_path(uri)).write_text(json.dumps(body))  # our pid, but a process started in 1970
    lease.acquire(lease.Lease(uri, "mine"), "x")
    assert lease.holder(uri)["run"] == "mine"


def test_another_hosts_lease_lives_while_its_heartbeat_is_fresh(tmp_path):
    uri = _lease_uri(tmp_path)
    Path(storage.local_path(uri)).parent.mkdir(parents=True)
    body = {"run": "remote", "time": time.time(), "host": "node-7", "pid": 1}
    Path(storage.local_path(uri)).write_text(json.dumps(body))
    with pytest.raises(lease.LeaseError, match=f"host node-7.*remove {uri}"):
        lease.acquire(lease.Lease(uri, "mine"), "x")
    body["time"] = time.time() - lease.DEFAULT_TTL_S - 1  # its heartbeat stopped
    Path(storage.local_path(uri)).write_text(json.dumps(body))
    lease.acquire(lease.Lease(uri, "mine"), "x")
    assert lease.holder(uri)["run"] == "mine"


def test_heartbeat_renews_and_stops_before_release(tmp_path):
    held = lease.Lease(_lease_uri(tmp_path), "mine")
    lease.acquire(held, "x")
    first = lease.holder(held.uri)["time"]
    with lease.Heartbeat([held], every=0.05):
        time.sleep(0.3)
    assert lease.holder(held.uri)["time"] > first
    lease.release(held)
    time.sleep(0.1)
    assert lease.holder(held.uri) is None and not (tmp_path / ".leases").exists(), "released, folder removed"


def test_rerun_after_kill_9_needs_no_hand(tmp_path, hostile_model):
    """A translation killed mid-run (here: right after staging, holding its lease) leaves a lease and a staging
    folder; the rerun takes the lease over, sweeps the staging and publishes; nothing is left beside the output."""
    small_volume(tmp_path / "in.zarr", shape=(24, 24, 24))
    out = tmp_path / "out" / "in.zarr"
    code = (
        "import sys, time\nfrom msgan.volumes.pinning import pin\n"
        "from msgan.volumes.staging import plan_volume, stage\n"
        "from msgan.volumes.tasks import volume_task\nplan = pin(sys.argv[1])\nc = plan.load()\n"
        "t = volume_task(sys.argv[2], '', plan.model_id, output=sys.argv[3], run='killed')\n"
        "from msgan import lease\nlease.acquire(t.lease, t.output)\n"
        "stage(t, c.config, plan_volume(t, c))\nprint('staged', flush=True)\ntime.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, hostile_model, str(tmp_path / "in.zarr"), str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "staged"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert os.listdir(tmp_path / "out" / ".staging") and os.listdir(tmp_path / "out" / ".leases")
    assert main(["translate", str(tmp_path / "in.zarr"), str(out), "--model", hostile_model, "--quiet"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["in.zarr"], "the dead run's staging swept, empty folders removed"


def test_batch_on_a_multi_node_cluster_refuses_node_local_paths(monkeypatch, tmp_path):
    """The training job's shared-storage rule, for the batch path (the node count is what is faked here)."""
    import ray

    from msgan.distributed.translate import check_shared

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}])
    monkeypatch.delenv("MSGAN_SHARED_PATHS", raising=False)
    with pytest.raises(ValueError, match=r"input .* local path, but the Ray cluster has 2 nodes"):
        check_shared([str(tmp_path / "in")], str(tmp_path / "out"))
    monkeypatch.setenv("MSGAN_SHARED_PATHS", str(tmp_path))
    check_shared([str(tmp_path / "in")], str(tmp_path / "out"))
    check_shared(["s3://b/in"], "s3://b/out")


def test_write_zarr_without_replace_never_removes(tmp_path):
    p = tmp_path / "v.zarr"
    p.mkdir()
    (p / "keep").write_text("x")
    with pytest.raises(FileExistsError):
        write_volume(p, np.zeros((4, 4, 4), np.float32), GEOM, replace=False)
    assert (p / "keep").read_text() == "x"
    shutil.rmtree(p)
    sitk_file = tmp_path / "f.nii.gz"
    sitk_file.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        write_volume(sitk_file, np.zeros((4, 4, 4), np.float32), GEOM, replace=False)
    assert sitk_file.read_bytes() == b"keep" and sitk is not None


@pytest.mark.parametrize("layout", ["bare", "ome"])
def test_a_foreign_zarr_declaring_more_than_it_stores_is_refused_by_ingest(tmp_path, layout):
    import zarr

    from msgan.io.convert import ingest

    src = tmp_path / "foreign.zarr"
    if layout == "bare":
        arr = zarr.create_array(str(src), shape=(16, 16, 16), chunks=(16, 16, 16), dtype="float32")
        meta_path = src / "zarr.json"
    else:
        group = zarr.open_group(str(src), mode="w")
        arr = group.create_array("s0", shape=(16, 16, 16), chunks=(16, 16, 16), dtype="float32")
        group.attrs["ome"] = {
            "version": "0.5",
            "multiscales": [{"axes": ["z", "y", "x"], "datasets": [{"path": "s0"}]}],
        }
        meta_path = src / "s0" / "zarr.json"
    arr[...] = 1.0
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [1500, 1500, 1500]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(VolumeError, match=r"foreign\.zarr: 830583 of the 830584 chunk\(s\) .* never written"):
        ingest(src, tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()


def test_a_zarr_compression_bomb_is_refused_before_reading(tmp_path):
    """Every declared chunk stored, each a copy of one ~50-byte zero chunk: 128 MiB declared in a few KB."""
    p = tmp_path / "bomb.zarr"
    small_volume(p, shape=(64, 64, 64))  # a real volume, then its shape grown and its one chunk copied everywhere
    (p / "0" / "c" / "0" / "0" / "0").write_bytes(_zero_chunk(tmp_path))
    _edit_array(p, [512, 256, 256], [64, 64, 64])
    for z in range(8):
        for y in range(4):
            for x in range(4):
                dest = p / "0" / "c" / str(z) / str(y) / str(x)
                dest.parent.mkdir(parents=True, exist_ok=True)
                if (z, y, x) != (0, 0, 0):
                    shutil.copyfile(p / "0" / "c" / "0" / "0" / "0", dest)
    with pytest.raises(VolumeError, match=r"bomb\.zarr: array '0': declares .* bytes .* stored in .* bytes"):
        read_level(str(p))


def _zero_chunk(tmp_path: Path) -> bytes:
    src = tmp_path / "zero.zarr"
    write_volume(src, np.zeros((64, 64, 64), np.float32), GEOM)
    return (src / "0" / "c" / "0" / "0" / "0").read_bytes()


@pytest.mark.parametrize("kind", ["fifo", "devzero", "huge"])
def test_zarr_metadata_that_is_not_a_small_regular_file_is_refused(tmp_path, kind, capsys):
    p = tmp_path / "v.zarr"
    small_volume(p)
    meta = p / "0" / "zarr.json"
    meta.unlink()
    if kind == "fifo":
        os.mkfifo(meta)
    elif kind == "devzero":
        meta.symlink_to("/dev/zero")
    else:
        with open(meta, "wb") as f:
            f.truncate(64 * 2**20)  # sparse: 64 MiB of metadata
    with pytest.raises(VolumeError, match=r"metadata file 0/zarr\.json is"):
        read_level(str(p))
    assert _cli("export", str(p), str(tmp_path / "o.nii.gz"), "--format", "nifti") == 2
    assert "zarr.json" in capsys.readouterr().err and not (tmp_path / "o.nii.gz").exists()


def test_a_chunk_file_far_larger_than_its_voxels_is_refused(tmp_path):
    p = tmp_path / "v.zarr"
    small_volume(p)
    with open(p / "0" / "c" / "0" / "0" / "0", "ab") as f:
        f.truncate(8 * 2**20)  # 8 MiB for a 16^3 float32 chunk (16 KiB)
    with pytest.raises(VolumeError, match=r"chunk c/0/0/0 of array '0' stores 8388608 bytes"):
        read_level(str(p))


def test_new_model_never_empties_a_folder_and_replaces_a_cascade_only_with_the_flag(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    cfg = ["--config", "configs/demo.yaml"]
    assert _cli("new-model", *cfg, str(folder)) == 2
    assert "notes.txt" in capsys.readouterr().err and (folder / "notes.txt").read_text() == "keep"
    assert _cli("new-model", *cfg, str(folder), "--replace") == 2, "--replace never replaces what is not a cascade"
    assert _cli("new-model", *cfg, str(tmp_path / "c")) == 0
    assert _cli("new-model", *cfg, str(tmp_path / "c"), "--seed", "1") == 2
    assert _cli("new-model", *cfg, str(tmp_path / "c"), "--seed", "1", "--replace") == 0


def test_preview_never_overwrites_its_input_or_another_file(tmp_path, capsys):
    write_volume(tmp_path / "q.nii.gz", np.zeros((8, 8, 8), np.float32), GEOM)
    before = (tmp_path / "q.nii.gz").read_bytes()
    assert _cli("preview", str(tmp_path / "q.nii.gz"), str(tmp_path / "q.nii.gz")) == 2
    assert (tmp_path / "q.nii.gz").read_bytes() == before and "is the input" in capsys.readouterr().err
    small_volume(tmp_path / "p.zarr")
    (tmp_path / "p.png").write_bytes(b"someone's picture")
    assert _cli("preview", str(tmp_path / "p.zarr")) == 2
    assert (tmp_path / "p.png").read_bytes() == b"someone's picture"
    assert _cli("preview", str(tmp_path / "p.zarr"), "--replace") == 0
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")


def test_export_never_writes_into_its_input_or_through_a_symlink(tmp_path, capsys):
    small_volume(tmp_path / "pe.zarr")
    before = snapshot(tmp_path / "pe.zarr")
    assert _cli("export", str(tmp_path / "pe.zarr"), str(tmp_path / "pe.zarr"), "--format", "nifti") == 2
    assert "is the input" in capsys.readouterr().err and snapshot(tmp_path / "pe.zarr") == before
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "dcm").symlink_to(tmp_path / "elsewhere")
    assert _cli("export", str(tmp_path / "pe.zarr"), str(tmp_path / "sub" / "dcm")) == 2
    assert "symlink" in capsys.readouterr().err and not os.listdir(tmp_path / "elsewhere")


def test_replace_covers_volumes_msgan_wrote_without_a_manifest(tmp_path, hostile_model, capsys):
    assert _cli("phantom", str(tmp_path / "p.zarr"), "--shape", "16", "16", "16") == 0
    assert _cli("phantom", str(tmp_path / "p.zarr"), "--shape", "16", "16", "16") == 2
    assert _cli("phantom", str(tmp_path / "p.zarr"), "--shape", "16", "16", "16", "--seed", "2", "--replace") == 0
    write_volume(tmp_path / "in.nii.gz", np.zeros((16, 16, 16), np.float32), GEOM)
    assert _cli("translate", str(tmp_path / "in.nii.gz"), str(tmp_path / "o.zarr"), "--model", hostile_model) == 0
    args = ["translate", str(tmp_path / "p.zarr"), str(tmp_path / "o.zarr"), "--model", hostile_model, "--quiet"]
    assert _cli(*args) == 2
    assert _cli(*args, "--replace") == 0 and (tmp_path / "o.zarr" / "manifest.json").exists()


def test_a_lease_from_another_pid_namespace_on_this_hostname_lives_by_its_heartbeat(tmp_path):
    """Containers with host networking share the hostname, not the PIDs: their pid means nothing here."""
    import socket

    uri = _lease_uri(tmp_path)
    Path(storage.local_path(uri)).parent.mkdir(parents=True)
    body = {"run": "pod", "time": time.time(), "host": socket.gethostname(), "ns": "other-boot|pid:[1]", "pid": 999999}
    Path(storage.local_path(uri)).write_text(json.dumps(body))
    with pytest.raises(lease.LeaseError, match="run pod"):
        lease.acquire(lease.Lease(uri, "mine"), "x")  # pid 999999 is dead here, but it is not our pid


def test_temporaries_of_a_killed_writer_are_swept_by_the_next_write(tmp_path):
    from msgan.storage import _temp_tag

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    tag = _temp_tag().replace(f"-{os.getpid()}-", f"-{int(dead.stdout)}-")
    (tmp_path / f"{tag}v.nii.gz").write_bytes(b"half")  # staged_file's temporary, its process gone
    (tmp_path / f"{tag}abc123-v.zarr").mkdir()  # staged_dir's
    live = tmp_path / f"{_temp_tag()}other.nii.gz"  # a live process's (ours): never touched
    live.write_bytes(b"busy")
    write_volume(tmp_path / "v.nii.gz", np.zeros((4, 4, 4), np.float32), GEOM)
    write_volume(tmp_path / "v.zarr", np.zeros((4, 4, 4), np.float32), GEOM)
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, "v.nii.gz", "v.zarr"])


def test_a_batch_with_nothing_to_translate_starts_no_ray(tmp_path, hostile_model):
    import ray

    from msgan.distributed.translate import translate_batch

    small_volume(tmp_path / "in" / "v.zarr")
    (tmp_path / "out" / "v.zarr").mkdir(parents=True)
    (tmp_path / "out" / "v.zarr" / "notes.txt").write_text("keep")
    assert not ray.is_initialized()
    report = translate_batch([str(tmp_path / "in")], str(tmp_path / "out"), hostile_model, log=lambda _: None)
    assert "notes.txt" in report.failed["v"] and not report.published
    assert not ray.is_initialized(), "refused before any work: no Ray started"
    assert sorted(os.listdir(tmp_path / "out")) == ["v.zarr"] and os.listdir(tmp_path / "out" / "v.zarr") == [
        "notes.txt"
    ]


@pytest.mark.parametrize(
    "edit, says",
    [
        ("nan", "NaN or infinite"),
        ("inf", "NaN or infinite"),
        ("zero spacing", "must be positive"),
        ("nan origin", "must be finite numbers"),
        ("flat direction", "must be unit vectors"),
        ("spacing as text", "must hold numbers"),
    ],
)
def test_export_refuses_non_finite_voxels_and_a_broken_geometry_and_writes_nothing(tmp_path, capsys, edit, says):
    """A volume whose values or stored geometry were damaged is refused by name at export, in both formats; before,
    a NaN became a NaN RescaleIntercept in every DICOM file, and a zero spacing a DICOM series all at one position."""
    import zarr

    small_volume(tmp_path / "v.zarr")
    group = zarr.open_group(str(tmp_path / "v.zarr"), mode="r+")
    meta = dict(group.attrs["msgan"])
    geom = dict(meta["geometry"])
    if edit in ("nan", "inf"):
        level = group["0"]
        assert isinstance(level, zarr.Array)
        level[3, 4, 5] = float(edit)
    else:
        key, value = {
            "zero spacing": ("spacing", [0.0, 0.0, 0.0]),
            "nan origin": ("origin", [0.0, float("nan"), 0.0]),
            "flat direction": ("direction", [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]),
            "spacing as text": ("spacing", ["1", "1", "1"]),
        }[edit]
        geom[key] = value
        group.attrs["msgan"] = {**meta, "geometry": geom}
    for fmt, out in (("dicom", tmp_path / "dcm"), ("nifti", tmp_path / "v.nii.gz")):
        assert _cli("export", str(tmp_path / "v.zarr"), str(out), "--format", fmt) == 2
        err = capsys.readouterr().err
        assert "v.zarr" in err and says in err, err
        assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["v.zarr"]
    if edit == "spacing as text":
        return
    from msgan.io.volume import Geometry

    # the writer itself refuses the same, whoever calls it
    direct = Geometry(*(tuple(float(v) for v in geom[k]) for k in ("spacing", "origin", "direction")))
    with pytest.raises(VolumeError, match=says):
        write_volume(tmp_path / "direct.nii.gz", np.asarray(group["0"][...]), direct)
    assert not (tmp_path / "direct.nii.gz").exists()


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
@pytest.mark.parametrize("how", ["after 64 KiB of padding", "LIST beside a file named LIST"])
def test_a_header_never_reads_another_folders_file_however_it_names_it(tmp_path, suffix, how):
    """The data file a header names is checked however far down the header it stands (a header longer than what
    is checked is refused), and a LIST of files is refused even where a file named LIST stands beside it."""
    secret = tmp_path / "other_patient" / "ct.raw"
    secret.parent.mkdir()
    np.full((4, 8, 8), 1234, "<i2").tofile(secret)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "LIST").write_bytes(b"\0" * 512)
    padding = [("# " if suffix == ".nrrd" else "Comment = ") + "x" * 200 for _ in range(340)]
    if suffix == ".mha":
        head = [
            "ObjectType = Image",
            "NDims = 3",
            "DimSize = 8 8 4",
            "ElementType = MET_SHORT",
            "ElementSpacing = 1 1 1",
        ]
        tail = [f"ElementDataFile = {secret}"] if how.startswith("after") else ["ElementDataFile = LIST", str(secret)]
    else:
        head = ["NRRD0004", "type: short", "dimension: 3", "sizes: 8 8 4", "encoding: raw", "endian: little",
                "space: left-posterior-superior", "space directions: (1,0,0) (0,1,0) (0,0,1)"]  # fmt: skip
        tail = [f"data file: {secret}", ""] if how.startswith("after") else ["data file: LIST", *[str(secret)] * 4, ""]
    lines = head + (padding if how.startswith("after") else []) + tail
    path = inbox / f"x{suffix}"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(VolumeError, match=r"x\.(mha|nrrd): .*(data file|header)"):
        read_volume(path)


def test_the_batch_report_never_replaces_a_users_file_or_a_manifest_and_is_checked_before_any_work(
    tmp_path, hostile_model, capsys
):
    """--report replaced any regular file (a user's notes, a published volume's manifest.json), and only after the
    whole batch had run; now a file that is not an earlier batch report, or a path among the published volumes, is
    refused before any work, and an earlier report is replaced."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "translate_batch", Path(__file__).parents[2] / "jobs" / "translate_batch.py"
    )
    assert spec is not None and spec.loader is not None
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    small_volume(tmp_path / "in" / "a.zarr")
    notes = tmp_path / "notes.txt"
    notes.write_text("two years of notes")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.json").write_text("{}")
    base = ["--model", hostile_model, "--inputs", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    for report, says in ((notes, "is not a batch report"), (tmp_path / "out" / "keep.json", "lies inside the output")):
        assert job.main([*base, "--report", str(report)]) == 2
        assert says in capsys.readouterr().err
    assert notes.read_text() == "two years of notes" and sorted(os.listdir(tmp_path / "out")) == ["keep.json"]
    earlier = tmp_path / "report.json"
    earlier.write_text(json.dumps({"model": "m", "run": "r", "published": [], "failed": {}}))
    # an earlier report is the one file replaced (checked alone: a run of the batch costs a Ray start)
    where = job._report_destination(str(earlier), [str(tmp_path / "in")], str(tmp_path / "out"))
    assert storage.local_path(where) == earlier
