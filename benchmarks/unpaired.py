"""Training without pairs (issue 22): the four phantom tasks x every method, per held-out volume, resumable.

    python benchmarks/unpaired.py [--shape 128] [--tasks contrast] [--methods input linear ours]
    python benchmarks/unpaired.py --smoke       # 32^3, tiny training: checks the whole path in minutes
    python benchmarks/unpaired.py --tables      # only print / write the tables from what is measured
    python benchmarks/unpaired.py --methods edges --out runs/edges.json   # beside another run, then:
    python benchmarks/unpaired.py --merge runs/edges.json

The split and the methods were fixed in a commit before any run (``msgan.data.tasks.UNPAIRED_SEEDS``,
``UNPAIRED_METHODS``): every method trains on the inputs of subjects 101-104 (the source set) and the targets of
subjects 105-108 (the target set), no subject on both sides; validation subjects 201-204 may be used as
pairs, for choosing hyperparameters only, the same for every method; held-out 301-308 are scored against
their targets with the task tables' metrics (``msgan.metrics.ct_metrics``).

- ``input``: the input itself;
- ``linear``: the radially symmetric filter sqrt(P_target / P_source) of the two sets' mean power spectra
  (``msgan.forward_model.spectral_ratio_gain``), no pairs;
- ``nlm_tuned``: non-local means with the noise level estimated from the source images alone
  (``msgan.forward_model.noise_sigma``, mean over the source set) and h / sigma chosen from
  ``NLM_FACTORS`` by SSIM on the central half of validation volumes 201-202 (pairs, for tuning only);
- ``edges``: the paper's cascade (``condition=edges``), trained on the target set alone (its own edges);
- ``cyclegan``: a 3D patch CycleGAN, ResNet generators (8 filters, 6 blocks), trained on the two sets with our
  whole cascade's total steps x batch and a patch of 32 (>= our HR patch), stitched with blended overlaps;
  outside the window the same rule as ours (``intensity.outside``);
- ``ours``: the cascade of ``configs/<task>.yaml`` with ``train.objective=unpaired`` (docs/translation.md) and the
  settings chosen on validation (``OURS_TUNED``);
- ``paired``: the ``ours`` rows of the 128^3 task tables (``docs/results/tasks.json``: trained on 8 pairs), the
  upper bound, copied per volume (128^3 only).

Results go to ``docs/results/unpaired.json`` in the shape of ``tasks.json`` after every volume; trained models stay
in ``--workdir``, so a rerun resumes where the last one stopped.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import tasks as T  # noqa: E402  (benchmarks/tasks.py: results file, configs, scoring)

from msgan.config import Config, ConfigError  # noqa: E402
from msgan.data.tasks import METRIC_WINDOW, TASKS, UNPAIRED_METHODS, UNPAIRED_SEEDS, check_task, make_task  # noqa: E402
from msgan.metrics import ct_metrics  # noqa: E402

METHODS = UNPAIRED_METHODS
NLM_FACTORS = T.NLM_FACTORS
TABLE_KEYS = ("ssim", "psnr", "mae_hu", "rmse_hu", "hallucination_ml", "vessel_contrast_error", "noise_hu")
TESTED = ("ssim", "mae_hu", "hallucination_ml")
CYCLEGAN_PATCH = 32
SMOKE_SEEDS = {"train_sources": (101, 102), "train_targets": (105, 106), "validation": (201,), "heldout": (301, 302)}


def seeds_for(smoke: bool) -> dict[str, tuple[int, ...]]:
    return SMOKE_SEEDS if smoke else UNPAIRED_SEEDS


# Chosen on the validation seeds before any held-out run of ours (docs/results.md, "Without pairs"). The forward
# model's level remap (train.unpaired.remap_p) teaches the HR scales to take levels from the previous scale; on
# sharp-to-soft (validation 203-204, 64^3) it cost more than it gave: 0.9807 SSIM / 17.6 HU with the default 0.5,
# 0.986 / 13.9-15.5 HU with 0. The kernel and dose tasks change no tissue's level, so they train without it
# (soft-to-sharp and low-dose were not measured both ways: the same reasoning, not a measurement); contrast
# changes levels and keeps the default (hr_generator.levels: previous lost on validation with the trained
# scale 0: 0.933 vs 0.937).
OURS_TUNED: dict[str, tuple[str, ...]] = {
    "sharp-to-soft": ("train.unpaired.remap_p=0",),
    "soft-to-sharp": ("train.unpaired.remap_p=0",),
    "low-dose": ("train.unpaired.remap_p=0",),
    "contrast": (),
}


def ours_config(task: str, shape: int, smoke: bool, overrides: list[str]) -> Config:
    """``configs/<task>.yaml`` at ``shape``, trained without pairs. The two sets are made here in memory (the data
    section only names them: the job would read them from ``data.sources`` / ``data.targets``)."""
    s = seeds_for(smoke)
    sets = [
        "train.objective=unpaired",
        "data.source=unpaired",
        f"data.sources=in memory - {task} inputs of subjects {'/'.join(map(str, s['train_sources']))}",
        f"data.targets=in memory - {task} targets of subjects {'/'.join(map(str, s['train_targets']))}",
    ]
    return T.task_config(task, shape, smoke, [*sets, *OURS_TUNED.get(task, ()), *overrides])


def paper_config(ours: Config) -> Config:
    """The paper's cascade: the same networks and steps, edges only, on the target set alone."""
    return T.edges_config(ours.replace(**{"train.objective": "paired", "data.source": "phantom"}))


