"""Time to build the synthetic thorax and its two kernel reconstructions, and a radiograph.

python benchmarks/phantom_speed.py [--size 512] [--radiograph 2048]
"""

from __future__ import annotations

import argparse
import time

from msgan.data.phantom import radiograph, reconstruct, thorax_phantom
from msgan.memory import peak_host_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--radiograph", type=int, default=2048)
    args = p.parse_args()
    n = args.size
    t0 = time.perf_counter()
    truth = thorax_phantom((n, n, n), seed=1)
    t1 = time.perf_counter()
    recon = reconstruct(truth, seed=2)
    t2 = time.perf_counter()
    print(f"phantom {n}^3: anatomy {t1 - t0:.1f}s, soft+sharp kernels {t2 - t1:.1f}s, total {t2 - t0:.1f}s")
    soft, sharp = (float(recon[k][:, :8, :8].std()) for k in ("soft", "sharp"))
    print(f"  noise std in air: soft {soft:.1f} HU, sharp {sharp:.1f} HU")
    print(f"  peak host memory so far: {peak_host_bytes() / 2**30:.2f} GiB")
    del truth, recon
    if args.radiograph:
        t0 = time.perf_counter()
        img = radiograph(args.radiograph, seed=1)
        print(f"radiograph {img.shape}: {time.perf_counter() - t0:.1f}s, range [{img.min():.2f}, {img.max():.2f}]")


if __name__ == "__main__":
    main()
