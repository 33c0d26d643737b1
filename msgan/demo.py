"""The local end-to-end demo: phantoms -> pyramids -> train every scale -> translate a held-out
sharp-kernel volume -> metrics and a PNG of slices."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msgan.cascade import Cascade
from msgan.config import Config
from msgan.console import Progress
from msgan.distributed.prepare import held_out, training_pyramids
from msgan.io.volume import write_volume
from msgan.metrics import Scores, score_against_truth
from msgan.pyramid import Pyramid
from msgan.train import ScaleData, ScaleTrainer, StepMetrics

Log = Callable[[str], None]


def fingerprint(pyramids: Sequence[Pyramid]) -> str:
    """Content hash of the training data (every level of every pyramid)."""
    h = hashlib.sha256()
    for p in pyramids:
        for a in (*p.images, *p.edges):
            arr = np.ascontiguousarray(a, dtype=np.float32)
            h.update(str(arr.shape).encode())
            h.update(arr.tobytes())
    return h.hexdigest()


def train_locally(
    cfg: Config, pyramids: Sequence[Pyramid], log: Log = print, progress: Progress | None = None
) -> Cascade:
    """Train every scale one after another in this process (the Ray job trains them at once). With a
    ``progress``, each scale shows its step, rate and ETA there; otherwise every logged step goes to ``log``."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    gens, steps = [], []
    for s in range(cfg.num_scales):
        trainer = ScaleTrainer(cfg, s, ScaleData.from_pyramids(pyramids, s, cfg.train.foreground_threshold))
        t0 = time.perf_counter()
        total = cfg.steps_for(s)
        if progress is not None:
            progress.add(s, f"[scale {s}]", total, "steps")

        def report(m: StepMetrics, t0: float = t0, total: int = total) -> None:
            note = f"G {m.loss_g:.3f} (L1 {m.loss_g_l1:.4f}) D {m.loss_d:.3f}"
            if progress is not None:
                progress.update(m.scale, m.step, note)
            else:
                log(f"  scale {m.scale} step {m.step:>5}/{total}  {note}  {time.perf_counter() - t0:6.1f}s")

        trainer.fit(total, callback=report)
        gens.append(trainer.generator.eval())
        steps.append(trainer.step)
    if progress is not None:
        progress.close()
    return Cascade(cfg, gens, {"steps": steps, "data_fingerprint": fingerprint(pyramids)})


@dataclass(frozen=True)
class DemoResult:
    input: Scores
    ours: Scores
    seconds_train: float
    seconds_translate: float
    png: Path
    model: Path


def run_demo(cfg: Config, out_dir: str | Path, log: Log = print, progress: Progress | None = None) -> DemoResult:
    """Build phantoms, train, translate a held-out sharp-kernel volume and score it."""
    if cfg.dims != 3 or cfg.data.source != "phantom":
        raise ValueError("the demo uses 3D phantoms: set dims=3 and data.source=phantom")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = cfg.data.phantom.shape
    log(f"[1/4] {len(cfg.data.phantom.seeds)} training phantoms {tuple(shape)} (soft kernel), pyramids of "
        f"{cfg.num_scales} scales")  # fmt: skip
    pyramids = training_pyramids(cfg)
    log(f"[2/4] training {cfg.num_scales} scales, steps {[cfg.steps_for(s) for s in range(cfg.num_scales)]}")
    t0 = time.perf_counter()
    cascade = train_locally(cfg, pyramids, log, progress)
    t_train = time.perf_counter() - t0
    model_dir = cascade.save(out / "model")
    held = next(held_out(cfg))
    log(f"[3/4] translating held-out {held.label}: sharp kernel -> soft kernel")
    sharp, soft = held.image, held.truth
    if soft is None:
        raise ValueError(f"{held.label}: the demo needs a phantom with its truth")
    t0 = time.perf_counter()
    ours = cascade.translate(sharp)
    t_translate = time.perf_counter() - t0
    geom = held.geometry
    for name, vol in (("input_sharp", sharp), ("ours", ours), ("truth_soft", soft)):
        write_volume(out / f"{name}.nii.gz", vol, geom)
    png = out / "slices.png"
    s_in, s_ours = score_against_truth(cfg, sharp, ours, soft, geom.numpy_spacing(), png)
    result = DemoResult(s_in, s_ours, t_train, t_translate, png, model_dir)
    report: dict[str, Any] = {
        "input_vs_truth": asdict(s_in),
        "ours_vs_truth": asdict(s_ours),
        "seconds_train": t_train,
        "seconds_translate": t_translate,
        "shape": list(shape),
        "steps_per_scale": [cfg.steps_for(s) for s in range(cfg.num_scales)],
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    log("[4/4] metrics inside the body, window units ([-1, 1]):")
    log(f"  {'':<16}{'SSIM':>8}{'MAE':>9}{'MSE':>9}{'PSNR':>8}")
    for name, s in (("input (sharp)", s_in), ("ours", s_ours)):
        log(f"  {name:<16}{s.ssim:8.4f}{s.mae:9.4f}{s.mse:9.5f}{s.psnr:8.2f}")
    log(f"  train {t_train:.1f}s, translate {t_translate:.2f}s")
    log(f"  wrote {png}, {out / 'metrics.json'}, volumes and the model in {model_dir}")
    return result
