"""Secrets never reach a log: URIs and texts with ``user:password@`` are shown as ``user:***@``.

Every URI that is printed, logged or put into an exception message goes through
:func:`redact_uri` (or :func:`redact_text` for free text that may contain URIs). :func:`redact_text`
also masks the values of the secret settings in this process's environment wherever they appear, and
:func:`install` routes everything a command writes to stdout/stderr (its own lines, libraries' logs,
tracebacks, Ray workers' forwarded output) through it, as a last line of defence.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, TextIO

# scheme://user:password@host  ->  scheme://user:***@host  (also for a password with no user)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@/\s]+)@")
# query parameters that carry credentials (presigned URLs, some DSNs)
_QUERY = re.compile(
    r"(?P<key>[?&](?:password|passwd|pwd|[A-Za-z_]*token|secret|X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token)=)"
    r"(?P<value>[^&\s#]+)",
    re.IGNORECASE,
)
# environment variables whose whole value is a secret
SECRET_VARIABLES = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MSGAN_PACS_PASSWORD",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "RAY_AUTH_TOKEN",
    "POSTGRES_PASSWORD",
    "MINIO_ROOT_PASSWORD",
)
# environment variables holding URIs that may carry user:password@
URI_VARIABLES = ("MSGAN_PACS_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
_MIN_SECRET = 8  # shorter values (test dummies like "testing") would mask ordinary words


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """The secrets in ``environ`` (default: this process's): secret variables and passwords inside URIs."""
    env = os.environ if environ is None else environ
    found = {env[k] for k in SECRET_VARIABLES if len(env.get(k, "")) >= _MIN_SECRET}
    for k in URI_VARIABLES:
        found |= {m["secret"] for m in _USERINFO.finditer(env.get(k, "")) if len(m["secret"]) >= _MIN_SECRET}
    return sorted(found, key=len, reverse=True)


def redact_text(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@``, credential query values and the
    values of the environment's secret settings masked."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    text = _QUERY.sub(lambda m: f"{m['key']}***", text)
    for secret in secret_values():
        text = text.replace(secret, "***")
    return text


def redact_uri(uri: str) -> str:
    """One URI, safe to print."""
    return redact_text(uri)


class RedactingStream:
    """A text stream that redacts every write before passing it on (all else is the wrapped stream's)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def install() -> None:
    """Redact everything this process writes to ``sys.stdout`` and ``sys.stderr`` from now on (idempotent).

    Call it first in a command's ``main``, before logging handlers capture the streams."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
