"""Translate a batch of OME-Zarr volumes (file:// or s3://) through a cascade, cascaded scale by scale on Ray Data.

    python jobs/translate_batch.py --model models:/msgan-demo-cascade@candidate \\
        --inputs runs/volumes/ --output runs/translated
    ray job submit --address http://HEAD:8265 -- python jobs/translate_batch.py --model models:/NAME@champion \\
        --inputs s3://bucket/exports/ --output s3://bucket/translated --set inference.actors=8

The model alias is resolved once: every volume of the batch is translated by that one version,
which the manifests record. Volumes already published under --output by that version are skipped;
outputs of another version are translated again and replaced ("re-translated: model A -> B"); two
inputs that would land on one output are refused before any work. A volume that fails is reported
with its error and nothing of it is published; the others are. Progress: one line per scale and
interval (tiles done, rate, ETA). Exit status 1 when any volume failed, 2 on a bad request.
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
    p.add_argument("--tile", type=int, help="tile core of every HR scale (default: from the memory budget)")
    p.add_argument("--progress-every", type=float, default=10.0, metavar="S", help="seconds between progress lines")
    p.add_argument("--verbose", action="store_true", help="show the traceback of an unexpected error")
    args = p.parse_args(argv)
    from msgan.redact import install

    install()  # every line printed from here on (errors, tracebacks, workers' output) has secrets masked
    from msgan.config import ConfigError, parse_overrides
    from msgan.io.volume import VolumeError

    try:
        over = parse_overrides(args.overrides)
        bad = [k for k in over if not k.startswith("inference.")]
        if bad:
            raise ConfigError(f"--set {bad[0]}: a batch job may override inference.* settings only")
        from msgan.console import Progress, is_tty, scale_progress
        from msgan.distributed.translate import translate_batch

        report_to = _report_destination(args.report, args.inputs, args.output) if args.report else None

        bar = Progress(sys.stdout) if is_tty(sys.stdout) else None  # piped: a line per --progress-every
        report = translate_batch(
            args.inputs,
            args.output,
            args.model,
            {k[len("inference.") :]: v for k, v in over.items()},
            tile=args.tile,
            progress_every=args.progress_every,
            progress=scale_progress(bar) if bar is not None else None,
        )
        if bar is not None:
            bar.close()
    except (ConfigError, VolumeError, FileNotFoundError, ValueError) as err:
        print(f"translate_batch: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, an unreachable store: one line naming the file
        where = f" ({err.filename})" if err.filename else ""
        print(f"translate_batch: {err.strerror or err}{where}; nothing half-published", file=sys.stderr)
        return 2
    except Exception as err:
        if args.verbose:
            raise
        print(f"translate_batch: {type(err).__name__}: {err} (--verbose for the traceback)", file=sys.stderr)
        return 1
    print(report.summary())
    if report_to:
        from msgan.redact import redact_text
        from msgan.storage import local_path, staged_file

        with staged_file(local_path(report_to)) as tmp:
            tmp.write_text(redact_text(json.dumps(report.__dict__, indent=2, default=str)))
    return 1 if report.failed else 0


REPORT_KEYS = {"model", "run", "published", "failed"}  # what every batch report holds


def _report_destination(report: str, inputs: list[str], output: str) -> str:
    """Where --report goes, checked before any work: never into an input or the output prefix (a volume's
    manifest is not a report), and over an existing file only when it is an earlier batch report."""
    from msgan import storage
    from msgan.io import outputs

    where = outputs.resolve_output(report, inputs)
    try:
        outputs.resolve_output(report, [output])
    except outputs.OutputError:
        raise ValueError(f"--report {report}: lies inside the output {output} (or holds it); a report goes beside "
                         "the published volumes, never among them") from None  # fmt: skip
    if storage.is_s3(where):
        raise ValueError(f"--report {report}: a local file path (the report is written on this machine)")
    path = storage.local_path(where)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ValueError(f"--report {report}: exists and is not a regular file; give another path")
    if path.exists():
        try:
            earlier = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            earlier = None
        if not isinstance(earlier, dict) or not set(earlier) >= REPORT_KEYS:
            raise ValueError(f"--report {report}: exists and is not a batch report; it is never replaced "
                             "(give another path)")  # fmt: skip
    return where


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # msgan from this checkout
    from msgan.console import run_entry, set_verbose  # stdlib only: a missing dependency becomes one line

    set_verbose("--verbose" in sys.argv)
    sys.exit(run_entry("translate_batch", main, verbose="--verbose" in sys.argv))
