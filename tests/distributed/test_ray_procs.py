"""Tests stop only the Ray clusters they started: a cluster started by someone else survives their cleanup."""

import os
import signal
import subprocess
import sys

import psutil
import pytest

from tests.ray_procs import free_port, ray_head, ray_processes, short_temp_dir, stop_ray

pytestmark = pytest.mark.slow


def _head_args() -> list[str]:
    return [
        "--node-ip-address=127.0.0.1", f"--port={free_port()}", "--num-cpus=1", "--include-dashboard=false",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}


def test_cleanup_stops_the_tests_own_ray_and_no_other() -> None:
    env = _env()
    with ray_head(env, *_head_args()) as theirs:  # someone else's cluster, started before the test's own
        their_pids = {p.pid for p in ray_processes(theirs)}
        assert any(p.name() == "raylet" for p in ray_processes(theirs)), "the other head did not start"

        # the test's own head, stopped by the same helper the pipeline tests use
        with ray_head(env, *_head_args()) as ours:
            our_pids = {p.pid for p in ray_processes(ours)}
            assert our_pids and not (our_pids & their_pids)
        assert not [p for p in our_pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]

        # the local Ray a killed job started (its own RAY_TMPDIR), left behind after its driver died
        job_tmp = short_temp_dir()
        script = "import time, ray\nray.init(num_cpus=1, include_dashboard=False)\nprint('up', flush=True)\n"
        script += "time.sleep(600)"
        driver = subprocess.Popen(
            [sys.executable, "-c", script],
            env={**env, "RAY_TMPDIR": str(job_tmp)}, stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        assert driver.stdout is not None and driver.stdout.readline().strip() == "up"
        job_pids = {p.pid for p in ray_processes(job_tmp)}
        assert any(psutil.Process(p).name() == "raylet" for p in job_pids)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        stop_ray(job_tmp)
        assert not ray_processes(job_tmp)

        # the other cluster is untouched: every one of its processes still runs
        alive = {p.pid for p in ray_processes(theirs)}
        assert their_pids <= alive, f"processes of the other cluster were stopped: {their_pids - alive}"
    assert not ray_processes(theirs)
