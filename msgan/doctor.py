"""``msgan doctor``: is this environment able to run a job? One line per check, problems first named.

Checks Python and the pinned packages, the Ray address and token, storage (reachable and
writable: a probe object is written, read back and removed), the MLflow store, the PACS when
one is configured, and the GPU. Every network check has a short timeout; every URI printed
is redacted. Exit status 1 when any check fails.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from msgan import settings, storage
from msgan.redact import redact_text, redact_uri

TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    warn: bool = False  # not a failure, but worth a look

    def line(self) -> str:
        mark = "ok  " if self.ok and not self.warn else ("warn" if self.ok else "FAIL")
        return f"{mark}  {self.name:<8} {redact_text(self.detail)}"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {text[:300]}"


# ----------------------------------------------------------------------------- the checks


def check_python() -> Check:
    ok = sys.version_info >= (3, 11)
    detail = f"{sys.version.split()[0]} at {sys.executable}" + ("" if ok else ": msgan needs Python >= 3.11")
    return Check("python", ok, detail)


def check_packages() -> list[Check]:
    """Every dependency msgan declares is installed in a version it accepts."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        reqs = [Requirement(r) for r in metadata.requires("msgan") or []]
    except metadata.PackageNotFoundError:
        return [Check("packages", False, f"msgan is not installed in {sys.executable}: pip install -e .")]
    bad, seen = [], []
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # dev extras
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            bad.append(f"{req.name} missing (needs {req.specifier or 'any'})")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            bad.append(f"{req.name} {have} (needs {req.specifier})")
        seen.append(f"{req.name} {have}")
    if bad:
        return [Check("packages", False, f"{'; '.join(bad)}: reinstall with make install / pip install -e .")]
    key = [s for s in seen if s.split()[0].lower() in ("torch", "ray", "mlflow", "zarr")]
    return [Check("packages", True, f"{len(seen)} as pinned ({', '.join(key)})")]


def _http_get(url: str, headers: dict[str, str] | None = None, auth: Any = None) -> int:
    import requests

    return int(requests.get(url, headers=headers or {}, auth=auth, timeout=TIMEOUT_S).status_code)


def check_ray() -> Check:
    """RAY_ADDRESS reachable with the token it needs; unset means a job starts its own local Ray."""
    address = os.environ.get("RAY_ADDRESS", "")
    token = os.environ.get("RAY_AUTH_TOKEN", "")
    token_file = Path.home() / ".ray" / "auth_token"
    if not address:
        return Check("ray", True, "RAY_ADDRESS not set: jobs start a local Ray on this machine")
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.scheme in ("http", "https"):  # the job server (ray job submit)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            code = _http_get(f"{address.rstrip('/')}/api/version", headers)
        except Exception as err:  # any connection error is the finding
            return Check("ray", False, f"RAY_ADDRESS {address} unreachable ({_one_line(err)})")
        if code in (401, 403):
            why = "RAY_AUTH_TOKEN is wrong" if token else "RAY_AUTH_TOKEN is not set (the cluster uses token auth)"
            return Check("ray", False, f"RAY_ADDRESS {address} refused the request (HTTP {code}): {why}")
        if code != 200:
            return Check("ray", False, f"RAY_ADDRESS {address} answered HTTP {code}, not a Ray job server")
        return Check("ray", True, f"job server at {address}" + (", token set" if token else ""))
    import socket

    host, port = parsed.hostname or "", parsed.port or (10001 if parsed.scheme == "ray" else 6379)
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            pass
    except OSError as err:
        return Check("ray", False, f"RAY_ADDRESS {address} unreachable ({_one_line(err)})")
    if os.environ.get("RAY_AUTH_MODE") == "token" and not token and not token_file.is_file():
        return Check("ray", False, f"RAY_AUTH_MODE=token but neither RAY_AUTH_TOKEN nor {token_file} holds a token")
    return Check("ray", True, f"cluster at {address} reachable")


def check_storage(uri: str) -> Check:
    """Write, read back and remove a small probe object under ``uri``."""
    try:
        root = storage.resolve_storage(uri)
    except ValueError as err:
        return Check("storage", False, str(err))
    probe = storage.join(root, f".msgan-doctor-{uuid.uuid4().hex[:12]}")
    payload = f"msgan doctor {time.time()}".encode()
    try:
        storage.write_bytes(probe, payload)
        back = storage.read_bytes(probe)
        fs, path = storage.filesystem(probe)
        fs.rm(path)
    except Exception as err:  # permissions, missing bucket, no endpoint, bad credentials ...
        return Check("storage", False, f"{redact_uri(root)} is not writable ({_one_line(err)})")
    if back != payload:
        return Check("storage", False, f"{redact_uri(root)}: a probe object read back different bytes")
    return Check("storage", True, f"{redact_uri(root)} writable")


