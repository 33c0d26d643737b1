"""The task benchmark: every translation task x every method, per held-out volume, resumable.

    python benchmarks/tasks.py [--shape 128] [--tasks low-dose contrast] [--methods input linear nlm cnn edges ours]
    python benchmarks/tasks.py --smoke          # 32^3, tiny training: checks the whole path in minutes
    python benchmarks/tasks.py --tables         # only print / write the tables from what is measured
    python benchmarks/tasks.py --shape 256 --tasks contrast low-dose --compare docs/results/tasks.json

At sizes above 128^3 each task config is carried over with one more scale per doubling (``task_config``), the
default methods are ``LARGE_METHODS`` and results go to ``docs/results/tasks_<shape>.json``; ``--compare``
adds each method's change from another size's results to the printed tables.

Tasks and seeds: ``msgan.data.tasks`` (training 101-108, held-out 301-308, fixed before any run).
Methods, all fitted or trained on the same training pairs and scored on the same held-out volumes
with the same mask (``msgan.metrics.ct_metrics``):

- ``input``: the input itself;
- ``linear``: radially symmetric linear filter fitted by least squares in the Fourier domain;
- ``nlm``: non-local means of the input (the settings of docs/results.md: patch 5, distance 6,
  h = 0.8 sigma), on HU / 1024 without clipping, all cores;
- ``nlm_tuned``: the same filter with the noise level fitted on training pairs (robust standard
  deviation of input - target in the body, seeds 101-104) instead of estimated from the image (the
  wavelet estimate misses most of a soft kernel's low-frequency noise, so ``nlm`` does next to
  nothing there), and h / sigma chosen per task from ``NLM_FACTORS`` by mean SSIM on the central
  half (64^3 of 128^3) of validation volumes 201-202;
- ``cnn``: residual U-Net, L1 on patches; total steps = our whole cascade's, patch >= our HR
  patch, parameters >= our finest scale's; stitched with blended overlaps;
- ``cnn_large``: the same CNN and budget on the largest patch whose training step's measured peak fits the
  highest measured training-step peak of any of our scales, both probed alike (a few steps in a fresh
  process; ``cnn_large_job``; trained after ours, checkpointed every 100 steps like every model here);
- ``edges``: the paper's cascade, generating from edges (``condition=edges``);
- ``ours``: the cascade conditioned on the source image (``configs/<task>.yaml``, adversarial loss kept).

Results go to ``docs/results/tasks.json`` (``{task: {method: {metric: [per volume]}}}``, each method
with the ``seeds`` it holds) after every volume; trained models stay in ``--workdir``, so a rerun
resumes where the last one stopped and loses nothing but the volume in flight. Translation times
are measured with all cores (``torch`` threads and NLM threads alike).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msgan.cascade import Cascade
from msgan.config import Config, ConfigError, load_config
from msgan.data.tasks import METRIC_WINDOW, SEEDS, TASKS, TaskVolume, check_task, make_task
from msgan.metrics import ct_metrics, hallucination_ml, holm, paired_test

METHODS = ("input", "linear", "nlm", "nlm_tuned", "cnn", "cnn_large", "edges", "ours")
CNNS = ("cnn", "cnn_large")
# what a run at more than 128^3 measures unless --methods says otherwise (issue 23: the 256^3 tables)
LARGE_METHODS = ("input", "linear", "nlm_tuned", "cnn", "cnn_large", "ours")
NLM_FACTORS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)  # h / fitted sigma tried for nlm_tuned
TABLE_KEYS = ("ssim", "psnr", "mae_hu", "rmse_hu", "hallucination_ml", "noise_hu", "emphysema_error")
TESTED = ("ssim", "mae_hu", "hallucination_ml")  # paired t-tests of ours against every baseline, Holm-corrected
HIGHER_IS_BETTER = {"ssim": True, "psnr": True}
SMOKE = {"num_scales": 2, "train.steps_per_scale": [30, 20], "train.hr_patch": 12, "lr_generator.depth": 2}
CNN_DEPTH = 2
CNN_PATCH = 24  # >= train.hr_patch of every task config (16); a multiple of 2**CNN_DEPTH
PROBE_STEPS = 3  # training steps of a cnn_large patch probe (the peak is reached by the second)
PROBE_KEYS = ("min_parameters", "depth", "batch_size", "patch")
# what names a CNN run: a checkpoint of another never seeds it
CNN_RUN_KEYS = ("task", "seeds", "shape", "min_parameters", "depth", "steps", "patch", "batch_size")


# ----------------------------------------------------------------------------- configs


def task_config(task: str, shape: int, smoke: bool, overrides: list[str]) -> Config:
    """``configs/<task>.yaml`` at ``shape`` (the configuration of ``ours``). Above the size the config was made
    for (128^3), it is carried over with one more scale per doubling, each trained like the finest scale before
    it (``more_scales``), so every HR scale keeps its patch and the LR grid its size."""
    path = Path(__file__).resolve().parents[1] / "configs" / f"{task}.yaml"
    made = load_config(str(path))
    own = any(o.split("=", 1)[0].strip() in ("num_scales", "train.steps_per_scale") for o in overrides)
    carried = [] if own else more_scales(made, shape // made.data.phantom.shape[0])  # an explicit override wins
    extra = [f"data.phantom.shape=[{shape},{shape},{shape}]", *carried]
    cfg = load_config(str(path), [*extra, *overrides])
    if smoke:
        cfg = cfg.replace(**SMOKE)
    return cfg


def more_scales(cfg: Config, factor: int) -> list[str]:
    """Overrides that add one scale per doubling in ``factor`` (>= 2), each with the finest scale's steps."""
    extra = 0
    while factor >= 2 ** (extra + 1):
        extra += 1
    if not extra:
        return []
    steps = [cfg.steps_for(s) for s in range(cfg.num_scales)]
    steps += [steps[-1]] * extra
    return [f"num_scales={cfg.num_scales + extra}", f"train.steps_per_scale=[{','.join(map(str, steps))}]"]


