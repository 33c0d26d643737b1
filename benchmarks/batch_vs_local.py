"""Wall time of the in-process path against the batch path, on the same volume, model and cores.

    python benchmarks/batch_vs_local.py [--size 256] [--repeats 3] [--s3] [--work /tmp/batch_vs_local]

The same sharp phantom (``msgan phantom``) and untrained demo-config model (``msgan new-model``), default
tiles; alternating runs of

- ``msgan translate IN.zarr OUT.zarr`` (one process, zarr to zarr: :mod:`msgan.volumes.local`), and
- ``python jobs/translate_batch.py --set inference.actors=1`` (Ray Data on one actor:
  :mod:`msgan.distributed.translate`),

from ``file://`` and, with ``--s3``, from a moto S3 server on loopback (it runs in this process and shares
the cores). Each run is split into start-up (interpreter, imports, Ray), staging, scale 0, HR scales and
publishing, from what the paths record: the manifest's per-scale timings and ``seconds`` for ``msgan
translate``, the batch report's ``steps`` and ``scales`` for the batch job. Every output's checksum (all
levels, :func:`msgan.volumes.publishing.checksum`) must equal the first one's: the two paths are
bit-identical or the run fails. Records go to ``--work``/results.json as each run ends, and a rerun with
the same arguments skips the runs it holds (resumable); a table of medians is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # msgan from this tree, installed or not
PHASES = ("startup", "staging", "scale0", "hr", "publish", "other")


def sh(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=env["PYTHONPATH"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return wall, r.stdout + r.stderr


def read_json(uri: str) -> dict[str, Any]:
    from msgan import storage

    return json.loads(storage.read_bytes(storage.normalize_uri(uri)))


def run_local(src: str, out: str, model: str, env: dict[str, str]) -> dict[str, Any]:
    wall, text = sh([sys.executable, "-m", "msgan.cli", "translate", "--quiet", "--model", model, src, out], env)
    m = re.search(r"-> \S+ in ([0-9.]+)s", text)
    inside = float(m.group(1)) if m else wall
    man = read_json(out.rstrip("/") + "/manifest.json")
    scales = {int(t["scale"]): float(t["seconds"]) for t in man["timings"]}
    hr = sum(v for k, v in scales.items() if k > 0)
    return {
        "wall": wall,
        "checksum": man["checksum_sha256"],
        "scales": scales,
        "phases": {
            "startup": wall - inside,  # interpreter and imports
            "staging": float(man["seconds"]) - scales[0] - hr,  # plan + stage (the manifest's seconds end there)
            "scale0": scales[0],
            "hr": hr,
            "publish": inside - float(man["seconds"]),  # checks, checksum, manifest, lease
            "other": 0.0,
        },
    }


def run_batch(src: str, out_prefix: str, model: str, env: dict[str, str], report: Path) -> dict[str, Any]:
    cmd = [sys.executable, "jobs/translate_batch.py", "--model", model, "--inputs", src, "--output", out_prefix,
           "--set", "inference.actors=1", "--report", str(report)]  # fmt: skip
    wall, _ = sh(cmd, env)
    rep = json.loads(report.read_text())
    scales = {int(s["scale"]): float(s["seconds"]) for s in rep["scales"]}
    steps = rep.get("steps", {})
    hr = sum(v for k, v in scales.items() if k > 0)
    staging, publish, ray_s = steps.get("stage", 0.0), steps.get("publish", 0.0), steps.get("ray", 0.0)
    man = rep["published"][0] if rep["published"] else {}  # the published manifest
    return {
        "wall": wall,
        "checksum": man.get("checksum_sha256", ""),
        "scales": scales,
        "actor_ready_after": {int(s["scale"]): s.get("actor_ready_after") for s in rep["scales"]},
        "phases": {
            "startup": wall - float(rep["seconds"]) + ray_s,  # interpreter, imports, Ray started
            "staging": staging,
            "scale0": scales.get(0, 0.0),
            "hr": hr,
            "publish": publish,
            "other": float(rep["seconds"]) - ray_s - staging - publish - sum(scales.values()),  # pin, plan, leases
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each path")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--work", default="/tmp/batch_vs_local", help="phantom, model, outputs and results.json")
    p.add_argument("--s3", action="store_true", help="also from a moto S3 server on loopback")
    p.add_argument("--label", default="", help="a name for this tree's runs (e.g. before / after)")
    p.add_argument("--tree", default=str(REPO), help="the msgan checkout whose paths run (default: this one)")
    args = p.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tree = Path(args.tree).resolve()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    src = work / f"sharp{args.size}.zarr"
    model = work / "model"
    if not (src / "zarr.json").exists():
        n = str(args.size)
        sh([sys.executable, "-m", "msgan.cli", "phantom", "--kernel", "sharp", "--shape", n, n, n, str(src)], env)
    if not (model / "manifest.json").exists():  # the demo config's networks, untrained (seed 0)
        sh([sys.executable, "-m", "msgan.cli", "new-model", "--config", args.config, str(model)], env)
    results_path = work / "results.json"
    results: list[dict[str, Any]] = json.loads(results_path.read_text()) if results_path.exists() else []
    stores = ["file"] + (["s3"] if args.s3 else [])
    server = None
    for store in stores:
        senv, source, prefix = dict(env), str(src), str(work / "out")
        if store == "s3":
            server, source, prefix, senv = start_s3(src, env)
        for rep in range(args.repeats):
            for path in ("local", "batch"):
                key = {"label": args.label, "size": args.size, "store": store, "path": path, "rep": rep}
                if any(all(r.get(k) == v for k, v in key.items()) for r in results):
                    continue
                tag = f"{args.label or 'run'}-{store}-{path}-{rep}"
                if store == "file":  # what an interrupted earlier run left
                    shutil.rmtree(f"{prefix}/{tag}.zarr", ignore_errors=True)
                    shutil.rmtree(f"{prefix}/{tag}", ignore_errors=True)
                if path == "local":
                    out = f"{prefix}/{tag}.zarr"
                    rec = run_local(source, out, str(model), senv)
                else:
                    rec = run_batch(source, f"{prefix}/{tag}", str(model), senv, work / f"{tag}.json")
                rec.update(key, load=os.getloadavg()[0], when=time.strftime("%Y-%m-%dT%H:%M:%S"))
                results.append(rec)
                results_path.write_text(json.dumps(results, indent=1))
                print(f"{tag}: {rec['wall']:.1f}s  (load {rec['load']:.1f})", flush=True)
                if store == "file":
                    shutil.rmtree(out if path == "local" else f"{prefix}/{tag}", ignore_errors=True)
        if server is not None:
            server.stop()
    check_identical(results, args.size)
    table(results, args.size)


def start_s3(src: Path, env: dict[str, str]) -> tuple[Any, str, str, dict[str, str]]:
    """A moto server on loopback holding a copy of the phantom; the environment that points every client at it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request on stdout (35,000 at 512^3)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    s3env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    os.environ.update(s3env)
    client = boto3.client("s3", endpoint_url=url)
    client.create_bucket(Bucket="bench")
    for f in src.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), "bench", f"in/{src.name}/{f.relative_to(src).as_posix()}")
    return server, f"s3://bench/in/{src.name}", "s3://bench/out", {**env, **s3env}


