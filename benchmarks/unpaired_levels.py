"""Where the levels of a cascade trained without pairs come from: scale 0, or the HR scales?

    python benchmarks/unpaired_levels.py --task contrast --shape 64 --workdir runs/unpaired-val2 [--seeds 203 204]

Loads ``ours`` from a ``benchmarks/unpaired.py`` work folder (``<workdir>/<shape>/<task>/ours/scale_<s>.pt``) and
translates validation volumes three ways (more with the variants below): the input alone, the cascade, and the
cascade with scale 0 replaced by the *true* target's LR image (an oracle: what the HR scales make of a perfect
previous scale). Prints the task metrics of each and the mean HU per tissue (blood pool, lung vessels,
myocardium, soft tissue, fat) of the target, the input and every output. If the oracle row barely moves, the
HR scales take their levels from the source, not from the previous scale, and no better scale 0 can help them.
Validation seeds only: never held-out ones.

    python benchmarks/unpaired_levels.py --task contrast --workdir runs/unpaired-val2 \
        --variant levels-previous --hr-steps 600 --hr-set hr_generator.levels=previous

A variant retrains the HR scales alone (``--hr-steps`` each, ours' settings plus ``--hr-set``, the same two sets
and forward model fitting) beside ours' trained scale 0, into ``<workdir>/<shape>/<task>/hr-<variant>/``
(kept: a rerun with the same settings reuses them), and adds two rows: the variant with ours' scale 0, and with
the true LR image. ``--hr-set`` may change the HR scales and the unpaired synthesis, never scale 0.

    python benchmarks/unpaired_levels.py --task contrast --shape 128 --lr-variant norm-none \
        --lr-set lr_generator.norm=none [--variant levels-previous --hr-set hr_generator.levels=previous]

An LR variant retrains scale 0 alone (ours' settings plus ``--lr-set``, ours' steps) into
``<workdir>/<shape>/<task>/lr-<variant>/`` and adds its row with ours' HR scales (and with the HR variant's, when
both are given). ``--lr-set`` may change scale 0 and its cycle losses, never the HR scales. Every row with a
scale 0 also prints that scale's own levels per tissue on the LR grid beside the LR target's: a scale 0 that moves
a tissue the two domains share (fat, soft tissue) is wrong there before any HR scale runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import unpaired as U

from msgan.cascade import Cascade
from msgan.data.phantom import Label
from msgan.data.tasks import METRIC_WINDOW, SEEDS, make_task
from msgan.metrics import ct_metrics
from msgan.nets import build_generator
from msgan.pyramid import build_pyramid

TISSUES = {
    "blood pool": (Label.AORTA, Label.HEART_BLOOD),
    "lung vessels": (Label.LUNG_VESSEL,),
    "myocardium": (Label.MYOCARDIUM,),
    "soft tissue": (Label.SOFT,),
    "fat": (Label.FAT,),
}
HR_SHARED = ("num_scales", "condition", "source_residual", "intensity", "edges", "lr_generator")
LR_SHARED = ("num_scales", "condition", "source_residual", "intensity", "edges", "hr_generator")


class TrueLowRes(torch.nn.Module):
    """Scale 0 replaced by a fixed image: the target's own LR grid (set :attr:`image` before each volume)."""

    def __init__(self, like: Any) -> None:
        super().__init__()
        self.channels, self.halo = like.channels, getattr(like, "halo", 0)
        self.image: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.image is not None
        return self.image.reshape(x.shape[0], 1, *x.shape[2:]).to(x.dtype)