def edges_config(cfg: Config) -> Config:
    """The paper's cascade: the same networks and steps, conditioned on edges only, clipped to the
    window; trained on the same pairs as every method (the source's edges -> the target)."""
    keys = cfg.to_dict()
    over: dict[str, Any] = {}
    if "condition" in keys:
        over["condition"] = "edges"
    for section in ("hr_generator", "lr_generator"):
        if "source_residual" in keys.get(section, {}):
            over[f"{section}.source_residual"] = False
    if "source_residual" in keys:
        over["source_residual"] = False
        over["hr_generator.residual"] = True  # the paper: previous scale + correction
    if "outside" in keys.get("intensity", {}):
        over["intensity.outside"] = "clip"  # the paper: the window's ends
    return cfg.replace(**over) if over else cfg


def ours_pending(cfg: Config) -> str | None:
    """Why ``ours`` cannot run with this code yet, or None."""
    keys = cfg.to_dict()
    if keys.get("condition", "edges") == "edges":
        return "image conditioning (issue 12 item 1) has not landed: the config has no condition other than edges"
    return None


# ----------------------------------------------------------------------------- results file


RECORDED = ("methods", "reference")  # meta a results file records of its own runs, never taken from another's


class Results:
    """``{task: {method: {"seeds": [...], metric: [...]}}}`` on disk, rewritten atomically per volume."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.meta_path = path, path.with_name(path.stem + "_meta.json")
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        old = json.loads(self.meta_path.read_text()) if self.meta_path.exists() else {}
        keys = ("shape", "heldout", "validation")
        if old and [old.get(k) for k in keys] != [meta.get(k) for k in keys]:
            was, now = [old.get(k) for k in keys], [meta.get(k) for k in keys]
            raise SystemExit(
                f"{path} holds results of (shape, held-out, validation seeds) {was}; this run is {now}: pass "
                "another --out (never mix sizes or seeds in one table)"
            )
        # what this file recorded (each method's budget and seconds, the references) is its own: a run's meta
        # names the run (size, seeds), so another file's records never replace these, nor share their dicts
        run = {k: v for k, v in meta.items() if k not in RECORDED}
        self.meta = json.loads(json.dumps({**old, **run}))
        self.meta.setdefault("methods", {})

    def done(self, task: str, method: str, seed: int) -> bool:
        return seed in self.data.get(task, {}).get(method, {}).get("seeds", [])

    def add(self, task: str, method: str, seed: int, metrics: dict[str, float]) -> None:
        entry = self.data.setdefault(task, {}).setdefault(method, {"seeds": []})
        n = len(entry["seeds"])
        for k, v in metrics.items():
            col = entry.setdefault(k, [None] * n)
            col.append(None if v is None or not np.isfinite(v) else float(v))
        for k, col in entry.items():
            if k != "seeds" and len(col) == n:
                col.append(None)
        entry["seeds"].append(seed)
        self.save()

    def merge(self, other: Results) -> int:
        """Add the volumes ``other`` measured that this file lacks (runs of other methods in parallel
        write their own files); returns how many were added."""
        added = 0
        for task, rows in other.data.items():
            for method, entry in rows.items():
                for i, seed in enumerate(entry["seeds"]):
                    if not self.done(task, method, seed):
                        self.add(task, method, seed, {k: v[i] for k, v in entry.items() if k != "seeds"})
                        added += 1
        for task, methods in other.meta.get("methods", {}).items():
            for method, info in methods.items():
                self.meta["methods"].setdefault(task, {}).setdefault(method, {}).update(info)
        for task, ref in other.meta.get("reference", {}).items():
            self.meta.setdefault("reference", {}).setdefault(task, {}).update(ref)
        self.save()
        return added

    def note(self, task: str, method: str, **info: Any) -> None:
        self.meta["methods"].setdefault(task, {}).setdefault(method, {}).update(info)
        self.save()

    def save(self) -> None:
        for path, obj in ((self.path, self.data), (self.meta_path, self.meta)):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(obj, indent=1))
            os.replace(tmp, path)


# ----------------------------------------------------------------------------- training (own processes)


def pair_pyramid(cfg: Config, source: np.ndarray, target: np.ndarray) -> Any:
    """The training pyramid of one (source, target) pair: the target's images with the source's edges
    and images (what every cascade sees at inference). Code without paired training (before image
    conditioning) trains on the target's own edges, as the paper does."""
    import msgan.pyramid as pyr

    build_pair = getattr(pyr, "build_pair_pyramid", None)
    if build_pair is None:
        return pyr.build_pyramid(target, cfg.num_scales, cfg.intensity, cfg.edges)
    return build_pair(source, target, cfg.num_scales, cfg.intensity, cfg.edges)


