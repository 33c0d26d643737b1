"""Translate a batch of OME-Zarr volumes (file:// or s3://) through a cascade, cascaded scale by scale on Ray Data.

    python jobs/translate_batch.py --model models:/msgan-demo-cascade@candidate \\
        --inputs runs/volumes/ --output runs/translated
    ray job submit --address http://HEAD:8265 -- python jobs/translate_batch.py --model models:/NAME@champion \\
        --inputs s3://bucket/exports/ --output s3://bucket/translated --set inference.actors=8

Volumes already published under --output are skipped; a volume that fails is reported with its
error and nothing of it is published; the others are. Exit status 1 when any volume failed.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS (MLflow registry) or a cascade folder")
    p.add_argument("--inputs", nargs="+", required=True, help="volumes (*.zarr) or prefixes that hold them")
    p.add_argument("--output", required=True, help="output prefix: <output>/<volume>.zarr + manifest.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="inference.KEY=VALUE",
                   help="override an inference setting, e.g. --set inference.actors=4 (repeatable)")  # fmt: skip
    p.add_argument("--report", help="also write the batch report as JSON to this path")
    args = p.parse_args(argv)

    from msgan.batch import VolumeError
    from msgan.config import ConfigError, parse_overrides

    try:
        over = parse_overrides(args.overrides)
        bad = [k for k in over if not k.startswith("inference.")]
        if bad:
            raise ConfigError(f"--set {bad[0]}: a batch job may override inference.* settings only")
        from msgan.distributed.translate import translate_batch

        report = translate_batch(
            args.inputs, args.output, args.model, {k[len("inference.") :]: v for k, v in over.items()}
        )
    except (ConfigError, VolumeError, FileNotFoundError, ValueError) as err:
        print(f"translate_batch: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report.__dict__, f, indent=2, default=str)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