def check_identical(results: list[dict[str, Any]], size: int) -> None:
    sums = {r["checksum"] for r in results if r["size"] == size}
    if len(sums) != 1:
        raise SystemExit(f"outputs differ between runs: {len(sums)} checksums {sorted(sums)}")
    print(f"all {sum(r['size'] == size for r in results)} outputs bit-identical (sha256 {next(iter(sums))[:12]})")


def table(results: list[dict[str, Any]], size: int) -> None:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        if r["size"] == size:
            groups.setdefault((r["label"], r["store"], r["path"]), []).append(r)
    print(f"\n{size}^3, medians over runs (seconds; load = 1-min load average at each run's end)")
    print(f"{'label':8} {'store':5} {'path':6} {'n':>2} {'wall':>6} " + " ".join(f"{ph:>8}" for ph in PHASES)
          + "  load")  # fmt: skip
    walls: dict[tuple[str, str, str], float] = {}
    for (label, store, path), rs in sorted(groups.items()):
        med = {ph: statistics.median(r["phases"][ph] for r in rs) for ph in PHASES}
        walls[(label, store, path)] = statistics.median(r["wall"] for r in rs)
        loads = ",".join(f"{r['load']:.1f}" for r in rs)
        print(f"{label:8} {store:5} {path:6} {len(rs):>2} {walls[(label, store, path)]:6.1f} "
              + " ".join(f"{med[ph]:8.1f}" for ph in PHASES) + f"  {loads}")  # fmt: skip
    for (label, store, path), w in sorted(walls.items()):
        if path == "batch" and (label, store, "local") in walls:
            print(f"ratio in-process / batch ({label or '-'}, {store}): {walls[(label, store, 'local')] / w:.2f}")


if __name__ == "__main__":
    main()
