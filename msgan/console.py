"""What a person reads on the console: progress with rate and ETA, quiet libraries, one-line errors.

- :class:`Progress` follows counted work (training steps per scale, tiles per scale): on a
  terminal one bar line redrawn in place; piped (a log file, ``ray job submit``) a plain line
  at each quarter of a task and at its end, so a log stays short and greppable.
- :func:`quiet` turns the libraries' own chatter down (Ray, Ray Train, Ray Data, MLflow,
  alembic) unless ``verbose``, and :func:`ray_init_kwargs` keeps worker and actor output off
  the driver: our workers report progress through :class:`ProgressBoard`, and their failures
  come back as exceptions, so nothing that matters goes through Ray's log forwarding.
- :func:`run_entry` runs an entry point's body: an unexpected error becomes one line naming its
  type and message (and, for a missing module, the package and the Python that ran the job)
  and exit status 1; ``--verbose`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

_VERBOSE = [os.environ.get("MSGAN_VERBOSE", "") not in ("", "0")]


def verbose() -> bool:
    """Whether this process shows libraries' logs and tracebacks (``--verbose``, or MSGAN_VERBOSE=1)."""
    return _VERBOSE[0]


def set_verbose(on: bool) -> None:
    _VERBOSE[0] = bool(on)


QUIET_LOGGERS = ("ray", "ray.train", "ray.tune", "mlflow", "alembic", "urllib3", "botocore", "s3fs")
# Ray Data configures its own logger when imported (a session log file at DEBUG, a console handler at INFO,
# not propagating): :func:`ray_data_console` turns down only its console side.
RAY_DATA_LOGGER = "ray.data"
# Ray Data's warnings about a choice we made on purpose (progress bars off when piped): never worth a line
RAY_DATA_NOISE = ("Progress bars disabled", "Progress bars for operators disabled")


def is_tty(stream: TextIO | None = None) -> bool:
    s = stream if stream is not None else sys.stdout
    try:
        return bool(s.isatty())
    except (AttributeError, ValueError):
        return False


def fmt_seconds(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class _Task:
    label: str
    total: int
    unit: str
    start_done: int = 0
    done: int = 0
    t0: float = field(default_factory=time.time)  # wall clock: progress may come from other processes
    now: float = 0.0
    next_mark: int = 1  # next quarter (1..4) that prints a line when piped
    note: str = ""
    last_mark: int = 4  # 3: the caller prints the end itself

    def rate(self) -> float:
        dt = self.now - self.t0
        return (self.done - self.start_done) / dt if dt > 0 else 0.0

    def eta(self) -> float | None:
        r = self.rate()
        return (self.total - self.done) / r if r > 0 else None

    def line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        rate = self.rate()
        rate_s = f"{rate:.1f} {self.unit}/s" if rate >= 0.1 else f"{60 * rate:.1f} {self.unit}/min"
        if self.done >= self.total:
            tail = f"done in {fmt_seconds(self.now - self.t0)}"
        else:
            eta = self.eta()
            tail = f"ETA {fmt_seconds(eta)}" if eta is not None else "ETA ?"
        note = f"  {self.note}" if self.note else ""
        return f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:3.0f}%)  {rate_s}  {tail}{note}"


