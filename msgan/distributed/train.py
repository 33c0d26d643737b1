"""Ray Train: every scale GAN is its own ``TorchTrainer`` run, and all of them run at once.

The driver starts one thread per unfinished scale; each thread calls ``TorchTrainer.fit()``
(Train V2). A scale keeps its checkpoints under ``<storage>/ray/<job>-scale<i>``; a failed
worker group is restarted from its last checkpoint (``FailureConfig``) without touching the
other scales, and resubmitting the job resumes unfinished scales and skips finished ones
(their ``final/done.json`` exists).

Without pairs (``train.objective: unpaired``) every scale's workers also get the source set's stores and the
forward models of every scale (as dicts: :meth:`msgan.forward_model.ForwardModel.to_dict`) and build their
data with :func:`msgan.train.scale_data`.

Per scale, under ``<storage>/runs/<job>/scale_<i>/``:
  ``status.json``          step, attempt, pid, host, the step it resumed from (updated at checkpoints)
  ``final/generator.pt``   the trained generator's weights
  ``final/done.json``      written last: steps, time, losses, validation metrics, peak memory
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from msgan import storage
from msgan.config import Config, from_dict
from msgan.console import ProgressBoard, describe_error
from msgan.io.pyramids import CACHE_BYTES, open_pyramid
from msgan.memory import peak_device_bytes, peak_host_bytes
from msgan.train import ScaleData, ScaleTrainer, StepMetrics, scale_data

if TYPE_CHECKING:
    from msgan.registry import RunLogger


def _say(line: str, board: Any = None, **item: Any) -> None:
    """One progress line on the worker's stdout (in the worker's log; on the driver's console only with
    ``--verbose``) and, when ``item`` is given, a structured copy to the driver's progress board, which
    prints what a person reads. Ray Train's patched ``print`` would log twice when another library has
    wrapped ``sys.stdout``, hence the plain write."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    if item:
        ProgressBoard.send(board, t=time.time(), **item)


def scale_root(run_root: str, scale: int) -> str:
    return storage.join(run_root, f"scale_{scale}")


def read_json(uri: str) -> dict[str, Any] | None:
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


# ----------------------------------------------------------------------------- worker side


def _pyramids(volumes: Sequence[str], scale: int) -> list[Any]:
    """The stores' levels ``scale`` trains on: its own and, at an HR scale, the one below."""
    needed = {scale, scale - 1} if scale > 0 else {0}
    return [open_pyramid(u, needed) for u in volumes]


def _scale_data(
    volumes: Sequence[str], scale: int, cfg: Config, sources: Sequence[str] = (), forward: Sequence[Any] = ()
) -> ScaleData:
    """What this scale trains on (:func:`msgan.train.scale_data`): the pairs (or targets) of ``volumes``; without
    pairs, ``volumes`` are the target set's stores, ``sources`` the source set's and ``forward`` the forward
    models of every scale as dicts."""
    pyramids = _pyramids(volumes, scale)
    if cfg.train.objective != "unpaired":
        return scale_data(cfg, pyramids, scale)
    from msgan.forward_model import ForwardModel

    models = [ForwardModel.from_dict(d) for d in forward]
    # Scale 0 trains its cycle on every source-set image at the LR grid: read into memory. An HR scale never
    # reads the source set (its sources are synthesized from the targets); its stores are opened lazily
    # (cache_bytes=0: shapes only, not one voxel read) because ScaleData.from_unpaired wants the set.
    source_set = [open_pyramid(u, {scale}, cache_bytes=CACHE_BYTES if scale == 0 else 0) for u in sources]
    return scale_data(cfg, pyramids, scale, source_set, models)


