"""Storage URIs: ``file://`` paths and ``s3://bucket/prefix`` (S3 or an S3-compatible store).

One place decides how every library reaches a URI: fsspec/s3fs for our own files and
zarr, pyarrow for Ray Train's ``storage_filesystem``, boto3 for conditional writes.
``AWS_ENDPOINT_URL`` (MinIO, moto) and the usual AWS credential variables apply to all.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec

from msgan.redact import redact_uri

DEFAULT_STORAGE = "runs/storage"


def normalize_uri(uri: str | os.PathLike[str]) -> str:
    """``file://`` + absolute path for local paths; ``s3://`` URIs unchanged (no trailing slash)."""
    s = str(uri)
    if s.startswith("s3://"):
        return s.rstrip("/")
    if s.startswith("file://"):
        s = s[len("file://") :]
    elif "://" in s:
        raise ValueError(f"storage URI {redact_uri(s)!r}: only file:// and s3:// are supported")
    return "file://" + str(Path(s).expanduser().resolve())


def resolve_storage(uri: str) -> str:
    """A storage setting (``s3://...``, ``file://...`` or a path) as :func:`normalize_uri` makes it, but with a
    relative path placed under ``MSGAN_HOME`` (:func:`msgan.settings.resolve_local`), never the working directory."""
    from msgan.settings import resolve_local

    s = str(uri)
    local = s[len("file://") :] if s.startswith("file://") else None if "://" in s else s
    return normalize_uri(s if local is None else resolve_local(local))


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def local_path(uri: str) -> Path:
    if not uri.startswith("file://"):
        raise ValueError(f"{redact_uri(uri)!r} is not a file:// URI")
    return Path(uri[len("file://") :])


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri, *parts) if is_s3(uri) else "file://" + str(local_path(uri).joinpath(*parts))


def s3_options() -> dict[str, Any]:
    """fsspec/zarr storage options for S3 from the environment."""
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        opts["client_kwargs"] = {"region_name": region}
    return opts


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and the path inside it."""
    if is_s3(uri):
        fs = fsspec.filesystem("s3", **s3_options())
        return fs, uri[len("s3://") :]
    return fsspec.filesystem("file"), str(local_path(uri))


def zarr_store(uri: str) -> tuple[str, dict[str, Any] | None]:
    """(store, storage_options) for ``zarr.open_group``."""
    if is_s3(uri):
        return uri, s3_options()
    return str(local_path(uri)), None


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return bool(fs.exists(path))


SMALL_FILE_BYTES = 16 * 2**20  # manifests, state files, leases, zarr metadata: never larger


def read_local_small(path: str | os.PathLike[str], limit: int = SMALL_FILE_BYTES) -> bytes:
    """A small local file (metadata, manifest, lease) read safely: a regular file (never a FIFO, device or
    symlink, which could hang or read something else), at most ``limit`` bytes; :class:`OSError` naming it."""
    import errno
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a symlink where a small metadata file belongs; refused", str(path)) from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file where a small metadata file belongs; refused", str(path))
        if st.st_size > limit:
            raise OSError(
                errno.EFBIG, f"{st.st_size} bytes, above the {limit} a metadata file may hold; refused", str(path)
            )
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"grew beyond the {limit} bytes this file may hold while read; refused", str(path))
    return data


def read_text(uri: str, limit: int = SMALL_FILE_BYTES) -> str:
    return read_bytes(uri, limit).decode()


def write_bytes(uri: str, data: bytes) -> None:
    """Whole-object write: S3 puts are atomic; local files go through a temporary and a rename."""
    fs, path = filesystem(uri)
    if is_s3(uri):
        fs.pipe_file(path, data)
        return
    with staged_file(path) as tmp:
        tmp.write_bytes(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def json_object(raw: str | bytes, keys: Sequence[str] = ()) -> dict[str, Any]:
    """A JSON object holding every one of ``keys`` (manifests, state files: all untrusted); else a
    ValueError saying what is wrong (``not valid JSON (...)``, ``not a JSON object`` or ``missing keys
    ...``) for the caller to prefix with the file."""
    try:
        content = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"not valid JSON ({err})") from err
    if not isinstance(content, dict):
        raise ValueError(f"not a JSON object (a {type(content).__name__})")
    require_keys(content, keys)
    return content


def require_keys(content: dict[str, Any], keys: Sequence[str]) -> None:
    """A ValueError ``missing keys ...`` unless ``content`` holds every one of ``keys``."""
    missing = [k for k in keys if k not in content]
    if missing:
        raise ValueError(f"missing keys {', '.join(missing)}")


def read_bytes(uri: str, limit: int = SMALL_FILE_BYTES) -> bytes:
    """A whole object of at most ``limit`` bytes (manifests, state, leases: :data:`SMALL_FILE_BYTES`): on
    ``file://`` through :func:`read_local_small`, on ``s3://`` refused above ``limit`` before it is fetched."""
    fs, path = filesystem(uri)
    if not is_s3(uri):
        return read_local_small(path, limit)
    size = fs.size(path)
    if size is not None and size > limit:
        raise OSError(27, f"{size} bytes, above the {limit} this object may hold; refused", uri)
    return bytes(fs.cat_file(path))


