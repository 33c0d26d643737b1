"""DICOM attribute patterns: the one syntax that selects series by their attributes.

A pattern is ``Keyword=REGEX``:

- ``Keyword`` is a DICOM keyword of the standard's data dictionary, spelled as the standard spells it
  (``ConvolutionKernel``, ``SeriesDescription``, ``ImageType``, ``Modality``, ``ContrastBolusAgent``, ...);
  an unknown keyword is refused (with the nearest known ones), and so is a sequence or a binary attribute;
- ``REGEX`` is a Python regular expression that must match the **whole** value (``re.fullmatch``:
  ``ConvolutionKernel=B70f`` matches ``B70f``, not ``B70f_x``; write ``.*ARTERIAL.*`` to find a word inside),
  **ignoring case** (``b70F`` matches ``B70f``);
- an attribute with several values (a Siemens kernel such as ``['Br40d', '3']``, ``ImageType``) matches when
  **any** of its values matches; an attribute the series does not have matches nothing (present but empty: ``^$``);
- several patterns on one side must **all** match (``--source ConvolutionKernel=B70f --source Modality=CT``).

Only the first ``=`` separates the keyword from the regex (``SeriesDescription=a=b`` looks for ``a=b``).

Untrusted values never make matching slow: a regex is at most :data:`MAX_PATTERN_CHARS` characters, may not
repeat a repetition or an alternation (``(a+)+``, ``(ab|a)*``, ``(.*a){2,5}``: exponential time) and holds at
most :data:`MAX_REPEATS` variable repetitions (``*``, ``+``, ``?``, ``{m,n}``) and :data:`MAX_ALTERNATIONS`
alternations; only the first :data:`MAX_VALUES`
values of an attribute are looked at, and a value longer than :data:`MAX_VALUE_CHARS` characters matches nothing.

``pacs-sync``'s older ``kernel`` and ``description`` settings are the same machinery with their own, older rule
(:func:`legacy`: the regex is searched anywhere in the value, case counts).

This module imports nothing of msgan (the bottom layer): pydicom's data dictionary only.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_dict, tag_for_keyword

MAX_PATTERN_CHARS = 200  # a regex longer than this is refused
MAX_VALUE_CHARS = 256  # a value longer than this matches nothing (SH is 16 characters, LO 64)
MAX_VALUES = 64  # the first this many values of a multi-valued attribute are looked at
MAX_REPEATS = 3  # variable repetitions (*, +, ?, {m,n}) in one regex: backtracking stays polynomial and small
MAX_ALTERNATIONS = 4  # alternations (a|b) in one regex
UNMATCHABLE_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"}  # sequences and binary data are not text

HELP = (
    "KEYWORD=REGEX: a DICOM keyword (e.g. ConvolutionKernel, SeriesDescription, ImageType) and a regular "
    "expression matching its WHOLE value, ignoring case (ConvolutionKernel=B70f; SeriesDescription=.*ARTERIAL.*); "
    "a multi-valued attribute matches when any value does (a Siemens kernel ['Br40d', '3'] matches "
    "ConvolutionKernel=Br40d); repeat the option to require several patterns at once"
)

_KEYWORD = re.compile(r"[A-Za-z][A-Za-z0-9]*")


class PatternError(ValueError):
    """A pattern that cannot be used; the message names the pattern and the rule."""


def _parser() -> Any:
    return importlib.import_module("re._parser")  # the stdlib's own regex parser (a private module: no stubs)


def _walk(items: Any, inside_repeat: bool, text: str, count: list[int]) -> None:
    """Count the variable repetitions (``*``, ``+``, ``?``, ``{m,n}``) and alternations of a parsed regex in
    ``count``; refuse a variable repetition or an alternation inside a repetition (``(a+)+``, ``(ab|a)*``,
    ``(.*a){2,5}``: the shapes that backtrack exponentially)."""
    const = importlib.import_module("re._constants")
    repeats = (const.MAX_REPEAT, const.MIN_REPEAT, getattr(const, "POSSESSIVE_REPEAT", const.MAX_REPEAT))
    for op, av in items:
        subs: list[Any] = []
        if op in repeats:
            lo, hi, sub = av
            if inside_repeat and hi != lo:
                raise PatternError(
                    f"{text!r}: repeats a repetition (like (a+)+ or (.*a){{2,5}}), which can take exponential time "
                    "on some values; rewrite it without nesting repetitions"
                )
            count[0] += hi != lo
            _walk(sub, inside_repeat or hi > 1, text, count)
            continue
        if op == const.BRANCH:
            if inside_repeat:
                raise PatternError(
                    f"{text!r}: repeats an alternation (like (ab|a)+), which can take exponential time on some "
                    "values; rewrite it without repeating the alternatives"
                )
            count[1] += 1
            subs = list(av[1])
        elif op == const.SUBPATTERN:
            subs = [av[-1]]
        elif op in (const.ASSERT, const.ASSERT_NOT):
            subs = [av[1]]
        elif op == const.GROUPREF_EXISTS:
            count[1] += 1
            subs = [s for s in av[1:] if s is not None]
        elif getattr(const, "ATOMIC_GROUP", None) is not None and op == const.ATOMIC_GROUP:
            subs = [av]
        for sub in subs:
            _walk(sub, inside_repeat, text, count)


def _compile(text: str, regex: str, flags: int, counted: bool = True) -> re.Pattern[str]:
    if not regex:
        raise PatternError(
            f"{text!r}: empty regular expression after '='; to match an attribute that is present but empty, "
            "write KEYWORD=^$"
        )
    if len(regex) > MAX_PATTERN_CHARS:
        raise PatternError(f"{text[:60]!r}...: the regular expression is {len(regex)} characters, above the "
                           f"{MAX_PATTERN_CHARS} a pattern may have")  # fmt: skip
    try:
        compiled = re.compile(regex, flags)
        parsed = _parser().parse(regex, flags)
    except re.error as err:
        where = f" at position {err.pos}" if err.pos is not None else ""
        raise PatternError(f"{text!r}: not a valid regular expression ({err.msg}{where})") from None
    except RecursionError:
        raise PatternError(f"{text!r}: nested too deeply to be a usable regular expression") from None
    count = [0, 0]
    _walk(parsed.data if hasattr(parsed, "data") else parsed, False, text, count)
    if counted and (count[0] > MAX_REPEATS or count[1] > MAX_ALTERNATIONS):
        raise PatternError(
            f"{text!r}: {count[0]} repetitions (*, +, ?, {{m,n}}) and {count[1]} alternations (|); a pattern may "
            f"have at most {MAX_REPEATS} and {MAX_ALTERNATIONS} (each one multiplies the work on a long value)"
        )
    return compiled


def check_keyword(keyword: str, text: str | None = None) -> str:
    """``keyword`` when it names a DICOM attribute that holds text or numbers; else a :class:`PatternError`
    naming ``text`` (the pattern as given) and the nearest known keywords."""
    shown = text if text is not None else keyword
    if not _KEYWORD.fullmatch(keyword) or tag_for_keyword(keyword) is None:
        near = difflib.get_close_matches(keyword, list(keyword_dict), n=3, cutoff=0.75)
        folded = [k for k in keyword_dict if k.lower() == keyword.lower()]
        hint = folded or near
        raise PatternError(
            f"{shown!r}: {keyword[:64]!r} is not a DICOM keyword"
            + (f" (did you mean {' or '.join(hint)}?)" if hint else "")
            + "; a pattern is KEYWORD=REGEX with a keyword of the DICOM dictionary, e.g. ConvolutionKernel=B70f"
        )
    tag = tag_for_keyword(keyword)
    vr = dictionary_VR(tag) if tag is not None else ""
    if set(vr.split(" or ")) & UNMATCHABLE_VRS:  # "OB or OW" and the like
        raise PatternError(
            f"{shown!r}: {keyword} is {'a sequence' if vr == 'SQ' else 'binary data'} (VR {vr}); patterns match "
            "attributes that hold text or numbers"
        )
    return keyword


@dataclass(frozen=True)
class Pattern:
    """One ``Keyword=REGEX`` pattern (make it with :func:`parse`)."""

    keyword: str
    regex: str
    search: bool = False  # True: the regex may match anywhere in a value (pacs-sync's older settings only)
    ignore_case: bool = True
    _compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_keyword(self.keyword, str(self))
        flags = re.IGNORECASE if self.ignore_case else 0
        # pacs-sync's older settings (search) keep what they accepted before: no count of repetitions (nested
        # ones are still refused; values stay capped at MAX_VALUE_CHARS)
        compiled = _compile(str(self), self.regex, flags | re.DOTALL, counted=not self.search)
        object.__setattr__(self, "_compiled", compiled)

    def __str__(self) -> str:
        return f"{self.keyword}={self.regex}"

    def matches(self, values: Mapping[str, Any]) -> bool:
        """Whether any value of ``values[keyword]`` matches (a missing attribute matches nothing)."""
        match = self._compiled.search if self.search else self._compiled.fullmatch
        return any(match(v) is not None for v in text_values(values.get(self.keyword)))

    def describe(self) -> str:
        how = "found anywhere in" if self.search else "matching the whole of"
        case = "ignoring case" if self.ignore_case else "case counts"
        return f"{self.keyword}: /{self.regex}/ {how} any of its values ({case})"


def parse(text: str) -> Pattern:
    """A ``Keyword=REGEX`` pattern (see the module's documentation); a :class:`PatternError` naming ``text`` and
    the rule when it is not one."""
    if not isinstance(text, str):
        raise PatternError(f"{text!r}: a pattern is a string KEYWORD=REGEX")
    keyword, sep, regex = text.partition("=")
    if not sep:
        raise PatternError(
            f"{text[:80]!r}: a pattern is KEYWORD=REGEX (e.g. ConvolutionKernel=B70f or SeriesDescription=.*ART.*)"
        )
    return Pattern(keyword.strip(), regex)


def parse_all(texts: Iterable[str | Pattern]) -> tuple[Pattern, ...]:
    """Every pattern of ``texts`` (strings parsed, patterns kept)."""
    return tuple(t if isinstance(t, Pattern) else parse(t) for t in texts)


def legacy(keyword: str, regex: str) -> Pattern:
    """``pacs-sync``'s ``kernel`` / ``description`` settings: ``regex`` searched anywhere in any value of
    ``keyword``, case counts (their rule before this module); the same guards against slow regexes."""
    return Pattern(keyword, regex, search=True, ignore_case=False)


def matches_all(patterns: Sequence[Pattern], values: Mapping[str, Any]) -> bool:
    """Whether every pattern matches (no pattern: True)."""
    return all(p.matches(values) for p in patterns)


def describe_all(patterns: Sequence[Pattern]) -> str:
    return " and ".join(str(p) for p in patterns) if patterns else "(no pattern)"


def keywords(patterns: Iterable[Pattern]) -> list[str]:
    """The keywords the patterns look at, each once, in order."""
    return list(dict.fromkeys(p.keyword for p in patterns))


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, (bytes, bytearray, memoryview)):
        return None
    if isinstance(value, dict):  # DICOM JSON person name
        value = value.get("Alphabetic")
        if not isinstance(value, str):
            return None
    text = format(value, "g") if type(value) is float else str(value)  # a JSON number: 3.0 -> "3", 2.5 -> "2.5"
    text = text.strip(" \x00")
    return text if len(text) <= MAX_VALUE_CHARS else None


def text_values(raw: Any) -> list[str]:
    """The values of an attribute as texts: a string or number is one value, a list (pydicom's MultiValue, DICOM
    JSON's Value) several; binary values, and values longer than :data:`MAX_VALUE_CHARS`, are left out; only the
    first :data:`MAX_VALUES` are kept."""
    if raw is None:
        return []
    items = list(raw[:MAX_VALUES]) if isinstance(raw, (list, tuple)) or _is_multivalue(raw) else [raw]
    return [t for t in map(_text, items) if t is not None]


def _is_multivalue(raw: Any) -> bool:
    from pydicom.multival import MultiValue

    return isinstance(raw, MultiValue)


def dataset_values(ds: Any, names: Iterable[str]) -> dict[str, list[str]]:
    """``{keyword: values}`` of a pydicom dataset for ``names``: a value too long to be looked at (deferred by
    ``defer_size``, or above the caps) is not read at all."""
    out: dict[str, list[str]] = {}
    limit = MAX_VALUES * (MAX_VALUE_CHARS + 1)
    for name in names:
        tag = tag_for_keyword(name)
        if tag is None or tag not in ds:
            continue
        try:
            raw = ds.get_item(tag, keep_deferred=True)
            length = getattr(raw, "length", None)
            if raw is None or (isinstance(length, int) and length > limit):
                continue
            out[name] = text_values(ds[tag].value)
        except Exception:  # a malformed value: the attribute reads as absent (matches nothing)
            continue
    return out


def json_values(item: Mapping[str, Any], names: Iterable[str] | None = None) -> dict[str, list[str]]:
    """``{keyword: values}`` of one DICOM JSON object (a QIDO-RS result, a WADO-RS metadata instance), for
    ``names`` (default: every attribute with a keyword); types are checked, anything else reads as absent."""
    from pydicom.datadict import keyword_for_tag

    wanted = None if names is None else {tag_for_keyword(n): n for n in names}
    out: dict[str, list[str]] = {}
    for tag_text, entry in item.items():
        if not isinstance(tag_text, str) or len(tag_text) != 8 or not isinstance(entry, dict):
            continue
        try:
            tag = int(tag_text, 16)
        except ValueError:
            continue
        if wanted is not None:
            if tag not in wanted:
                continue
            name = wanted[tag]
        else:
            name = keyword_for_tag(tag)
            if not name:
                continue
        value = entry.get("Value")
        if isinstance(value, list):
            out[name] = text_values(value)
    return out


__all__ = [
    "HELP",
    "MAX_ALTERNATIONS",
    "MAX_PATTERN_CHARS",
    "MAX_REPEATS",
    "MAX_VALUES",
    "MAX_VALUE_CHARS",
    "Pattern",
    "PatternError",
    "check_keyword",
    "dataset_values",
    "describe_all",
    "json_values",
    "keywords",
    "legacy",
    "matches_all",
    "parse",
    "parse_all",
    "text_values",
]
