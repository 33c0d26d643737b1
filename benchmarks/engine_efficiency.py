"""How close the tile engine runs to the convolution limit, per HR scale.

    python benchmarks/engine_efficiency.py [--config configs/demo.yaml] [--size 128] [--tile T]
                                           [--batch B] [--threads N] [--set key=value ...]

For each HR scale of an untrained cascade translating a ``size``^dims phantom in memory:

- achieved GFLOP/s of ``translate``: FLOPs of the convolutions over the tiles actually run
  (halos, border padding and the padded last batch included; :func:`msgan.memory.conv_flops`)
  divided by the scale's wall time including the reads and writes of every tile;
- the practical limit: GFLOP/s of the generator alone on the same batch shape and threads,
  fed from memory (no reads, no writes, no input building; median of ``--repeats`` passes,
  timed first, so the translate runs on a warm shape as a long-lived actor does);
- ratio = achieved / limit;
- halo cost: (FLOPs run - FLOPs of one pass over exactly the volume's voxels) / the latter.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import batch_inputs

from msgan.cascade import Cascade, run_lr, run_scale
from msgan.config import load_config
from msgan.data.phantom import phantom_image
from msgan.memory import conv_flops, per_voxel_flops
from msgan.nets import HRGenerator
from msgan.pyramid import build_pyramid
from msgan.tiling import batches_of, tile_grid


@torch.no_grad()
def generator_alone(gen: HRGenerator, x: torch.Tensor, c: torch.Tensor | None, repeats: int) -> float:
    """Median seconds per forward pass of ``gen`` on ``x`` (after one warm-up pass)."""
    gen.eval()
    gen(x, c)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gen(x, c)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--tile", type=int, default=None, help="tile core; default: from the memory budget")
    p.add_argument("--batch", type=int, default=None, help="tiles per forward pass; default: inference.batch_size")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5, help="forward passes timed for the generator alone (median)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    if args.batch is not None:
        cfg = cfg.replace(**{"inference.batch_size": args.batch})
    bs = cfg.inference.batch_size
    cascade = Cascade.untrained(cfg, seed=0)
    shape = (args.size,) * cfg.dims
    pyr = build_pyramid(phantom_image(shape, 3, "sharp"), cfg.num_scales, cfg.intensity, cfg.edges)
    levels = [{"image": im, "edges": e} for im, e in zip(pyr.images, pyr.edges, strict=True)]
    prev = run_lr(cascade.generators[0], levels[0])
    print(f"{args.config} ({cfg.condition}, {cfg.hr_generator.context}), volume {shape}, batch {bs}, "
          f"{args.threads} threads, torch {torch.__version__}")  # fmt: skip
    head = f"{'scale':>5} {'grid':>15} {'tile':>4} {'halo':>4} {'tiles':>6} {'GFLOP':>8} {'wall s':>7}"
    print(f"{head} {'GFLOP/s':>8} {'alone':>8} {'ratio':>6} {'halo cost':>9}")
    for s in range(1, cfg.num_scales):
        gen = cascade.generators[s]
        assert isinstance(gen, HRGenerator)
        grid = tuple(levels[s]["edges"].shape)
        core = args.tile or cascade.tile_size(s, grid)
        tiles = tile_grid(grid, core)
        batches = batches_of(tiles, bs)
        x, c = batch_inputs(gen, tiles[0].run_shape, bs, torch.device("cpu"))
        per_batch = conv_flops(gen, x, c)
        flops = per_batch * len(batches)
        alone = per_batch / generator_alone(gen, x, c, args.repeats)  # also warms this shape up, as an actor has
        out = np.zeros(grid, np.float32)
        t0 = time.perf_counter()
        run_scale(gen, {**levels[s], "prev": prev}, out, core, bs)
        wall = time.perf_counter() - t0
        achieved = flops / wall
        useful = per_voxel_flops(gen) * math.prod(grid)
        print(f"{s:>5} {'x'.join(map(str, grid)):>15} {core:>4} {gen.halo:>4} {len(tiles):>6} {flops / 1e9:8.1f} "
              f"{wall:7.2f} {achieved / 1e9:8.2f} {alone / 1e9:8.2f} {achieved / alone:6.2f} "
              f"{flops / useful - 1:9.2f}", flush=True)  # fmt: skip
        prev = out


if __name__ == "__main__":
    main()
