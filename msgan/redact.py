"""Secrets never reach a log: URIs and texts with ``user:password@`` are shown as ``user:***@``.

Every URI that is printed, logged or put into an exception message goes through
:func:`redact_uri` (or :func:`redact_text` for free text that may contain URIs).
"""

from __future__ import annotations

import re

# scheme://user:password@host  ->  scheme://user:***@host  (also for a password with no user)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@/\s]+)@")
# query parameters that carry credentials (presigned URLs, some DSNs)
_QUERY = re.compile(
    r"(?P<key>[?&](?:password|passwd|pwd|token|secret|X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token)=)"
    r"(?P<value>[^&\s#]+)",
    re.IGNORECASE,
)


def redact_text(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` and credential query values masked."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _QUERY.sub(lambda m: f"{m['key']}***", text)


def redact_uri(uri: str) -> str:
    """One URI, safe to print."""
    return redact_text(uri)
