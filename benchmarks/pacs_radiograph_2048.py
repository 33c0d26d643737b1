"""One pacs-sync pass with a 2D model on a 2048^2 radiograph, end to end against a real Orthanc.

    python benchmarks/pacs_radiograph_2048.py [--size 2048] [--config configs/xray-2048.yaml]

A DX "for presentation" image (MONOCHROME1, 12-bit, ImagerPixelSpacing + magnification factor, made from the
phantom's radiograph by tests/dicom_data.py) is stored in a fresh Orthanc; one pass of ``msgan.pacs_sync`` with
an untrained cascade of the config's networks (intensity window set to the DX's 12-bit range) fetches it,
translates it on a local Ray, exports a derived DX and stores it back. Prints the pass's time and what came back:
SOP class, photometric interpretation, size, spacing, and dciodvfy's Error lines (0 expected).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.pacs_fetch_memory import orthanc
from msgan.cascade import Cascade
from msgan.config import load_config
from msgan.io.dicom import read_series
from msgan.io.pacs import DicomWebClient
from msgan.pacs_sync import SyncConfig, run_once
from tests.dicom_data import write_radiograph


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--config", default="configs/xray-2048.yaml")
    args = ap.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "pacs").mkdir()
        t0 = time.perf_counter()
        src, src_uid, _ = write_radiograph(tmp / "dx", "DX", size=(args.size, args.size), monochrome1=True)
        print(f"DX {args.size}^2 written in {time.perf_counter() - t0:.1f}s ({src.stat().st_size / 2**20:.1f} MiB)")
        cfg = load_config(args.config, {"intensity.low": 0.0, "intensity.high": 4095.0, "inference.actors": 1})
        model = str(Cascade.untrained(cfg, seed=0).save(tmp / "model"))
        ray.init(num_cpus=2, include_dashboard=False)
        try:
            with orthanc(tmp / "pacs") as pacs:
                client = DicomWebClient(pacs["url"], pacs["user"], pacs["password"], timeout=600)
                client.store([src])
                t0 = time.perf_counter()
                report = run_once(SyncConfig(model=model, storage=str(tmp / "store"), modality="DX"), client, log=print)
                seconds = time.perf_counter() - t0
                print(report.summary())
                derived = report.translated[src_uid]
                found = [s for s in client.find_series("DX") if s.series_uid == derived]
                got = client.fetch_series(found[0].study_uid, derived, tmp / "derived")
        finally:
            ray.shutdown()
        ds, source = pydicom.dcmread(got[0]), pydicom.dcmread(src)
        back, orig = read_series([tmp / "derived"]).volumes[0], read_series([tmp / "dx"]).volumes[0]
        check = subprocess.run(
            [str(Path(sys.executable).parent / "dciodvfy"), str(got[0])], capture_output=True, text=True
        )
        errors = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]
        print(f"pass: {seconds:.1f}s for one {args.size}^2 radiograph ({cfg.num_scales} scales)")
        print(f"derived: {ds.SOPClassUID.name} (source {source.SOPClassUID.name}), {ds.PhotometricInterpretation}, "
              f"{ds.Rows}x{ds.Columns}, ImagerPixelSpacing {list(ds.ImagerPixelSpacing)}, geometry equal to the "
              f"source's: {back.geometry.allclose(orig.geometry)}, dciodvfy errors: {len(errors)}")  # fmt: skip
        for line in errors:
            print("  ", line)


if __name__ == "__main__":
    main()
