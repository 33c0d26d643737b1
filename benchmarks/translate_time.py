"""Wall time of ``Cascade.translate`` on a sharp phantom held in memory, with whichever msgan is imported.

    python benchmarks/translate_time.py [--config configs/demo.yaml] [--size 256] [--repeats 2] [--threads 2]

Before/after a change, run it against the old tree too, on the same image and the same config file
(so the same networks and plan; the phantom itself changes between trees)::

    python benchmarks/translate_time.py --save-image /tmp/p256.npy --repeats 0
    git worktree add /tmp/before 0675a52
    OLD=/tmp/before/configs/demo.yaml
    PYTHONPATH=/tmp/before python benchmarks/translate_time.py --image /tmp/p256.npy --config $OLD
    PYTHONPATH=.           python benchmarks/translate_time.py --image /tmp/p256.npy --config $OLD

The cascade is untrained (seeded), so the figure is the engine's, not a model's; the output's mean
is printed so that two trees can be seen to compute the same thing.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image", default=None, help="a .npy volume to translate instead of a new phantom")
    p.add_argument("--save-image", default=None, help="save the phantom as .npy (for the other tree)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import msgan
    from msgan.cascade import Cascade
    from msgan.config import load_config
    from msgan.data.phantom import reconstruct, thorax_phantom

    n = args.size
    if args.image:
        image = np.load(args.image)
    else:
        image = np.asarray(reconstruct(thorax_phantom((n, n, n), seed=3), ("sharp",), seed=11)["sharp"], np.float32)
    if args.save_image:
        np.save(args.save_image, image)
    cascade = Cascade.untrained(load_config(args.config, []), seed=0)
    where = os.path.dirname(msgan.__file__)
    print(f"msgan from {where}, {args.config}, {image.shape}, {args.threads} threads", flush=True)
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        out = cascade.translate(image)
        print(f"  run {rep}: {time.perf_counter() - t0:.1f} s (output mean {float(np.mean(out)):.3f})", flush=True)


if __name__ == "__main__":
    main()
