"""Ray Data: cascaded batch translation of many large volumes in object storage.

Per batch, on the driver: one :class:`~msgan.volumes.pinning.PinnedModel` (the model pinned to a version,
the overrides, the run id), the output of every input (two inputs for one output are refused
before any work), which outputs are done (by this version: skipped; by another: translated
again), a lease per output, and each volume's :class:`~msgan.volumes.staging.VolumePlan`. Then: stage every
volume (a Ray task each: windowed image + edge pyramid, block by block), and run the one per-scale loop
(:func:`msgan.scale_loop.run_cascade`) with :class:`RayRunner`: scale 0 as a task per volume on its whole LR
edge image, and each HR scale as one Ray Data dataset whose rows are the scale's fixed tile batches of *all*
volumes, mapped onto a pool of actors that each load the pinned cascade once; the dataset's end is the
barrier between scales. Tiles read their inputs from zarr and write their core into their own output chunk:
only descriptors and small records pass through the object store. A failing volume is reported with its
error and never published; the others go on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from msgan import lease, storage
from msgan.cascade import Cascade
from msgan.io.volume import VolumeError
from msgan.memory import current_rss, peak_host_bytes, reset_peak_rss
from msgan.scale_loop import Progress, ScaleTiles, Tick, run_cascade
from msgan.volumes import publishing, steps
from msgan.volumes.heap import HEAP_MMAP_THRESHOLD, bound_heap, release_memory
from msgan.volumes.pinning import PinnedModel, pin
from msgan.volumes.staging import VolumePlan, plan_volume, stage
from msgan.volumes.tasks import VolumeTask, check_collisions, check_output, expand_inputs, parent_of, volume_task

Log = Callable[[str], None]
PROGRESS_EVERY_S = 10.0  # one progress line per interval (and one at the end of each scale)

# Tile actors run in worker processes of their own (a distinct runtime env: Ray never hands them
# a worker that ran a staging task) with few malloc arenas, so their memory is theirs and stays flat.
ACTOR_ENV = {
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_MMAP_THRESHOLD_": str(HEAP_MMAP_THRESHOLD),  # see heap.bound_heap: set before the process starts
    "MSGAN_WORKER": "tile-actor",
}


def _task(d: dict[str, Any]) -> VolumeTask:
    return VolumeTask(**d)


def _device(gpus: float) -> str:
    import torch

    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def _process_start() -> float:
    """When this process started (wall clock, seconds since the epoch); now when unknown."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:
        return time.time()


