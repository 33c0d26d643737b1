import io
import subprocess
import sys
from pathlib import Path

import pytest

from msgan.console import Progress, describe_error, fmt_seconds, run_entry, scale_progress

REPO = Path(__file__).resolve().parents[1]


def test_piped_progress_is_a_line_per_quarter_with_rate_and_eta():
    out = io.StringIO()
    p = Progress(out, tty=False)
    p.add(1, "scale 1", 8, "tiles", at=100.0)
    for done in range(1, 9):
        p.update(1, done, at=100.0 + done)  # one tile per second
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines  # 25, 50, 75, 100 %
    assert lines[0] == "scale 1: 2/8 tiles ( 25%)  1.0 tiles/s  ETA 6s"
    assert lines[-1] == "scale 1: 8/8 tiles (100%)  1.0 tiles/s  done in 8s"


def test_resumed_task_skips_passed_quarters_and_caller_may_own_the_end():
    out = io.StringIO()
    p = Progress(out, tty=False)
    p.add("s", "[scale 0]", 100, "steps", start=60, final_line=False, at=0.0)
    p.update("s", 80, note="G 1.0", at=10.0)
    p.update("s", 100, at=20.0)
    lines = out.getvalue().splitlines()
    assert lines == ["[scale 0]: 80/100 steps ( 80%)  2.0 steps/s  ETA 10s  G 1.0"]


def test_terminal_progress_redraws_one_line_and_keeps_messages():
    out = io.StringIO()
    p = Progress(out, tty=True)
    cb = scale_progress(p)
    cb(1, 1, 4)
    p.say("a message")
    cb(1, 4, 4)
    p.close()
    text = out.getvalue()
    assert "\r\x1b[K[######" in text and "a message\n" in text
    assert text.rstrip().endswith("done in 0s")


def test_fmt_seconds():
    assert [fmt_seconds(s) for s in (4.4, 65, 3725)] == ["4s", "1m05s", "1h02m"]


def test_unexpected_error_is_one_line_and_exit_1():
    err = io.StringIO()

    def boom() -> int:
        raise KeyError("scale_3")

    assert run_entry("job", boom, stream=err) == 1
    assert err.getvalue() == "job: error: KeyError: 'scale_3' (--verbose shows the traceback)\n"
    err = io.StringIO()
    assert run_entry("job", boom, verbose=True, stream=err) == 1
    assert "Traceback (most recent call last)" in err.getvalue() and "job: error: KeyError" in err.getvalue()


def test_missing_module_names_the_package_and_the_python():
    try:
        import msgan_no_such_package  # type: ignore[import-not-found]  # noqa: F401
    except ModuleNotFoundError as e:
        line = describe_error(e)
    assert "'msgan_no_such_package'" in line and sys.executable in line


@pytest.mark.parametrize(
    "job,args",
    [
        ("train_all_scales.py", ["--config", str(REPO / "configs" / "demo.yaml")]),
        ("translate_batch.py", ["--model", "m", "--inputs", "in.zarr", "--output", "out"]),
        ("translate_pacs_exports.py", ["--model", "m"]),
    ],
)
def test_job_under_a_python_without_the_dependencies_says_so_in_one_line(tmp_path, job, args):
    """The issue's case: `ray job submit` ran the job with a `python` that lacks torch. Before, the
    job died with UnboundLocalError (JobFailed imported inside the try its except names)."""
    python = Path("/usr/bin/python3")
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True) if python.exists() else None
    if probe is None or probe.returncode == 0:
        pytest.skip("needs a system python3 without torch")
    r = subprocess.run(
        [str(python), str(REPO / "jobs" / job), *args],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "UnboundLocalError" not in r.stderr and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot import" in lines[0] and str(python) in lines[0], r.stderr


def test_error_lines_never_show_a_password():
    line = describe_error(ConnectionError("cannot reach http://user:hunter2@mlflow:5000/api"))
    assert "hunter2" not in line and "user:***@mlflow" in line


def test_ray_data_progress_bars_only_on_a_terminal(monkeypatch):
    import ray.data

    from msgan.console import ray_data_progress

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # piped
    ray_data_progress(verbose=False)
    assert ray.data.DataContext.get_current().enable_progress_bars is False
    ray_data_progress(verbose=True)
    assert ray.data.DataContext.get_current().enable_progress_bars is True


def test_raylet_process_hints_are_dropped_and_its_other_messages_kept(capsys):
    import ray._private.worker as ray_worker

    from msgan.console import filter_raylet_noise

    filter_raylet_noise()
    noise = "WARNING: 8 PYTHON worker processes have been started on node: abc with address: 1.2.3.4"
    ray_worker.print_to_stdstream({"lines": [noise], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    died = "A worker died or was killed while executing a task by an unexpected system error (OOM)"
    ray_worker.print_to_stdstream({"lines": [died], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr().out
    assert "PYTHON worker processes" not in out and died in out


def test_verbose_forwards_ray_workers_and_logs():
    import logging

    from msgan.console import ray_init_kwargs

    assert ray_init_kwargs(False) == {"log_to_driver": False, "logging_level": logging.WARNING}
    assert ray_init_kwargs(True) == {"log_to_driver": True, "logging_level": logging.INFO}


def test_ray_data_console_lines_only_with_verbose_and_its_log_file_keeps_them():
    import logging

    import ray.data  # noqa: F401  (sets up Ray Data's own logger: a session file and a console handler)

    from msgan.console import ray_data_console

    logger = logging.getLogger("ray.data")
    [handler] = [h for h in logger.handlers if type(h).__name__ == "PlainRayHandler"]  # Ray Data's console
    out = io.StringIO()
    old = handler.setStream(out)
    try:
        ray_data_console(verbose=False)
        logger.info("Execution plan of Dataset d_0: InputDataBuffer[Input] -> ActorPoolMapOperator")
        logger.warning("Progress bars disabled. To enable, set ...")
        logger.warning("a block failed")
        text = out.getvalue()
        assert "Execution plan" not in text and "Progress bars" not in text and "a block failed" in text, text
        assert logger.isEnabledFor(logging.INFO), "the session log file still gets Ray Data's INFO lines"
        ray_data_console(verbose=True)
        logger.info("Dataset d_0 execution finished in 1.0 seconds")
        assert "execution finished" in out.getvalue()
    finally:
        ray_data_console(verbose=False)
        handler.setStream(old)
