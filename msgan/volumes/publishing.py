"""Publishing a staged volume whole: every level checked complete and checksummed, the manifest written, and
the output appearing at once (an atomic exchange on ``file://``; on ``s3://`` a copy whose ``manifest.json``
is written last); discarding a failed volume's staging; sweeping staging left by dead runs."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import posixpath
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from msgan import lease, storage
from msgan.io import outputs
from msgan.io.volume import VolumeError, ome_attrs, open_group
from msgan.normalize import NORMALISED_UNITS
from msgan.volumes.staging import RUN_FILE, VolumePlan, array
from msgan.volumes.tasks import MANIFEST, PUBLISHING, VolumeTask, is_ours, parent_of


def checksum(result: zarr.Group, n: int, name: str) -> str:
    """sha256 of every level's float32 bytes, read chunk-row by chunk-row; NaN means a tile was never written
    (a :class:`VolumeError` naming the level, chunk and first voxel)."""
    h = hashlib.sha256()
    for k in range(n):
        arr = array(result, str(k))
        step = arr.chunks[0]
        for a in range(0, arr.shape[0], step):
            block = np.asarray(arr[a : a + step])
            if np.isnan(block).any():
                first = np.argwhere(np.isnan(block))[0]
                voxel = (a + int(first[0]), *(int(i) for i in first[1:]))
                key = arr.metadata.encode_chunk_key(tuple(v // c for v, c in zip(voxel, arr.chunks, strict=True)))
                raise VolumeError(
                    f"{name}: output level {k} chunk {key} has unwritten voxels (first at {voxel}; "
                    "a tile was lost or an input chunk was missing); not published"
                )
            h.update(np.ascontiguousarray(block, dtype=np.float32).tobytes())
    return h.hexdigest()


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_dir(new: Path, dest: Path) -> None:
    """Put ``new`` at ``dest``; an old ``dest`` is removed only once ``new`` is in its place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        os.rename(new, dest)
        return
    if exchange(new, dest):
        shutil.rmtree(new, ignore_errors=True)  # the old output, now at the staging path
        return
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    os.rename(dest, old)  # fallback: a moment without an output, never a mix of two
    try:
        os.rename(new, dest)
    except OSError:
        os.rename(old, dest)  # the previous output back in its place: a failed publish loses nothing
        raise
    shutil.rmtree(old, ignore_errors=True)


def publish(task: VolumeTask, info: dict[str, Any], volumes: bool = False) -> dict[str, Any]:
    """Check, checksum and publish the staged output (the run must hold the output's lease); it replaces
    only msgan's own output (with ``volumes``, also a zarr volume msgan wrote). Returns the manifest."""
    vplan = VolumePlan.staged(task)
    result = open_group(task.result_uri, "r+")
    digest = checksum(result, vplan.num_scales, task.name)
    result.attrs["ome"] = ome_attrs(list(vplan.shapes[::-1]), vplan.geometry, task.name)  # finest first
    source = {k: v for k, v in vplan.source.items() if k != "geometry"}
    attrs: dict[str, Any] = {"geometry": vplan.geometry.as_dict(), "source": source, "translated_by": task.model}
    if vplan.scaling is not None:  # the values are in the target domain's normalised units (msgan.normalize)
        attrs["intensity"] = {"units": NORMALISED_UNITS, "source_scaling": vplan.scaling.to_dict()}
    result.attrs["msgan"] = attrs
    from msgan.preview import PREVIEW, preview_volume  # source beside result, published with the volume

    preview_volume(task.result_uri, storage.join(task.result_uri, PREVIEW), source=task.input)
    manifest = {
        "preview": PREVIEW,
        "volume": task.name,
        "input": task.input,
        "model": task.model,
        "run": task.run,
        "shape": list(vplan.shapes[-1]),
        "tiles": list(vplan.tiles),
        "checksum_sha256": digest,
        **({} if vplan.scaling is None else {"source_scaling": vplan.scaling.to_dict()}),
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **info,
    }
    if task.run and not lease.holds(task.lease):
        raise VolumeError(
            f"{task.name}: this run ({task.run}) no longer holds the lease on {task.output}; not published"
        )
    # again at the last moment: only msgan's own output is replaced
    outputs.refuse_foreign(task.output, lambda u: is_ours(u) or (volumes and outputs.is_msgan_volume(u)))
    if storage.is_s3(task.output):
        _publish_s3(task, manifest)
    else:
        src_path, dst_path = storage.local_path(task.result_uri), storage.local_path(task.output)
        (src_path / MANIFEST).write_text(json.dumps(manifest, indent=2))
        replace_dir(src_path, dst_path)  # the output appears whole, manifest included
        shutil.rmtree(storage.local_path(task.staging), ignore_errors=True)
        outputs.remove_empty_dirs(parent_of(task.staging))
    return manifest


