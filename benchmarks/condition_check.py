"""Quick sanity check of image conditioning (not the task benchmark: see benchmarks/tasks.py).

    python benchmarks/condition_check.py [--shape 48] [--steps 300] [--seeds 1 2 3 4] [--holdout 1000]

Trains the demo networks on sharp -> soft phantom pairs (small, every scale ``--steps`` steps)
once per conditioning variant and prints SSIM / MAE (window units, inside the body) of the
held-out translation against the soft truth, beside the sharp input's own score.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from msgan.cascade import Cascade
from msgan.config import load_config
from msgan.data.phantom import kernel_pair
from msgan.metrics import score
from msgan.pyramid import build_pair_pyramid, window
from msgan.train import ScaleData, ScaleTrainer

VARIANTS = {
    "edges (paper)": {},
    "image+edges, source residual": {
        "condition": "image+edges",
        "source_residual": True,
        "hr_generator.residual": False,
    },
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--shape", type=int, default=48)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--holdout", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = (args.shape,) * 3
    base = load_config(args.config, {"data.phantom.shape": list(shape)})
    pairs = [kernel_pair(shape, s) for s in args.seeds]  # (soft, sharp)
    pyramids = [build_pair_pyramid(sharp, soft, base.num_scales, base.intensity, base.edges) for soft, sharp in pairs]
    soft, sharp = kernel_pair(shape, args.holdout)
    truth = window(soft, base.intensity)
    mask = truth > -0.8
    rows = {"sharp input": score(window(sharp, base.intensity), truth, mask=mask)}
    for name, over in VARIANTS.items():
        cfg = base.replace(**over)
        t0 = time.perf_counter()
        gens = []
        for s in range(cfg.num_scales):
            trainer = ScaleTrainer(cfg, s, ScaleData.from_pyramids(pyramids, s, cfg.train.foreground_threshold))
            trainer.fit(args.steps)
            gens.append(trainer.generator.eval())
        out = Cascade(cfg, gens).translate(sharp)
        rows[name] = score(window(out, cfg.intensity), truth, mask=mask)
        print(f"{name}: trained {cfg.num_scales} scales x {args.steps} steps in {time.perf_counter() - t0:.0f}s",
              flush=True)  # fmt: skip
    print(f"held-out seed {args.holdout}, {shape}, window units inside the body:")
    print(f"  {'':<32}{'SSIM':>8}{'MAE':>9}")
    for name, s in rows.items():
        print(f"  {name:<32}{s.ssim:8.4f}{s.mae:9.4f}")
    print(f"  (scores are means; {np.count_nonzero(mask)} voxels in the body)")


if __name__ == "__main__":
    main()