# ----------------------------------------------------------------------------- the two sets


def _sets(task: str, shape: tuple[int, ...], seeds: dict[str, tuple[int, ...]]) -> tuple[list[Any], list[Any]]:
    """The source set (inputs of the source subjects) and the target set (targets of the target subjects), HU."""
    sources = [make_task(task, s, shape, workers=1).input for s in seeds["train_sources"]]
    targets = [make_task(task, s, shape, workers=1).target for s in seeds["train_targets"]]
    return sources, targets


def _record_of(path: Path) -> Path:
    return path.with_name(path.name + ".record.json")


def fresh(path: Path, record: dict[str, Any]) -> bool:
    """Whether ``path`` (a fitted or trained artifact) was made from ``record`` (settings, seeds, shape); a stale
    one (another config, budget or window) is removed, so it is made again and never stands in for this run's."""
    want = json.loads(json.dumps(record))
    rec = _record_of(path)
    if path.exists() and rec.exists() and json.loads(rec.read_text()) == want:
        return True
    path.unlink(missing_ok=True)
    return False


def remember(path: Path, record: dict[str, Any]) -> None:
    T._atomic_bytes(_record_of(path), json.dumps(record).encode())


def _pyramids(cfg: Config, images: list[np.ndarray]) -> list[Any]:
    from msgan.pyramid import build_pyramid

    return [build_pyramid(im, cfg.num_scales, cfg.intensity, cfg.edges) for im in images]


def _train_scale(job: dict[str, Any]) -> dict[str, Any]:
    """One scale of ``ours`` (without pairs) or of ``edges`` (the target set alone), in its own process."""
    from msgan.config import from_dict
    from msgan.forward_model import ForwardModel
    from msgan.train import ScaleData, ScaleTrainer, scale_data

    torch.set_num_threads(1)
    cfg = from_dict(job["config"], {"train.checkpoint_every": 100})
    scale = job["scale"]
    sources, targets = _sets(job["task"], tuple(job["shape"]), {k: tuple(v) for k, v in job["seeds"].items()})
    tgt = _pyramids(cfg, targets)
    if job["variant"] == "ours":
        forward = [ForwardModel.from_dict(d) for d in job["forward"]]
        data = scale_data(cfg, tgt, scale, _pyramids(cfg, sources), forward)
    else:
        data = ScaleData.from_pyramids(tgt, scale, cfg.train.foreground_threshold)
    trainer = ScaleTrainer(cfg, scale, data)
    checkpoint = Path(job["checkpoint"])
    if checkpoint.exists() and torch.load(checkpoint, weights_only=True).get("config") != cfg.to_dict():
        checkpoint.unlink()
    if checkpoint.exists():
        trainer.restore(checkpoint)
    t0 = time.perf_counter()
    trainer.fit(cfg.steps_for(scale), checkpoint=checkpoint)
    buf = io.BytesIO()
    torch.save(trainer.generator.state_dict(), buf)
    return {"weights": buf.getvalue(), "seconds": time.perf_counter() - t0}