def _sample_png(trainer: ScaleTrainer, path: Path, n: int = 4) -> Path:
    """A montage of ``n`` fixed validation samples (rows: centre slices of edges, generated, real), readable
    as the scale's sample in MLflow; the same samples at every call (fixed seed, no corruption)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from msgan.augment import Augmenter
    from msgan.config import AugmentConfig
    from msgan.nets import HRGenerator, crop
    from msgan.train import sample_hr_batch, sample_lr_batch

    rng = np.random.default_rng(7)
    clean = Augmenter(AugmentConfig(noise_p=0, blur_p=0, resolution_p=0, edge_noise_p=0))
    gen = trainer.generator.eval()
    if isinstance(gen, HRGenerator):
        b = sample_hr_batch(trainer.data, gen, trainer.cfg.train.hr_patch, n, rng, clean)
    else:
        b = sample_lr_batch(trainer.data, n, rng, clean, gen)
    with torch.no_grad():
        x = b.x.to(trainer.device)
        c = b.coarse.to(trainer.device) if b.coarse is not None else None
        y = (gen(x, c) if isinstance(gen, HRGenerator) else gen(x)).float().cpu()
    edges = crop(b.x, gen.halo)[:, -1:] if isinstance(gen, HRGenerator) else b.x[:, -1:]
    panels = [("edges", edges), ("generated", y), ("real", b.target)]
    rows = int(y.shape[0])
    fig, axes = plt.subplots(rows, 3, figsize=(6.6, 2.2 * rows + 0.3), squeeze=False)
    for r in range(rows):
        for ax, (name, t) in zip(axes[r], panels, strict=True):
            v = t[r, 0].float().numpy()
            img = v[v.shape[0] // 2] if v.ndim == 3 else v
            ax.imshow(img, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            ax.axis("off")
            if r == 0:
                ax.set_title(name)
    fig.suptitle(f"scale {trainer.scale}, step {trainer.step}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def train_loop(spec: dict[str, Any]) -> None:
    """Ray Train worker: train one scale, resuming from Ray's latest checkpoint when there is one.

    A failure's cause goes to the driver's progress board before Ray sees the exception, so the
    console shows it even when Ray retries the scale and its own logs are not forwarded."""
    try:
        _train_loop(spec)
    except Exception as err:
        import ray.train

        _say(
            f"[scale {spec['scale']}] failed: {describe_error(err)}",
            spec.get("board"),
            kind="failed",
            scale=int(spec["scale"]),
            rank=ray.train.get_context().get_world_rank(),
            error=describe_error(err),
        )
        raise


def _train_loop(spec: dict[str, Any]) -> None:
    """One scale on this worker: :meth:`ScaleTrainer.fit`, the loop of the local path, with Ray's parts
    (DDP wrapping, checkpoints through ``ray.train.report``, the status file, rank-0 progress and MLflow)
    plugged into its hooks by :class:`_Worker`."""
    w = _Worker.start(spec)
    w.announce()
    w.t0 = time.perf_counter()
    rank0 = w.rank == 0
    last = w.trainer.fit(
        w.steps,
        callback=w.on_log if rank0 else None,
        checkpoint=w.on_checkpoint,
        on_step=w.pending.append if rank0 else None,
    )
    if rank0:
        w.finish(last)


@dataclass
class _Worker:
    """A Ray Train worker's side of one scale: what :meth:`ScaleTrainer.fit` calls back into."""

    spec: dict[str, Any]
    cfg: Config
    root: str  # <storage>/runs/<job>/scale_<i>
    rank: int
    world: int
    device: torch.device
    trainer: ScaleTrainer
    resumed_from: int
    log: RunLogger | None = None  # rank 0, when the job tracks in MLflow
    status: dict[str, Any] = field(default_factory=dict)
    pending: list[StepMetrics] = field(default_factory=list)  # steps not yet sent to MLflow
    t0: float = 0.0

    @property
    def scale(self) -> int:
        return self.trainer.scale

    @property
    def steps(self) -> int:
        return self.cfg.steps_for(self.scale)

    @property
    def board(self) -> Any:
        return self.spec.get("board")

    @classmethod
    def start(cls, spec: dict[str, Any]) -> _Worker:
        """The scale's trainer on this worker's device (DDP-wrapped when several workers train it), resumed
        exactly from Ray's latest checkpoint when there is one."""
        import ray.train
        import ray.train.torch

        cfg = from_dict(spec["config"])
        scale = int(spec["scale"])
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        device = ray.train.torch.get_device()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        wrap = functools.partial(ray.train.torch.prepare_model, move_to_device=False) if world > 1 else None
        data = _scale_data(spec["volumes"], scale, cfg, spec.get("source_volumes", ()), spec.get("forward", ()))
        trainer = ScaleTrainer(cfg, scale, data, device, rank=rank, wrap=wrap)
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                trainer.restore(Path(d) / "state.pt")
        log = None
        if rank == 0 and spec.get("run_id"):
            from msgan.registry import RunLogger  # imports MLflow: only where it logs

            log = RunLogger(spec["tracking_uri"], spec["run_id"])
        root = scale_root(spec["run_root"], scale)
        return cls(spec, cfg, root, rank, world, device, trainer, trainer.step, log)

    def announce(self) -> None:
        """Rank 0: a new attempt in ``status.json``, its start on the board and in MLflow."""
        if self.rank != 0:
            return
        scale, steps = self.scale, self.steps
        previous = read_json(storage.join(self.root, "status.json")) or {}
        self.status = {
            "scale": scale,
            "steps": steps,
            "step": self.trainer.step,
            "attempt": int(previous.get("attempt", 0)) + 1,
            "resumed_from": self.resumed_from,
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        storage.write_text(storage.join(self.root, "status.json"), json.dumps(self.status))
        _say(
            f"[scale {scale}] attempt {self.status['attempt']}: starting at step {self.resumed_from}/{steps} "
            f"(world_size={self.world}, {self.device})",
            self.board,
            kind="start",
            scale=scale,
            steps=steps,
            step=self.resumed_from,
            attempt=self.status["attempt"],
            world=self.world,
            device=str(self.device),
        )
        if self.log is not None:
            self.log.metrics({"resumed_from_step": self.resumed_from}, step=self.status["attempt"])
            self.log.params({"scale": scale, "steps": steps, "workers": self.world, "device": str(self.device)})

    def on_log(self, m: StepMetrics) -> None:
        """Rank 0, every ``log_every`` steps: a progress line and the losses of every step since the last."""
        rate = (m.step - self.resumed_from) / (time.perf_counter() - self.t0)
        _say(
            f"[scale {self.scale}] step {m.step}/{self.steps}  G {m.loss_g:.3f} (L1 {m.loss_g_l1:.4f})  "
            f"D {m.loss_d:.3f}  {rate:.1f} steps/s",
            self.board,
            kind="step",
            scale=self.scale,
            step=m.step,
            loss_g=m.loss_g,
            l1=m.loss_g_l1,
            loss_d=m.loss_d,
        )
        if self.log is not None:
            rows = [({k: v for k, v in p.as_dict().items() if k.startswith("loss")}, p.step) for p in self.pending]
            self.log.metric_rows(rows)
        self.pending.clear()

    def on_checkpoint(self, trainer: ScaleTrainer, m: StepMetrics) -> None:
        """Every rank reports to Ray; rank 0 with the checkpoint, then the step in ``status.json``."""
        import ray.train

        metrics = {"step": m.step, "loss_g": m.loss_g, "loss_d": m.loss_d}
        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            trainer.save(Path(d) / "state.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        storage.write_text(storage.join(self.root, "status.json"), json.dumps(self.status | {"step": m.step}))

    def finish(self, last: StepMetrics | None) -> None:
        """Rank 0: validation, MLflow's last metrics and sample, then ``final/generator.pt`` and, last,
        ``final/done.json``."""
        seconds = time.perf_counter() - self.t0
        trainer, scale, spec = self.trainer, self.scale, self.spec
        val_data = None
        if spec.get("val_volumes"):  # pairs, also without pairs (data.pairs): their sources read, not synthesized
            thr = self.cfg.train.foreground_threshold
            val_data = ScaleData.from_pyramids(_pyramids(spec["val_volumes"], scale), scale, thr)
        if val_data is None and self.cfg.train.objective == "unpaired":  # no pairs to score: no validation figure
            val = {"val_l1": float("nan"), "val_ssim": float("nan")}  # (the training data's would be synthetic)
        else:
            val = trainer.evaluate(val_data)
        peak = peak_device_bytes(self.device) or peak_host_bytes()
        summary = {
            "scale": scale,
            "steps": trainer.step,
            "seconds": seconds,
            "attempt": self.status["attempt"],
            "resumed_from": self.resumed_from,
            "loss_g": last.loss_g if last else None,
            "loss_d": last.loss_d if last else None,
            "loss_g_l1": last.loss_g_l1 if last else None,
            "peak_memory_bytes": peak,
            "peak_memory_kind": "cuda" if self.device.type == "cuda" else "host_rss",
            **val,
        }
        if self.log is not None:
            self.log.metrics(
                {k: float(v) for k, v in val.items() if math.isfinite(v)} | {"peak_memory_mib": peak / 2**20},
                step=trainer.step,
            )
            with tempfile.TemporaryDirectory() as d:
                self.log.artifact(_sample_png(trainer, Path(d) / f"scale{scale}_step{trainer.step}.png"), "samples")
        state = {k: v.detach().cpu() for k, v in trainer.generator.state_dict().items()}
        buf = io.BytesIO()
        torch.save(state, buf)
        storage.write_bytes(storage.join(self.root, "final", "generator.pt"), buf.getvalue())
        storage.write_text(storage.join(self.root, "final", "done.json"), json.dumps(summary))
        _say(
            f"[scale {scale}] done: {trainer.step} steps in {seconds:.1f}s",
            self.board,
            kind="done",
            scale=scale,
            step=trainer.step,
            seconds=seconds,
        )


# ----------------------------------------------------------------------------- driver side


@dataclass(frozen=True)
class ScaleOutcome:
    scale: int
    summary: dict[str, Any] | None
    skipped: bool
    error: str | None = None


def use_gpu(cfg: Config) -> bool:
    """Whether the scales train on GPUs (``job.device``; ``auto``: when the cluster has one)."""
    if cfg.job.device != "auto":
        return cfg.job.device == "gpu"
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) >= 1


def run_scale(spec: dict[str, Any], cfg: Config, job: str, use_gpu: bool) -> ScaleOutcome:
    """Train one scale with its own TorchTrainer (blocking); skip it when it finished before."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scale = int(spec["scale"])
    done_uri = storage.join(scale_root(spec["run_root"], scale), "final", "done.json")
    done = read_json(done_uri)
    if done is not None:
        return ScaleOutcome(scale, done, skipped=True)
    path, fs = storage.pyarrow_storage(storage.join(spec["storage"], "ray"))
    resources: dict[str, float] = {"CPU": cfg.job.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=spec,
        scaling_config=ScalingConfig(
            num_workers=cfg.job.workers_per_scale, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=f"{job}-scale{scale}",
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(  # type: ignore[call-arg]  # V2 fields; the stubs show V1
                max_failures=cfg.job.max_failures, controller_failure_limit=3
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": storage.env_for_workers()},
        ),
    )
    try:
        trainer.fit()
    except Exception as err:  # one scale's failure must not take the others down
        return ScaleOutcome(scale, None, skipped=False, error=failure_cause(err))
    return ScaleOutcome(scale, read_json(done_uri), skipped=False)


def failure_cause(err: BaseException) -> str:
    """One line for a failed ``fit()``: the first worker's own exception (not Ray's wrapper and traceback)."""
    failures = getattr(err, "worker_failures", None) or {}
    cause: BaseException = next(iter(failures.values()), None) or getattr(err, "controller_failure", None) or err
    inner = getattr(cause, "cause", None)  # ray.exceptions.RayTaskError carries the user's exception
    if isinstance(inner, BaseException):
        cause = inner
    return describe_error(cause)


def train_all_scales(
    cfg: Config,
    job: str,
    volumes: Sequence[str],
    val_volumes: Sequence[str],
    storage_root: str,
    tracking_uri: str | None,
    run_ids: dict[int, str] | None,
    scales: Sequence[int] | None = None,
    board: Any = None,
    source_volumes: Sequence[str] = (),
    forward: Sequence[dict[str, Any]] = (),
) -> list[ScaleOutcome]:
    """Launch every (unfinished) scale at once, one TorchTrainer each; wait for all. Workers send their
    progress to ``board`` (a :class:`msgan.console.ProgressBoard` handle) when one is given. Without pairs,
    ``volumes`` are the target set's stores, ``source_volumes`` the source set's and ``forward`` every scale's
    forward model (:meth:`msgan.forward_model.ForwardModel.to_dict`), handed to every scale's workers."""
    run_root = storage.join(storage_root, "runs", job)
    gpu = use_gpu(cfg)
    todo = list(range(cfg.num_scales)) if scales is None else list(scales)
    specs = [
        {
            "scale": s,
            "config": cfg.to_dict(),
            "volumes": list(volumes),
            "val_volumes": list(val_volumes),
            "source_volumes": list(source_volumes),
            "forward": [dict(m) for m in forward],
            "run_root": run_root,
            "storage": storage_root,
            "tracking_uri": tracking_uri,
            "run_id": (run_ids or {}).get(s),
            "board": board,
        }
        for s in todo
    ]
    with ThreadPoolExecutor(max_workers=len(specs)) as pool:
        return list(pool.map(lambda sp: run_scale(sp, cfg, job, gpu), specs))


def load_generator(cfg: Config, run_root: str, scale: int) -> torch.nn.Module:
    """Scale ``scale``'s trained generator from ``final/generator.pt`` under ``run_root``, through the
    cascade's loader (weights only, every tensor's shape checked against the config before loading)."""
    from msgan.cascade import WEIGHTS_MAX_BYTES  # the one weights loader (Cascade.load uses it too)
    from msgan.cascade import load_generator as from_weights

    uri = storage.join(scale_root(run_root, scale), "final", "generator.pt")
    return from_weights(cfg, scale, storage.read_bytes(uri, limit=WEIGHTS_MAX_BYTES), uri).eval()


def load_generators(cfg: Config, storage_root: str, job: str) -> list[torch.nn.Module]:
    """Every scale's trained generator (:func:`load_generator`)."""
    run_root = storage.join(storage_root, "runs", job)
    return [load_generator(cfg, run_root, s) for s in range(cfg.num_scales)]
