"""The inference memory model against measured peaks, and the conv layout behind it.

    python benchmarks/memory_model.py                       # HR tiles and scale 0, model vs measured
    python benchmarks/memory_model.py --layers              # one convolution at a time: oneDNN's copies

Each case runs in a fresh process (2 threads by default): an untrained cascade of ``--config``'s
networks, synthetic inputs, one warm-up pass, then the peak RSS of the measured pass above the RSS
before it (``clear_refs`` resets the high-water mark). HR: :func:`msgan.engine.run_tiles` over 8 tiles,
``batch`` tiles per forward, against :func:`msgan.memory.hr_inference_bytes` less the parameters
(loaded before the pass). Scale 0: :func:`msgan.engine.run_whole` on an ``n``^3 LR grid against
:func:`msgan.memory.forward_peak_bytes` (plain layout). ``--layers`` prints, per convolution, the
measured peak above its output in plain and channels-last layout, what the model adds, and the
median time of our convolution (oneDNN always) against PyTorch's own choice of kernel.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASE = """
import json, sys
import numpy as np, torch
from msgan.volumes.heap import bound_heap, release_memory
from msgan.cascade import Cascade
from msgan.config import load_config
from msgan.engine import array_writer, run_tiles, run_whole, tile_feed
from msgan.memory import current_rss, forward_peak_bytes, hr_inference_bytes, peak_host_bytes, reset_peak_rss
from msgan.nets import count_parameters
from msgan.tiling import tile_grid

config, what, n, bs, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
bound_heap()
cascade = Cascade.untrained(load_config(config, {}), seed=0)
dims = cascade.config.dims
rng = np.random.default_rng(0)
if what == "hr":
    s = cascade.config.num_scales - 1
    gen = cascade.generators[s]
    grid = (2 * n,) * dims  # 4 (2D) or 8 (3D) tiles
    arrays = {k: rng.uniform(-1, 1, grid).astype(np.float32) for k in ("image", "edges")}
    arrays["prev"] = rng.uniform(-1, 1, tuple(g // 2 for g in grid)).astype(np.float32)
    out = np.zeros(grid, np.float32)
    tiles = tile_grid(grid, n)
    feed, write = tile_feed(gen, arrays), array_writer(out)
    run_tiles(gen, tiles[:bs], feed, write, bs)  # warm-up: oneDNN primitives for this shape
    model = hr_inference_bytes(gen, n, dims, bs) - 4 * count_parameters(gen)
    release_memory(); base = current_rss(); reset_peak_rss()
    run_tiles(gen, tiles, feed, write, bs)
else:
    gen = cascade.generators[0]
    arrays = {k: rng.uniform(-1, 1, (n,) * dims).astype(np.float32) for k in ("image", "edges")}
    run_whole(gen, arrays)
    model = forward_peak_bytes(gen, (1, len(gen.channels)) + (n,) * dims)
    release_memory(); base = current_rss(); reset_peak_rss()
    y = run_whole(gen, arrays)
print(json.dumps({"measured": peak_host_bytes() - base, "model": model}))
"""

LAYER = """
import json, sys, time, torch
import torch.nn.functional as F
from msgan.volumes.heap import bound_heap, release_memory
from msgan.memory import current_rss, forward_peak_bytes, peak_host_bytes, reset_peak_rss
from msgan.nets import conv
cin, cout, side, layout = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1); bound_heap()
c = conv(3, cin, cout, 3)
x = torch.rand(1, cin, side, side, side)
if layout == "channels_last":
    x = x.contiguous(memory_format=torch.channels_last_3d)

def seconds(f):
    f(); t = []
    for _ in range(5):
        t0 = time.perf_counter(); f(); t.append(time.perf_counter() - t0)
    return sorted(t)[2]

with torch.no_grad():
    c(x)
    release_memory(); base = current_rss(); reset_peak_rss()
    y = c(x)
    extra = peak_host_bytes() - base - y.numel() * 4
    ours = seconds(lambda: c(x))
    torch_own = seconds(lambda: F.conv3d(x, c.weight, c.bias))  # PyTorch's own choice of kernel
shape = (1, cin, side, side, side)
model = forward_peak_bytes(c, shape, channels_last=layout == "channels_last") - x.numel() * 4 - y.numel() * 4
print(json.dumps({"extra": extra, "model": model, "input": x.numel() * 4, "output": y.numel() * 4,
                  "ms": ours * 1e3, "ms_torch": torch_own * 1e3}))
"""


LAYERS = [(16, 16, 56), (16, 16, 90), (3, 16, 60), (1, 16, 40), (16, 1, 50), (16, 1, 90), (2, 16, 128)]


def _run(code: str, *argv: object) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--cores", type=int, nargs="+", default=[16, 32, 48, 64])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--lr", type=int, nargs="*", default=[32, 64, 128], help="scale-0 grid sides")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", action="store_true", help="one convolution at a time instead")
    args = p.parse_args()
    mib = 2**20
    if args.layers:
        head = f"{'conv':>12} {'side':>5} {'layout':>13} {'input':>7} {'output':>7} {'measured':>9} {'model':>7}"
        print(head + f" {'ms':>7} {'ms torch':>9}  (MiB above the output; ms: ours, PyTorch's own kernel, 1 thread)")
        for cin, cout, side in LAYERS:
            for layout in ("plain", "channels_last"):
                r = _run(LAYER, cin, cout, side, layout)
                cols = (("input", 7), ("output", 7), ("extra", 9), ("model", 7))
                mem = " ".join(f"{r[k] / mib:{w}.1f}" for k, w in cols)
                name = f"{cin}->{cout}"
                print(f"{name:>12} {side:>5} {layout:>13} {mem} {r['ms']:7.1f} {r['ms_torch']:9.1f}", flush=True)
        return
    print(f"{args.config}, {args.threads} threads; MiB above the RSS before the pass")
    print(f"{'case':>22} {'model':>8} {'measured':>9} {'measured/model':>15}")
    cases = [("hr", c, b) for c in args.cores for b in args.batches] + [("lr", n, 1) for n in args.lr]
    for what, n, bs in cases:
        r = _run(CASE, args.config, what, n, bs, args.threads)
        name = f"HR tile {n}, batch {bs}" if what == "hr" else f"scale 0, {n}^3 grid"
        ratio = r["measured"] / r["model"]
        print(f"{name:>22} {r['model'] / mib:8.1f} {r['measured'] / mib:9.1f} {ratio:15.2f}", flush=True)


if __name__ == "__main__":
    main()