class Progress:
    """Progress of one or more counted tasks (e.g. every scale at once), thread-safe.

    ``update(key, done, note=...)`` records progress; on a terminal the tasks share one line
    redrawn in place (a bar per task when there is one), piped a line is printed when a task
    passes a quarter of its total and when it ends. ``say`` prints a message line without
    breaking the bar.
    """

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None, width: int = 24) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.tty = is_tty(self.stream) if tty is None else tty
        self.width = width
        self._tasks: dict[Any, _Task] = {}
        self._lock = threading.Lock()
        self._drawn = False

    def add(
        self,
        key: Any,
        label: str,
        total: int,
        unit: str = "steps",
        start: int = 0,
        final_line: bool = True,
        at: float | None = None,
    ) -> None:
        """A task of ``total`` units, ``start`` of them done already (a resumed task prints no quarter it
        passed before); ``final_line=False`` when the caller reports the end itself; ``at``: when it
        started (``time.time()``, default now), for work timed in another process."""
        with self._lock:
            t0 = time.time() if at is None else float(at)
            t = _Task(label, max(1, int(total)), unit, start, start, t0, t0, last_mark=4 if final_line else 3)
            while t.next_mark <= t.last_mark and start * 4 >= t.next_mark * t.total:
                t.next_mark += 1
            self._tasks[key] = t

    def update(self, key: Any, done: int, note: str = "", at: float | None = None) -> None:
        with self._lock:
            t = self._tasks.get(key)
            if t is None:
                return
            t.done = min(int(done), t.total)
            t.now = time.time() if at is None else float(at)
            t.note = note or t.note
            if self.tty:
                self._draw()
                return
            final = t.done >= t.total
            if t.next_mark <= t.last_mark and t.done * 4 >= t.next_mark * t.total and (t.last_mark == 4 or not final):
                while t.next_mark <= t.last_mark and t.done * 4 >= t.next_mark * t.total:
                    t.next_mark += 1
                self._write(t.line())

    def say(self, line: str) -> None:
        with self._lock:
            self._clear()
            self._write(line)
            if self.tty and self._active():
                self._draw()

    def close(self) -> None:
        with self._lock:
            if self.tty and self._drawn:
                self._clear()
                for t in self._tasks.values():
                    self._write(t.line())
            self._tasks.clear()

    # ----------------------------------------------------------------- internals
    def _active(self) -> list[_Task]:
        return [t for t in self._tasks.values() if t.done < t.total]

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r\033[K")
            self._drawn = False

    def _draw(self) -> None:
        tasks = list(self._tasks.values())
        if len(tasks) == 1:
            t = tasks[0]
            filled = int(self.width * t.done / t.total)
            text = f"[{'#' * filled}{'.' * (self.width - filled)}] {t.line()}"
        else:
            parts = []
            for t in tasks:
                eta = t.eta()
                state = "done" if t.done >= t.total else (f"ETA {fmt_seconds(eta)}" if eta is not None else "")
                parts.append(f"{t.label} {100 * t.done // t.total:3d}% {state}")
            text = " | ".join(parts)
        cols = _columns()
        self.stream.write("\r\033[K" + text[: cols - 1])
        self.stream.flush()
        self._drawn = True


def _columns() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 120


def scale_progress(progress: Progress, unit: str = "tiles") -> Callable[[int, int, int], None]:
    """A ``(scale, done, total)`` callback (the cascade's and the batch path's) that feeds ``progress``."""

    def callback(scale: int, done: int, total: int) -> None:
        if scale not in progress._tasks:
            progress.add(scale, f"scale {scale}", total, unit)
        progress.update(scale, done)

    return callback


# --------------------------------------------------------------------------------- quiet libraries


def quiet(verbose: bool = False) -> None:
    """Library chatter off (warnings and errors still show), or everything on with ``verbose``."""
    level = logging.INFO if verbose else logging.WARNING
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if not verbose:
        # Ray Train's placement-group monitor warns while the state API warms up; our own
        # progress and the job's errors say what matters
        logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray(\.|$)")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow(\.|$)")
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a FutureWarning "Tip"
        os.environ.setdefault("TQDM_DISABLE", "0" if is_tty(sys.stderr) else "1")
        # a fresh machine: Ray's note that it made an auth token, matplotlib's font cache notice
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    if "ray.data" in sys.modules:  # else ensure_ray's call of ray_data_progress does it, once Ray is imported
        ray_data_progress(verbose)


def ray_data_progress(verbose: bool = False) -> None:
    """Ray Data's own progress bars on a terminal (or with ``verbose``) only: piped, they are noise. Its
    console lines (:func:`ray_data_console`) follow ``verbose`` too."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = verbose or is_tty(sys.stderr)
    ray_data_console(verbose)


class _RayDataNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(RAY_DATA_NOISE)


def ray_data_console(verbose: bool = False) -> None:
    """Ray Data's console lines at WARNING unless ``verbose`` (each dataset's "Starting execution",
    "Execution plan" and "Dataset ... finished" are INFO; our own progress lines say the same), without its
    notes about the progress bars we turned off. Only the console handlers change: Ray Data's session log
    files (``ray-data.log``) keep every line. Call after ``import ray.data`` (which sets those handlers up)."""
    logger = logging.getLogger(RAY_DATA_LOGGER)
    for handler in logger.handlers:
        if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
            continue  # a file: keeps everything
        handler.setLevel(logging.INFO if verbose else logging.WARNING)
        for f in [f for f in handler.filters if isinstance(f, _RayDataNoise)]:
            handler.removeFilter(f)
        if not verbose:
            handler.addFilter(_RayDataNoise())


def ray_init_kwargs(verbose: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``ray.init``: workers' and actors' output reaches the driver only when verbose
    (it is still in the session's log files); Ray's own driver logging at WARNING."""
    return {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}


