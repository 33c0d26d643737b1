"""Leases: at most one run publishes an output at a time, and a retry of that run is not locked out.

A lease is a small JSON object beside the outputs (``<prefix>/.leases/<output name>.json``)
created exclusively: an ``O_EXCL`` file on ``file://``, a conditional put
(``IfNoneMatch="*"``, HTTP 412 when it exists) on ``s3://``. It names the run that holds it;
the same run (a Ray retry of one of its tasks) holds it again, another run is refused until
the lease is released or older than its time to live (a killed run), when it may be taken over.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msgan import storage

DEFAULT_TTL_S = 6 * 3600.0  # a run refreshes its leases between scales; older ones are dead


class LeaseError(RuntimeError):
    """Another run holds the lease; the message names the output, that run and since when."""


@dataclass(frozen=True)
class Lease:
    uri: str  # where the lease object lives
    run: str  # the run that wants / holds it
    ttl_s: float = DEFAULT_TTL_S


def new_run_id() -> str:
    """A sortable, unique run id: UTC time + random suffix (no path separators)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + uuid.uuid4().hex[:8]


def _body(run: str) -> bytes:
    return json.dumps({"run": run, "time": time.time(), "host": socket.gethostname(), "pid": os.getpid()}).encode()


def _s3_client() -> Any:
    import boto3

    opts = storage.s3_options()
    region = opts.get("client_kwargs", {}).get("region_name")
    return boto3.client("s3", endpoint_url=opts.get("endpoint_url"), region_name=region)


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def _create_exclusive(uri: str, data: bytes) -> bool:
    """Create ``uri`` holding ``data`` unless it exists; True when this call created it."""
    if storage.is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = _split_s3(uri)
        try:
            _s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            raise
        return True
    path = storage.local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def holder(uri: str) -> dict[str, Any] | None:
    """The lease's content, or None when there is none (an unreadable lease counts as held by nobody)."""
    try:
        data = json.loads(storage.read_bytes(uri))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    except OSError:
        if not storage.exists(uri):
            return None
        raise
    return data if isinstance(data, dict) and isinstance(data.get("run"), str) else None


def _expired(info: dict[str, Any], ttl_s: float) -> bool:
    return time.time() - float(info.get("time", 0.0)) > ttl_s


def _remove_stale(uri: str, seen: dict[str, Any]) -> None:
    """Remove a stale lease. On ``file://`` by renaming it aside first: only one taker wins the rename."""
    if storage.is_s3(uri):
        bucket, key = _split_s3(uri)
        _s3_client().delete_object(Bucket=bucket, Key=key)
        return
    path = storage.local_path(uri)
    aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if (holder(storage.normalize_uri(aside)) or {}).get("run") != seen.get("run"):
        os.rename(aside, path)  # it was refreshed meanwhile: put it back, the next attempt refuses
        return
    aside.unlink(missing_ok=True)


def acquire(lease: Lease, what: str) -> None:
    """Hold ``lease`` for ``lease.run`` or raise :class:`LeaseError` naming the run that holds it."""
    for _ in range(3):
        if _create_exclusive(lease.uri, _body(lease.run)):
            if (holder(lease.uri) or {}).get("run") == lease.run:
                return
            continue
        info = holder(lease.uri)
        if info is None:
            _remove_stale(lease.uri, {})
            continue
        if info["run"] == lease.run:
            refresh(lease)
            return
        if _expired(info, lease.ttl_s):
            _remove_stale(lease.uri, info)
            continue
        since = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(float(info.get("time", 0.0))))
        raise LeaseError(
            f"{what}: run {info['run']} (host {info.get('host', '?')}) has been publishing it since {since}; "
            f"this run ({lease.run}) does not touch it. Retry when that run ends (a killed run's lease "
            f"expires after {lease.ttl_s / 3600:.1f} h)"
        )
    raise LeaseError(f"{what}: could not take the lease {lease.uri} (contended by several runs); retry")


def holds(lease: Lease) -> bool:
    info = holder(lease.uri)
    return info is not None and info["run"] == lease.run


def refresh(lease: Lease) -> None:
    """Renew the lease's time (only its own run does this)."""
    if holds(lease):
        storage.write_bytes(lease.uri, _body(lease.run))


def release(lease: Lease) -> None:
    """Drop the lease if this run holds it."""
    if not holds(lease):
        return
    if storage.is_s3(lease.uri):
        bucket, key = _split_s3(lease.uri)
        _s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        Path(storage.local_path(lease.uri)).unlink(missing_ok=True)
