"""Train all scale GANs of the cascade at once on Ray, register it in MLflow, translate held-out volumes.

    python jobs/train_all_scales.py --config configs/demo.yaml            # local Ray, file:// storage, sqlite MLflow
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train_all_scales.py --config ...

Resubmitting the same job (same config and data, or the same job.name) resumes unfinished
scales from their checkpoints and skips finished ones. Relative storage paths and the default
MLflow store live under MSGAN_HOME (default ~/.msgan on the driver's node). The console shows
our progress only; --verbose adds Ray's and the workers' own logs and tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # msgan from this checkout

from msgan.console import quiet, run_entry, set_verbose  # stdlib only: works before any dependency is imported


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml", help="experiment YAML (default configs/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=100 (repeatable)")  # fmt: skip
    p.add_argument("--smoke-test", action="store_true", help="a few steps per scale, to check the plumbing")
    p.add_argument("--verbose", action="store_true", help="Ray's and the workers' logs, tracebacks on errors")
    args = p.parse_args(argv)
    set_verbose(args.verbose)
    quiet(args.verbose)
    return run_entry("train_all_scales", lambda: _run(args), verbose=args.verbose)


def _run(args: argparse.Namespace) -> int:
    from msgan.config import ConfigError, load_config
    from msgan.distributed.pipeline import JobFailed, run_training_job

    overrides = list(args.overrides)
    if args.smoke_test:
        overrides = ["train.steps=4", "train.steps_per_scale=[]", "train.log_every=2", "train.checkpoint_every=2",
                     *overrides]  # fmt: skip
    try:
        run_training_job(load_config(args.config, overrides))
    except ConfigError as err:
        print(f"train_all_scales: bad configuration: {err}", file=sys.stderr)
        return 2
    except JobFailed as err:
        print(f"train_all_scales: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