def _publish_s3(task: VolumeTask, manifest: dict[str, Any]) -> None:
    """Copy the staged output over the old one; ``manifest.json`` (which names exactly what is there) last."""
    fs, src = storage.filesystem(task.result_uri)
    _, dst = storage.filesystem(task.output)
    fs.invalidate_cache()  # listings cached by s3fs predate this run's writes
    new_keys = {key[len(src) :] for key in fs.find(src)}
    manifest["objects"] = len(new_keys) + 1
    text = json.dumps(manifest, indent=2)
    if fs.exists(f"{dst}/{MANIFEST}"):
        storage.write_text(storage.join(task.output, PUBLISHING), json.dumps({"run": task.run}))
        fs.rm(f"{dst}/{MANIFEST}")  # unpublished from here until the new manifest lands
    for rel in sorted(new_keys):
        fs.copy(src + rel, dst + rel)
    stale = {key[len(dst) :] for key in fs.find(dst)} - new_keys - {f"/{PUBLISHING}"}
    for rel in sorted(stale):
        fs.rm(dst + rel)
    storage.write_text(storage.join(task.output, MANIFEST), text)  # last: it names exactly what is there
    if fs.exists(f"{dst}/{PUBLISHING}"):
        fs.rm(f"{dst}/{PUBLISHING}")
    fs.rm(storage.filesystem(task.staging)[1], recursive=True)


def discard(task: VolumeTask) -> None:
    """Remove a volume's staging (after a failure); nothing of it was published."""
    fs, path = storage.filesystem(task.staging)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    outputs.remove_empty_dirs(parent_of(task.staging))


def sweep_staging(out_parent: str, ttl_s: float = lease.DEFAULT_TTL_S) -> list[str]:
    """Remove staging folders under ``<out_parent>/.staging`` left by dead runs: whose run does not
    hold its output's lease (or the lease expired), or, without a run record, older than ``ttl_s``."""
    fs, path = storage.filesystem(storage.join(out_parent, ".staging"))
    if not fs.exists(path):
        return []
    removed = []
    scheme = "s3://" if storage.is_s3(out_parent) else "file://"
    for entry in fs.ls(path, detail=False):
        uri = scheme + entry.lstrip("/") if scheme == "s3://" else scheme + entry
        alive = _staging_alive(fs, entry, uri, ttl_s, out_parent)
        if alive is False:
            try:
                fs.rm(entry, recursive=True)
                removed.append(uri)
            except FileNotFoundError:
                pass
    outputs.remove_empty_dirs(storage.join(out_parent, ".staging"))
    return removed


def _staging_alive(fs: Any, entry: str, uri: str, ttl_s: float, out_parent: str = "") -> bool | None:
    """Whether the run that made staging folder ``uri`` may still be at work (None: unreadable, kept). Its run
    record is a file in the staging folder, so untrusted: it is used only when it names an output of
    ``out_parent`` (the lease looked at is then that output's), else the folder's age decides."""
    try:
        record = json.loads(storage.read_text(storage.join(uri, RUN_FILE)))
    except (FileNotFoundError, ValueError):  # not JSON, not UTF-8: no record
        record = None
    except OSError:
        return None
    output = record.get("output") if isinstance(record, dict) else None
    if isinstance(output, str) and isinstance(record.get("run"), str):  # type: ignore[union-attr]
        parent, base = posixpath.split(output.rstrip("/"))
        try:
            ours = bool(base) and (not out_parent or storage.normalize_uri(parent) == storage.normalize_uri(out_parent))
        except ValueError:  # a URI of no store msgan writes: not a record of this folder's runs
            ours = False
        if ours:
            try:
                info = lease.holder(f"{parent}/.leases/{base}.json")
            except (OSError, ValueError):
                return None
            return info is not None and info["run"] == record["run"] and lease.alive(info, ttl_s)  # type: ignore[index]
    try:
        return time.time() - float(fs.modified(entry).timestamp()) <= ttl_s
    except (OSError, NotImplementedError, AttributeError):
        return True
