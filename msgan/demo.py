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
from msgan.data.phantom import default_spacing, kernel_pair, phantom_image
from msgan.io.volume import Geometry, write_volume
from msgan.metrics import Scores, score
from msgan.pyramid import Pyramid, build_pyramid, window
from msgan.train import ScaleData, ScaleTrainer, StepMetrics

Log = Callable[[str], None]
HOLDOUT_SEED = 1000


def phantom_pyramids(cfg: Config) -> list[Pyramid]:
    """One pyramid per training phantom."""
    p = cfg.data.phantom
    return [
        build_pyramid(phantom_image(p.shape, s, p.kernel), cfg.num_scales, cfg.intensity, cfg.edges) for s in p.seeds
    ]


def fingerprint(pyramids: Sequence[Pyramid]) -> str:
    """Content hash of the training data (every level of every pyramid)."""
    h = hashlib.sha256()
    for p in pyramids:
        for a in (*p.images, *p.edges):
            arr = np.ascontiguousarray(a, dtype=np.float32)
            h.update(str(arr.shape).encode())
            h.update(arr.tobytes())
    return h.hexdigest()


def train_locally(cfg: Config, pyramids: Sequence[Pyramid], log: Log = print) -> Cascade:
    """Train every scale one after another in this process (the Ray job trains them at once)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    gens, steps = [], []
    for s in range(cfg.num_scales):
        trainer = ScaleTrainer(cfg, s, ScaleData.from_pyramids(pyramids, s, cfg.train.foreground_threshold))
        t0 = time.perf_counter()

        total = cfg.steps_for(s)

        def report(m: StepMetrics, t0: float = t0, total: int = total) -> None:
            log(
                f"  scale {m.scale} step {m.step:>5}/{total}  G {m.loss_g:7.3f} (L1 {m.loss_g_l1:.4f})"
                f"  D {m.loss_d:.3f}  {time.perf_counter() - t0:6.1f}s"
            )

        trainer.fit(total, callback=report)
        gens.append(trainer.generator.eval())
        steps.append(trainer.step)
    return Cascade(cfg, gens, {"steps": steps, "data_fingerprint": fingerprint(pyramids)})


@dataclass(frozen=True)
class DemoResult:
    input: Scores
    ours: Scores
    seconds_train: float
    seconds_translate: float
    png: Path
    model: Path


def body_mask(gt_windowed: np.ndarray, threshold: float = -0.8) -> np.ndarray:
    return gt_windowed > threshold


def save_slices_png(path: Path, columns: dict[str, np.ndarray], vmin: float = -1.0, vmax: float = 1.0) -> Path:
    """Axial, coronal and sagittal centre slices (rows) of each volume (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    fig, axes = plt.subplots(3, len(names), figsize=(3.2 * len(names), 9.6), squeeze=False)
    for j, name in enumerate(names):
        v = columns[name]
        c = [n // 2 for n in v.shape]
        views = [("axial", v[c[0]]), ("coronal", v[:, c[1]][::-1]), ("sagittal", v[:, :, c[2]][::-1])]
        for i, (view, img) in enumerate(views):
            ax = axes[i][j]
            ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name)
            if j == 0:
                ax.set_ylabel(view)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run_demo(cfg: Config, out_dir: str | Path, log: Log = print) -> DemoResult:
    """Build phantoms, train, translate a held-out sharp-kernel volume and score it."""
    if cfg.dims != 3 or cfg.data.source != "phantom":
        raise ValueError("the demo uses 3D phantoms: set dims=3 and data.source=phantom")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = cfg.data.phantom.shape
    log(f"[1/4] {len(cfg.data.phantom.seeds)} training phantoms {tuple(shape)} (soft kernel), pyramids of "
        f"{cfg.num_scales} scales")  # fmt: skip
    pyramids = phantom_pyramids(cfg)
    log(f"[2/4] training {cfg.num_scales} scales, steps {[cfg.steps_for(s) for s in range(cfg.num_scales)]}")
    t0 = time.perf_counter()
    cascade = train_locally(cfg, pyramids, log)
    t_train = time.perf_counter() - t0
    model_dir = cascade.save(out / "model")
    log(f"[3/4] translating held-out phantom (seed {HOLDOUT_SEED}): sharp kernel -> soft kernel")
    soft, sharp = kernel_pair(shape, HOLDOUT_SEED)
    t0 = time.perf_counter()
    ours = cascade.translate(sharp)
    t_translate = time.perf_counter() - t0
    geom = Geometry.identity(3, tuple(reversed(default_spacing(shape))))
    for name, vol in (("input_sharp", sharp), ("ours", ours), ("truth_soft", soft)):
        write_volume(out / f"{name}.nii.gz", vol, geom)
    w = {k: window(v, cfg.intensity) for k, v in (("input", sharp), ("ours", ours), ("truth", soft))}
    mask = body_mask(w["truth"])
    s_in, s_ours = score(w["input"], w["truth"], mask=mask), score(w["ours"], w["truth"], mask=mask)
    png = save_slices_png(
        out / "slices.png", {"input (sharp)": w["input"], "ours": w["ours"], "truth (soft)": w["truth"]}
    )
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
