"""Leases: at most one run publishes an output at a time, and a retry of that run is not locked out.

A lease is a small JSON object beside the outputs (``<prefix>/.leases/<output name>.json``)
created exclusively: an ``O_EXCL`` file on ``file://``, a conditional put
(``IfNoneMatch="*"``, HTTP 412 when it exists) on ``s3://``. It names the run that holds it and the
process: host, pid and that process's start time. The same run (a Ray retry of one of its tasks) holds
it again; another run is refused while the holder lives. Whether it lives:

- on this host: its process exists and started when the lease says (a recycled pid is another process);
  a killed run's lease is taken over at once;
- on another host: its heartbeat (:class:`Heartbeat`, every :data:`HEARTBEAT_S`) is younger than the
  lease's time to live (:data:`DEFAULT_TTL_S`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msgan import storage

HEARTBEAT_S = 30.0  # a holder renews its leases this often
DEFAULT_TTL_S = 10 * HEARTBEAT_S  # a lease on another host whose heartbeat is older than this is dead


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


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), None when there is no such process."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:  # exists, but cannot be inspected (another user's): alive as far as we can tell
        return -1.0


@functools.cache
def _namespace() -> str:
    """This machine's boot and PID namespace: two containers that share a hostname (host networking) but not
    their PIDs differ here, so a pid is judged only inside the namespace that recorded it."""
    parts = []
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(Path(path).read_text().strip() if path.endswith("boot_id") else os.readlink(path))
        except OSError:
            parts.append("?")
    return "|".join(parts)


@functools.lru_cache(maxsize=4)
def _own_start(pid: int) -> float | None:
    """This process's start time (keyed by pid: a forked child is another process)."""
    return _process_start(pid)


def _body(run: str) -> bytes:
    pid = os.getpid()
    return json.dumps(
        {"run": run, "time": time.time(), "host": socket.gethostname(), "ns": _namespace(), "pid": pid,
         "started": _own_start(pid)}
    ).encode()  # fmt: skip


def alive(info: dict[str, Any], ttl_s: float = DEFAULT_TTL_S) -> bool:
    """Whether the holder named by a lease's content still runs (see the module's rules)."""
    ns = _namespace()
    same_ns = info.get("ns", ns) == ns  # leases written before "ns" existed: same host, same ns
    if info.get("host") == socket.gethostname() and same_ns and isinstance(info.get("pid"), int):
        started = _process_start(int(info["pid"]))
        if started is None:
            return False  # its process is gone
        recorded = info.get("started")
        # the pid may now belong to another process: alive only if it started when the lease says
        return not (isinstance(recorded, (int, float)) and started >= 0 and abs(started - float(recorded)) > 1.0)
    try:
        return time.time() - float(info.get("time", 0.0)) <= ttl_s
    except (TypeError, ValueError):
        return False


def describe(info: dict[str, Any], uri: str) -> str:
    """Who holds a lease and how to clear it, for messages."""
    try:
        age = f"{time.time() - float(info.get('time', 0.0)):.0f} s ago"
    except (TypeError, ValueError):
        age = "at an unknown time"
    return (
        f"run {info.get('run')} (host {info.get('host', '?')}, pid {info.get('pid', '?')}, last heartbeat {age}) "
        f"holds it. If that run is dead and its host cannot tell (another host), remove {uri} to clear it"
    )


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
        if not alive(info, lease.ttl_s):
            _remove_stale(lease.uri, info)
            continue
        raise LeaseError(
            f"{what}: another run is publishing it; this run ({lease.run}) does not touch it. "
            f"{describe(info, lease.uri)} (a killed run on this host is taken over at once, one on another host "
            f"when its heartbeat is {lease.ttl_s:.0f} s old)"
        )
    raise LeaseError(f"{what}: could not take the lease {lease.uri} (contended by several runs); retry")


def holds(lease: Lease) -> bool:
    info = holder(lease.uri)
    return info is not None and info["run"] == lease.run


_RENEWING = threading.Lock()  # a renewal and a release never interleave (a renewal must not recreate a lease)


def refresh(lease: Lease) -> None:
    """Renew the lease's time (only its own run does this)."""
    with _RENEWING:
        if holds(lease):
            storage.write_bytes(lease.uri, _body(lease.run))


def release(lease: Lease) -> None:
    """Drop the lease if this run holds it (and the ``.leases`` folder when it is left empty)."""
    with _RENEWING:
        _release(lease)


def _release(lease: Lease) -> None:
    if not holds(lease):
        return
    if storage.is_s3(lease.uri):
        bucket, key = _split_s3(lease.uri)
        _s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        path = Path(storage.local_path(lease.uri))
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # other leases (or something else) are there
            path.parent.rmdir()


class Heartbeat:
    """Renews ``leases`` every ``every`` seconds on a daemon thread while the ``with`` block runs, so another
    host sees the run alive however long a scale takes; stopped (and joined) before the block's leases are
    released, so a renewal never recreates a released lease."""

    def __init__(self, leases: Iterable[Lease], every: float = HEARTBEAT_S) -> None:
        self.leases, self.every = list(leases), every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="msgan-lease-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            for held in self.leases:
                with contextlib.suppress(OSError):  # storage unreachable for a moment: the next beat tries again
                    refresh(held)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