def cpu_threads(cpus: float, actors: int, node_cpus: int) -> int:
    """Torch threads of a CPU tile actor: the node's CPUs shared by the pool's actors that can sit on it
    (``actors``, at most as many as ``cpus`` each fit), never fewer than its own reservation. Ray's
    fractional ``cpus`` is a scheduling share, not a limit: one actor of 0.5 CPU on a 2-core machine has both
    cores to itself, as ``msgan translate`` does (1 thread there made scale 2 take 1.9x as long)."""
    fit = int(node_cpus // cpus) if cpus > 0 else actors
    sharing = max(1, min(actors, fit))
    return max(1, int(cpus), node_cpus // sharing)


def node_cpus() -> int:
    """CPUs Ray gives the node this process runs on (its own count when Ray does not say)."""
    import ray

    try:
        here = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node.get("NodeID") == here and node.get("Alive"):
                return max(1, int(node.get("Resources", {}).get("CPU", 0)))
    except Exception:  # not in a Ray worker, or the GCS did not answer: the process's own view
        pass
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


# ----------------------------------------------------------------------------- per-volume steps (Ray tasks)


def _stage(task: dict[str, Any], config: dict[str, Any], vplan: dict[str, Any]) -> dict[str, Any]:
    from msgan.config import from_dict

    try:
        stage(_task(task), from_dict(config), VolumePlan.from_dict(vplan))
        return {"ok": True}
    except Exception as err:  # reported per volume; the batch goes on
        publishing.discard(_task(task))
        return {"error": _error(err)}


def _scale0(task: dict[str, Any], model: PinnedModel, gpus: float, cpus: float, at_once: int) -> dict[str, Any]:
    try:
        device = _device(gpus)
        if device == "cpu":  # the U-Net on the whole LR grid: the node's cores shared by the volumes at once
            import torch

            torch.set_num_threads(cpu_threads(cpus, at_once, node_cpus()))
        return {"seconds": steps.run_scale0(_task(task), model.load(device), device)}
    except Exception as err:
        return {"error": _error(err)}


def _publish(task: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"manifest": publishing.publish(_task(task), info)}
    except Exception as err:
        return {"error": _error(err)}


class TileWorker:
    """A Ray Data actor: loads the pinned cascade once in its life, runs rows of fixed tile batches."""

    def __init__(
        self,
        model: PinnedModel,
        tasks: list[dict[str, Any]],
        vplans: dict[int, dict[str, Any]],
        scale: int,
        gpus: float,
        cpus: float,
        actors: int,
    ) -> None:
        import torch

        self.hwm_inherited = peak_host_bytes()  # what this process had peaked at before it became this actor
        bound_heap()
        reset_peak_rss()
        self.rss_start = current_rss()
        self.device = _device(gpus)
        self.threads = cpu_threads(cpus, actors, node_cpus()) if self.device == "cpu" else 0
        if self.threads:
            torch.set_num_threads(self.threads)
        self.cascade = model.load(self.device)
        self.tasks = [_task(t) for t in tasks]
        self.scale = scale
        bs = max(1, self.cascade.config.inference.batch_size)
        self.batches = {v: VolumePlan.from_dict(p).batches(scale, bs) for v, p in vplans.items()}
        self.runners: dict[int, ScaleTiles] = {}  # per volume: its arrays opened once
        self.ready = time.time()  # wall clock: the cascade loaded (the process started at _process_start())
        self.startup = self.ready - _process_start()  # spawn, imports, cascade: what a scale's pool pays first

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vols, counts, errors, seconds = [], [], [], []
        for v, b in zip(rows["volume"], rows["batch"], strict=True):
            v, b = int(v), int(b)
            tiles = self.batches[v][b]
            t0 = time.perf_counter()
            try:
                if v not in self.runners:
                    self.runners[v] = steps.scale_tiles(self.tasks[v], self.cascade, self.scale)
                self.runners[v].run(tiles, self.device)
                err = ""
            except Exception as e:  # an error stays with its volume instead of aborting the dataset
                err = _error(e)
            vols.append(v)
            counts.append(0 if err else len(tiles))
            errors.append(err)
            seconds.append(time.perf_counter() - t0)
        release_memory()
        return {
            "volume": np.array(vols, dtype=np.int64),
            "tiles": np.array(counts, dtype=np.int64),
            "error": np.array(errors, dtype=object),
            "seconds": np.array(seconds, dtype=np.float64),
            "peak_rss": np.full(len(vols), peak_host_bytes(), dtype=np.int64),  # this actor's, from its start
            "start_rss": np.full(len(vols), self.rss_start, dtype=np.int64),
            "inherited_hwm": np.full(len(vols), self.hwm_inherited, dtype=np.int64),
            "pid": np.full(len(vols), os.getpid(), dtype=np.int64),
            "ready": np.full(len(vols), self.ready, dtype=np.float64),
            "startup": np.full(len(vols), self.startup, dtype=np.float64),
            "threads": np.full(len(vols), self.threads, dtype=np.int64),
        }


# ----------------------------------------------------------------------------- the batch


@dataclass
class BatchReport:
    model: str = ""  # the pinned model id every volume was translated with
    run: str = ""
    published: list[dict[str, Any]] = field(default_factory=list)  # manifests
    skipped: list[str] = field(default_factory=list)  # published by this model version before this run
    retranslated: dict[str, str] = field(default_factory=dict)  # volume -> "model A -> B"
    failed: dict[str, str] = field(default_factory=dict)  # volume -> error
    scales: list[dict[str, Any]] = field(default_factory=list)  # per scale: tiles, voxels, seconds
    steps: dict[str, float] = field(default_factory=dict)  # seconds: ray (start/connect), stage, publish
    tiles_computed: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"volumes: {len(self.published)} published, {len(self.skipped)} already published, "
            f"{len(self.failed)} failed; {self.tiles_computed} tiles in {self.seconds:.1f}s with {self.model}"
        ]
        for s in self.scales:
            rate = s["voxels"] / s["seconds"] / 1e6 if s["seconds"] > 0 else 0.0
            rss = f"  actor peak RSS {s['actor_peak_rss'] / 2**20:.0f} MiB" if s.get("actor_peak_rss") else ""
            if s.get("actors_seen"):
                rss += f", ready after {s['actor_ready_after']:.1f}s, {s['threads'] or 'GPU'} threads"
            lines.append(
                f"  scale {s['scale']}: {s['tiles']:>6} tiles {s['voxels'] / 1e6:9.2f} Mvox {s['seconds']:7.1f}s "
                f"{rate:8.3f} Mvox/s{rss}"
            )
        lines += [f"  re-translated {name}: model {what}" for name, what in self.retranslated.items()]
        lines += [f"  FAILED {name}: {err}" for name, err in self.failed.items()]
        return "\n".join(lines)


class ProgressLines:
    """Tiles done per scale with rate and ETA: a line every ``every`` seconds and one at the end."""

    def __init__(self, log: Log, scale: int, total: int, volumes: int, every: float = PROGRESS_EVERY_S) -> None:
        self.log, self.scale, self.total, self.volumes, self.every = log, scale, total, volumes, every
        self.done = 0
        self.t0 = self.last = time.perf_counter()

    def add(self, tiles: int) -> None:
        self.done += tiles
        now = time.perf_counter()
        if self.done >= self.total or now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            self.log(
                f"  scale {self.scale}: {self.done}/{self.total} tiles of {self.volumes} volume(s), "
                f"{rate:.1f} tiles/s, ETA {eta:.0f}s"
            )


def _gpus_per_actor(cascade: Cascade) -> float:
    import ray

    inf = cascade.config.inference
    if inf.device == "cpu":
        return 0.0
    if inf.device == "gpu" or float(ray.cluster_resources().get("GPU", 0)) >= 1:
        return inf.gpus_per_actor
    return 0.0


def _screen(tasks: list[VolumeTask], report: BatchReport) -> list[VolumeTask]:
    """Before Ray starts: drop what this version already published (skipped) and outputs that are not msgan's
    (refused, named); :func:`_claim` checks again under each lease."""
    todo = []
    for t in tasks:
        try:
            previous = check_output(t)
        except (ValueError, OSError) as err:
            report.failed[t.name] = str(err)
            continue
        if previous is not None and previous["model"] == t.model:
            report.skipped.append(t.name)
        else:
            todo.append(t)
    return todo


def _claim(
    tasks: list[VolumeTask], cascade: Cascade, model: PinnedModel, report: BatchReport, log: Log
) -> tuple[list[VolumeTask], dict[int, VolumePlan]]:
    """Lease what :func:`_screen` left, check it again under the lease (skip what this version published
    meanwhile), plan it. Returns (tasks, volume plans by index)."""
    todo: list[VolumeTask] = []
    for t in tasks:
        try:
            lease.acquire(t.lease, t.output)
            previous = check_output(t)  # under the lease: another run may have published it since _screen
            if previous is not None and previous["model"] == t.model:
                lease.release(t.lease)
                report.skipped.append(t.name)
                continue
        except (ValueError, lease.LeaseError, OSError) as err:
            report.failed[t.name] = str(err)
            continue
        if previous is not None:
            report.retranslated[t.name] = f"{previous['model']} -> {t.model}"
            log(f"  {t.name}: published by {previous['model']}; re-translating with {t.model}")
        todo.append(t)
    vplans: dict[int, VolumePlan] = {}
    for i, t in enumerate(todo):
        try:
            vplans[i] = plan_volume(t, cascade, model.tile)
        except (VolumeError, OSError) as err:
            report.failed[t.name] = str(err)
            lease.release(t.lease)
    return todo, vplans


def check_shared(inputs: Sequence[str], out_prefix: str) -> None:
    """On a Ray cluster of several nodes a node-local ``file://`` input or output is a silent split brain
    (tiles written on whichever node runs them): refused before any work unless ``MSGAN_SHARED_PATHS``
    lists it, the training job's rule (:func:`msgan.settings.check_reachable_from_all_nodes`)."""
    import ray

    from msgan.settings import check_reachable_from_all_nodes

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    for what, uri in [*(("input", i) for i in inputs), ("output", out_prefix)]:
        check_reachable_from_all_nodes(what, storage.normalize_uri(uri), nodes)


def translate_batch(
    inputs: Sequence[str],
    out_prefix: str,
    model: str | PinnedModel,
    overrides: dict[str, Any] | None = None,
    log: Log = print,
    tile: int | None = None,
    progress_every: float = PROGRESS_EVERY_S,
    progress: Progress | None = None,
) -> BatchReport:
    """Translate every input volume not yet published under ``out_prefix`` by this model version.
    ``model``: a reference (its alias is resolved here, once) or a model a caller already pinned.
    Progress: ``progress(scale, tiles done, total)`` when given (e.g. a bar on a terminal), else a line
    through ``log`` every ``progress_every`` seconds and at the end of each scale."""
    from msgan.distributed.pipeline import ensure_ray

    t_start = time.perf_counter()
    # the one resolution of the alias in this batch (unless the caller pinned it)
    pinned = model if isinstance(model, PinnedModel) else pin(model, overrides, tile)
    cascade = pinned.load()
    report = BatchReport(model=pinned.model_id, run=pinned.run)
    all_tasks = []
    for uri in expand_inputs(inputs):
        try:
            all_tasks.append(volume_task(uri, out_prefix, pinned.model_id, run=pinned.run))
        except ValueError as err:  # an output that is the input, or a symlink leaving its folder: this volume only
            report.failed[uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")] = str(err)
    check_collisions(all_tasks)  # before any work
    all_tasks = _screen(all_tasks, report)
    if not all_tasks:  # nothing to translate: no Ray started
        log(f"[1/4] 0 volumes to translate ({len(report.skipped)} already published, {len(report.failed)} refused)")
        report.seconds = time.perf_counter() - t_start
        return report
    t_ray = time.perf_counter()
    ensure_ray(cascade.config)
    report.steps["ray"] = time.perf_counter() - t_ray
    check_shared(inputs, out_prefix)  # before any work: every node must reach the inputs and outputs
    for parent in sorted({parent_of(t.output) for t in all_tasks}):
        for gone in publishing.sweep_staging(parent):
            log(f"  removed stale staging {gone}")
    tasks: list[VolumeTask] = []
    try:
        with lease.Heartbeat([t.lease for t in all_tasks]):  # from the first lease on, another host sees us alive
            tasks, vplans = _claim(all_tasks, cascade, pinned, report, log)
            log(
                f"[1/4] {len(vplans)} volumes to translate with {pinned.model_id} (run {pinned.run}), "
                f"{len(report.skipped)} already published, {len(report.failed)} refused"
            )
            if vplans:
                _run(RayRunner(tasks, vplans, cascade, pinned, report, log, progress_every), progress)
    finally:
        for t in tasks or all_tasks:
            lease.release(t.lease)
    for name in [n for n in report.retranslated if n in report.failed]:
        report.retranslated.pop(name)  # the old output stays, untouched
    report.seconds = time.perf_counter() - t_start
    return report


@dataclass
class RayRunner:
    """Where the tiles of one batch's volumes run on Ray (a :class:`msgan.scale_loop.Runner`): scale 0 as a
    task per volume, each HR scale as a Ray Data dataset on an actor pool; with the steps around the loop
    (stage, publish). A volume that fails a step is reported, its staging discarded and its lease released;
    the others go on."""

    tasks: list[VolumeTask]
    vplans: dict[int, VolumePlan]
    cascade: Cascade
    model: PinnedModel
    report: BatchReport
    log: Log
    progress_every: float = PROGRESS_EVERY_S
    env: dict[str, str] = field(default_factory=storage.env_for_workers)  # storage settings for every worker

    def __post_init__(self) -> None:
        self.inf = self.cascade.config.inference
        self.gpus = _gpus_per_actor(self.cascade)
        self.task_dicts = [asdict(t) for t in self.tasks]
        self.remote_args: dict[str, Any] = {"runtime_env": {"env_vars": self.env}} if self.env else {}

    def fail(self, i: int, why: str) -> None:
        self.report.failed[self.tasks[i].name] = why
        self.vplans.pop(i, None)
        publishing.discard(self.tasks[i])
        lease.release(self.tasks[i].lease)

    def _each(
        self, fn: Callable[..., dict[str, Any]], cpus: float, gpus: float, args: Callable[[int], tuple[Any, ...]]
    ) -> dict[int, dict[str, Any]]:
        """``fn(task, *args(i))`` for every volume ``i`` still going, as Ray tasks; failures reported and dropped."""
        import ray

        remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=2, **self.remote_args)(fn)
        order = list(self.vplans)
        results = ray.get([remote.remote(self.task_dicts[i], *args(i)) for i in order])
        for i, r in zip(order, results, strict=True):
            if "error" in r:
                self.fail(i, r["error"])
        return {i: r for i, r in zip(order, results, strict=True) if "error" not in r}

    def stage(self) -> None:
        config = self.cascade.config.to_dict()
        self._each(_stage, 1, 0, lambda i: (config, self.vplans[i].to_dict()))

    def scale0(self) -> dict[str, Any]:
        cpus, at_once = self.inf.cpus_per_actor, len(self.vplans)
        self._each(_scale0, cpus, self.gpus, lambda i: (self.model, self.gpus, cpus, at_once))
        n, gpus = self.cascade.config.num_scales, self.gpus or "no"
        self.log(f"[3/4] HR scales 1..{n - 1}: tiles of all volumes on {self.inf.actors} actors ({gpus} GPU each)")
        return {"tiles": len(self.vplans), "voxels": sum(p.voxels(0) for p in self.vplans.values())}

    def hr_scale(self, s: int, tick: Tick | None) -> dict[str, Any] | None:
        """Scale ``s``'s tiles of every volume as one Ray Data dataset on the actor pool; None when none is left."""
        for t in self.tasks:
            lease.refresh(t.lease)
        bs = max(1, self.inf.batch_size)
        items = [{"volume": i, "batch": b} for i, p in self.vplans.items() for b in range(len(p.batches(s, bs)))]
        if not items:
            return None
        total = sum(len(p.tiles_of(s)) for p in self.vplans.values())
        voxels = sum(p.voxels(s) for p in self.vplans.values())
        lines = ProgressLines(self.log, s, total, len(self.vplans), self.progress_every)
        tiles, rss, rss0, hwm0, pids = 0, 0, 0, 0, set()
        busy, ready, startup, threads = 0.0, float("inf"), 0.0, 0
        t0 = time.time()
        for row in self._dataset(s, items).iter_rows():  # the barrier: scale s+1 starts when scale s is written
            v = int(row["volume"])
            busy += float(row["seconds"])
            ready, startup = min(ready, float(row["ready"])), max(startup, float(row["startup"]))
            threads = max(threads, int(row["threads"]))
            rss, rss0 = max(rss, int(row["peak_rss"])), max(rss0, int(row["start_rss"]))
            hwm0 = max(hwm0, int(row["inherited_hwm"]))
            pids.add(int(row["pid"]))
            if row["error"] and v in self.vplans:
                self.fail(v, f"scale {s}: {row['error']}")
            tiles += int(row["tiles"])
            if tick is not None:
                tick(tiles, total)
            else:
                lines.add(int(row["tiles"]))
        self.report.tiles_computed += tiles
        return {"tiles": tiles, "actor_peak_rss": rss, "actor_start_rss": rss0, "actor_inherited_hwm": hwm0,
                "actors_seen": len(pids), "voxels": voxels, "busy_seconds": busy,
                "actor_ready_after": max(0.0, ready - t0) if pids else 0.0, "actor_startup": startup,
                "threads": threads}  # fmt: skip

    def _dataset(self, s: int, items: list[dict[str, int]]) -> Any:
        """Rows (volume, batch) of scale ``s`` mapped onto a pool of :class:`TileWorker` actors."""
        import ray

        inf = self.inf
        worker_args = {
            "model": self.model,
            "tasks": self.task_dicts,
            "vplans": {i: p.to_dict() for i, p in self.vplans.items()},
            "scale": s,
            "gpus": self.gpus,
            "cpus": inf.cpus_per_actor,
            "actors": inf.actors,
        }
        actor_env = {"env_vars": {**self.env, **ACTOR_ENV}} if ACTOR_ENV else self.remote_args.get("runtime_env")
        blocks = max(1, min(len(items), inf.actors * 4))  # rows of a block share a task: overhead amortised
        return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            TileWorker,
            fn_constructor_kwargs=worker_args,
            compute=ray.data.ActorPoolStrategy(size=inf.actors),
            batch_size=1,  # a row is one fixed batch of tiles: one forward pass, whichever actor runs it
            num_cpus=inf.cpus_per_actor,
            num_gpus=self.gpus,
            runtime_env=actor_env,  # Ray Data restarts dead actors and retries their tiles
        )

    def publish(self) -> None:
        info = {"timings": self.report.scales, "model_uri": self.model.model}
        for r in self._each(_publish, self.inf.cpus_per_actor, 0, lambda i: (info,)).values():
            self.report.published.append(r["manifest"])


def _run(run: RayRunner, progress: Progress | None) -> None:
    """Stage every volume, the one per-scale loop on Ray, publish."""
    n = run.cascade.config.num_scales
    t0 = time.perf_counter()
    run.stage()
    run.report.steps["stage"] = time.perf_counter() - t0
    run.log(f"[2/4] staged {len(run.vplans)} volumes (edges at {n} scales); scale 0 on each whole LR image")
    run.report.scales.extend(run_cascade(n, run, progress))
    run.log(f"[4/4] publishing {len(run.vplans)} volumes")
    t0 = time.perf_counter()
    run.publish()
    run.report.steps["publish"] = time.perf_counter() - t0
    run.log(f"  volumes: {len(run.report.published)} published, {len(run.report.failed)} failed")
