"""Ray Data: cascaded batch translation of many large volumes in object storage.

Per batch: stage every volume (a Ray task each: windowed image + edge pyramid, block by
block), scale 0 (a task per volume on its whole LR edge image), then for each HR scale one
Ray Data dataset of tile descriptors from *all* volumes, mapped onto a pool of actors that
each hold the cascade; ``take_all()`` is the barrier between scales. Tiles read their inputs
from zarr and write their core into their own output chunk: only descriptors and small
records pass through the object store. A failing volume is reported with its error and
never published; the others go on.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from msgan import batch as vb
from msgan import storage
from msgan.cascade import Cascade
from msgan.memory import peak_host_bytes
from msgan.tiling import Tile

Log = Callable[[str], None]


def load_model(model: str, device: str = "cpu") -> Cascade:
    """A cascade from a registry URI (``models:/NAME@ALIAS``) or a cascade folder."""
    if model.startswith(("models:/", "runs:/")):
        from msgan.registry import load_cascade

        return load_cascade(model, device)
    return Cascade.load(model, device)


def _with_inference(cascade: Cascade, overrides: dict[str, Any]) -> Cascade:
    if overrides:
        cascade.config = cascade.config.replace(**{f"inference.{k}": v for k, v in overrides.items()})
    return cascade


def _task(d: dict[str, Any]) -> vb.VolumeTask:
    return vb.VolumeTask(**d)


def _device(gpus: float) -> str:
    import torch

    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- per-volume steps (Ray tasks)


def _stage(task: dict[str, Any], model: str, overrides: dict[str, Any]) -> dict[str, Any]:
    cascade = _with_inference(load_model(model), overrides)
    try:
        return {"plan": vb.stage(_task(task), cascade)}
    except Exception as err:  # reported per volume; the batch goes on
        vb.discard(_task(task))
        return {"error": f"{type(err).__name__}: {err}"}


def _scale0(task: dict[str, Any], model: str, gpus: float) -> dict[str, Any]:
    try:
        return {"seconds": vb.run_scale0(_task(task), load_model(model, _device(gpus)), _device(gpus))}
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}


def _publish(task: dict[str, Any], model: str, info: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"manifest": vb.publish(_task(task), load_model(model), info)}
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}


class TileWorker:
    """A Ray Data actor: loads the cascade once, translates batches of tile descriptors."""

    def __init__(self, model: str, tasks: list[dict[str, Any]], scale: int, gpus: float, threads: int) -> None:
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.device = _device(gpus)
        self.cascade = load_model(model, self.device)
        self.tasks = [_task(t) for t in tasks]
        self.scale = scale

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        by_volume: dict[int, list[Tile]] = defaultdict(list)
        for v, a, b in zip(rows["volume"], rows["start"], rows["stop"], strict=True):
            by_volume[int(v)].append(Tile(tuple(int(x) for x in a), tuple(int(x) for x in b)))
        vols, counts, errors, seconds = [], [], [], []
        for v, tiles in by_volume.items():
            t0 = time.perf_counter()
            try:
                vb.translate_tiles(
                    self.tasks[v],
                    self.cascade,
                    self.scale,
                    tiles,
                    self.device,
                    self.cascade.config.inference.batch_size,
                )
                err = ""
            except Exception as e:  # an error stays with its volume instead of aborting the dataset
                err = f"{type(e).__name__}: {e}"
            vols.append(v)
            counts.append(0 if err else len(tiles))
            errors.append(err)
            seconds.append(time.perf_counter() - t0)
        return {
            "volume": np.array(vols, dtype=np.int64),
            "tiles": np.array(counts, dtype=np.int64),
            "error": np.array(errors, dtype=object),
            "seconds": np.array(seconds, dtype=np.float64),
            "peak_rss": np.full(len(vols), peak_host_bytes(), dtype=np.int64),  # this actor's process so far
        }


# ----------------------------------------------------------------------------- the batch


@dataclass
class BatchReport:
    published: list[dict[str, Any]] = field(default_factory=list)  # manifests
    skipped: list[str] = field(default_factory=list)  # already published before this run
    failed: dict[str, str] = field(default_factory=dict)  # volume -> error
    scales: list[dict[str, Any]] = field(default_factory=list)  # per scale: tiles, voxels, seconds
    tiles_computed: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"volumes: {len(self.published)} published, {len(self.skipped)} already published, "
            f"{len(self.failed)} failed; {self.tiles_computed} tiles in {self.seconds:.1f}s"
        ]
        for s in self.scales:
            rate = s["voxels"] / s["seconds"] / 1e6 if s["seconds"] > 0 else 0.0
            rss = f"  actor peak RSS {s['actor_peak_rss'] / 2**20:.0f} MiB" if s.get("actor_peak_rss") else ""
            lines.append(
                f"  scale {s['scale']}: {s['tiles']:>6} tiles {s['voxels'] / 1e6:9.2f} Mvox {s['seconds']:7.1f}s "
                f"{rate:8.3f} Mvox/s{rss}"
            )
        lines += [f"  FAILED {name}: {err}" for name, err in self.failed.items()]
        return "\n".join(lines)


def _gpus_per_actor(cascade: Cascade) -> float:
    import ray

    inf = cascade.config.inference
    if inf.device == "cpu":
        return 0.0
    if inf.device == "gpu" or float(ray.cluster_resources().get("GPU", 0)) >= 1:
        return inf.gpus_per_actor
    return 0.0


def translate_batch(
    inputs: Sequence[str],
    out_prefix: str,
    model: str,
    overrides: dict[str, Any] | None = None,
    log: Log = print,
) -> BatchReport:
    """Translate every input volume not yet published under ``out_prefix`` with ``model``."""
    import ray

    from msgan.distributed.pipeline import ensure_ray

    t_start = time.perf_counter()
    overrides = dict(overrides or {})
    cascade = _with_inference(load_model(model), overrides)
    ensure_ray(cascade.config)
    mid = vb.model_id(model)
    report = BatchReport()
    tasks = []
    for uri in vb.expand_inputs(inputs):
        t = vb.volume_task(uri, out_prefix, mid)
        (report.skipped.append(t.name) if vb.is_published(t) else tasks.append(t))
    log(f"[1/4] {len(tasks)} volumes to translate with {mid}, {len(report.skipped)} already published")
    if not tasks:
        report.seconds = time.perf_counter() - t_start
        return report
    inf = cascade.config.inference
    gpus = _gpus_per_actor(cascade)
    n = cascade.config.num_scales
    task_dicts = [asdict(t) for t in tasks]
    env = storage.env_for_workers()  # this process's storage/tracking settings reach every task and actor
    remote_args: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}

    stage_remote = ray.remote(num_cpus=1, max_retries=2, **remote_args)(_stage)
    staged = ray.get([stage_remote.remote(t, model, overrides) for t in task_dicts])
    plans: dict[int, dict[str, Any]] = {}
    for i, r in enumerate(staged):
        if "error" in r:
            report.failed[tasks[i].name] = r["error"]
        else:
            plans[i] = r["plan"]
    log(f"[2/4] staged {len(plans)} volumes (edges at {n} scales); scale 0 on each whole LR image")
    t0 = time.perf_counter()
    remote0 = ray.remote(num_cpus=inf.cpus_per_actor, num_gpus=gpus, max_retries=2, **remote_args)(_scale0)
    results0 = dict(zip(plans, ray.get([remote0.remote(task_dicts[i], model, gpus) for i in plans]), strict=True))
    for i, r in results0.items():
        if "error" in r:
            report.failed[tasks[i].name] = r["error"]
            plans.pop(i)
    report.scales.append(
        {"scale": 0, "tiles": len(plans), "seconds": time.perf_counter() - t0,
         "voxels": sum(int(np.prod(p["shapes"][0])) for p in plans.values())}
    )  # fmt: skip

    log(f"[3/4] HR scales 1..{n - 1}: tiles of all volumes on {inf.actors} actors ({gpus or 'no'} GPU each)")
    threads = max(1, int(inf.cpus_per_actor)) if gpus == 0 else 0
    for s in range(1, n):
        items = [
            {"volume": i, "start": list(t.start), "stop": list(t.stop)}
            for i, plan in plans.items()
            for t in vb.tiles_of(plan, s)
        ]
        if not items:
            break
        t0 = time.perf_counter()
        # a few blocks per actor: rows of one block share a task, so per-task overhead is amortised
        blocks = max(1, min(len(items), inf.actors * 4))
        ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            TileWorker,
            fn_constructor_kwargs={"model": model, "tasks": task_dicts, "scale": s, "gpus": gpus, "threads": threads},
            compute=ray.data.ActorPoolStrategy(size=inf.actors),
            batch_size=max(1, inf.batch_size),
            num_cpus=inf.cpus_per_actor,
            num_gpus=gpus,
            runtime_env=remote_args.get("runtime_env"),  # Ray Data restarts dead actors and retries their tiles
        )
        rows = ds.take_all()  # the barrier: scale s+1 starts when every tile of scale s is written
        tiles, rss = 0, max((int(r["peak_rss"]) for r in rows), default=0)
        for row in rows:
            v = int(row["volume"])
            if row["error"] and v in plans:
                report.failed[tasks[v].name] = f"scale {s}: {row['error']}"
                plans.pop(v)
            tiles += int(row["tiles"])
        report.tiles_computed += tiles
        report.scales.append(
            {"scale": s, "tiles": tiles, "seconds": time.perf_counter() - t0, "actor_peak_rss": rss,
             "voxels": sum(int(np.prod(p["shapes"][s])) for p in plans.values())}
        )  # fmt: skip
    for name in report.failed:
        for t in tasks:
            if t.name == name:
                vb.discard(t)

    log(f"[4/4] publishing {len(plans)} volumes")
    info = {"timings": report.scales}
    remote_pub = ray.remote(num_cpus=inf.cpus_per_actor, max_retries=2, **remote_args)(_publish)
    published = ray.get([remote_pub.remote(task_dicts[i], model, info) for i in plans])
    for i, r in zip(plans, published, strict=True):
        if "error" in r:
            report.failed[tasks[i].name] = r["error"]
        else:
            report.published.append(r["manifest"])
    report.seconds = time.perf_counter() - t_start
    return report
