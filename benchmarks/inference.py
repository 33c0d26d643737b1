"""Inference figures: constant memory, tiling overhead, actor scaling.

    python benchmarks/inference.py memory   [--sizes 128 512]   # peak RSS: tile actor and local path vs analytic
    python benchmarks/inference.py trend    [--size 256]        # RSS over the finest scale's tiles, tile by tile
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


def _needs(cascade: Cascade, n: int, tile: int | None = None) -> tuple[int, int, int]:
    """Analytic bytes (:mod:`msgan.memory`): scale 0 on the whole LR grid, one HR tile at the finest
    scale, and the tile core the 64 MiB budget picks."""
    from msgan.memory import forward_peak_bytes, hr_inference_bytes
    from msgan.nets import HRGenerator
    from msgan.tiling import pyramid_shapes

    cfg = cascade.config
    shapes = pyramid_shapes((n,) * cfg.dims, cfg.num_scales)
    gen0 = cascade.generators[0]
    channels: tuple[str, ...] = tuple(getattr(gen0, "channels", ("edges",)))  # edges, image or both
    lr = forward_peak_bytes(gen0, (1, len(channels), *shapes[0]))
    s = cfg.num_scales - 1
    gen = cascade.generators[s]
    assert isinstance(gen, HRGenerator)
    tile = tile or cascade.tile_size(s, shapes[s])
    return lr, hr_inference_bytes(gen, tile, cfg.dims, cfg.inference.batch_size), tile


LOCAL = """
import json, sys, torch
from msgan.cascade import Cascade
from msgan.memory import current_rss, peak_host_bytes, reset_peak_rss
from msgan.volumes.local import translate_volume
from msgan.volumes.pinning import with_overrides
from msgan.volumes.tasks import volume_task
torch.set_num_threads(1)
root, model, tile = sys.argv[1], sys.argv[2], int(sys.argv[3]) or None
cascade = with_overrides(Cascade.load(model), {"memory_budget_mb": 64})
task = volume_task(root + "/in/v.zarr", root + "/local", "bench/local")
base = current_rss(); reset_peak_rss()
translate_volume(task, cascade, tile=tile)
print(json.dumps({"base": base, "peak": peak_host_bytes()}))
"""


SCALE0 = """
import sys, numpy as np, torch
from msgan.cascade import Cascade, run_lr
from msgan.memory import current_rss, peak_host_bytes, reset_peak_rss
from msgan.tiling import pyramid_shapes
torch.set_num_threads(1)
cascade = Cascade.load(sys.argv[1])
n = int(sys.argv[2])
lr = pyramid_shapes((n,) * cascade.config.dims, cascade.config.num_scales)[0]
x = np.random.default_rng(0).uniform(-1, 1, lr).astype(np.float32)
base = current_rss(); reset_peak_rss()
run_lr(cascade.generators[0], {"edges": x, "image": x})
print(peak_host_bytes() - base)
"""


def _scale0_measured(path: str, n: int) -> int:
    """Peak bytes of scale 0's forward pass alone on the whole LR grid of an ``n``^dims volume (own process)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SCALE0, path, str(n)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return int(out.stdout.strip().splitlines()[-1])


def memory(args: argparse.Namespace) -> None:
    """Peak RSS of the Ray tile actor (its own process, from its start) and of the local path
    (``translate_volume``, beyond its RSS after loading the model) against the analytic needs."""
    import json
    import subprocess
    import sys

    import ray

    from msgan.distributed import translate as tr

    if args.shared_workers:  # main's behaviour: actors may start in a worker that ran a staging task
        tr.ACTOR_ENV = {}
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.tmp) as d:
            tmp = Path(d)
            path, cascade = _model(tmp, **{"inference.memory_budget_mb": 64})
            lr_need, tile_need, tile = _needs(cascade, n, args.tile)
            lr_measured = _scale0_measured(path, n)
            if args.scale0_only:
                print(f"{n}^3: scale 0 forward on the whole LR grid: {lr_measured / 2**20:.0f} MiB measured, "
                      f"{lr_need / 2**20:.0f} MiB analytic (memory model: the tensors alive at once)")  # fmt: skip
                continue
            _volume(tmp, n, "v")
            actor = {}
            if not args.local_only:
                ray.init(
                    address="local", num_cpus=2, include_dashboard=False
                )  # fresh actors: their peak RSS is this volume's
                try:
                    rep = tr.translate_batch([str(tmp / "in")], str(tmp / "out"), path,
                                             {"memory_budget_mb": 64, "actors": 1, "cpus_per_actor": 1.0},
                                             log=lambda _: None, tile=args.tile)  # fmt: skip
                finally:
                    ray.shutdown()
                hr = [s for s in rep.scales if s["scale"] > 0]
                actor = {
                    "peak": max(s["actor_peak_rss"] for s in hr),
                    "start": max(s["actor_start_rss"] for s in hr),
                    "inherited": max(s["actor_inherited_hwm"] for s in hr),
                    "seconds": rep.seconds,
                }
            local: dict[str, int] = {}
            if not args.ray_only:
                out = subprocess.run([sys.executable, "-c", LOCAL, str(tmp), path, str(args.tile or 0)],
                                     capture_output=True, text=True)  # fmt: skip
                if out.returncode:
                    raise SystemExit(out.stderr[-3000:])
                local = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((n, actor, local, lr_need, lr_measured))
            mib = 2**20
            line = (f"{n}^3 (tile {tile}; HR tile analytic {tile_need / mib:.0f} MiB; scale 0 on the whole LR grid "
                    f"analytic {lr_need / mib:.1f} MiB, measured alone {lr_measured / mib:.0f} MiB):")  # fmt: skip
            if actor:
                line += (f" tile actor peak {actor['peak'] / mib:.0f} MiB (RSS at its start {actor['start'] / mib:.0f},"
                         f" high-water mark it inherited {actor['inherited'] / mib:.0f}),"
                         f" batch {actor['seconds']:.0f}s;")  # fmt: skip
            if local:
                line += (f" local path peak {local['peak'] / mib:.0f} MiB = after load {local['base'] / mib:.0f} "
                         f"+ {(local['peak'] - local['base']) / mib:.0f}")  # fmt: skip
            print(line, flush=True)
    if not rows:
        return
    (n0, a0, l0, lr0, m0), (n1, a1, l1, lr1, m1) = rows[0], rows[-1]
    print(f"growth {n0}^3 -> {n1}^3 ({(n1 / n0) ** 3:.0f}x voxels):")
    if a0 and a1:
        g = (a1["peak"] - a0["peak"]) / 2**20
        print(f"  tile actor peak RSS {g:+.1f} MiB (target < 64 MiB): {'ok' if g < 64 else 'OVER'}")
    if l1:
        g = (l1["peak"] - l1["base"]) / 2**20
        bound = lr1 / 2**20 + 64
        print(f"  local path at {n1}^3: +{g:.0f} MiB over its loaded model; bound = scale 0 need {lr1 / 2**20:.1f} "
              f"(analytic) + 64 = {bound:.0f} MiB: {'ok' if g <= bound else 'OVER'}; with scale 0's measured need "
              f"{m1 / 2**20:.0f} + 64 = {m1 / 2**20 + 64:.0f} MiB: "
              f"{'ok' if g <= m1 / 2**20 + 64 else 'OVER'}")  # fmt: skip
    if l0 and l1:
        g = (l1["peak"] - l0["peak"]) / 2**20
        print(f"  local path peak {g:+.0f} MiB from {n0}^3 to {n1}^3 (scale 0's measured need grows by "
              f"{(m1 - m0) / 2**20:.0f} MiB, analytic by {(lr1 - lr0) / 2**20:.0f})")  # fmt: skip


