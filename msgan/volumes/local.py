"""The local driver: one volume, all four steps in this process (``msgan translate`` for zarr), constant
memory, the same result as the Ray batch (:mod:`msgan.distributed.translate`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from msgan import lease
from msgan.cascade import Cascade
from msgan.io.volume import VolumeError
from msgan.scale_loop import InProcess, Progress, run_cascade
from msgan.volumes.heap import bound_heap, release_memory
from msgan.volumes.publishing import discard, publish, sweep_staging
from msgan.volumes.staging import plan_volume, stage
from msgan.volumes.steps import StagedVolume
from msgan.volumes.tasks import VolumeTask, check_output, parent_of

Log = Callable[[str], None]


def translate_volume(
    task: VolumeTask,
    cascade: Cascade,
    device: str | torch.device = "cpu",
    log: Log | None = None,
    tile: int | None = None,
    progress: Progress | None = None,
    replace: bool = True,
    volumes: bool = False,
) -> dict[str, Any]:
    """Stage, run every scale, publish. Returns the manifest with ``status``: ``skipped`` (published by the
    same model), ``translated``, or ``re-translated`` (``previous_model`` replaced; only with ``replace``).
    An output that msgan did not publish is refused (:func:`msgan.volumes.tasks.check_output`), whatever
    ``replace`` says."""
    previous = check_output(task, replace, volumes)
    if previous is not None and previous["model"] == task.model:
        return {**previous, "status": "skipped"}
    bound_heap()
    held = task.lease
    try:
        lease.acquire(held, task.output)
    except lease.LeaseError as err:
        raise VolumeError(str(err)) from err
    beat = lease.Heartbeat([held])
    try:
        beat.__enter__()
        sweep_staging(parent_of(task.output))
        previous = check_output(task, replace, volumes)  # again under the lease: another run may have published
        if previous is not None and previous["model"] == task.model:
            return {**previous, "status": "skipped"}
        manifest = _translate(task, cascade, device, log, tile, progress, volumes)
    except OSError as err:
        discard(task)
        where = f" ({err.filename})" if err.filename else ""
        raise VolumeError(f"{task.name}: {err.strerror or err}{where}; nothing published") from err
    except BaseException:
        discard(task)
        raise
    finally:
        beat.__exit__()
        lease.release(held)
    if previous is not None:
        if log is not None:
            log(f"re-translated: model {previous['model']} -> {task.model}")
        return {**manifest, "status": "re-translated", "previous_model": previous["model"]}
    return {**manifest, "status": "translated"}


def _translate(
    task: VolumeTask,
    cascade: Cascade,
    device: str | torch.device,
    log: Log | None,
    tile: int | None,
    progress: Progress | None,
    volumes: bool,
) -> dict[str, Any]:
    """Under the output's lease: stage, the one per-scale loop in this process, publish."""
    t0 = time.perf_counter()
    vplan = plan_volume(task, cascade, tile)
    stage(task, cascade.config, vplan)
    runner = InProcess(cascade, StagedVolume(task, cascade.config, vplan), device, after_scale=release_memory)
    timings = run_cascade(cascade.config.num_scales, runner, progress, log)
    return publish(task, {"timings": timings, "seconds": time.perf_counter() - t0}, volumes)
