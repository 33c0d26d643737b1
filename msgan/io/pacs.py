"""A PACS over its standard interfaces: DICOMweb QIDO-RS (find), WADO-RS (fetch), STOW-RS (store).

Configured by URL and credentials from the environment (``MSGAN_PACS_URL``, the DICOMweb root,
e.g. ``http://orthanc:8042/dicom-web``; ``MSGAN_PACS_USER``, ``MSGAN_PACS_PASSWORD``).
Credentials never appear in messages, logs or ``repr``, in any encoding: the client registers them with
:func:`msgan.redact.add_credentials`, and an error answer is redacted before it is cut and shown.
Answers are untrusted: QIDO-RS is paged (``MSGAN_PACS_PAGE_SIZE``) with caps on pages and results, JSON
answers are size-capped and type-checked, UIDs are checked before they name a request.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from msgan.io.uids import check_uid
from msgan.redact import add_credentials, redact_text, redact_uri

TAGS = {
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "Modality": "00080060",
    "SeriesDescription": "0008103E",
    "StudyDate": "00080020",
    "PatientID": "00100020",
    "NumberOfSeriesRelatedInstances": "00201209",
    "ConvolutionKernel": "00181210",
    "ImageType": "00080008",
}


class PacsError(RuntimeError):
    """The PACS could not be reached or refused a request (the message holds no credentials)."""


@dataclass(frozen=True)
class SeriesInfo:
    study_uid: str
    series_uid: str
    modality: str
    description: str
    study_date: str
    patient_id: str
    instances: int | None

    def values(self) -> dict[str, str]:
        """The attributes of this QIDO-RS result that patterns may look at before any metadata is fetched
        (find-pairs and pacs-sync alike)."""
        return {
            "SeriesDescription": self.description,
            "Modality": self.modality,
            "StudyDate": self.study_date,
            "PatientID": self.patient_id,
            "SeriesInstanceUID": self.series_uid,
            "StudyInstanceUID": self.study_uid,
        }


def _first(item: dict[str, Any], tag: str) -> Any:
    value = _values(item, TAGS.get(tag, tag))
    if not value:
        return None
    v = value[0]
    return v.get("Alphabetic") if isinstance(v, dict) else v


CHUNK_BYTES = 1 << 20  # a streamed response is read 1 MiB at a time
MAX_PART_HEADER_BYTES = 64 << 10  # a part's MIME headers are a few lines; more is not a DICOM multipart body


def _boundary(content_type: str) -> bytes:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise PacsError(f"multipart response without a boundary ({content_type})")
    return m.group(1).encode()


def write_multipart(chunks: Iterable[bytes], content_type: str, dest: Path) -> list[Path]:
    """Write each part of a ``multipart/related`` body to ``dest/NNNNN.dcm`` as it arrives: memory holds one chunk
    and a delimiter's worth of bytes, never an instance or the series (work is linear in the body, whatever the
    chunk size). A part is written under a temporary name and renamed when its closing delimiter has arrived; a
    body that ends early (a dropped connection) raises."""
    delimiter = b"\r\n--" + _boundary(content_type)
    buf, state = b"\r\n", "preamble"  # the CRLF lets the first delimiter match like the others
    files: list[Path] = []
    part: Any = None
    try:
        for chunk in chunks:
            buf += chunk
            at = 0  # parsed up to here; buf is trimmed once per chunk, never per part
            while state != "done":
                if state in ("preamble", "body"):
                    i = buf.find(delimiter, at)
                    if i < 0:  # keep what may be the start of a delimiter; write the rest
                        keep = max(at, len(buf) - len(delimiter))
                        if state == "body" and keep > at:
                            part.write(memoryview(buf)[at:keep])
                        at = keep
                        break
                    if state == "body":
                        part.write(memoryview(buf)[at:i])
                        part.close()
                        final = dest / f"{len(files):05d}.dcm"
                        os.replace(part.name, final)
                        files.append(final)
                        part = None
                    at, state = i + len(delimiter), "delimiter"
                if state == "delimiter":
                    if len(buf) - at < 2:
                        break
                    state = "done" if buf.startswith(b"--", at) else "headers"
                if state == "headers":
                    j = buf.find(b"\r\n\r\n", at)
                    if j < 0:
                        if len(buf) - at > MAX_PART_HEADER_BYTES:  # else memory would hold whatever follows
                            raise PacsError(
                                f"part {len(files) + 1} of the multipart response has headers longer than "
                                f"{MAX_PART_HEADER_BYTES} bytes; not a DICOM multipart body"
                            )
                        break
                    at, state = j + 4, "body"
                    part = open(dest / f".{len(files):05d}.part", "wb")  # noqa: SIM115 - closed at its delimiter
            buf = buf[at:]
            if state == "done":
                break
    finally:
        if part is not None:
            part.close()
            Path(part.name).unlink(missing_ok=True)
    if state != "done":
        raise PacsError(f"the multipart response ended before its closing delimiter ({len(files)} complete parts)")
    return files


PAGE_SIZE_SETTING = "MSGAN_PACS_PAGE_SIZE"
DEFAULT_PAGE_SIZE = 500  # QIDO-RS results asked for per request (limit=)
MAX_PAGE_SIZE = 10_000
MAX_SEARCH_RESULTS = 100_000  # series one search may return: more is a query too broad (or a hostile server)
MAX_SEARCH_PAGES = 1_000  # requests one search may make (a server that caps pages small, or never ends)
MAX_JSON_BYTES = 32 << 20  # one DICOM JSON answer (a page of 500 series is ~1 MB; parsed, ~10x that)
ERROR_BODY_BYTES = 64 << 10  # read of an error answer, redacted, then cut to ERROR_BODY_SHOWN characters
ERROR_BODY_SHOWN = 300


def page_size_from_env() -> int:
    """``MSGAN_PACS_PAGE_SIZE`` (default 500): QIDO-RS results per request, 1 to 10000."""
    raw = os.environ.get(PAGE_SIZE_SETTING, "").strip()
    if not raw:
        return DEFAULT_PAGE_SIZE
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_PAGE_SIZE:
        raise ValueError(f"{PAGE_SIZE_SETTING}={raw!r}: expected an integer from 1 to {MAX_PAGE_SIZE}")
    return value


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _no_constant(name: str) -> Any:
    """JSON's ``NaN`` / ``Infinity`` are not DICOM JSON: an answer holding them is refused, not read as numbers."""
    raise ValueError(f"{name} is not a DICOM JSON value")