@functools.cache
def _host() -> str:
    """This host's name as it may stand in a file name."""
    import socket

    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64]


def _temp_tag() -> str:
    """``.tmp-HOST-PID-``: the start of every temporary name beside an output, so a later run can tell whose it is."""
    return f".tmp-{_host()}-{os.getpid()}-"


def sweep_temporaries(folder: Path, name: str) -> None:
    """Remove temporaries for ``name`` in ``folder`` left by killed processes of this host (a pid that no longer
    runs); another host's, or a live process's, are left alone."""
    import psutil

    pattern = re.compile(rf"\.tmp-{re.escape(_host())}-(\d+)-(?:[a-z0-9_]+-)?{re.escape(name)}$")
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or psutil.pid_exists(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@contextmanager
def staged_file(dest: str | os.PathLike[str], replace: bool = True) -> Iterator[Path]:
    """A local file that appears at ``dest`` whole or not at all: write the yielded temporary (beside
    ``dest``, ending in its name so that writers that go by the suffix pick the same format); on success it
    replaces ``dest`` by a rename (without ``replace``: refused when ``dest`` exists by then, never
    overwritten); the temporary is removed whatever happens."""
    out = Path(dest)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(out.parent, out.name)
    tmp = out.with_name(f"{_temp_tag()}{out.name}")
    try:
        yield tmp
        if replace:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)  # atomic, and fails when out exists
            except FileExistsError as err:
                raise FileExistsError(f"{out}: exists; not replaced (pass --replace)") from err
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def staged_dir(dest: str | os.PathLike[str], replace: bool = True) -> Iterator[Path]:
    """A local folder that appears at ``dest`` whole or not at all: fill the yielded staging folder
    (beside ``dest``); on success it replaces ``dest`` by a rename (without ``replace`` an existing
    ``dest`` is refused, never removed), on failure it is removed."""
    out = Path(dest)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not replace:
        raise FileExistsError(f"{out}: exists; not replaced")
    sweep_temporaries(out.parent, out.name)
    stage = Path(tempfile.mkdtemp(prefix=f"{_temp_tag()}", suffix=f"-{out.name}", dir=out.parent))
    try:
        yield stage
        if out.is_symlink() or out.is_file():
            raise FileExistsError(f"{out}: a {'symlink' if out.is_symlink() else 'file'} is there; not replaced")
        if out.exists():
            if not replace:
                raise FileExistsError(f"{out}: exists; not replaced")
            shutil.rmtree(out)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def pyarrow_storage(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for a Ray Train ``RunConfig``."""
    if not is_s3(uri):
        return str(local_path(uri)), None
    import pyarrow.fs as pafs

    parsed = urlparse(os.environ.get("AWS_ENDPOINT_URL", ""))
    kwargs: dict[str, Any] = {}
    if parsed.netloc:
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        kwargs["region"] = region
    return uri[len("s3://") :], pafs.S3FileSystem(**kwargs)


# Where storage and tracking are: safe to show, passed to every Ray worker.
WORKER_SETTINGS = (
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
)
# Credentials: never in a runtime_env. Ray shows a task's runtime_env to anyone who can reach the cluster
# (`ray list tasks --detail`, the dashboard) and writes it into its session logs (runtime_env_agent.log),
# even for a local Ray. Workers read them from their own environment: on a cluster what the platform
# provides (an instance role, a Kubernetes Secret in the pod env, the compose file's env); on a local Ray
# the job starts itself (no RAY_ADDRESS) the driver's environment, which its raylet and workers inherit.
WORKER_SECRETS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


def env_for_workers() -> dict[str, str]:
    """Environment variables the Ray workers get through ``runtime_env``: where storage and tracking are,
    never credentials (:data:`WORKER_SECRETS` are left out, and so is a setting whose URI carries
    ``user:password@``: the workers keep their own environment's value of it)."""
    return {
        k: os.environ[k] for k in WORKER_SETTINGS if os.environ.get(k) and "@" not in urlparse(os.environ[k]).netloc
    }
