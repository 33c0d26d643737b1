"""Wall time of training scales concurrently (one TorchTrainer each, at once) vs one after another.

    python benchmarks/parallel_scales.py [--config configs/demo.yaml] [--scales 1 2] [--steps 300]

Same scales, same steps, same machine, one run. Each worker gets 1 CPU and 1 torch thread.
Prints both wall times and their ratio (concurrent / sequential).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from msgan import storage
from msgan.config import load_config
from msgan.distributed import prepare as prep
from msgan.distributed.pipeline import ensure_ray
from msgan.distributed.train import train_all_scales


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            args.config,
            {
                "train.steps": args.steps,
                "train.steps_per_scale": [],
                "train.threads": 1,
                "train.checkpoint_every": args.steps,
                "job.cpus_per_worker": 1.0,
                "job.storage": tmp,
            },
        )
        root = storage.normalize_uri(tmp)
        ensure_ray(cfg)
        volumes = [v["uri"] for v in prep.prepare(cfg, prep.sources(cfg), root)]

        def timed(job: str, scales: list[int]) -> float:
            t0 = time.perf_counter()
            outcomes = train_all_scales(cfg, job, volumes, [], root, None, None, scales)
            bad = [o for o in outcomes if o.summary is None]
            if bad:
                raise SystemExit(f"training failed: {[o.error for o in bad]}")
            return time.perf_counter() - t0

        concurrent = timed("bench-concurrent", args.scales)
        sequential = sum(timed(f"bench-sequential-{s}", [s]) for s in args.scales)
    print(f"scales {args.scales}, {args.steps} steps each, 1 CPU / 1 thread per worker")
    print(f"concurrent: {concurrent:.1f}s   sequential: {sequential:.1f}s   ratio: {concurrent / sequential:.2f}")


if __name__ == "__main__":
    main()
