"""Secrets never reach a log, a report, a state file or an exception text, in any form.

:func:`redact_text` is the one place that scrubs a text. It masks, for every secret this process holds
(the values of the secret settings in :data:`msgan.settings.SETTINGS` and a few more variables, passwords
inside URI settings, and credentials a client registered with :func:`add_credentials`):

- the plain value;
- its percent-encoded forms (``urllib.parse.quote`` with and without ``/`` safe, ``quote_plus``; hex digits
  in either case), its JSON/``repr`` escaped form;
- its base64 forms (standard and URL-safe, padded or not), the HTTP Basic value ``base64(user:password)`` of
  every known pair, and the secret inside *any* base64 text (at each of the three byte offsets, so a Basic
  header of an unknown user with a known password is caught too);

and, for secrets it does not know, these forms wherever they appear:

- ``scheme://user:password@host`` -> ``scheme://user:***@host``;
- credential query/keyword values (``?password=``, ``token=``, ``access_token=``, ``X-Amz-Signature=``, ...)
  and quoted JSON/dict keys (``"password": "..."``);
- ``Authorization:`` / ``Proxy-Authorization:`` header values (``Authorization: Basic ***``), and ``Bearer X``
  or ``Basic <base64 of a:b>`` tokens anywhere.

Which plain values are masked (the rule for short secrets): a plain value is only masked when it cannot be
an ordinary word of our own output. Passwords, tokens and secret keys are masked from
:data:`MIN_PLAIN_SECRET` (4) characters; identities (user names, access key IDs: ``*_USER``, ``*_USERNAME``,
``*_ACCESS_KEY_ID``) from :data:`MIN_PLAIN_IDENTITY` (8) characters, since a user such as ``msgan`` is also the
name of this program. Shorter values are still masked in every encoded form that is at least
:data:`MIN_ENCODED` (6) characters long (e.g. ``Basic base64(msgan:pw1)``), and the generic header, bearer,
query and userinfo rules above mask them in those positions whatever their length.

The masks for one set of secret values are compiled once (cached), so redacting is one regex pass per rule.
:func:`install` routes everything a command writes to stdout/stderr (its own lines, libraries' logs,
tracebacks, Ray workers' forwarded output) through :func:`redact_text`, as a last line of defence.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
import re
import sys
import threading
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import quote, quote_plus, unquote

from msgan.settings import SETTINGS

MASK = "***"
MIN_PLAIN_SECRET = 4  # a password/token/key shorter than this is masked only in its encoded forms
MIN_PLAIN_IDENTITY = 8  # a user name or access key ID shorter than this is masked only in its encoded forms
MIN_ENCODED = 6  # an encoded form (percent, base64) shorter than this is not masked (it would match noise)
MIN_BASE64_CORE = 8  # a secret is searched inside any base64 text only where its own base64 is this long

# scheme://user:password@host  ->  scheme://user:***@host  (also for a password with no user)
# (the secret may hold an unencoded '/', which ends the authority for a parser but not for a person who pasted it)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@\s]+?)@")
_CRED_KEY = (
    r"password|passwd|pwd|secret|[A-Za-z_\-]*token|[A-Za-z_\-]*secret[_\-]?(?:access[_\-]?)?key|api[_\-]?key"
    r"|X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token"
)
# key=value pairs that carry credentials (query strings, DSNs, free text: "token=X")
_QUERY = re.compile(rf"(?P<key>(?<![A-Za-z0-9_\-])(?:{_CRED_KEY})=)(?P<value>[^&\s#\"',;]+)", re.IGNORECASE)
# quoted keys in JSON or a Python dict: "password": "X", 'token': 'X'
_QUOTED = re.compile(
    rf"(?P<key>(?P<q>[\"'])(?:{_CRED_KEY})(?P=q)\s*:\s*(?P<q2>[\"']))(?P<value>[^\"']+)", re.IGNORECASE
)
# header values: Authorization: Basic X, 'Authorization': 'Bearer X', authorization=Digest ...
_AUTH_HEADER = re.compile(
    r"(?P<key>(?<![A-Za-z0-9_\-])(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)"
    r"(?P<scheme>(?:Basic|Bearer|Digest|Negotiate|NTLM|AWS4-HMAC-SHA256|Token|ApiKey)\s+)?(?P<value>[^\s\"',;]+)",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?P<key>(?<![A-Za-z0-9_\-])Bearer\s+)(?P<value>[A-Za-z0-9\-._~+/]{6,}=*)", re.IGNORECASE)
_BASIC = re.compile(r"(?P<key>(?<![A-Za-z0-9_\-])Basic\s+)(?P<value>[A-Za-z0-9+/_\-]{4,}={0,2})")
_B64_CHARS = "A-Za-z0-9+/_\\-"
_CRED_HINTS = ("pass", "pwd", "secret", "token", "key", "x-amz")  # one of them is in every _CRED_KEY

# environment variables whose whole value is a secret, beyond the secret settings (the compose stack's own)
SECRET_VARIABLES = (
    "POSTGRES_PASSWORD",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)
# environment variables holding URIs that may carry user:password@
URI_VARIABLES = ("MSGAN_PACS_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
# (user, password) pairs sent as HTTP Basic by some client
BASIC_PAIRS = (
    ("MSGAN_PACS_USER", "MSGAN_PACS_PASSWORD"),
    ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
    ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"),
)
_IDENTITY_SUFFIXES = ("_USER", "_USERNAME", "_ACCESS_KEY_ID")

_lock = threading.Lock()
_registered: set[tuple[str, bool]] = set()  # (value, is identity)
_registered_pairs: set[tuple[str, str]] = set()
_registered_version = 0  # bumped by add_credentials: part of the key of the cached secrets


def _secret_names() -> list[str]:
    names = [s.name for s in SETTINGS if s.secret]
    return names + [n for n in SECRET_VARIABLES if n not in names]


def _is_identity(name: str) -> bool:
    return name.endswith(_IDENTITY_SUFFIXES)


def add_credentials(user: str | None = None, password: str | None = None, *, token: str | None = None) -> None:
    """Make :func:`redact_text` mask these credentials from now on, in this process (a client given them
    directly, not through the environment, calls this)."""
    global _registered_version
    with _lock:
        _registered_version += 1
        if user:
            _registered.add((user, True))
        for value in (password, token):
            if value:
                _registered.add((value, False))
        if user and password:
            _registered_pairs.add((user, password))


def _watched() -> tuple[str, ...]:
    """The environment variables that may hold a secret: secret settings, Basic pairs, URIs with userinfo."""
    return (*_secret_names(), *(n for pair in BASIC_PAIRS for n in pair), *URI_VARIABLES)


def _held() -> tuple[frozenset[tuple[str, bool]], frozenset[tuple[str, str]]]:
    """Every secret this process holds: (value, is identity) and (user, password) pairs. Worked out again
    only when a watched variable or a registered credential changed (this runs on every line written)."""
    names = _watched()
    return _held_for(names, tuple(os.environ.get(n) for n in names), _registered_version)


@functools.lru_cache(maxsize=8)
def _held_for(
    names: tuple[str, ...], seen: tuple[str | None, ...], version: int
) -> tuple[frozenset[tuple[str, bool]], frozenset[tuple[str, str]]]:
    env = {n: v for n, v in zip(names, seen, strict=True) if v}
    values = {(env[n], _is_identity(n)) for n in _secret_names() if env.get(n)}
    pairs = {(env[u], env[p]) for u, p in BASIC_PAIRS if env.get(u) and env.get(p)}
    for name in URI_VARIABLES:
        for m in _USERINFO.finditer(env.get(name, "")):
            user, secret = m["user"], m["secret"]
            for u, sec in {(user, secret), (unquote(user), unquote(secret))}:
                values.add((sec, False))
                if u:
                    values.add((u, True))
                    pairs.add((u, sec))
    with _lock:
        values |= _registered
        pairs |= _registered_pairs
    return frozenset(values), frozenset(pairs)


def _plain_masked(value: str, identity: bool) -> bool:
    return len(value) >= (MIN_PLAIN_IDENTITY if identity else MIN_PLAIN_SECRET)


def _b64_forms(raw: bytes) -> set[str]:
    std = base64.b64encode(raw).decode().rstrip("=")
    return {std, std.replace("+", "-").replace("/", "_")}


def _b64_cores(raw: bytes) -> set[str]:
    """The base64 characters that depend only on ``raw``, at each of the three byte offsets it may have inside a
    longer base64 text (e.g. a password after ``user:`` in a Basic header)."""
    cores = set()
    bits = 8 * len(raw)
    for k in range(3):
        enc = base64.b64encode(b"\0" * k + raw).decode()
        first, end = -(-8 * k // 6), (8 * k + bits) // 6  # chars wholly inside the secret's bits
        core = enc[first:end]
        if len(core) >= MIN_BASE64_CORE:
            cores |= {core, core.replace("+", "-").replace("/", "_")}
    return cores


_B64_WORD = re.compile(f"[{_B64_CHARS}]{{{MIN_BASE64_CORE},}}={{0,2}}")


@dataclass(frozen=True)
class _Masks:
    """Every form of a set of secrets, compiled: ``known`` masks the literal forms, run only when one of
    ``needles`` (case-sensitive) or ``lower_needles`` (in the lower-cased text) occurs; ``cores`` finds a
    secret inside a base64 word."""

    known: re.Pattern[str] | None
    needles: tuple[str, ...]
    lower_needles: tuple[str, ...]
    cores: re.Pattern[str] | None


@functools.lru_cache(maxsize=16)
def _compiled(values: frozenset[tuple[str, bool]], pairs: frozenset[tuple[str, str]]) -> _Masks:
    """The masks for every form of every held secret, compiled once per set of values."""
    exact: set[str] = set()  # case-sensitive literal forms
    percent: set[str] = set()  # percent-encoded forms (hex in either case)
    base64_exact: set[str] = set()  # unpadded base64 forms, matched as whole base64 words
    cores: set[str] = set()  # base64 cores, matched inside any base64 word
    for value, identity in values:
        if _plain_masked(value, identity):
            exact.add(value)
        for escaped in (json.dumps(value)[1:-1], repr(value)[1:-1]):
            if escaped != value and _plain_masked(escaped, identity):
                exact.add(escaped)
        for enc in (quote(value, safe=""), quote(value), quote_plus(value), quote_plus(value, safe="/")):
            if enc != value and len(enc) >= MIN_ENCODED:
                (percent if "%" in enc else exact).add(enc)
        raw = value.encode()
        base64_exact |= {b for b in _b64_forms(raw) if len(b) >= MIN_ENCODED}
        if not identity:
            cores |= _b64_cores(raw)
    for user, password in pairs:
        base64_exact |= _b64_forms(f"{user}:{password}".encode())
    alternatives = [re.escape(v) for v in sorted(exact, key=len, reverse=True)]
    alternatives += [f"(?i:{re.escape(v)})" for v in sorted(percent, key=len, reverse=True)]
    word = f"[{_B64_CHARS}]"
    b64 = sorted(base64_exact, key=len, reverse=True)
    alternatives += [f"(?<!{word}){re.escape(v)}={{0,2}}(?!{word})" for v in b64]
    inside = "|".join(re.escape(c) for c in sorted(cores, key=len, reverse=True))
    return _Masks(
        known=re.compile("|".join(alternatives)) if alternatives else None,
        needles=tuple(exact | base64_exact),
        lower_needles=tuple(v.lower() for v in percent),
        cores=re.compile(inside) if inside else None,
    )


def _basic(m: re.Match[str]) -> str:
    """``Basic <base64>``: masked when the base64 decodes to ``user:password``."""
    value = m["value"]
    try:
        decoded = base64.b64decode(value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return m[0]
    return f"{m['key']}{MASK}" if b":" in decoded else m[0]


def redact_text(text: str) -> str:
    """``text`` with every held secret masked in every form, and the credential positions of unknown secrets
    (userinfo, credential parameters, ``Authorization`` values, bearer and basic tokens) masked too."""
    if not text:
        return text
    values, pairs = _held()
    masks = _compiled(values, pairs)
    # each regex runs only where a cheap substring test says it may match (most log lines hold none)
    if masks.known is not None:
        low = text.lower()
        if any(n in text for n in masks.needles) or any(n in low for n in masks.lower_needles):
            text = masks.known.sub(MASK, text)
    cores = masks.cores
    if cores is not None:  # a secret inside a longer base64 text: the whole base64 word goes
        text = _B64_WORD.sub(lambda m: MASK if cores.search(m[0]) else m[0], text)
    low = text.lower()
    if "://" in text and "@" in text:
        text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    if "authorization" in low:
        text = _AUTH_HEADER.sub(lambda m: f"{m['key']}{m['scheme'] or ''}{MASK}", text)
    if "bearer" in low:
        text = _BEARER.sub(lambda m: f"{m['key']}{MASK}", text)
    if "Basic" in text:
        text = _BASIC.sub(_basic, text)
    if any(hint in low for hint in _CRED_HINTS):
        text = _QUOTED.sub(lambda m: f"{m['key']}{MASK}", text)
        if "=" in text:
            text = _QUERY.sub(lambda m: f"{m['key']}{MASK}", text)
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