def check_mlflow() -> Check:
    """The tracking store answers (a sqlite file is created if missing, as jobs do)."""
    uri = settings.tracking_uri()
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(TIMEOUT_S))
    try:
        from mlflow import MlflowClient

        local = settings.local_path_of(uri) if uri.startswith("sqlite:") else None
        if local is not None:
            local.parent.mkdir(parents=True, exist_ok=True)
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:
        return Check("mlflow", False, f"{redact_uri(uri)} unreachable ({_one_line(err)})")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    default = "" if os.environ.get("MLFLOW_TRACKING_URI") else " (default; set MLFLOW_TRACKING_URI for a server)"
    return Check("mlflow", True, f"{redact_uri(uri)} answers{default}")


def check_pacs() -> Check:
    """The DICOMweb root answers a QIDO-RS query with the configured credentials."""
    url = os.environ.get("MSGAN_PACS_URL", "")
    if not url:
        return Check("pacs", True, "MSGAN_PACS_URL not set: no PACS configured (only pacs-sync needs one)")
    user, password = os.environ.get("MSGAN_PACS_USER"), os.environ.get("MSGAN_PACS_PASSWORD")
    auth = (user, password or "") if user else None
    try:
        code = _http_get(f"{url.rstrip('/')}/studies?limit=1", {"Accept": "application/dicom+json"}, auth)
    except Exception as err:
        return Check("pacs", False, f"{redact_uri(url)} unreachable ({_one_line(err)})")
    if code in (401, 403):
        return Check(
            "pacs", False, f"{redact_uri(url)} refused the credentials (HTTP {code}): check MSGAN_PACS_USER/_PASSWORD"
        )
    if code not in (200, 204):
        return Check(
            "pacs", False, f"{redact_uri(url)} answered HTTP {code} to a QIDO-RS query (is it the DICOMweb root?)"
        )
    return Check("pacs", True, f"{redact_uri(url)} answers QIDO-RS")


def check_gpu(need: str = "auto") -> Check:
    """GPUs torch sees; ``need='gpu'`` makes their absence a failure."""
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(n))
    except Exception as err:
        return Check("gpu", need != "gpu", f"cannot query CUDA ({_one_line(err)})", warn=True)
    if n:
        return Check("gpu", True, f"{n} visible ({names}), torch {torch.__version__}")
    smi = _nvidia_smi_gpus()
    if smi and torch.version.cuda is None:
        return Check(
            "gpu",
            need != "gpu",
            f"nvidia-smi lists {smi[0]} but torch {torch.__version__} is a CPU build: reinstall with "
            f'make TORCH="torch==<version> --index-url <CUDA wheel index>" install',
            warn=True,
        )
    if need == "gpu":
        return Check("gpu", False, f"none visible to torch {torch.__version__}, but GPUs are required")
    return Check("gpu", True, f"none visible (torch {torch.__version__}): training and translation run on CPU")


def _nvidia_smi_gpus() -> list[str]:
    """GPU names nvidia-smi lists (empty when it is missing or fails)."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=TIMEOUT_S).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split(":", 1)[1].split("(")[0].strip() for line in out.splitlines() if line.startswith("GPU ")]


def run_checks(storage_uri: str, need_gpu: str = "auto") -> list[Check]:
    steps: Iterable[Callable[[], Check | list[Check]]] = (
        check_python,
        check_packages,
        check_ray,
        lambda: check_storage(storage_uri),
        check_mlflow,
        check_pacs,
        lambda: check_gpu(need_gpu),
    )
    out: list[Check] = []
    for step in steps:
        result = step()
        out.extend(result if isinstance(result, list) else [result])
    return out


def doctor(storage_uri: str, need_gpu: str = "auto", write: Callable[[str], None] = print) -> int:
    """Print one line per check; 0 when nothing failed, 1 otherwise."""
    checks = run_checks(storage_uri, need_gpu)
    for c in checks:
        write(c.line())
    failed = [c.name for c in checks if not c.ok]
    write(f"{len(failed)} problem(s): {', '.join(failed)}" if failed else "everything a job needs is in place")
    return 1 if failed else 0
