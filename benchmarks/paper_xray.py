"""The paper's 2D experiment: radiographs of 2048^2 (projected phantoms) generated from their edges.

    python benchmarks/paper_xray.py [--config configs/paper-xray2048.yaml] [--out docs/results] [--workers 2]

Rows: ours (4 scales), small generation (LR 256^2) upscaled, plain patch-wise stitched. Columns: SSIM,
MAE, MSE against the real radiograph (mean +- std over held-out images), seconds per image, and the
peak memory of training each scale (CPU: peak resident memory of its training process).
Writes <out>/quality_xray2048.md, .json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_quality import _load, _train  # the same per-scale training process

from msgan import storage
from msgan.baselines import patch_generator, patchwise_translate, upscale_small
from msgan.cascade import Cascade, run_lr
from msgan.config import load_config
from msgan.data.phantom import radiograph
from msgan.io.pyramids import write_pyramid
from msgan.io.volume import Geometry
from msgan.metrics import paired_test, score
from msgan.pyramid import build_pyramid, window
from msgan.train import build_generator


def _image(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return radiograph(shape, seed=seed, depth=128)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/paper-xray2048.yaml")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    t_start = time.perf_counter()
    cfg = load_config(args.config, args.overrides)
    shape = tuple(cfg.data.phantom.shape)
    n = cfg.num_scales
    with tempfile.TemporaryDirectory() as tmp:
        root = storage.normalize_uri(tmp)
        volumes = []
        for seed in cfg.data.phantom.seeds:
            uri = storage.join(root, f"train{seed}.zarr")
            pyr = build_pyramid(_image(shape, seed), n, cfg.intensity, cfg.edges)
            write_pyramid(uri, pyr, Geometry.identity(2), {})
            volumes.append(uri)
        print(f"{len(volumes)} training radiographs {shape} ready ({time.perf_counter() - t_start:.0f}s)", flush=True)
        jobs = [{"variant": "ours", "scale": s, "config": cfg.to_dict(), "volumes": volumes} for s in range(n)]
        jobs.append({"variant": "patch-wise", "scale": n - 1, "config": cfg.to_dict(), "volumes": volumes})
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            trained = {(r["variant"], r["scale"]): r for r in pool.map(_train, jobs)}
    t_train = time.perf_counter() - t_start
    print(f"trained in {t_train:.0f}s", flush=True)
    gens = [_load(build_generator(cfg, s), trained[("ours", s)]["weights"]) for s in range(n)]
    cascade = Cascade(cfg, gens)
    patch_gen = _load(patch_generator(cfg), trained[("patch-wise", n - 1)]["weights"])
    rows: dict[str, list[dict[str, float]]] = {}
    example: dict[str, np.ndarray] = {}
    for i, seed in enumerate(cfg.data.phantom.holdout_seeds):
        real = _image(shape, seed)
        w_real = window(real, cfg.intensity)
        results: dict[str, tuple[np.ndarray, float]] = {}
        t0 = time.perf_counter()
        results["ours"] = (window(cascade.translate(real), cfg.intensity), time.perf_counter() - t0)
        t0 = time.perf_counter()
        pyr = build_pyramid(real, n, cfg.intensity, cfg.edges)
        results["small generation upscaled"] = (
            upscale_small(run_lr(gens[0], pyr.edges[0]), shape),
            time.perf_counter() - t0,
        )
        t0 = time.perf_counter()
        pyr = build_pyramid(real, n, cfg.intensity, cfg.edges)
        results["patch-wise, stitched"] = (patchwise_translate(patch_gen, pyr.edges[-1], cfg.train.hr_patch, 5),
                                           time.perf_counter() - t0)  # fmt: skip
        for name, (img, seconds) in results.items():
            rows.setdefault(name, []).append({**asdict(score(img, w_real, data_range=2.0)), "seconds": seconds})
        print(f"test radiograph {seed}: " + ", ".join(f"{k} {rows[k][-1]['ssim']:.3f}" for k in rows), flush=True)
        if i == 0:
            example = {"real": w_real, **{k: v[0] for k, v in results.items()}}
    memory = {f"scale {s} ({'LR' if s == 0 else 'HR'})": trained[("ours", s)]["peak_bytes"] for s in range(n)}
    memory["patch-wise (full resolution)"] = trained[("patch-wise", n - 1)]["peak_bytes"]
    report = {"shape": list(shape), "train_seconds": t_train, "total_seconds": time.perf_counter() - t_start,
              "rows": rows, "training_peak_bytes": memory}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_xray2048.json").write_text(json.dumps(report, indent=1))
    ours = rows["ours"]
    lines = [
        f"{len(ours)} held-out radiographs {shape}, trained on {len(volumes)}; whole image, window units; "
        f"mean +- std; p: paired t-test against ours (SSIM / MAE / MSE).",
        "",
        "| method | SSIM | MAE | MSE | s / image | p (SSIM / MAE / MSE) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        cols = [
            f"{np.mean([x[k] for x in r]):.4f} +- {np.std([x[k] for x in r], ddof=1):.4f}"
            for k in ("ssim", "mae", "mse")
        ]
        tests = [paired_test([x[k] for x in r], [x[k] for x in ours]).p for k in ("ssim", "mae", "mse")]
        ps = "" if name == "ours" else " / ".join(f"{p:.2g}" for p in tests)
        lines.append(f"| {name} | " + " | ".join(cols) + f" | {np.mean([x['seconds'] for x in r]):.1f} | {ps} |")
    lines += ["", "Peak memory of training each scale (CPU peak resident memory of its process, batch "
              f"{cfg.train.batch_size}):", "", "| network | peak MiB |", "| --- | --- |"]  # fmt: skip
    lines += [f"| {k} | {v / 2**20:.0f} |" for k, v in memory.items()]
    (out / "quality_xray2048.md").write_text("\n".join(lines) + "\n")
    _figure(example, out / "quality_xray2048.png")
    print("\n".join(lines))


def _figure(example: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(example)
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 6.6), squeeze=False)
    for j, name in enumerate(names):
        v = example[name]
        axes[0][j].imshow(v, cmap="gray", vmin=-1, vmax=1)
        axes[1][j].imshow(v[1000:1256, 700:956], cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        axes[0][j].set_title(name, fontsize=9)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1][0].set_ylabel("zoom 256^2", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