def _train_cyclegan(job: dict[str, Any]) -> dict[str, Any]:
    from msgan.config import from_dict
    from msgan.cyclegan import CycleGANConfig, parameter_count, train_cyclegan
    from msgan.pyramid import window

    torch.set_num_threads(1)
    cfg = from_dict(job["config"])
    sources, targets = _sets(job["task"], tuple(job["shape"]), {k: tuple(v) for k, v in job["seeds"].items()})
    cc = CycleGANConfig(**job["cyclegan"])

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), f"  {job['task']}: cyclegan {msg}", flush=True)

    import dataclasses

    checkpoint = Path(job["checkpoint"])  # every 100 steps: an hour of training survives a stop
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    if checkpoint.exists() and torch.load(checkpoint, weights_only=True).get("config") != dataclasses.asdict(cc):
        checkpoint.unlink()  # another budget's or window's training never seeds this one
    t0 = time.perf_counter()
    model = train_cyclegan([window(s, cfg.intensity) for s in sources], [window(t, cfg.intensity) for t in targets],
                           cc, log=log, log_every=300, checkpoint=checkpoint, checkpoint_every=100)  # fmt: skip
    buf = io.BytesIO()
    torch.save(model.g_st.state_dict(), buf)
    return {"weights": buf.getvalue(), "seconds": time.perf_counter() - t0, "parameters": parameter_count(model.g_st)}


def fit_forward(task: str, cfg: Config, shape: tuple[int, ...], seeds: dict[str, Any], work: Path) -> list[dict]:
    """The forward models of ``ours`` (one per scale), fitted once per task and kept in ``work``."""
    from msgan.train import fit_forward_models

    path = work / "forward.json"
    record = {"config": cfg.to_dict(), "seeds": seeds, "shape": list(shape)}
    if fresh(path, record):
        return list(json.loads(path.read_text()))
    sources, targets = _sets(task, shape, seeds)
    models = [m.to_dict() for m in fit_forward_models(cfg, _pyramids(cfg, sources), _pyramids(cfg, targets))]
    T._atomic_bytes(path, json.dumps(models).encode())
    remember(path, record)
    return models


def scale_job(variant: str, scale: int, cfg: Config, task: str, seeds: dict[str, Any], shape: tuple[int, ...],
              forward: list[dict[str, Any]] | None, folder: Path) -> dict[str, Any]:  # fmt: skip
    """One scale's training job for ``_train_scale``: it checkpoints into ``folder``."""
    return {"variant": variant, "scale": scale, "config": cfg.to_dict(), "task": task, "seeds": seeds,
            "shape": list(shape), "forward": forward, "checkpoint": str(folder / f"scale_{scale}.ckpt")}  # fmt: skip