def _train_scale(job: dict[str, Any]) -> dict[str, Any]:
    """One scale of one cascade on a task's training pairs, in its own process (one torch thread). A job with
    ``probe`` trains that many steps on its first training pair instead (no checkpoint, no weights kept) and
    reports the step's peak: :func:`probe_scale_step`, measured as the CNN's :func:`probe_cnn_step`."""
    from msgan.config import from_dict
    from msgan.memory import current_rss, peak_host_bytes, reset_peak_rss
    from msgan.train import ScaleData, ScaleTrainer
    from msgan.volumes.heap import release_memory

    torch.set_num_threads(1)
    cfg = from_dict(job["config"], {"train.checkpoint_every": 100})  # a stopped run resumes within the scale
    scale, probe = job["scale"], int(job.get("probe") or 0)
    pyramids = []
    for seed in job["seeds"][:1] if probe else job["seeds"]:
        tv = make_task(job["task"], seed, job["shape"], workers=1)
        pyramids.append(pair_pyramid(cfg, tv.input, tv.target))
        del tv
    data = ScaleData.from_pyramids(pyramids, scale, cfg.train.foreground_threshold)
    trainer = ScaleTrainer(cfg, scale, data)
    checkpoint = None if probe else Path(job["checkpoint"])
    if checkpoint and checkpoint.exists() and torch.load(checkpoint, weights_only=True).get("config") != cfg.to_dict():
        checkpoint.unlink()  # an earlier run's checkpoint of another config never seeds this one
    if checkpoint and checkpoint.exists():
        trainer.restore(checkpoint)
    # the step's peak, not the data loading's (the CNN is measured the same way); the heap the loading freed goes
    # back to the OS first, or the loop would reuse it unseen and its peak would read low
    release_memory()
    reset_peak_rss()
    base = current_rss()
    t0 = time.perf_counter()
    trainer.fit(probe or cfg.steps_for(scale), checkpoint=checkpoint)
    step_peak = peak_host_bytes() - base
    if probe:
        return {"step_peak_bytes": step_peak}
    buf = io.BytesIO()
    torch.save(trainer.generator.state_dict(), buf)
    return {"weights": buf.getvalue(), "seconds": time.perf_counter() - t0, "step_peak_bytes": step_peak}


def _train_cnn(job: dict[str, Any]) -> dict[str, Any]:
    """The CNN baseline (``cnn`` or ``cnn_large``) on the task's training pairs, in its own process. A job
    with ``probe`` trains that many steps on a synthetic pair instead and reports only the step's peak."""
    from msgan.baselines import body_centres, cnn_for_budget, train_cnn
    from msgan.memory import current_rss, peak_host_bytes, reset_peak_rss
    from msgan.volumes.heap import release_memory

    torch.set_num_threads(1)
    pairs = []
    if job.get("probe"):
        side = job["patch"] + 2 * 2 ** job["depth"]
        noise = np.random.default_rng(0).normal(0.0, 100.0, (side,) * 3).astype(np.float32)
        pairs.append((noise, noise))
    else:
        for seed in job["seeds"]:
            tv = make_task(job["task"], seed, job["shape"], workers=1)
            pairs.append((tv.input, tv.target))
    torch.manual_seed(0)
    net = cnn_for_budget(3, job["min_parameters"], job["depth"])

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), f"  {job['task']}: {job['variant']} {msg}", flush=True)

    steps = int(job.get("probe") or job["steps"])
    checkpoint = None if job.get("probe") else Path(job["work"]) / f"{job['variant']}.ckpt"  # a stopped run resumes
    tag = json.loads(json.dumps({k: job[k] for k in CNN_RUN_KEYS}))
    stored = torch.load(checkpoint, weights_only=True) if checkpoint is not None and checkpoint.exists() else None
    if checkpoint is not None and stored is not None and stored.get("run", {}).get("tag") != tag:
        checkpoint.unlink()  # an earlier run's checkpoint of another budget or data never seeds this one
    del stored
    centres = [body_centres(t) for _, t in pairs]  # the patch sampler's index: data, not the step
    release_memory()  # as for our scales: the loop's allocations show in the peak
    reset_peak_rss()
    base = current_rss()
    info = train_cnn(net, pairs, steps, job["patch"], job["batch_size"], log=None if job.get("probe") else log,
                     log_every=300, checkpoint=checkpoint, tag=tag, centres=centres)  # fmt: skip
    step_peak = peak_host_bytes() - base
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    width = net.body.down[0][0].out_channels  # type: ignore[index]
    return {"kind": job["variant"], "weights": buf.getvalue(), "width": int(width), **info,
            "parameters": sum(p.numel() for p in net.parameters()), "step_peak_bytes": step_peak}  # fmt: skip