# Messages the raylet pushes to every driver (printed by Ray whatever ``log_to_driver`` says) that are
# hints about Ray's own process management, not about the job; everything else (a worker killed for
# memory, an actor that died) still shows.
RAYLET_NOISE = ("PYTHON worker processes have been started on node",)


def filter_raylet_noise() -> None:
    """Drop the raylet hints of :data:`RAYLET_NOISE` from the driver's console (quiet mode only)."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "_msgan_filtered", False):
        return

    def filtered(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            lines = [ln for ln in data.get("lines", []) if not any(n in ln for n in RAYLET_NOISE)]
            if not lines:
                return
            data = {**data, "lines": lines}
        original(data, ignore_prefix)

    filtered._msgan_filtered = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = filtered


class _Board:
    """Collects progress messages from workers; the driver takes them out in order."""

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []

    def put(self, item: dict[str, Any]) -> None:
        self._items.append(item)

    def take(self) -> list[dict[str, Any]]:
        items, self._items = self._items, []
        return items


class ProgressBoard:
    """A tiny Ray actor through which workers send progress to the driver (which prints it), so that
    workers' own stdout need not be forwarded. ``send`` never raises: progress is never worth a failure."""

    def __init__(self) -> None:
        import ray

        self.handle: Any = ray.remote(num_cpus=0, max_restarts=-1)(_Board).remote()

    @staticmethod
    def send(handle: Any, **item: Any) -> None:
        if handle is None:
            return
        with contextlib.suppress(Exception):  # the board being gone must not stop training
            handle.put.remote(item)

    def take(self) -> list[dict[str, Any]]:
        import ray

        try:
            return list(ray.get(self.handle.take.remote(), timeout=10))
        except Exception:  # progress is never worth a failure
            return []

    def follow(self, handler: Callable[[dict[str, Any]], None], interval: float = 0.5) -> Callable[[], None]:
        """Poll in a thread, handing each item to ``handler``; returns ``stop()`` (which drains what is left)."""
        stop = threading.Event()

        def handle(item: dict[str, Any]) -> None:
            try:
                handler(item)
            except Exception as err:  # a malformed item must not end the progress thread
                print(f"(progress: {describe_error(err)})", file=sys.stderr)

        def loop() -> None:
            while not stop.wait(interval):
                for item in self.take():
                    handle(item)

        thread = threading.Thread(target=loop, name="msgan-progress", daemon=True)
        thread.start()

        def finish() -> None:
            stop.set()
            thread.join(timeout=15)
            for item in self.take():
                handle(item)

        return finish


# --------------------------------------------------------------------------------- entry points


def describe_error(err: BaseException) -> str:
    """One line: the error's type and message; a missing module names the package and this Python."""
    if isinstance(err, ModuleNotFoundError):
        return (
            f"the Python that ran this job ({sys.executable}, {sys.version.split()[0]}) cannot import "
            f"{err.name!r}: install msgan's dependencies into it (make install / pip install -e .), or start "
            f"Ray (ray start) from the environment that has them"
        )
    from msgan.redact import redact_text

    text = redact_text(" ".join(str(err).split())) or "(no message)"
    return f"{type(err).__name__}: {text}"


def run_entry(prog: str, body: Callable[[], int], verbose: bool = False, stream: TextIO | None = None) -> int:
    """Run an entry point's ``body``: its own exit status; an unexpected error -> one line on stderr and 1
    (the traceback first with ``verbose``); Ctrl-C -> 130."""
    from msgan.redact import install

    install()  # whatever the process prints from here on (tracebacks, libraries' logs) has secrets masked
    out = stream if stream is not None else sys.stderr
    try:
        return int(body())
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=out)
        return 130
    except SystemExit:
        raise
    except Exception as err:  # the one place that turns any error into a line
        if verbose:
            traceback.print_exc(file=out)
        hint = "" if verbose else " (--verbose shows the traceback)"
        print(f"{prog}: error: {describe_error(err)}{hint}", file=out)
        return 1
