"""Scheduled batch translation of PACS exports: one pass (a Kubernetes CronJob runs it every N minutes).

    MSGAN_PACS_URL=http://orthanc:8042/dicom-web MSGAN_PACS_USER=... MSGAN_PACS_PASSWORD=... \\
    python jobs/translate_pacs_exports.py --model models:/msgan-cascade@champion --storage s3://bucket/pacs \\
        --modality CT --kernel 'B[6-9]0f'

New series that match the filter are fetched (WADO-RS), ingested, translated on Ray Data,
exported as derived DICOM series and stored back (STOW-RS). State in --storage makes a rerun
translate nothing twice. Same options as `msgan pacs-sync` (and --verbose).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # msgan from this checkout

from msgan.console import run_entry  # stdlib only: works before any dependency is imported


def main(argv: list[str]) -> int:
    def body() -> int:
        from msgan.cli import main as cli

        return cli(["pacs-sync", *argv])

    return run_entry("translate_pacs_exports", body, verbose="--verbose" in argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
