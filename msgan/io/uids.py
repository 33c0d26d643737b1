"""DICOM UIDs from untrusted sources (files, a PACS), checked before they name anything.

A UID read from a DICOM file or returned by a PACS may become a folder, a file, an object key,
a URL path segment or a state entry. Only values that follow the DICOM UID grammar
(PS3.5 9.1: components of digits separated by single dots, no empty component, no leading
zero in a component except a lone ``0``, at most 64 characters) are allowed to; anything else
(``..``, ``1..2``, ``/abs``, ``../../x``, an overlong value) is refused. Other identifiers
(PatientID, AccessionNumber, ...) never name anything.
"""

from __future__ import annotations

import re

MAX_LENGTH = 64
_COMPONENT = r"(?:0|[1-9][0-9]*)"
UID_PATTERN = re.compile(rf"{_COMPONENT}(?:\.{_COMPONENT})*")


class UidError(ValueError):
    """A value that is not a DICOM UID was about to name a file, folder, key or request."""


def uid_problem(value: object) -> str | None:
    """Why ``value`` is not a valid DICOM UID, or None when it is one."""
    if not isinstance(value, str):
        return f"not a string ({type(value).__name__})"
    if not value:
        return "empty"
    if len(value) > MAX_LENGTH:
        return f"{len(value)} characters, more than {MAX_LENGTH}"
    if UID_PATTERN.fullmatch(value):
        return None
    bad = sorted({c for c in value if c not in "0123456789."})
    if bad:
        return f"contains {', '.join(map(repr, bad[:5]))}; only digits and dots are allowed"
    if value.startswith(".") or value.endswith(".") or ".." in value:
        return "has an empty component (a leading, trailing or doubled dot)"
    return "a component has a leading zero (only a lone 0 may start with 0)"


def is_uid(value: object) -> bool:
    return uid_problem(value) is None


def shown(value: object) -> str:
    """``value`` as it may appear in a message or a report key: as is when it is a UID, else quoted and cut."""
    if is_uid(value):
        return str(value)
    text = value[:80] if isinstance(value, str) else value
    return f"(invalid UID {text!a}{'...' if isinstance(value, str) and len(value) > 80 else ''})"


def check_uid(value: object, what: str = "UID") -> str:
    """``value`` when it is a valid DICOM UID; otherwise a :class:`UidError` naming it and the rule."""
    problem = uid_problem(value)
    if problem is not None:
        text = value[:80] if isinstance(value, str) else value
        raise UidError(
            f"{what} {text!a} is not a valid DICOM UID ({problem}); a UID is digits in components separated by "
            f"single dots, no leading zeros, at most {MAX_LENGTH} characters, e.g. 1.2.840.10008.5.1.4.1.1.2"
        )
    return str(value)


__all__ = ["MAX_LENGTH", "UID_PATTERN", "UidError", "check_uid", "is_uid", "shown", "uid_problem"]
