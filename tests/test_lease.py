"""msgan.lease on file://: one run publishes an output at a time, its retry is not locked out, and a dead holder
is taken over (the s3:// conditional put runs in the batch tests against moto)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from msgan import lease, storage
from msgan.lease import Lease, LeaseError


def _lease(tmp_path, run, **kw):
    return Lease(storage.normalize_uri(tmp_path / "out" / ".leases" / "v.zarr.json"), run, **kw)


def _write(tmp_path, body):
    path = tmp_path / "out" / ".leases" / "v.zarr.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body if isinstance(body, str) else json.dumps(body))


def test_one_run_holds_its_retry_holds_again_another_is_refused(tmp_path):
    a, b = _lease(tmp_path, "runA"), _lease(tmp_path, "runB")
    lease.acquire(a, "v.zarr")
    assert lease.holds(a) and not lease.holds(b)
    first = lease.holder(a.uri)["time"]
    time.sleep(0.01)
    lease.acquire(a, "v.zarr")  # a Ray retry of the same run
    assert lease.holder(a.uri)["time"] > first  # renewed, not refused
    with pytest.raises(LeaseError, match=r"v\.zarr: another run is publishing it; this run \(runB\).*run runA \(host"):
        lease.acquire(b, "v.zarr")
    lease.release(b)  # not its lease: nothing happens
    assert lease.holds(a)
    lease.release(a)
    assert not (tmp_path / "out" / ".leases").exists()  # the empty folder goes with the last lease
    lease.acquire(b, "v.zarr")
    assert lease.holds(b)


def test_a_killed_runs_lease_on_this_host_is_taken_over_at_once(tmp_path):
    a = _lease(tmp_path, "runA")
    code = f"from msgan import lease; lease.acquire(lease.Lease({a.uri!r}, 'runA'), 'v.zarr')"
    subprocess.run([sys.executable, "-c", code], check=True)  # it acquires, then dies without releasing
    assert lease.holder(a.uri)["run"] == "runA" and not lease.alive(lease.holder(a.uri))
    b = _lease(tmp_path, "runB")
    lease.acquire(b, "v.zarr")
    assert lease.holds(b)
    assert not list((tmp_path / "out" / ".leases").glob(".*stale*"))  # the stale one was removed, not left aside


def test_a_recycled_pid_is_not_the_holder():
    me = json.loads(lease._body("runA"))
    assert lease.alive(me)  # this very process
    assert not lease.alive({**me, "started": me["started"] - 3600})  # the same pid, another process's start


def test_a_holder_on_another_host_lives_as_long_as_its_heartbeat(tmp_path):
    other = {"run": "runA", "host": socket.gethostname() + "-other", "pid": os.getpid(), "started": 0.0}
    assert lease.alive({**other, "time": time.time()}, ttl_s=60)
    assert not lease.alive({**other, "time": time.time() - 61}, ttl_s=60)
    assert not lease.alive({**other, "time": "garbage"}, ttl_s=60)
    _write(tmp_path, {**other, "time": time.time()})
    with pytest.raises(LeaseError, match=r"run runA \(host .*-other, pid \d+, last heartbeat \d+ s ago\)"):
        lease.acquire(_lease(tmp_path, "runB", ttl_s=60), "v.zarr")
    _write(tmp_path, {**other, "time": time.time() - 61})
    b = _lease(tmp_path, "runB", ttl_s=60)
    lease.acquire(b, "v.zarr")
    assert lease.holds(b)


@pytest.mark.parametrize("body", ["", "{not json", '["a list"]', '{"run": 7}'])
def test_an_unreadable_lease_is_held_by_nobody(tmp_path, body):
    _write(tmp_path, body)
    b = _lease(tmp_path, "runB")
    assert lease.holder(b.uri) is None
    lease.acquire(b, "v.zarr")
    assert lease.holds(b)


def test_the_heartbeat_renews_and_releases(tmp_path):
    a = _lease(tmp_path, "runA")
    lease.acquire(a, "v.zarr")
    start = lease.holder(a.uri)["time"]
    with lease.Heartbeat([a], every=0.05):
        time.sleep(0.3)
        assert lease.holder(a.uri)["time"] > start
    assert lease.holds(a)  # the heartbeat renews; the run releases when it has published