def training_jobs(task: str, args: argparse.Namespace, results: T.Results, work: Path) -> list[dict[str, Any]]:
    """What of the trained methods has no weights in ``work`` yet."""
    shape = (args.shape,) * 3
    seeds = {k: list(v) for k, v in seeds_for(args.smoke).items()}
    ours = ours_config(task, args.shape, args.smoke, args.set)
    cfgs = {"ours": ours, "edges": paper_config(ours)}
    jobs: list[dict[str, Any]] = []
    for m, cfg in cfgs.items():
        if m not in args.methods:
            continue
        forward = fit_forward(task, cfg, shape, seeds, work) if m == "ours" else None
        for s in range(cfg.num_scales):
            job = scale_job(m, s, cfg, task, seeds, shape, forward, work / m)
            weights = work / m / f"scale_{s}.pt"
            record = {"config": job["config"], "seeds": seeds, "shape": list(shape)}
            if weights.exists():
                if T._trained_as(weights) == json.loads(json.dumps(record)):
                    continue
                weights.unlink()
            jobs.append(job)
        how = " train.objective=unpaired" if m == "ours" else " condition=edges, target set alone"
        results.note(task, m, config=f"configs/{task}.yaml{how}",
                     steps_per_scale=[cfg.steps_for(s) for s in range(cfg.num_scales)])  # fmt: skip
    if "cyclegan" in args.methods and not fresh(work / "cyclegan.pt", cyclegan_record(ours, args, seeds)):
        rec = cyclegan_record(ours, args, seeds)
        jobs.append({"variant": "cyclegan", "task": task, "seeds": seeds, "shape": list(shape), "cyclegan": rec["cc"],
                     "config": ours.to_dict(), "record": rec, "checkpoint": str(work / "cyclegan.ckpt")})  # fmt: skip
    return jobs


def cyclegan_settings(ours: Config, args: argparse.Namespace) -> dict[str, Any]:
    """``cyclegan``'s budget: our whole cascade's steps x batch, a patch >= our HR patch (a multiple of 4)."""
    steps = sum(ours.steps_for(s) for s in range(ours.num_scales))
    patch = max(CYCLEGAN_PATCH if args.shape >= 64 else 16, ours.train.hr_patch)
    return {"dims": 3, "width": 8, "blocks": 6, "patch": -(-patch // 4) * 4, "steps": 20 if args.smoke else steps,
            "batch_size": ours.train.batch_size, "seed": 0}  # fmt: skip


def cyclegan_record(ours: Config, args: argparse.Namespace, seeds: dict[str, Any]) -> dict[str, Any]:
    """What a trained CycleGAN was made from: its settings, the window it was trained in, seeds and shape."""
    return {"cc": cyclegan_settings(ours, args), "intensity": ours.to_dict()["intensity"], "seeds": seeds,
            "shape": [args.shape] * 3}  # fmt: skip


def run_training(jobs: list[dict[str, Any]], workers: int, results: T.Results, work_of: Callable[[str], Path],
                 log: Callable[[str], None]) -> None:  # fmt: skip
    if not jobs:
        return
    jobs = sorted(jobs, key=lambda j: 0 if j["variant"] == "cyclegan" else 1 if j.get("scale") == 0 else 2)
    log(f"training {len(jobs)} jobs on {workers} processes: "
        + ", ".join(f"{j['task']}:{j['variant']}/{j.get('scale', '-')}" for j in jobs))  # fmt: skip
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_train_cyclegan if j["variant"] == "cyclegan" else _train_scale, j): j for j in jobs}
        for fut in as_completed(futures):
            job, r = futures[fut], fut.result()
            task, work = job["task"], work_of(job["task"])
            if job["variant"] == "cyclegan":
                T._atomic_bytes(work / "cyclegan.pt", r["weights"])
                remember(work / "cyclegan.pt", job["record"])
                results.note(task, "cyclegan", train_seconds=r["seconds"], parameters=r["parameters"],
                             **job["cyclegan"])  # fmt: skip
            else:
                weights = work / job["variant"] / f"scale_{job['scale']}.pt"
                record = {"config": job["config"], "seeds": job["seeds"], "shape": job["shape"]}
                T._atomic_bytes(weights.with_suffix(".json"), json.dumps(record).encode())
                T._atomic_bytes(weights, r["weights"])
                seconds = results.meta["methods"].get(task, {}).get(job["variant"], {}).get("train_seconds", {})
                results.note(task, job["variant"], train_seconds={**seconds, str(job["scale"]): r["seconds"]})
            log(f"  {task}: trained {job['variant']}/{job.get('scale', '-')} ({time.perf_counter() - t0:.0f}s)")


# ----------------------------------------------------------------------------- methods


