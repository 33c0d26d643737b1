"""Score trained task models on the VALIDATION seeds at the tables' size: does a sweep's choice at 64^3
hold at 128^3? (Never the held-out seeds: those are for benchmarks/tasks.py's tables only.)

    python benchmarks/validate_models.py --models ours ours_v3 [--tasks low-dose ...]

Each name is a folder of ``runs/tasks/<shape>/<task>/`` holding ``scale_<s>.pt``; the networks are
built from ``configs/<task>.yaml`` (training-only settings such as the patch size do not change them).
Writes ``--out`` (JSON, one entry per volume, resumable) and prints a line per volume.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tasks import Results, evaluate, load_methods, task_config
from msgan.data.tasks import METRIC_WINDOW, SEEDS, TASKS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--shape", type=int, default=128)
    p.add_argument("--workdir", default="runs/tasks")
    p.add_argument("--out", default="runs/validate/validate.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    seeds = list(SEEDS["validation"])
    res = Results(Path(args.out), {"shape": [args.shape] * 3, "validation": seeds})
    for task in args.tasks:
        cfg = task_config(task, args.shape, False, [])
        work = Path(args.workdir) / str(args.shape) / task
        fns = load_methods(task, dict.fromkeys(args.models, cfg), ["input", *args.models], work, lambda: iter(()))
        missing = [m for m in args.models if m not in fns]
        if missing:
            raise SystemExit(f"{task}: no trained weights for {missing} under {work}")
        evaluate(task, fns, seeds, (args.shape,) * 3, METRIC_WINDOW, res,
                 lambda m: print(time.strftime("%H:%M:%S"), m, flush=True))  # fmt: skip


if __name__ == "__main__":
    main()
