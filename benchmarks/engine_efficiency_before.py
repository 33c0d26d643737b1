"""The efficiency ratio of a tree from before the tile engine (no msgan.engine, ``run_hr`` in cascade.py).

    python benchmarks/translate_time.py --size 128 --save-image /tmp/p128.npy --repeats 0
    git worktree add /tmp/before 0675a52
    cd /tmp && PYTHONPATH=/tmp/before python /path/to/benchmarks/engine_efficiency_before.py \\
        /tmp/before/configs/demo.yaml /tmp/p128.npy

Per HR scale: convolution FLOPs of ``translate`` (torch's FlopCounterMode around the old ``run_hr``)
over the scale's wall time (a second, uncounted pass), against the generator alone on the tile batch
shape it ran (median of 5 warm passes); compare with ``benchmarks/engine_efficiency.py --config`` on
the same config with this tree.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode


def main() -> None:
    torch.set_num_threads(2)
    import msgan.cascade as mc  # the old tree's, from PYTHONPATH
    from msgan.config import load_config

    cascade = mc.Cascade.untrained(load_config(sys.argv[1], []), seed=0)
    image = np.load(sys.argv[2])
    original = mc.run_hr
    rec: dict[int, dict[str, Any]] = {}
    counting = {"on": False}

    def run_hr(gen: Any, prev: Any, edges: Any, out: Any, core: Any, *a: Any, **k: Any) -> int:
        calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        forward = gen.forward

        def spy(x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
            calls.append((x.detach().clone(), None if c is None else c.detach().clone()))
            return forward(x, c)

        gen.forward = spy
        r = rec.setdefault(id(gen), {})
        try:
            if counting["on"]:
                with FlopCounterMode(display=False) as fc:
                    n = original(gen, prev, edges, out, core, *a, **k)
                r["flops"] = fc.get_total_flops()
            else:
                t0 = time.perf_counter()
                n = original(gen, prev, edges, out, core, *a, **k)
                r.update(wall=time.perf_counter() - t0, calls=len(calls), sample=calls[0], core=core)
        finally:
            gen.forward = forward
        return int(n)

    mc.run_hr = run_hr
    counting["on"] = True
    cascade.translate(image)
    counting["on"] = False
    cascade.translate(image)  # warm
    cascade.translate(image)
    for s, gen in enumerate(cascade.generators):
        if id(gen) not in rec:
            continue
        r = rec[id(gen)]
        x, c = r["sample"]
        with torch.no_grad():
            with FlopCounterMode(display=False) as fc:
                gen(x, c)
            times = []
            for _ in range(6):
                t0 = time.perf_counter()
                gen(x, c)
                times.append(time.perf_counter() - t0)
        alone = fc.get_total_flops() / statistics.median(times[1:]) / 1e9
        achieved = r["flops"] / r["wall"] / 1e9
        print(f"before scale {s}: core {r['core']} tiles {r['calls']} batch {tuple(x.shape)} "
              f"GFLOP {r['flops'] / 1e9:.1f} wall {r['wall']:.2f}s achieved {achieved:.1f} alone {alone:.1f} "
              f"ratio {achieved / alone:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