def _atomic_bytes(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def training_jobs(
    task: str, cfgs: dict[str, Config], methods: list[str], shape: tuple[int, ...], work: Path,
    seeds: tuple[int, ...] = SEEDS["train"],
) -> list[dict[str, Any]]:  # fmt: skip
    """What of ``methods`` has no weights in ``work`` yet: one job per cascade scale, one for the CNN."""

    jobs: list[dict[str, Any]] = []
    for m in cfgs:
        if m in methods:
            for s in range(cfgs[m].num_scales):
                job = _scale_job(m, s, cfgs[m], task, seeds, shape, work)
                weights = work / m / f"scale_{s}.pt"
                if weights.exists():
                    if _trained_as(weights) == _training_record(job):
                        continue
                    weights.unlink()  # another config's (or an unrecorded) model never stands in for this one
                jobs.append(job)
    ref = cfgs.get("ours") or cfgs.get("edges") or next(iter(cfgs.values()))
    if "cnn" in methods and not (work / "cnn.pt").exists():
        jobs.append(cnn_job(task, ref, shape, work, seeds))
    return jobs


def _scale_job(variant: str, scale: int, cfg: Config, task: str, seeds: tuple[int, ...], shape: tuple[int, ...],
               work: Path) -> dict[str, Any]:  # fmt: skip
    """One scale's training job for :func:`_train_scale`, checkpointing into ``work / variant``."""
    return {"variant": variant, "scale": scale, "config": cfg.to_dict(), "task": task, "seeds": list(seeds),
            "shape": shape, "work": str(work), "steps_per_scale": [cfg.steps_for(i) for i in range(cfg.num_scales)],
            "checkpoint": str(work / variant / f"scale_{scale}.ckpt")}  # fmt: skip


def cnn_job(task: str, ref: Config, shape: tuple[int, ...], work: Path,
            seeds: tuple[int, ...] = SEEDS["train"]) -> dict[str, Any]:  # fmt: skip
    """The CNN baseline's training job by the budget rules: total steps = our whole cascade's, parameters >= our
    finest scale's, patch >= our HR patch (``cnn_large`` takes it with another patch)."""
    from msgan.nets import build_generator, count_parameters

    finest = count_parameters(build_generator(ref, ref.num_scales - 1))
    steps = sum(ref.steps_for(s) for s in range(ref.num_scales))
    patch = max(CNN_PATCH if ref.data.phantom.shape[0] >= 64 else 8, ref.train.hr_patch)
    patch = -(-patch // 2**CNN_DEPTH) * 2**CNN_DEPTH
    return {"variant": "cnn", "task": task, "seeds": list(seeds), "shape": shape, "work": str(work),
            "min_parameters": finest, "depth": CNN_DEPTH, "steps": steps, "patch": patch,
            "batch_size": ref.train.batch_size}  # fmt: skip


def cnn_large_for(task: str, args: argparse.Namespace, cfgs: dict[str, Config], work: Path, results: Results,
                  log: Callable[[str], None]) -> dict[str, Any] | None:  # fmt: skip
    """:func:`cnn_large_job` for ``task`` with ours' config as the reference of the CNN's budget."""
    ref = cfgs.get("ours") or task_config(task, args.shape, args.smoke, args.set)
    return cnn_large_job(task, ref, (args.shape,) * 3, work, results, log)


def _probe(train: Callable[[dict[str, Any]], dict[str, Any]], job: dict[str, Any]) -> int:
    """``train`` run on ``job`` for :data:`PROBE_STEPS` steps in a fresh process: its training-step peak (bytes)."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return int(pool.submit(train, {**job, "probe": PROBE_STEPS}).result()["step_peak_bytes"])


def probe_cnn_step(job: dict[str, Any]) -> int:
    """The measured training-step peak (bytes) of the CNN ``job`` at its patch: a few steps in a fresh process."""
    return _probe(_train_cnn, job)


def probe_scale_step(job: dict[str, Any]) -> int:
    """The measured training-step peak (bytes) of one of our scales (``job`` of :func:`_scale_job`): a few steps
    in a fresh process on one training pair, the heap the data loading freed handed back first; as
    :func:`probe_cnn_step` measures the CNN."""
    return _probe(_train_scale, job)


def cnn_large_job(task: str, ref: Config, shape: tuple[int, ...], work: Path, results: Results,
                  log: Callable[[str], None], measure: Callable[[dict[str, Any]], int] = probe_cnn_step,
                  measure_scale: Callable[[dict[str, Any]], int] = probe_scale_step,
                  ) -> dict[str, Any] | None:  # fmt: skip
    """``cnn_large``: the CNN on the largest patch whose training step's measured peak fits the highest measured
    training-step peak of any of our scales. Both are measured alike: a few training steps in a fresh process
    (:func:`probe_scale_step`, :func:`probe_cnn_step`), the process's peak resident memory over them above what
    it held before (``msgan.memory.reset_peak_rss``, after the freed heap went back to the OS). The CNN's patch
    is found by doubling, then bisecting in steps of 2**depth; every probe is kept in ``work``. None when
    ``cnn_large`` is trained already."""
    if (work / "cnn_large.pt").exists():
        return None
    base = cnn_job(task, ref, shape, work)
    path = work / "cnn_large_patch.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    ours_config = json.loads(json.dumps(ref.to_dict()))
    if known.get("base") != {k: base[k] for k in PROBE_KEYS} or known.get("ours_config") != ours_config:
        known = {"base": {k: base[k] for k in PROBE_KEYS}, "ours_config": ours_config, "ours_probes": {},
                 "probes": {}}  # fmt: skip
    ours: dict[str, int] = known["ours_probes"]
    for s in range(ref.num_scales):
        if str(s) not in ours:
            ours[str(s)] = int(measure_scale(_scale_job("ours", s, ref, task, SEEDS["train"], shape, work)))
            _atomic_bytes(path, json.dumps(known).encode())
            log(f"  {task}: ours' scale {s}: training step peak {ours[str(s)] / 2**20:.0f} MiB")
    budget = max(ours.values())
    probes: dict[str, int] = known["probes"]
    step = 2**CNN_DEPTH

    def fits(patch: int) -> bool:
        if str(patch) not in probes:
            probes[str(patch)] = int(measure({**base, "patch": patch, "variant": "cnn_large"}))
            _atomic_bytes(path, json.dumps(known).encode())
            log(f"  {task}: cnn_large probe: patch {patch}: step peak {probes[str(patch)] / 2**20:.0f} MiB "
                f"(budget {budget / 2**20:.0f} MiB)")  # fmt: skip
        return probes[str(patch)] <= budget

    # lo: the largest patch known to fit (or the CNN's own), hi: the smallest known not to
    lo, hi = base["patch"], None
    limit = min(shape)
    p = lo
    while hi is None:
        nxt = min(2 * p, limit // step * step)
        if nxt <= p:
            break
        if fits(nxt):
            lo = p = nxt
        else:
            hi = nxt
    while hi is not None and hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    scale = max(ours, key=lambda k: ours[k])
    results.note(task, "cnn_large", pending=None, patch=lo, budget_bytes=budget, budget_from=f"ours scale {scale}",
                 ours_probe_peaks_bytes=dict(ours), probe_peaks_bytes=dict(probes))  # fmt: skip
    return {**base, "variant": "cnn_large", "patch": lo}


def _training_record(job: dict[str, Any]) -> dict[str, Any]:
    """What a scale's weights were trained as: config, seeds and volume shape (JSON's own types)."""
    return dict(json.loads(json.dumps({"config": job["config"], "seeds": job["seeds"], "shape": list(job["shape"])})))


def _trained_as(weights: Path) -> dict[str, Any] | None:
    record = weights.with_suffix(".json")
    return dict(json.loads(record.read_text())) if record.exists() else None


def _cost(job: dict[str, Any]) -> int:
    """Scheduling order: the whole-LR-image scale 0 first (the longest by far), then the CNN, then
    the patch scales, so the pool's processes finish together."""
    return 0 if job.get("scale") == 0 or job["variant"] == "cnn_large" else 1 if job["variant"] == "cnn" else 2


def run_training(jobs: list[dict[str, Any]], workers: int, results: Results, log: Callable[[str], None]) -> None:
    """Run training ``jobs`` (of any tasks) in one pool, longest first; each result is saved the moment
    its job ends, so a stopped run keeps every finished scale."""
    if not jobs:
        return
    jobs = sorted(jobs, key=_cost)
    log(f"training {len(jobs)} jobs on {workers} processes: "
        + ", ".join(f"{j['task']}:{j['variant']}/{j.get('scale', '-')}" for j in jobs))  # fmt: skip
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_train_cnn if j["variant"] in CNNS else _train_scale, j): j for j in jobs}
        for fut in as_completed(futures):
            job, r = futures[fut], fut.result()
            task, work = job["task"], Path(job["work"])
            if job["variant"] in CNNS:
                _atomic_bytes(work / f"{job['variant']}.pt", r["weights"])
                results.note(task, job["variant"], steps=r["steps"], train_seconds=r["seconds"], width=r["width"],
                             depth=CNN_DEPTH, patch=job["patch"], parameters=r["parameters"],
                             min_parameters=job["min_parameters"], batch_size=job["batch_size"],
                             step_peak_bytes=r["step_peak_bytes"])  # fmt: skip
            else:
                weights = work / job["variant"] / f"scale_{job['scale']}.pt"
                _atomic_bytes(weights.with_suffix(".json"), json.dumps(_training_record(job)).encode())
                _atomic_bytes(weights, r["weights"])
                info = results.meta["methods"].get(task, {}).get(job["variant"], {})
                seconds, peaks = info.get("train_seconds", {}), info.get("step_peak_bytes", {})
                results.note(task, job["variant"], train_seconds={**seconds, str(job["scale"]): r["seconds"]},
                             steps_per_scale=job["steps_per_scale"],
                             step_peak_bytes={**peaks, str(job["scale"]): r["step_peak_bytes"]})  # fmt: skip
            log(
                f"  {task}: trained {job['variant']}/{job.get('scale', '-')} in {r['seconds']:.0f} s "
                f"({time.perf_counter() - t0:.0f} s into this pool)"
            )


