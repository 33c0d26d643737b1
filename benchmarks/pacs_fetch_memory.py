"""Peak memory while fetching a large series from a PACS: streamed (``DicomWebClient.fetch_series``) against
reading the whole WADO-RS response into memory first (what ``fetch_series`` did before).

    python benchmarks/pacs_fetch_memory.py [--slices 600] [--size 512]

Starts its own Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) on loopback ports in a temporary folder,
stores a synthetic CT series of SLICES x SIZE^2 int16 slices (written one slice at a time), then fetches it
both ways and prints the peak resident memory above the baseline of each (psutil, sampled every 5 ms) and
the peak Python allocation (tracemalloc).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pydicom
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msgan.io.dicom import derived_uid, write_series
from msgan.io.pacs import DicomWebClient, write_multipart
from msgan.io.volume import Geometry


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def orthanc(root: Path) -> Iterator[dict[str, str]]:
    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    http = _port()
    config = {
        "Name": "msgan-bench", "HttpPort": http, "DicomPort": _port(), "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"), "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
        "RegisteredUsers": {"bench": "bench-pw"}, "HttpTimeout": 600,
        "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }  # fmt: skip
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([binary, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http}"
    try:
        for _ in range(200):
            try:
                if requests.get(f"{base}/system", auth=("bench", "bench-pw"), timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        yield {"url": f"{base}/dicom-web", "user": "bench", "password": "bench-pw"}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def write_big_series(folder: Path, slices: int, size: int) -> tuple[list[Path], str, str]:
    """SLICES files of SIZE^2 int16, written one at a time from one template slice (memory stays small)."""
    geom = Geometry((0.7, 0.7, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    series = derived_uid("bench", "fetch", str(slices), str(size))
    ids = {"PatientID": "BENCH", "Modality": "CT", "StudyInstanceUID": derived_uid("bench", "study")}
    rng = np.random.default_rng(0)
    (template,) = write_series(rng.integers(-1000, 1000, (1, size, size)).astype(np.float32), geom, folder, ids,
                               series, "bench")  # fmt: skip
    ds = pydicom.dcmread(template)
    files = []
    for k in range(slices):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = derived_uid(series, str(k))
        ds.InstanceNumber, ds.ImagePositionPatient = k + 1, [0.0, 0.0, float(k)]
        ds.PixelData = rng.integers(-1000, 1000, (size, size), dtype=np.int16).tobytes()
        path = folder / f"{k:05d}.dcm"
        ds.save_as(path)
        files.append(path)
    return files, str(ds.StudyInstanceUID), series


def peak(fn: Callable[[], object]) -> tuple[float, float, float]:
    """(peak RSS above the baseline in MiB, peak Python allocation in MiB, seconds) while ``fn`` runs."""
    proc, stop, top = psutil.Process(), threading.Event(), [0]
    base = proc.memory_info().rss

    def sample() -> None:
        while not stop.is_set():
            top[0] = max(top[0], proc.memory_info().rss)
            time.sleep(0.005)

    thread = threading.Thread(target=sample)
    tracemalloc.start()
    thread.start()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return (max(top[0], proc.memory_info().rss) - base) / 2**20, traced / 2**20, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=600)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "pacs").mkdir()
        (Path(tmp) / "src").mkdir()
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    with orthanc(tmp / "pacs") as pacs:
        files, study, series = write_big_series(Path(tmp) / "src", args.slices, args.size)
        mib = sum(f.stat().st_size for f in files) / 2**20
        client = DicomWebClient(pacs["url"], pacs["user"], pacs["password"], timeout=600)
        t0 = time.perf_counter()
        client.store(files, batch=16)
        print(f"series: {args.slices} x {args.size}^2 int16, {mib:.0f} MiB in {len(files)} files; "
              f"stored in {time.perf_counter() - t0:.1f}s")  # fmt: skip
        for f in files:
            f.unlink()

        def streamed() -> None:
            got = client.fetch_series(study, series, Path(tmp) / "streamed")
            assert len(got) == args.slices

        def whole() -> None:  # the body in memory, then split (as before the streaming fetch)
            url, auth = f"{pacs['url']}/studies/{study}/series/{series}", (pacs["user"], pacs["password"])
            accept = {"Accept": 'multipart/related; type="application/dicom"'}
            r = requests.get(url, auth=auth, headers=accept, timeout=600)
            out = Path(tmp) / "whole"
            out.mkdir()
            body = r.content
            got = write_multipart([body], r.headers["Content-Type"], out)
            assert len(got) == args.slices

        for name, fn in (("streamed fetch_series", streamed), ("whole body in memory", whole)):
            rss, traced, seconds = peak(fn)
            print(f"{name:24s} peak RSS +{rss:7.1f} MiB, peak Python allocations {traced:7.1f} MiB, {seconds:5.1f}s")


if __name__ == "__main__":
    main()
