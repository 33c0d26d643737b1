"""Start and stop only the Ray clusters a test started itself.

`ray stop --force` stops every Ray cluster on the machine (another engineer's, a user's, another test's).
A test instead gives its cluster its own temp dir (`ray start --head --temp-dir DIR`, or `RAY_TMPDIR=DIR`
for the local Ray a job's `ray.init()` starts) and stops exactly the processes that name that dir on
their command line, the client server that names that cluster's GCS address, and their descendants.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def short_temp_dir(prefix: str = "msgan-ray-") -> Path:
    """A fresh, short directory for a Ray cluster (Ray's unix socket paths must stay under 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _names(arg: str, marker: str) -> bool:
    return arg.endswith(marker) or f"{marker}/" in arg


def _gcs_addresses(temp_dir: Path) -> set[str]:
    """GCS addresses of the clusters started under ``temp_dir`` (``ray_current_cluster`` files)."""
    return {p.read_text().strip() for p in temp_dir.rglob("ray_current_cluster") if p.is_file()}


def ray_processes(temp_dir: Path) -> list[psutil.Process]:
    """Processes of the Ray cluster(s) started under ``temp_dir``, with their descendants; nothing else."""
    marker = str(temp_dir).rstrip("/")
    addresses = {f"--address={a}" for a in _gcs_addresses(temp_dir)}
    roots: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info["cmdline"] or []
        if any(_names(a, marker) or a in addresses for a in args):
            roots[proc.pid] = proc
    found = dict(roots)
    for proc in roots.values():
        try:
            found.update({child.pid: child for child in proc.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_ray(temp_dir: Path, timeout: float = 30.0, remove: bool = True) -> int:
    """SIGKILL the processes of the cluster(s) under ``temp_dir`` (what `ray stop --force` does, to those
    only), then remove ``temp_dir`` (unless ``remove`` is false); returns how many processes there were.
    Searches again until none are left: a dying raylet may still be starting workers."""
    total: set[int] = set()
    deadline = time.time() + timeout
    while procs := ray_processes(temp_dir):
        if time.time() > deadline:
            raise RuntimeError(f"Ray processes under {temp_dir} survived SIGKILL: {[p.pid for p in procs]}")
        total.update(p.pid for p in procs)
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(procs, timeout=3)
    if remove:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return len(total)


@contextmanager
def ray_head(env: dict[str, str], *args: str, temp_dir: Path | None = None) -> Iterator[Path]:
    """`ray start --head` with its own temp dir and the given extra ``args``; stops exactly that cluster after.

    Yields the temp dir. Give explicit ports (``--port``, ``--dashboard-port``, ``--ray-client-server-port``)
    so the cluster does not collide with others on the machine."""
    temp_dir = temp_dir or short_temp_dir()
    start = subprocess.run(
        [RAY, "start", "--head", f"--temp-dir={temp_dir}", "--disable-usage-stats", *args],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    try:
        if start.returncode != 0:
            raise RuntimeError(f"ray start --head failed (exit {start.returncode}): {start.stderr[-3000:]}")
        yield temp_dir
    finally:
        stop_ray(temp_dir)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
