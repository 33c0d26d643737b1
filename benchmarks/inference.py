"""Inference figures: constant memory, tiling overhead, actor scaling.

    python benchmarks/inference.py memory   [--sizes 128 384]   # peak RSS of the tile actor per volume size
    python benchmarks/inference.py overhead [--size 128]        # tiled vs one whole-volume pass, same networks
    python benchmarks/inference.py scaling  [--size 160]        # voxels/s with 1 vs 2 CPU actors

All use an untrained cascade of configs/demo.yaml's networks (compute and memory do not depend
on the weights) on a synthetic phantom, on this machine's CPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from msgan.cascade import Cascade, run_hr, run_hr_whole
from msgan.config import load_config
from msgan.data.phantom import thorax_phantom
from msgan.io.volume import Geometry, write_zarr
from msgan.pyramid import build_pyramid


def _model(tmp: Path, **over: object) -> tuple[str, Cascade]:
    cfg = load_config("configs/demo.yaml", {k: v for k, v in over.items()})
    cascade = Cascade.untrained(cfg, seed=0)
    return str(cascade.save(tmp / "model")), cascade


def _volume(tmp: Path, n: int, name: str) -> None:
    write_zarr(tmp / "in" / f"{name}.zarr", [thorax_phantom((n, n, n), seed=3)], Geometry.identity(3), chunks=64)


def memory(args: argparse.Namespace) -> None:
    import ray

    from msgan.distributed.translate import translate_batch

    results = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            path, _ = _model(tmp, **{"inference.actors": 1, "inference.cpus_per_actor": 1.0})
            _volume(tmp, n, f"v{n}")
            ray.init(num_cpus=2, include_dashboard=False)  # fresh actors: their peak RSS is this volume's
            try:
                rep = translate_batch([str(tmp / "in")], str(tmp / "out"), path, {"memory_budget_mb": 64},
                                      log=lambda _: None)  # fmt: skip
            finally:
                ray.shutdown()
            peak = max(s.get("actor_peak_rss", 0) for s in rep.scales)
            tile = rep.published[0]["tiles"][-1]
            results.append((n, peak, tile, rep.seconds))
            print(f"{n}^3: tile {tile}, tile actor peak RSS {peak / 2**20:.0f} MiB, batch {rep.seconds:.0f}s")
    (n0, p0, _, _), (n1, p1, _, _) = results[0], results[-1]
    print(f"growth {n0}^3 -> {n1}^3 ({(n1 / n0) ** 3:.0f}x voxels): {(p1 - p0) / 2**20:+.1f} MiB")


def overhead(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d:
        _, cascade = _model(Path(d))
    cfg = cascade.config
    n = args.size
    pyr = build_pyramid(thorax_phantom((n, n, n), seed=3), cfg.num_scales, cfg.intensity, cfg.edges)
    s = cfg.num_scales - 1
    gen = cascade.generators[s]
    prev = np.random.default_rng(0).uniform(-1, 1, pyr.shapes[s - 1]).astype(np.float32)
    budget_tile = cascade.tile_size(s, pyr.shapes[s])
    t0 = time.perf_counter()
    whole = run_hr_whole(gen, prev, pyr.edges[s])  # type: ignore[arg-type]
    t_whole = time.perf_counter() - t0
    h = gen.halo  # type: ignore[union-attr]
    print(f"finest scale {n}^3, halo {h}, whole-volume pass {t_whole:.2f}s; memory budget picks tile {budget_tile}")
    for core in sorted({32, 64, budget_tile}):
        out = np.zeros_like(whole)
        t0 = time.perf_counter()
        tiles = run_hr(gen, prev, pyr.edges[s], out, core)  # type: ignore[arg-type]
        t = time.perf_counter() - t0
        ideal = ((core + 2 * h) / core) ** 3 / ((n + 2 * h) / n) ** 3
        print(f"tile {core:>4}: {tiles:>4} tiles {t:6.2f}s  ratio {t / t_whole:.2f}x  (halo compute alone {ideal:.2f}x)"
              f"  max|diff| {np.abs(out - whole).max():.1e}")  # fmt: skip


def scaling(args: argparse.Namespace) -> None:
    import ray

    from msgan.distributed.translate import translate_batch

    rates = {}
    for actors in (1, 2):
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            path, _ = _model(tmp)
            for i in range(args.volumes):
                _volume(tmp, args.size, f"v{i}")
            ray.init(num_cpus=2, include_dashboard=False)
            try:
                rep = translate_batch([str(tmp / "in")], str(tmp / "out"), path,
                                      {"actors": actors, "cpus_per_actor": 0.9, "memory_budget_mb": 64,
                                       "batch_size": args.batch},
                                      log=lambda _: None)  # fmt: skip
            finally:
                ray.shutdown()
            hr = [s for s in rep.scales if s["scale"] > 0]
            rates[actors] = sum(s["voxels"] for s in hr) / sum(s["seconds"] for s in hr)
            detail = ", ".join(f"scale {s['scale']} {s['seconds']:.1f}s" for s in hr)
            print(f"{actors} actor(s): HR scales {rates[actors] / 1e6:.3f} Mvox/s ({detail})")
    print(f"speed-up 2 vs 1 actors: {rates[2] / rates[1]:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--sizes", type=int, nargs="+", default=[128, 384])
    o = sub.add_parser("overhead")
    o.add_argument("--size", type=int, default=128)
    s = sub.add_parser("scaling")
    s.add_argument("--size", type=int, default=192)
    s.add_argument("--volumes", type=int, default=3)
    s.add_argument("--batch", type=int, default=4, help="tiles per actor call")
    args = p.parse_args()
    {"memory": memory, "overhead": overhead, "scaling": scaling}[args.what](args)


if __name__ == "__main__":
    main()