def train_variant(task: str, shape: int, cfg: Any, scales: Sequence[int], folder: Path) -> list[torch.nn.Module]:
    """The generators of ``scales`` of ``cfg`` (ours without pairs), trained into ``folder`` on the benchmark's two
    sets, or reused when ``folder`` holds them trained as asked."""
    import time

    folder.mkdir(parents=True, exist_ok=True)
    seeds = {k: list(v) for k, v in U.seeds_for(False).items()}
    grid = (shape,) * 3
    record = {"config": cfg.to_dict(), "seeds": seeds, "shape": list(grid)}
    forward = None
    gens = []
    for s in scales:
        weights = folder / f"scale_{s}.pt"
        if not U.fresh(weights, record):
            forward = forward or U.fit_forward(task, cfg, grid, seeds, folder)
            t0 = time.perf_counter()
            job = U.scale_job("ours", s, cfg, task, seeds, grid, forward, folder)
            weights.write_bytes(U._train_scale(job)["weights"])
            U.remember(weights, record)
            seconds = time.perf_counter() - t0
            print(f"  trained {folder.name} scale {s}: {cfg.steps_for(s)} steps, {seconds:.0f} s", flush=True)
        g = build_generator(cfg, s)
        g.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
        gens.append(g.eval())
    return gens


def train_hr_variant(task: str, shape: int, cfg: Any, steps: int, folder: Path) -> list[torch.nn.Module]:
    """The HR scales of ``cfg`` trained for ``steps`` each into ``folder``, reused when trained as asked."""
    from msgan.config import from_dict

    cfg = from_dict(cfg.to_dict(), {"train.steps_per_scale": [cfg.steps_for(0)] + [steps] * (cfg.num_scales - 1)})
    return train_variant(task, shape, cfg, range(1, cfg.num_scales), folder)