def trend(args: argparse.Namespace) -> None:
    """RSS of this process over the finest scale's tiles, one tile per forward (is anything kept per tile?)."""
    import torch

    from msgan.memory import current_rss, peak_host_bytes, reset_peak_rss
    from msgan.volumes.heap import bound_heap, release_memory
    from msgan.volumes.staging import plan_volume, stage
    from msgan.volumes.steps import run_scale0, scale_tiles
    from msgan.volumes.tasks import volume_task

    torch.set_num_threads(1)
    if not args.glibc_default:
        bound_heap()
    n, mib = args.size, 2**20
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        tmp = Path(d)
        _, cascade = _model(tmp, **{"inference.memory_budget_mb": 64})
        _volume(tmp, n, "v")
        task = volume_task(str(tmp / "in" / "v.zarr"), str(tmp / "out"), "bench/trend")
        vplan = plan_volume(task, cascade, args.tile)
        stage(task, cascade.config, vplan)
        run_scale0(task, cascade)
        for s in range(1, cascade.config.num_scales - 1):
            scale_tiles(task, cascade, s).run(vplan.tiles_of(s))
        s = cascade.config.num_scales - 1
        tiles = vplan.tiles_of(s)
        runner = scale_tiles(task, cascade, s)
        release_memory()
        reset_peak_rss()
        print(f"{n}^3, finest scale, {len(tiles)} tiles of {args.tile}: RSS at start {current_rss() / mib:.0f} MiB")
        for i, t in enumerate(tiles):
            runner.run([t])
            if i % 25 == 0 or i == len(tiles) - 1:
                release_memory()
                print(f"  tile {i + 1}: RSS {current_rss() / mib:.0f} MiB, peak {peak_host_bytes() / mib:.0f} MiB")


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
    h = int(getattr(gen, "halo", 0))
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
            ray.init(address="local", num_cpus=2, include_dashboard=False)
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
    m.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
    m.add_argument("--ray-only", action="store_true", help="only the Ray tile actor")
    m.add_argument("--local-only", action="store_true", help="only the local path (translate_volume)")
    m.add_argument(
        "--shared-workers",
        action="store_true",
        help="let actors start in workers that ran staging tasks (main's behaviour)",
    )
    m.add_argument(
        "--tile",
        type=int,
        default=48,
        help="HR tile core at every size (0: each size's from the 64 MiB budget, which may differ)",
    )
    m.add_argument("--scale0-only", action="store_true", help="only scale 0's forward pass, measured and analytic")
    m.add_argument("--tmp", default=None, help="folder for the volumes (default: the system's temp)")
    t = sub.add_parser("trend")
    t.add_argument("--size", type=int, default=256)
    t.add_argument("--tile", type=int, default=48)
    t.add_argument("--glibc-default", action="store_true", help="without heap.bound_heap (glibc's defaults)")
    t.add_argument("--tmp", default=None)
    o = sub.add_parser("overhead")
    o.add_argument("--size", type=int, default=128)
    s = sub.add_parser("scaling")
    s.add_argument("--size", type=int, default=192)
    s.add_argument("--volumes", type=int, default=3)
    s.add_argument("--batch", type=int, default=4, help="tiles per actor call")
    args = p.parse_args()
    {"memory": memory, "trend": trend, "overhead": overhead, "scaling": scaling}[args.what](args)


if __name__ == "__main__":
    main()
