"""The 64^3 sweep that chooses each task's defaults: conditioning, context and augmentation strength.

    python benchmarks/sweep.py [--shape 64] [--tasks low-dose] [--variants base "context wide"] [--steps 0.34]
    python benchmarks/sweep.py --smoke

Trained on the training seeds, scored on the VALIDATION seeds (201-204) only: the held-out seeds
never choose anything. One factor at a time around ``base`` (image + edges, upscaled context, the
default augmentation): conditioning (edges, image, image + edges with a source residual), the wide
context, augmentation off and strong. ``--steps`` scales every scale's training steps (a small sweep;
the benchmark trains the full steps); the input itself is scored beside them. Results per validation
volume go to ``docs/results/sweep.json``
(same shape as tasks.json) and resume like the task benchmark; the tables rank the variants.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tasks import Results, evaluate, load_methods, task_config, train_task
from msgan.config import Config, ConfigError
from msgan.data.tasks import METRIC_WINDOW, SEEDS, TASKS, check_task

NO_AUGMENT = {"augment.noise_p": 0.0, "augment.blur_p": 0.0, "augment.resolution_p": 0.0, "augment.edge_noise_p": 0.0}
STRONG_AUGMENT = {"augment.noise_p": 0.6, "augment.blur_p": 0.6, "augment.resolution_p": 0.6,
                  "augment.edge_noise_p": 0.6, "augment.noise_std": [0.04, 0.16]}  # fmt: skip
BASE = {"condition": "image+edges", "source_residual": False, "hr_generator.residual": True}
VARIANTS: dict[str, dict[str, Any]] = {
    "base": BASE,
    "condition edges": {**BASE, "condition": "edges"},
    "condition image": {**BASE, "condition": "image"},
    "source residual": {**BASE, "source_residual": True, "hr_generator.residual": False},
    "context wide": {**BASE, "hr_generator.context": "wide"},
    "augmentation off": {**BASE, **NO_AUGMENT},
    "augmentation strong": {**BASE, **STRONG_AUGMENT},
    # around the task's own config (``ours``: source residual); "_steps" = the per-scale steps, as
    # fractions of the config's, before --steps scales them all (1500/600/600 -> 300/1200/1200: the same
    # total, so the CNN's budget is unchanged)
    "ours": {},
    "ours hr-heavy": {"_steps": [0.2, 2.0, 2.0]},
    "ours hr-heavy l1 1000": {"_steps": [0.2, 2.0, 2.0], "train.l1_weight": 1000.0},
    "ours wide window": {"intensity.high": 3072.0},
    "ours wide window hr-heavy": {"intensity.high": 3072.0, "_steps": [0.2, 2.0, 2.0]},
    "ours wide window hr-heavy l1 1000": {
        "intensity.high": 3072.0,
        "_steps": [0.2, 2.0, 2.0],
        "train.l1_weight": 1000.0,
    },
    # the remaining factors of the issue (conditioning, context, augmentation) around the chosen config
    "ours image only": {"condition": "image"},
    "ours context wide": {"hr_generator.context": "wide"},
    "ours augmentation off": NO_AUGMENT,
    "ours augmentation strong": STRONG_AUGMENT,
    # what still separates ours from the plain supervised CNN (24^3 patches, no adversarial term):
    # HR patches as large as the CNN's, and 10x less adversarial weight ("_l1": factor on train.l1_weight)
    "ours patch 24": {"train.hr_patch": 24},
    "ours l1 x10": {"_l1": 10.0},
    "ours patch 24 l1 x10": {"train.hr_patch": 24, "_l1": 10.0},
}


def variant_configs(base: Config, names: list[str], steps: float) -> dict[str, Config]:
    """Every variant's config; those this code cannot express (e.g. before image conditioning) are left out."""
    out = {}
    for name in names:
        over = dict(VARIANTS[name])
        factors = list(over.pop("_steps", [1.0]))
        factors = (factors + [factors[-1]] * base.num_scales)[: base.num_scales]
        scaled = [max(1, round(base.steps_for(s) * f * steps)) for s, f in enumerate(factors)]
        if "_l1" in over:
            over["train.l1_weight"] = base.train.l1_weight * over.pop("_l1")
        try:
            out[name] = base.replace(**{**over, "train.steps_per_scale": scaled})
        except ConfigError as err:
            print(f"variant {name!r} skipped: {err}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, default=64)
    p.add_argument("--smoke", action="store_true", help="32^3, tiny training, 2 validation volumes")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=float, default=0.34, help="fraction of each config's training steps")
    p.add_argument("--volumes", type=int, default=len(SEEDS["validation"]))
    p.add_argument("--out", default=None, help="default docs/results/sweep.json (smoke: runs/sweep-smoke/sweep.json)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    if args.smoke:
        args.shape, args.volumes = 32, min(args.volumes, 2)
    for t in args.tasks:
        try:
            check_task(t)
        except ValueError as err:
            raise SystemExit(str(err)) from err
    out = Path(args.out or ("runs/sweep-smoke/sweep.json" if args.smoke else "docs/results/sweep.json"))
    workdir = Path(args.workdir or ("runs/sweep-smoke" if args.smoke else "runs/sweep"))
    seeds = list(SEEDS["validation"][: args.volumes])
    results = Results(out, {"shape": [args.shape] * 3, "validation": list(SEEDS["validation"]), "steps": args.steps})

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    shape = (args.shape,) * 3
    for task in args.tasks:
        base = task_config(task, args.shape, args.smoke, args.set)
        cfgs = variant_configs(base, args.variants, args.steps)
        for name, cfg in cfgs.items():
            results.note(task, name, overrides=VARIANTS[name], steps_per_scale=list(cfg.train.steps_per_scale))
        work = workdir / f"{args.shape}" / task
        train_task(task, cfgs, list(cfgs), shape, work, args.workers, results, log)
        torch.set_num_threads(os.cpu_count() or 1)
        fns = load_methods(task, cfgs, ["input", *cfgs], work, lambda: iter(()))  # the input: the reference
        evaluate(task, fns, seeds, shape, METRIC_WINDOW, results, log)
    text = ranking(results.data)
    out.with_suffix(".md").write_text(text)
    print(text)


def ranking(data: dict[str, Any]) -> str:
    """Per task: the variants by mean validation SSIM, with MAE and hallucination beside it."""
    import numpy as np

    lines = []
    for task, rows in data.items():
        lines += [f"### {task} (validation seeds)", "", "| variant | n | SSIM | MAE HU | halluc. mL |",
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip

        def mean(r: dict[str, Any], k: str) -> float:
            v = [x for x in r.get(k, []) if x is not None]
            return float(np.mean(v)) if v else float("nan")

        for name, r in sorted(rows.items(), key=lambda kv: -mean(kv[1], "ssim")):
            lines.append(f"| {name} | {len(r['seeds'])} | {mean(r, 'ssim'):.4f} | {mean(r, 'mae_hu'):.1f} | "
                         f"{mean(r, 'hallucination_ml'):.1f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