def choose_on_validation(task: str, shape: tuple[int, ...], seeds: dict[str, Any], options: list[Any],
                         run: Callable[[np.ndarray, Any], np.ndarray]) -> tuple[Any, dict[Any, float]]:  # fmt: skip
    """The option of ``options`` whose ``run(input, option)`` has the best mean SSIM on the central half of the
    first two validation volumes (pairs allowed there for choosing settings, the same for every method)."""
    crop = tuple(slice(n // 4, n // 4 + n // 2) for n in shape)
    scores: dict[Any, list[float]] = {o: [] for o in options}
    for seed in tuple(seeds["validation"])[:2]:
        tv = make_task(task, seed, shape)
        for o in options:
            r = ct_metrics(run(tv.input[crop], o), tv.target[crop], tv.noiseless[crop], tv.labels[crop], tv.spacing,
                           METRIC_WINDOW)  # fmt: skip
            scores[o].append(r["ssim"])
    means = {o: float(np.mean(v)) for o, v in scores.items()}
    return max(means, key=lambda o: means[o]), means


def tune_nlm(task: str, shape: tuple[int, ...], seeds: dict[str, Any], work: Path, results: T.Results,
             log: Callable[[str], None]) -> dict[str, float]:  # fmt: skip
    """``nlm_tuned``: sigma from the source images alone; h / sigma by SSIM on validation pairs."""
    from msgan.baselines import nlm_filter
    from msgan.forward_model import noise_sigma

    path = work / "nlm_tuned.json"
    record = {"seeds": seeds, "shape": list(shape), "factors": list(NLM_FACTORS)}
    if fresh(path, record):
        return dict(json.loads(path.read_text()))
    sources, _ = _sets(task, shape, seeds)
    sigma = float(np.mean([noise_sigma(s / 1024.0, s > -800.0) for s in sources]))
    val = list(tuple(seeds["validation"])[:2])
    best, means = choose_on_validation(
        task,
        shape,
        seeds,
        list(NLM_FACTORS),
        lambda x, f: nlm_filter(x / 1024.0, h_factor=f, sigma=sigma, workers=0) * 1024.0,
    )
    log(f"  {task}: nlm_tuned sigma {sigma * 1024:.1f} HU (source images alone), h = {best} sigma")
    T._atomic_bytes(path, json.dumps({"h_factor": best, "sigma": sigma, "validation_ssim": means}).encode())
    remember(path, record)
    results.note(task, "nlm_tuned", h_factor=best, sigma_hu=sigma * 1024, sigma_from="the source set alone",
                 validation_seeds=list(val), validation_ssim={str(f): v for f, v in means.items()})  # fmt: skip
    return {"h_factor": best, "sigma": sigma}


def tune_tile(task: str, run: Callable[[np.ndarray, int], np.ndarray], record: dict[str, Any], shape: tuple[int, ...],
              seeds: dict[str, Any], work: Path, results: T.Results, log: Callable[[str], None]) -> int:  # fmt: skip
    """``cyclegan``'s inference tile: instance norm makes a tile's output depend on the tile (its statistics), so
    the tile (the training patch, or twice it) is chosen on validation volumes 201-202, as ``nlm_tuned``'s h is."""
    path = work / "cyclegan_tile.json"
    patch = int(record["cc"]["patch"])
    tiles = [patch, 2 * patch] if 2 * patch <= shape[0] // 2 else [patch]
    if fresh(path, {**record, "tiles": tiles}):
        return int(json.loads(path.read_text())["tile"])
    best, means = choose_on_validation(task, shape, seeds, tiles, run)
    said = ", ".join(f"{t}: {v:.4f}" for t, v in means.items())
    log(f"  {task}: cyclegan tile {best} (validation SSIM {said})")
    T._atomic_bytes(path, json.dumps({"tile": best, "validation_ssim": means}).encode())
    remember(path, {**record, "tiles": tiles})
    results.note(task, "cyclegan", tile=best, overlap=8, tile_validation_ssim={str(t): v for t, v in means.items()})
    return best


def load_methods(task: str, args: argparse.Namespace, work: Path, results: T.Results,
                 log: Callable[[str], None]) -> dict[str, Callable[[np.ndarray], np.ndarray]]:  # fmt: skip
    from msgan.baselines import nlm_filter
    from msgan.forward_model import apply_radial, spectral_ratio_gain
    from msgan.pyramid import output_units, window

    shape = (args.shape,) * 3
    seeds = seeds_for(args.smoke)
    ours = ours_config(task, args.shape, args.smoke, args.set)
    out: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    if "input" in args.methods:
        out["input"] = lambda x: x
    if "linear" in args.methods:
        path = work / "linear.npz"
        record = {"seeds": {k: list(v) for k, v in seeds.items()}, "shape": list(shape), "smooth": True}
        if not fresh(path, record):
            sources, targets = _sets(task, shape, seeds)
            edges, gain = spectral_ratio_gain(sources, targets, smooth=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, edges=edges, gain=gain)
            remember(path, record)
        z = np.load(path)
        out["linear"] = lambda x, e=z["edges"], g=z["gain"]: apply_radial(x, e, g)
    if "nlm_tuned" in args.methods:
        t = tune_nlm(task, shape, seeds, work, results, log)
        h, sigma = float(t["h_factor"]), float(t["sigma"])
        out["nlm_tuned"] = lambda x: nlm_filter(np.asarray(x) / 1024.0, h_factor=h, sigma=sigma, workers=0) * 1024.0
    gan = cyclegan_record(ours, args, {k: list(v) for k, v in seeds.items()})
    if "cyclegan" in args.methods and fresh(work / "cyclegan.pt", gan):
        from msgan.cyclegan import cyclegan_translate, resnet_generator

        g = resnet_generator(3, 8, 6)
        g.load_state_dict(torch.load(work / "cyclegan.pt", weights_only=True))
        g.eval()

        def run(x: np.ndarray, tile: int) -> np.ndarray:
            y = cyclegan_translate(g, window(x, ours.intensity), tile=tile, overlap=8)
            return output_units(y, ours.intensity, x)

        tile = tune_tile(task, run, gan, shape, seeds, work, results, log)
        out["cyclegan"] = lambda x: run(x, tile)

    cfgs = {"ours": ours, "edges": paper_config(ours)}
    for m, cfg in cfgs.items():
        cascade = T.load_cascade(cfg, work / m) if m in args.methods else None
        if cascade is not None:
            out[m] = cascade.translate
    return out


def copy_paired(task: str, args: argparse.Namespace, results: T.Results) -> None:
    """``paired``: the task tables' ``ours`` per held-out volume (128^3 only: the tables' size)."""
    src = HERE.parent / "docs" / "results" / "tasks.json"
    if args.shape != 128 or args.smoke or not src.exists():
        return
    rows = json.loads(src.read_text()).get(task, {}).get("ours")
    if not rows:
        return
    for i, seed in enumerate(rows["seeds"]):
        if seed in seeds_for(False)["heldout"] and not results.done(task, "paired", seed):
            results.add(task, "paired", seed, {k: v[i] for k, v in rows.items() if k != "seeds"})
    results.note(task, "paired", source="docs/results/tasks.json ours (8 training pairs, 101-108)")


# ----------------------------------------------------------------------------- tables


def tables(data: dict[str, Any], meta: dict[str, Any]) -> str:
    """One table per task: means over held-out volumes; p: paired t-test of ours against the row (SSIM / MAE /
    hallucination), Holm-corrected across the table; the share of the input -> paired SSIM gap ours closes."""
    lines = []
    for task in TASKS:
        rows = data.get(task)
        if not rows:
            continue
        adjusted = T.holm_tests(rows, TESTED)
        n = max(len(r["seeds"]) for r in rows.values())
        lines += [f"### {task} (without pairs)", "",
                  f"{n} held-out volumes; means; p: ours vs the row, paired t-test on SSIM / MAE / hallucination, "
                  "Holm-corrected across this table.", "",
                  "| method | n | SSIM | PSNR | MAE HU | RMSE HU | halluc. mL | vessel contrast err. HU | noise HU | "
                  "s / volume | p (SSIM / MAE / halluc.) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for m in [*METHODS, *sorted(set(rows) - set(METHODS))]:
            if m not in rows:
                continue
            r = rows[m]
            cols = [T._fmt(r.get(k, []), k) for k in TABLE_KEYS]
            ps = " / ".join(f"{adjusted[(m, k)]:.2g}" if (m, k) in adjusted else "-" for k in TESTED)
            lines.append(f"| {m} | {len(r['seeds'])} | " + " | ".join(cols)
                         + f" | {T._fmt(r.get('seconds', []), 'seconds')} | {ps if m != 'ours' else ''} |")  # fmt: skip
        if all(k in rows for k in ("input", "ours", "paired")):
            mean = {k: float(np.nanmean([np.nan if v is None else v for v in rows[k]["ssim"]])) for k in
                    ("input", "ours", "paired")}  # fmt: skip
            gap = mean["paired"] - mean["input"]
            if gap > 0:
                lines += ["", f"Ours closes {100 * (mean['ours'] - mean['input']) / gap:.0f}% of the SSIM gap between "
                          f"the input ({mean['input']:.4f}) and the paired model ({mean['paired']:.4f})."]  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, default=128)
    p.add_argument("--smoke", action="store_true", help="32^3, tiny training, 2 held-out volumes")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--out", default=None, help="default docs/results/unpaired.json (smoke: runs/unpaired-smoke/)")
    p.add_argument("--workdir", default=None, help="trained models (default runs/unpaired, smoke: runs/unpaired-smoke)")
    p.add_argument("--workers", type=int, default=2, help="training processes")
    p.add_argument("--set", action="append", default=[], help="config override of ours (and edges), KEY=VALUE")
    p.add_argument("--tables", action="store_true", help="only print and write the tables")
    p.add_argument("--merge", nargs="+", default=[], help="results files of parallel runs (--out) to merge into --out")
    p.add_argument("--on", choices=["heldout", "validation"], default="heldout",
                   help="validation: score validation volumes 203-204 (settings; never the tables)")  # fmt: skip
    args = p.parse_args()
    if args.smoke:
        args.shape = 32
    for t in args.tasks:
        try:
            check_task(t)
        except ValueError as err:
            raise SystemExit(str(err)) from err
    seeds = dict(seeds_for(args.smoke))
    if args.on == "validation":  # 201-202 tune nlm_tuned's h and cyclegan's tile; the others check settings
        seeds["heldout"] = seeds["validation"][2:] or seeds["validation"]
        args.out = args.out or f"runs/unpaired-validation/{args.shape}/unpaired.json"
    out = Path(args.out or ("runs/unpaired-smoke/unpaired.json" if args.smoke else "docs/results/unpaired.json"))
    root = Path(args.workdir or ("runs/unpaired-smoke" if args.smoke else "runs/unpaired"))
    results = T.Results(out, {"shape": [args.shape] * 3, "heldout": list(seeds["heldout"]),
                              "validation": list(seeds["validation"]), "smoke": args.smoke,
                              "train_sources": list(seeds["train_sources"]),
                              "train_targets": list(seeds["train_targets"])})  # fmt: skip

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    def work_of(task: str) -> Path:
        return root / str(args.shape) / task

    for other in args.merge:  # a run of other methods beside this one writes its own --out; merged here
        log(f"merged {results.merge(T.Results(Path(other), results.meta))} volumes from {other}")
    if not args.tables and not args.merge:
        log(f"tasks {args.tasks}, methods {args.methods}, {args.shape}^3, held-out {list(seeds['heldout'])} -> {out}")
        try:
            jobs = [j for task in args.tasks for j in training_jobs(task, args, results, work_of(task))]
            run_training(jobs, args.workers, results, work_of, log)
        except ConfigError as err:
            raise SystemExit(str(err)) from err
        torch.set_num_threads(os.cpu_count() or 1)
        for task in args.tasks:
            if "paired" in args.methods:
                copy_paired(task, args, results)
            fns = load_methods(task, args, work_of(task), results, log)
            T.evaluate(task, fns, list(seeds["heldout"]), (args.shape,) * 3, METRIC_WINDOW, results, log)
    text = tables(results.data, results.meta)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