def lr_labels(labels: np.ndarray, lr_shape: tuple[int, ...]) -> np.ndarray:
    """The label at the centre of each LR voxel (the LR grid may be rounded up: the pyramid pads odd sides)."""
    index = []
    for n, m in zip(labels.shape, lr_shape, strict=True):
        k = -(-n // m)  # voxels per LR voxel
        index.append(np.minimum(np.arange(m) * k + k // 2, n - 1))
    return labels[np.ix_(*index)]


def lr_levels(cascade: Cascade, lr_input: dict[str, np.ndarray], target_lr: np.ndarray, labels: np.ndarray) -> str:
    """Scale 0's own output per tissue on the LR grid (HU), beside the LR target's: ``tissue out/target``.
    ``lr_input``: the source's named LR arrays (:meth:`Cascade.levels`, the same for every row compared)."""
    from msgan.cascade import run_lr
    from msgan.pyramid import unwindow

    out = run_lr(cascade.generators[0], lr_input)
    lab = lr_labels(labels, out.shape)
    parts = []
    for tissue, ids in TISSUES.items():
        sel = np.isin(lab, ids)
        if sel.any():
            o, t = (float(np.mean(unwindow(a, cascade.config.intensity)[sel])) for a in (out, target_lr))
            parts.append(f"{tissue} {o:.0f}/{t:.0f}")
    return ", ".join(parts)


def main() -> None:
    from msgan.config import from_dict

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=list(U.TASKS))
    p.add_argument("--shape", type=int, default=64)
    p.add_argument("--workdir", default="runs/unpaired")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS["validation"][2:]))
    p.add_argument("--set", action="append", default=[], help="the config overrides ours was trained with")
    p.add_argument("--variant", default="", help="a name for HR scales retrained with --hr-set beside ours")
    p.add_argument("--hr-set", action="append", default=[], help="the variant's overrides of ours, KEY=VALUE")
    p.add_argument("--hr-steps", type=int, default=600, help="the variant's training steps per HR scale")
    p.add_argument("--lr-variant", default="", help="a name for a scale 0 retrained with --lr-set beside ours")
    p.add_argument("--lr-set", action="append", default=[], help="the LR variant's overrides of ours, KEY=VALUE")
    args = p.parse_args()
    if set(args.seeds) & set(SEEDS["heldout"]):
        raise SystemExit("held-out seeds are for the tables only; diagnose on validation seeds")
    if args.hr_set and not args.variant:
        raise SystemExit("--hr-set needs --variant NAME (the folder its HR scales are kept in)")
    if args.lr_set and not args.lr_variant:
        raise SystemExit("--lr-set needs --lr-variant NAME (the folder its scale 0 is kept in)")
    torch.set_num_threads(1)
    cfg = U.ours_config(args.task, args.shape, False, args.set)
    folder = Path(args.workdir) / str(args.shape) / args.task / "ours"
    ours = U.T.load_cascade(cfg, folder)
    if ours is None:
        raise SystemExit(f"{folder}: no trained ours (scale_<s>.pt for every scale); run benchmarks/unpaired.py first")
    gens = list(ours.generators)
    oracle = TrueLowRes(gens[0])
    ways = {"input": None, "ours": ours, "ours, true LR": Cascade(cfg, [oracle, *gens[1:]])}
    names = [n for n in (args.variant, args.lr_variant) if n]
    if len(set(names)) < len(names) or set(names) & {"input", "ours", "target"}:
        raise SystemExit(f"--variant and --lr-variant need names of their own, not {names}")
    if args.variant:
        vcfg = U.ours_config(args.task, args.shape, False, [*args.set, *args.hr_set])
        if any(getattr(vcfg, k) != getattr(cfg, k) for k in HR_SHARED):
            raise SystemExit("--hr-set changes scale 0; a variant retrains the HR scales only")
        hr = train_hr_variant(args.task, args.shape, vcfg, args.hr_steps, folder.parent / f"hr-{args.variant}")
        ways[args.variant] = Cascade(vcfg, [gens[0], *hr])
        ways[f"{args.variant}, true LR"] = Cascade(vcfg, [oracle, *hr])
    if args.lr_variant:
        lcfg = U.ours_config(args.task, args.shape, False, [*args.set, *args.lr_set])
        if any(getattr(lcfg, k) != getattr(cfg, k) for k in LR_SHARED):
            raise SystemExit("--lr-set changes the HR scales; an LR variant retrains scale 0 only")
        [lr_gen] = train_variant(args.task, args.shape, lcfg, [0], folder.parent / f"lr-{args.lr_variant}")
        ways[args.lr_variant] = Cascade(lcfg, [lr_gen, *gens[1:]])
        if args.variant:
            both = from_dict({**vcfg.to_dict(), "lr_generator": lcfg.to_dict()["lr_generator"]})  # each variant's own
            ways[f"{args.lr_variant} + {args.variant}"] = Cascade(both, [lr_gen, *hr])
    for seed in args.seeds:
        tv = make_task(args.task, seed, (args.shape,) * 3)
        lr = build_pyramid(tv.target, cfg.num_scales, cfg.intensity, cfg.edges).images[0]
        oracle.image = torch.from_numpy(np.ascontiguousarray(lr))
        levels = {"target": tv.target}
        lr_input = ours.levels(tv.input)[0][0]  # every row's scale 0 reads the same LR arrays (LR_SHARED, HR_SHARED)
        for name, cascade in ways.items():
            out = tv.input if cascade is None else cascade.translate(tv.input)
            levels[name] = out
            if cascade is not None and not isinstance(cascade.generators[0], TrueLowRes):
                own = lr_levels(cascade, lr_input, lr, tv.labels)
                print(f"  seed {seed} {name}: scale 0 (HU, out/LR target): {own}", flush=True)
            r = ct_metrics(out, tv.target, tv.noiseless, tv.labels, tv.spacing, METRIC_WINDOW)
            keys = ("ssim", "mae_hu", "hallucination_ml", "vessel_contrast_error")
            print(json.dumps({"seed": seed, "way": name, **{k: round(float(r[k]), 4) for k in keys}}), flush=True)
        for tissue, labels in TISSUES.items():
            sel = np.isin(tv.labels, labels)
            if sel.any():
                means = ", ".join(f"{k} {float(v[sel].mean()):.0f}" for k, v in levels.items())
                print(f"  seed {seed} {tissue} (HU): {means}", flush=True)


if __name__ == "__main__":
    main()