def series_info(item: Any) -> SeriesInfo:
    """One QIDO-RS result as :class:`SeriesInfo`; a value of the wrong type reads as empty (a UID that is not a
    string becomes ``""``, which the caller's UID check refuses)."""
    if not isinstance(item, dict):
        item = {}
    n = _first(item, "NumberOfSeriesRelatedInstances")
    try:
        instances = int(n) if n is not None else None
    except (TypeError, ValueError, OverflowError):
        instances = None
    return SeriesInfo(
        study_uid=_text(_first(item, "StudyInstanceUID")),
        series_uid=_text(_first(item, "SeriesInstanceUID")),
        modality=_text(_first(item, "Modality")),
        description=_text(_first(item, "SeriesDescription")),
        study_date=_text(_first(item, "StudyDate")),
        patient_id=_text(_first(item, "PatientID")),
        instances=instances,
    )


class StowBody:
    """A STOW-RS ``multipart/related`` body made lazily from files: iterating it reads one file at a time, in
    1 MiB chunks (memory holds one chunk, never the batch); its length is known up front from the files' sizes,
    so it is sent with a Content-Length (no chunked encoding needed at the server)."""

    def __init__(self, files: Sequence[str | os.PathLike[str]], boundary: str | None = None) -> None:
        self.files = [Path(f) for f in files]
        self.boundary = boundary or uuid.uuid4().hex
        self._head = b"--" + self.boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
        self._tail = b"--" + self.boundary.encode() + b"--\r\n"
        self.sizes = [f.stat().st_size for f in self.files]  # a missing file fails here, before any request
        self._length = sum(len(self._head) + n + 2 for n in self.sizes) + len(self._tail)
        self.files_opened = 0  # how many files the iteration has read so far (one at a time)

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def __len__(self) -> int:
        return self._length

    def parts(self) -> Iterator[bytes]:
        for path, size in zip(self.files, self.sizes, strict=True):
            yield self._head
            sent = 0
            try:
                with open(path, "rb") as fh:
                    self.files_opened += 1
                    while chunk := fh.read(CHUNK_BYTES):
                        sent += len(chunk)
                        if sent > size:
                            break
                        yield chunk
            except OSError as err:
                raise PacsError(f"{path}: cannot be read while storing it ({type(err).__name__})") from None
            if sent != size:  # the declared Content-Length would be wrong: stop rather than send a broken body
                raise PacsError(f"{path}: changed size while being stored ({size} bytes before, {sent} now)")
            yield b"\r\n"
        yield self._tail

    def __iter__(self) -> Iterator[bytes]:
        return self.parts()