def train_task(
    task: str, cfgs: dict[str, Config], methods: list[str], shape: tuple[int, ...], work: Path,
    workers: int, results: Results, log: Callable[[str], None], seeds: tuple[int, ...] = SEEDS["train"],
) -> None:  # fmt: skip
    """Train whatever of ``methods`` has no weights in ``work`` yet: cascade scales and the CNN, in parallel."""
    run_training(training_jobs(task, cfgs, methods, shape, work, seeds), workers, results, log)


# ----------------------------------------------------------------------------- translation


def tune_nlm(task: str, shape: tuple[int, ...], window: tuple[float, float], work: Path, results: Results,
             log: Callable[[str], None]) -> dict[str, float]:  # fmt: skip
    """``nlm_tuned``'s settings: the noise level fitted on training pairs (1.4826 x median absolute
    deviation of input - target in the body, HU / 1024) and the h / sigma of :data:`NLM_FACTORS` with
    the best mean SSIM on the central half of the first two validation volumes (never a held-out
    one); kept in ``work`` and the results' meta."""
    from msgan.baselines import nlm_filter

    path = work / "nlm_tuned.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    diffs = []
    for seed in SEEDS["train"][:4]:
        tv = make_task(task, seed, shape)
        d = (tv.input - tv.target)[tv.labels != 0] / 1024.0
        diffs.append(d)
    d = np.concatenate(diffs)
    sigma = float(1.4826 * np.median(np.abs(d - np.median(d))))
    crop = tuple(slice(n // 4, n // 4 + n // 2) for n in shape)
    seeds = SEEDS["validation"][:2]
    ssim: dict[float, list[float]] = {f: [] for f in NLM_FACTORS}
    for seed in seeds:
        tv = make_task(task, seed, shape)
        for f in NLM_FACTORS:
            out = nlm_filter(tv.input[crop] / 1024.0, h_factor=f, sigma=sigma, workers=0) * 1024.0
            r = ct_metrics(out, tv.target[crop], tv.noiseless[crop], tv.labels[crop], tv.spacing, window)
            ssim[f].append(r["ssim"])
    means = {f: float(np.mean(v)) for f, v in ssim.items()}
    best = max(means, key=lambda f: means[f])
    log(f"  {task}: nlm_tuned sigma {sigma * 1024:.1f} HU, h = {best} sigma (validation SSIM "
        + ", ".join(f"{f}: {v:.4f}" for f, v in means.items()) + ")")  # fmt: skip
    settings = {"h_factor": best, "sigma": sigma}
    _atomic_bytes(path, json.dumps({**settings, "validation_ssim": means}).encode())
    results.note(task, "nlm_tuned", h_factor=best, sigma_hu=sigma * 1024, validation_seeds=list(seeds),
                 sigma_from="training seeds 101-104", crop="central half per axis",
                 validation_ssim={str(f): v for f, v in means.items()})  # fmt: skip
    return settings


def load_methods(task: str, cfgs: dict[str, Config], methods: list[str], work: Path, train_pairs: Callable[[], Any]
                 ) -> dict[str, Callable[[np.ndarray], np.ndarray]]:  # fmt: skip
    from msgan.baselines import ResidualUNet, cnn_translate, fit_radial_filter, nlm_filter

    out: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    if "input" in methods:
        out["input"] = lambda x: x
    if "linear" in methods:
        path = work / "linear.npz"
        if not path.exists():
            filt = fit_radial_filter(train_pairs())
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, edges=filt.edges, gain=filt.gain)
        from msgan.baselines import RadialFilter

        z = np.load(path)
        filt = RadialFilter(z["edges"], z["gain"])
        out["linear"] = filt.apply
    if "nlm" in methods:
        out["nlm"] = lambda x: nlm_filter(np.asarray(x) / 1024.0, workers=0) * 1024.0
    if "nlm_tuned" in methods and (work / "nlm_tuned.json").exists():
        t = json.loads((work / "nlm_tuned.json").read_text())
        h, sigma = float(t["h_factor"]), float(t["sigma"])
        out["nlm_tuned"] = lambda x: nlm_filter(np.asarray(x) / 1024.0, h_factor=h, sigma=sigma, workers=0) * 1024.0
    for variant in CNNS:
        if variant in methods and (work / f"{variant}.pt").exists():
            state = torch.load(work / f"{variant}.pt", weights_only=True)
            width = int(state["body.down.0.0.weight"].shape[0])
            net = ResidualUNet(3, width, CNN_DEPTH)
            net.load_state_dict(state)

            def cnn(x: np.ndarray, net: ResidualUNet = net) -> np.ndarray:
                return cnn_translate(net, x, tile=64, overlap=8)

            out[variant] = cnn
    for m, cfg in cfgs.items():
        cascade = load_cascade(cfg, work / m) if m in methods else None
        if cascade is not None:
            out[m] = cascade.translate
    return out


def load_cascade(cfg: Config, folder: Path) -> Cascade | None:
    """The cascade of ``cfg`` with the generators ``folder/scale_<s>.pt``; None while a scale is missing."""
    from msgan.nets import build_generator

    files = [folder / f"scale_{s}.pt" for s in range(cfg.num_scales)]
    if not all(f.exists() for f in files):
        return None
    gens = []
    for s, f in enumerate(files):
        g = build_generator(cfg, s)
        g.load_state_dict(torch.load(f, weights_only=True, map_location="cpu"))
        gens.append(g.eval())
    return Cascade(cfg, gens)


def task_setup(task: str, args: argparse.Namespace, results: Results, log: Callable[[str], None]
               ) -> tuple[dict[str, Config], list[str], Path]:  # fmt: skip
    """The configs of ``task``'s cascades, the methods to run and the task's work folder."""
    work = Path(args.workdir) / f"{args.shape}" / task
    cfg = task_config(task, args.shape, args.smoke, args.set)
    cfgs = {"edges": edges_config(cfg)}
    methods = list(args.methods)
    if "ours" in methods:
        why = ours_pending(cfg)
        if why is None:
            cfgs["ours"] = cfg
            loss = cfg.train
            results.note(task, "ours", config=f"configs/{task}.yaml", l1_weight=loss.l1_weight,
                         adversarial_weight=1.0, gan_loss=loss.gan_loss, pending=None)  # fmt: skip
        else:
            results.note(task, "ours", pending=why)
            log(f"  {task}: ours pending: {why}")
            methods.remove("ours")
    if "edges" in methods:
        results.note(task, "edges", config=f"configs/{task}.yaml with condition=edges")
    return cfgs, methods, work


def task_done(task: str, methods: list[str], args: argparse.Namespace, results: Results) -> bool:
    return all(results.done(task, m, s) for m in methods for s in SEEDS["heldout"][: args.volumes])


def run_task(task: str, args: argparse.Namespace, results: Results, log: Callable[[str], None]) -> None:
    """Train what ``task`` lacks, then translate and score every held-out volume not measured yet."""
    shape = (args.shape,) * 3
    cfgs, methods, work = task_setup(task, args, results, log)
    heldout = list(SEEDS["heldout"][: args.volumes])
    if task_done(task, methods, args, results):
        log(f"  {task}: all {len(methods)} methods x {len(heldout)} volumes already measured")
        return
    train_task(task, cfgs, methods, shape, work, args.workers, results, log)
    if "cnn_large" in methods:
        job = cnn_large_for(task, args, cfgs, work, results, log)
        run_training([job] if job else [], 1, results, log)

    def train_pairs() -> Any:
        for seed in SEEDS["train"]:
            tv = make_task(task, seed, shape)
            yield tv.input, tv.target

    torch.set_num_threads(os.cpu_count() or 1)
    if "nlm_tuned" in methods:
        tune_nlm(task, shape, METRIC_WINDOW, work, results, log)
    fns = load_methods(task, cfgs, methods, work, train_pairs)
    evaluate(task, fns, heldout, shape, METRIC_WINDOW, results, log)


def evaluate(
    task: str, fns: dict[str, Callable[[np.ndarray], np.ndarray]], seeds: list[int], shape: tuple[int, ...],
    window: tuple[float, float], results: Results, log: Callable[[str], None],
) -> None:  # fmt: skip
    """Translate each volume of ``seeds`` with every method not measured on it yet; one results write each."""
    for seed in seeds:
        todo = [m for m in fns if not results.done(task, m, seed)]
        known = str(seed) in results.meta.get("reference", {}).get(task, {})
        if not todo and known:
            continue
        tv: TaskVolume = make_task(task, seed, shape)
        if not known:  # what the target acquisition itself scores: its own noise against the noiseless target
            body = tv.labels != 0
            ref = {"hallucination_ml": hallucination_ml(tv.target, tv.noiseless, tv.spacing, body)}
            results.meta.setdefault("reference", {}).setdefault(task, {})[str(seed)] = ref
            results.save()
        line = []
        for m in todo:
            t0 = time.perf_counter()
            out = np.asarray(fns[m](tv.input), dtype=np.float32)
            seconds = time.perf_counter() - t0
            r = ct_metrics(out, tv.target, tv.noiseless, tv.labels, tv.spacing, window)
            results.add(task, m, seed, {**r, "seconds": seconds})
            line.append(f"{m} {r['ssim']:.3f}/{r['mae_hu']:.1f}HU/{r['hallucination_ml']:.1f}mL/{seconds:.1f}s")
        log(f"  {task} seed {seed}: " + ", ".join(line))


# ----------------------------------------------------------------------------- tables


def _fmt(values: list[float | None], key: str) -> str:
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    if np.all(np.isnan(v)):
        return "-"
    digits = 4 if key == "ssim" else 2 if key in ("psnr", "emphysema_error") else 1
    return f"{np.nanmean(v):.{digits}f}"


def holm_tests(rows: dict[str, Any], keys: tuple[str, ...]) -> dict[tuple[str, str], float]:
    """Paired t-tests of ``ours`` against every other row of one table on ``keys``, over the volumes both hold,
    Holm-corrected across the table: ``{(method, key): adjusted p}`` (no test where fewer than 2 pairs, or all
    equal)."""
    ours = rows.get("ours")
    tests: dict[tuple[str, str], float] = {}
    if ours is not None:
        for m, r in rows.items():
            if m == "ours":
                continue
            for k in keys:
                common = [s for s in ours["seeds"] if s in r["seeds"]]
                a = [ours[k][ours["seeds"].index(s)] for s in common]
                b = [r[k][r["seeds"].index(s)] for s in common]
                pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
                if len(pairs) >= 2 and any(x != y for x, y in pairs):
                    tests[(m, k)] = paired_test([x for x, _ in pairs], [y for _, y in pairs]).p
    return dict(zip(tests, holm(list(tests.values())), strict=True))


def tables(data: dict[str, Any], meta: dict[str, Any]) -> str:
    """One markdown table per task: means over held-out volumes; p: paired t-test of ours against the
    row (SSIM / MAE / hallucination), Holm-corrected across the table."""
    lines = []
    for task in TASKS:
        rows = data.get(task)
        if not rows:
            continue
        info = meta.get("methods", {}).get(task, {})
        adjusted = holm_tests(rows, TESTED)
        n = max(len(r["seeds"]) for r in rows.values())
        ref = [v["hallucination_ml"] for v in meta.get("reference", {}).get(task, {}).values()]
        own = (
            f" The target acquisition itself scores {np.mean(ref):.1f} mL of hallucination (its own noise)."
            if ref
            else ""
        )
        lines += [f"### {task}", "", f"{n} held-out volumes; means; p: ours vs the row, paired t-test on "
                  f"SSIM / MAE / hallucination, Holm-corrected across this table.{own}", "",
                  "| method | n | SSIM | PSNR | MAE HU | RMSE HU | halluc. mL | noise HU (target) | "
                  "EI error % | s / volume | p (SSIM / MAE / halluc.) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for m in [*METHODS, *sorted(set(rows) - set(METHODS))]:  # earlier runs of ours (kept, never dropped) last
            if m not in rows:
                if m in info and info[m].get("pending"):
                    lines.append(f"| {m} | pending: {info[m]['pending']} |" + " |" * 9)
                continue
            r = rows[m]
            cols = [_fmt(r.get(k, []), k) for k in TABLE_KEYS]
            cols[5] = f"{cols[5]} ({_fmt(r.get('noise_target_hu', []), 'noise_hu')})"
            ps = " / ".join(f"{adjusted[(m, k)]:.2g}" if (m, k) in adjusted else "-" for k in TESTED)
            lines.append(f"| {m} | {len(r['seeds'])} | " + " | ".join(cols)
                         + f" | {_fmt(r.get('seconds', []), 'seconds')} | {ps if m != 'ours' else ''} |")  # fmt: skip
        large = info.get("cnn_large", {})
        if "cnn_large" in rows and large.get("patch"):
            cnn = info.get("cnn", {})
            # the probe at its patch where there is one (measured as ours' scales were), else its training run's
            peak = large.get("probe_peaks_bytes", {}).get(str(large["patch"]), large.get("step_peak_bytes", 0))
            fits = peak <= large["budget_bytes"]
            how = "the largest whose training step peaks within" if fits else "the CNN's own: even it peaks above"
            lines += ["", f"cnn_large: patch {large['patch']}^3, {how} ours' "
                      f"highest ({peak / 2**20:.0f} MiB against "
                      f"{large['budget_bytes'] / 2**20:.0f} MiB, {large.get('budget_from', 'ours')}); trained in "
                      f"{large.get('train_seconds', float('nan')):.0f} s (cnn, patch {cnn.get('patch', '-')}^3: "
                      f"{cnn.get('train_seconds', float('nan')):.0f} s), "
                      f"{large.get('steps', '-')} steps each."]  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def change_table(small: dict[str, Any], large: dict[str, Any], sizes: tuple[int, int]) -> str:
    """Per task measured at both sizes: each method's mean SSIM and MAE at ``sizes`` and the change, and ours'
    SSIM minus every CNN's (what the cascade's coarser scales add over patches as a patch sees less)."""
    a, b = sizes
    lines = []
    for task in TASKS:
        if task not in small or task not in large:
            continue
        lines += [f"### {task}: {a}^3 -> {b}^3", "",
                  f"| method | SSIM {a}^3 | SSIM {b}^3 | change | MAE HU {a}^3 | MAE HU {b}^3 | change |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip

        def mean(rows: dict[str, Any], m: str, k: str) -> float:
            v = [x for x in rows.get(m, {}).get(k, []) if x is not None]
            return float(np.mean(v)) if v else float("nan")

        def num(x: float, spec: str) -> str:  # a method not measured at one size: "-", not nan
            return format(x, spec) if np.isfinite(x) else "-"

        for m in [x for x in METHODS if x in small[task] or x in large[task]]:
            s0, s1 = mean(small[task], m, "ssim"), mean(large[task], m, "ssim")
            e0, e1 = mean(small[task], m, "mae_hu"), mean(large[task], m, "mae_hu")
            lines.append(f"| {m} | {num(s0, '.4f')} | {num(s1, '.4f')} | {num(s1 - s0, '+.4f')} | {num(e0, '.1f')} "
                         f"| {num(e1, '.1f')} | {num(e1 - e0, '+.1f')} |")  # fmt: skip
        for cnn in CNNS:
            d0 = mean(small[task], "ours", "ssim") - mean(small[task], cnn, "ssim")
            d1 = mean(large[task], "ours", "ssim") - mean(large[task], cnn, "ssim")
            if np.isfinite(d0) or np.isfinite(d1):
                lines.append(f"| ours - {cnn} (SSIM) | {num(d0, '+.4f')} | {num(d1, '+.4f')} | "
                             f"{num(d1 - d0, '+.4f')} | | | |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, default=128)
    p.add_argument("--smoke", action="store_true", help="32^3, tiny training, 2 held-out volumes, runs/tasks-smoke")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=METHODS,
        help="default: all but cnn_large at 128^3 and below, " + " ".join(LARGE_METHODS) + " above",
    )
    p.add_argument("--volumes", type=int, default=len(SEEDS["heldout"]), help="first N held-out seeds")
    p.add_argument(
        "--out",
        default=None,
        help="default docs/results/tasks.json at 128^3, tasks_<shape>.json at other "
        "sizes (smoke: runs/tasks-smoke/tasks.json)",
    )
    p.add_argument("--workdir", default=None, help="trained models (default runs/tasks, smoke: runs/tasks-smoke)")
    p.add_argument("--workers", type=int, default=2, help="training processes")
    p.add_argument("--set", action="append", default=[], help="config override for every task, KEY=VALUE")
    p.add_argument("--tables", action="store_true", help="only print and write the tables")
    p.add_argument("--merge", nargs="+", default=[], help="results files of parallel runs to merge into --out")
    p.add_argument("--compare", default=None, help="a results file of another size (e.g. docs/results/tasks.json): "
                   "adds each method's change to the tables")  # fmt: skip
    args = p.parse_args()
    if args.smoke:
        args.shape = 32
        args.volumes = min(args.volumes, 2)
    if args.methods is None:
        args.methods = list(LARGE_METHODS if args.shape > 128 else (m for m in METHODS if m != "cnn_large"))
    for t in args.tasks:
        try:
            check_task(t)
        except ValueError as err:
            raise SystemExit(str(err)) from err
    name = "tasks.json" if args.shape == 128 or args.smoke else f"tasks_{args.shape}.json"
    out = Path(args.out or ("runs/tasks-smoke/tasks.json" if args.smoke else f"docs/results/{name}"))
    args.workdir = args.workdir or ("runs/tasks-smoke" if args.smoke else "runs/tasks")
    heldout = list(SEEDS["heldout"][: args.volumes])
    results = Results(out, {"shape": [args.shape] * 3, "heldout": list(SEEDS["heldout"]), "smoke": args.smoke})

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    for other in args.merge:
        n = results.merge(Results(Path(other), results.meta))
        log(f"merged {n} volumes from {other}")
    if not args.tables and not args.merge:
        log(f"tasks {args.tasks}, methods {args.methods}, {args.shape}^3, held-out {heldout} -> {out}")
        try:  # first every task's training in one pool (longest first), then the translations
            setups = {task: task_setup(task, args, results, log) for task in args.tasks}
            todo = {t: st for t, st in setups.items() if not task_done(t, st[1], args, results)}
            jobs = [j for t, (cfgs, methods, work) in todo.items()
                    for j in training_jobs(t, cfgs, methods, (args.shape,) * 3, work)]  # fmt: skip
            run_training(jobs, args.workers, results, log)
            large = []  # after ours: cnn_large's patch is sized by ours' measured training peaks
            for t, (cfgs, methods, work) in todo.items():
                job = cnn_large_for(t, args, cfgs, work, results, log) if "cnn_large" in methods else None
                large += [job] if job else []
            run_training(large, args.workers, results, log)
        except ConfigError as err:
            raise SystemExit(str(err)) from err
        for task in args.tasks:
            try:
                run_task(task, args, results, log)
            except ConfigError as err:
                raise SystemExit(f"{task}: {err}") from err
    text = tables(results.data, results.meta)
    if args.compare:
        other = json.loads(Path(args.compare).read_text())
        size = json.loads(Path(args.compare).with_name(Path(args.compare).stem + "_meta.json").read_text())["shape"][0]
        pair = (
            ((other, results.data), (size, args.shape))
            if size < args.shape
            else ((results.data, other), (args.shape, size))
        )
        text += "\n" + change_table(*pair[0], pair[1])
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
