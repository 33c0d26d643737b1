"""Tiled vs whole-volume inference of the default HR generator, and its halo and size.

    python benchmarks/tile_exactness.py [--shape 37 53 41] [--tiles 8 16 24]

Prints the halo, parameter count, and for each tile core the max |tiled - whole| over a
volume whose shape is not a multiple of any tile, with random weights.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from msgan.cascade import run_scale, run_scale_whole
from msgan.config import Config
from msgan.nets import build_generator, count_parameters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs="+", default=[37, 53, 41])
    p.add_argument("--tiles", type=int, nargs="+", default=[8, 16, 24])
    p.add_argument("--context", choices=["upscaled", "wide"], default="upscaled")
    p.add_argument("--condition", choices=["edges", "image", "image+edges"], default="edges")
    args = p.parse_args()
    torch.manual_seed(0)
    over = {"hr_generator.context": args.context, "condition": args.condition}
    cfg = Config(dims=len(args.shape)).replace(**over)  # type: ignore[arg-type]
    gen = build_generator(cfg, 1).eval()
    print(f"default HR generator ({args.context}, {args.condition}): halo {gen.halo}, "
          f"{count_parameters(gen):,} parameters")  # fmt: skip
    rng = np.random.default_rng(0)
    shape = tuple(args.shape)
    arrays = {
        "prev": rng.uniform(-1, 1, tuple(-(-s // 2) for s in shape)).astype(np.float32),
        "edges": rng.uniform(-1, 1, shape).astype(np.float32),
        "image": rng.uniform(-1, 1, shape).astype(np.float32),
    }
    t0 = time.perf_counter()
    whole = run_scale_whole(gen, arrays)
    print(f"whole-volume pass {shape}: {time.perf_counter() - t0:.2f}s")
    for core in args.tiles:
        out = np.zeros(shape, np.float32)
        t0 = time.perf_counter()
        n = run_scale(gen, arrays, out, core)
        diff = float(np.abs(out - whole).max())
        print(f"tile core {core:>3}: {n:>4} tiles, {time.perf_counter() - t0:6.2f}s, max |tiled - whole| = {diff:.3g}")


if __name__ == "__main__":
    main()