class DicomWebClient:
    def __init__(
        self,
        url: str,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 120.0,
        page_size: int | None = None,
        max_results: int = MAX_SEARCH_RESULTS,
        max_pages: int = MAX_SEARCH_PAGES,
    ):
        from urllib.parse import unquote, urlsplit

        if not url.startswith(("http://", "https://")):
            raise ValueError(
                f"PACS URL {redact_uri(url)!r}: expected the DICOMweb root, e.g. http://orthanc:8042/dicom-web"
            )
        parts = urlsplit(url)
        if "@" not in parts.netloc and "@" in url.split("://", 1)[1]:
            # user:pass@ whose password holds '/', '?' or '#' unencoded: a parser reads part of it as the host
            raise ValueError(
                f"PACS URL {redact_uri(url)!r}: its user:password@ part holds a character that must be "
                "percent-encoded ('/', '?' or '#'); encode the password, or set MSGAN_PACS_USER and MSGAN_PACS_PASSWORD"
            )
        if "@" in parts.netloc:  # user:password@ in the URL: used as credentials, never kept in the URL we show
            user = user or unquote(parts.username or "") or None
            password = password if password is not None else unquote(parts.password or "")
            url = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
        add_credentials(user, password)  # every text this process redacts masks them, in every encoding
        self.url = url.rstrip("/")
        self.shown_url = redact_uri(self.url)  # what messages and repr show (a ?token=... query is masked)
        self._auth = (user, password or "") if user else None
        self.timeout = timeout
        self.page_size = page_size_from_env() if page_size is None else page_size
        if not 1 <= self.page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"PACS page size {self.page_size}: expected 1 to {MAX_PAGE_SIZE}")
        self.max_results = max_results
        self.max_pages = max_pages

    @classmethod
    def from_env(cls) -> DicomWebClient:
        url = os.environ.get("MSGAN_PACS_URL")
        if not url:
            raise ValueError("MSGAN_PACS_URL is not set (the PACS DICOMweb root, e.g. http://orthanc:8042/dicom-web)")
        return cls(url, os.environ.get("MSGAN_PACS_USER"), os.environ.get("MSGAN_PACS_PASSWORD"))

    def __repr__(self) -> str:
        return f"DicomWebClient({self.shown_url!r}, user={'set' if self._auth else 'none'})"

    def _request(self, method: str, path: str, **kw: Any) -> requests.Response:
        try:
            r = requests.request(method, f"{self.url}{path}", auth=self._auth, timeout=self.timeout, **kw)
        except requests.RequestException as err:
            raise PacsError(f"PACS {self.shown_url} unreachable ({type(err).__name__})") from None
        if r.status_code == 401:
            r.close()
            raise PacsError(f"PACS {self.shown_url}: {method} {path} refused the credentials (HTTP 401)")
        if r.status_code >= 400:
            body = self._error_body(r)  # a PACS may echo the request, credentials included
            raise PacsError(f"PACS {self.shown_url}: {method} {path} failed: HTTP {r.status_code} {body}")
        return r

    def _error_body(self, r: requests.Response) -> str:
        """The start of an error answer, redacted *before* it is cut (a cut could leave half a secret), on one
        line; reads at most ERROR_BODY_BYTES of it."""
        raw = b""
        try:
            for chunk in r.iter_content(4096):
                raw += chunk
                if len(raw) >= ERROR_BODY_BYTES:
                    break
        except requests.RequestException:
            pass
        finally:
            r.close()
        text = redact_text(raw[:ERROR_BODY_BYTES].decode("utf-8", errors="replace"))
        return " ".join(text.split())[:ERROR_BODY_SHOWN]

    def _json(self, r: requests.Response, what: str) -> Any:
        """The DICOM JSON answer of ``r`` (empty: None), read up to MAX_JSON_BYTES."""
        raw = bytearray()
        with r:
            try:
                for chunk in r.iter_content(64 << 10):
                    raw += chunk
                    if len(raw) > MAX_JSON_BYTES:
                        raise PacsError(
                            f"PACS {self.shown_url}: {what} answered more than {MAX_JSON_BYTES} bytes of JSON "
                            f"(the cap for one answer); refused"
                        )
            except requests.RequestException as err:
                raise PacsError(f"PACS {self.shown_url}: {what} broke off ({type(err).__name__})") from None
        if not raw.strip():
            return None
        try:
            return json.loads(bytes(raw), parse_constant=_no_constant)
        except RecursionError:
            raise PacsError(f"PACS {self.shown_url}: {what} answered JSON nested too deeply to read; refused") from None
        except ValueError as err:
            start = redact_text(bytes(raw[:4096]).decode("utf-8", errors="replace"))[:60]  # redacted, then cut
            raise PacsError(
                f"PACS {self.shown_url}: {what} answered something that is not JSON ({err.msg} at byte {err.pos}; "
                f"starts {start!r})"
                if isinstance(err, json.JSONDecodeError)
                else f"PACS {self.shown_url}: {what} answered something that is not JSON ({type(err).__name__})"
            ) from None

    def _json_list(self, r: requests.Response, what: str) -> list[dict[str, Any]]:
        data = self._json(r, what)
        if data is None:
            return []
        if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
            raise PacsError(
                f"PACS {self.shown_url}: {what} answered JSON that is not a list of DICOM JSON objects "
                f"({type(data).__name__})"
            )
        return data

    @staticmethod
    def _series_path(study_uid: str, series_uid: str) -> str:
        """The WADO-RS path of a series; UIDs from the PACS are checked before they become a URL path."""
        return (
            f"/studies/{check_uid(study_uid, 'StudyInstanceUID')}/series/{check_uid(series_uid, 'SeriesInstanceUID')}"
        )

    # -- QIDO-RS

    def find_series(self, modality: str | None = None, study_date: str | None = None) -> list[SeriesInfo]:
        """Series matching the filters (``study_date``: DICOM range, e.g. ``20260101-``), paged.

        Asks ``limit=page_size`` results at a time and goes on at ``offset`` + what came back until a page is
        empty (a page shorter than the limit is not taken as the end: a server that caps its results silently
        answers short pages). A server that answers more than the limit does not page: that answer is all of it.
        A page that brings no series not seen before (a server that ignores ``offset`` and repeats itself) ends
        the search with a :class:`PacsError`, as do more than ``max_results`` series or ``max_pages`` requests:
        nothing is dropped silently and nothing loops forever. A series seen twice (the PACS changed between two
        pages) is listed once."""
        fields = ("SeriesDescription", "StudyDate", "PatientID", "NumberOfSeriesRelatedInstances")
        params: list[tuple[str, str]] = [("includefield", TAGS[k]) for k in fields]
        if modality:
            params.append(("Modality", modality))
        if study_date:
            params.append(("StudyDate", study_date))
        limit, offset = self.page_size, 0
        found: dict[str, SeriesInfo] = {}
        for page_no in range(1, self.max_pages + 1):
            what = f"QIDO-RS /series (page {page_no}, offset {offset}, limit {limit})"
            r = self._request("GET", "/series", params=[*params, ("limit", str(limit)), ("offset", str(offset))],
                              headers={"Accept": "application/dicom+json"}, stream=True)  # fmt: skip
            page = [series_info(it) for it in self._json_list(r, what)]
            if not page:
                return list(found.values())
            new = [s for s in page if s.series_uid not in found]
            if not new:  # QIDO-RS servers shall support offset; one that does not cannot be paged
                raise PacsError(
                    f"PACS {self.shown_url}: {what} repeated {len(page)} series of earlier pages and brought no new "
                    f"one; the server does not page with offset, so results after the first {len(found)} cannot be "
                    "reached; refusing to loop (search with a narrower --study-date or --modality)"
                )
            for s in new:
                found[s.series_uid] = s
            if len(found) > self.max_results:
                raise PacsError(
                    f"PACS {self.shown_url}: {what}: more than {self.max_results} series match, above the cap for one "
                    "search; narrow it (--study-date, --modality)"
                )
            if len(page) > limit:  # the server ignores limit: this was its whole answer
                return list(found.values())
            offset += len(page)
        raise PacsError(
            f"PACS {self.shown_url}: QIDO-RS /series still answered series after {self.max_pages} pages "
            f"({len(found)} series, page size {limit}), the cap for one search; refusing to page further "
            f"(raise {PAGE_SIZE_SETTING} or narrow the search)"
        )

    def series_metadata(self, study_uid: str, series_uid: str) -> list[dict[str, Any]]:
        """DICOM JSON metadata of every instance of a series (WADO-RS metadata)."""
        path = self._series_path(study_uid, series_uid)
        r = self._request("GET", f"{path}/metadata", headers={"Accept": "application/dicom+json"}, stream=True)
        return self._json_list(r, f"WADO-RS metadata of series {series_uid}")

    # -- WADO-RS

    def fetch_series(self, study_uid: str, series_uid: str, dest: str | os.PathLike[str]) -> list[Path]:
        """Every instance of a series as ``.dcm`` files in ``dest``, streamed to disk one instance at a time
        (WADO-RS multipart read as it arrives: memory does not grow with the series)."""
        path = self._series_path(study_uid, series_uid)  # checked before anything is created
        out = Path(dest)
        out.mkdir(parents=True, exist_ok=True)
        r = self._request("GET", path, stream=True,
                          headers={"Accept": 'multipart/related; type="application/dicom"'})  # fmt: skip
        with r:
            try:
                files = write_multipart(r.iter_content(CHUNK_BYTES), r.headers.get("Content-Type", ""), out)
            except requests.RequestException as err:
                raise PacsError(
                    f"PACS {self.shown_url}: series {series_uid} broke off ({type(err).__name__})"
                ) from None
        if not files:
            raise PacsError(f"PACS {self.shown_url}: series {series_uid} returned no instances")
        return files

    # -- STOW-RS

    def store(self, files: Sequence[str | os.PathLike[str]], batch: int = 64) -> int:
        """Store DICOM files (STOW-RS); returns how many the PACS accepted (a repeat, Orthanc's AlreadyStored, is
        accepted too). Each request's body is streamed from the files (:class:`StowBody`): memory holds one
        chunk of one file, whatever the batch."""
        accepted = 0
        for i in range(0, len(files), batch):
            body = StowBody(files[i : i + batch])
            headers = {"Content-Type": body.content_type, "Accept": "application/dicom+json"}
            r = self._request("POST", "/studies", data=body, headers=headers, stream=True)
            result = self._json(r, f"STOW-RS of {len(body.files)} instances")
            if result is None:
                result = {}
            if not isinstance(result, dict):
                raise PacsError(f"PACS {self.shown_url}: STOW-RS answered JSON that is not a DICOM JSON object")
            failed = _values(result, "00081198")
            if failed:
                raise PacsError(f"PACS {self.shown_url}: refused {len(failed)} of {len(body.files)} instances")
            accepted += len(_values(result, "00081199"))
        return accepted


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    entry = item.get(tag)
    value = entry.get("Value") if isinstance(entry, dict) else None
    return value if isinstance(value, list) else []
