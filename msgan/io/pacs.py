"""A PACS over its standard interfaces: DICOMweb QIDO-RS (find), WADO-RS (fetch), STOW-RS (store).

Configured by URL and credentials from the environment (``MSGAN_PACS_URL``, the DICOMweb root,
e.g. ``http://orthanc:8042/dicom-web``; ``MSGAN_PACS_USER``, ``MSGAN_PACS_PASSWORD``).
Credentials never appear in messages, logs or ``repr``.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from msgan.io.uids import check_uid
from msgan.redact import redact_text, redact_uri

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


def _first(item: dict[str, Any], tag: str) -> Any:
    value = item.get(TAGS.get(tag, tag), {}).get("Value")
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


class DicomWebClient:
    def __init__(self, url: str, user: str | None = None, password: str | None = None, timeout: float = 120.0):
        from urllib.parse import unquote, urlsplit

        if not url.startswith(("http://", "https://")):
            raise ValueError(
                f"PACS URL {redact_uri(url)!r}: expected the DICOMweb root, e.g. http://orthanc:8042/dicom-web"
            )
        parts = urlsplit(url)
        if "@" in parts.netloc:  # user:password@ in the URL: used as credentials, never kept in the URL we show
            user = user or unquote(parts.username or "") or None
            password = password if password is not None else unquote(parts.password or "")
            url = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
        self.url = url.rstrip("/")
        self.shown_url = redact_uri(self.url)  # what messages and repr show (a ?token=... query is masked)
        self._auth = (user, password or "") if user else None
        self.timeout = timeout

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
            raise PacsError(f"PACS {self.shown_url}: {method} {path} refused the credentials (HTTP 401)")
        if r.status_code >= 400:
            body = redact_text(r.text[:300])  # a PACS may echo the request
            raise PacsError(f"PACS {self.shown_url}: {method} {path} failed: HTTP {r.status_code} {body}")
        return r

    @staticmethod
    def _series_path(study_uid: str, series_uid: str) -> str:
        """The WADO-RS path of a series; UIDs from the PACS are checked before they become a URL path."""
        return (
            f"/studies/{check_uid(study_uid, 'StudyInstanceUID')}/series/{check_uid(series_uid, 'SeriesInstanceUID')}"
        )

    # -- QIDO-RS

    def find_series(self, modality: str | None = None, study_date: str | None = None) -> list[SeriesInfo]:
        """Series matching the filters (``study_date``: DICOM range, e.g. ``20260101-``)."""
        fields = ("SeriesDescription", "StudyDate", "PatientID", "NumberOfSeriesRelatedInstances")
        params: list[tuple[str, str]] = [("includefield", TAGS[k]) for k in fields]
        if modality:
            params.append(("Modality", modality))
        if study_date:
            params.append(("StudyDate", study_date))
        r = self._request("GET", "/series", params=params, headers={"Accept": "application/dicom+json"})
        items = r.json() if r.content else []
        out = []
        for it in items:
            n = _first(it, "NumberOfSeriesRelatedInstances")
            out.append(
                SeriesInfo(
                    study_uid=str(_first(it, "StudyInstanceUID")),
                    series_uid=str(_first(it, "SeriesInstanceUID")),
                    modality=str(_first(it, "Modality") or ""),
                    description=str(_first(it, "SeriesDescription") or ""),
                    study_date=str(_first(it, "StudyDate") or ""),
                    patient_id=str(_first(it, "PatientID") or ""),
                    instances=int(n) if n is not None else None,
                )
            )
        return out

    def series_metadata(self, study_uid: str, series_uid: str) -> list[dict[str, Any]]:
        """DICOM JSON metadata of every instance of a series (WADO-RS metadata)."""
        path = self._series_path(study_uid, series_uid)
        r = self._request("GET", f"{path}/metadata",
                          headers={"Accept": "application/dicom+json"})  # fmt: skip
        return list(r.json())

    # -- WADO-RS

    def fetch_series(self, study_uid: str, series_uid: str, dest: str | os.PathLike[str]) -> list[Path]:
        """Every instance of a series as ``.dcm`` files in ``dest``, streamed to disk one instance at a time
        (WADO-RS multipart read as it arrives: memory does not grow with the series)."""
        out = Path(dest)
        out.mkdir(parents=True, exist_ok=True)
        r = self._request("GET", self._series_path(study_uid, series_uid), stream=True,
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
        """Store DICOM files (STOW-RS); returns how many the PACS accepted (a repeat is accepted too)."""
        accepted = 0
        for i in range(0, len(files), batch):
            boundary = uuid.uuid4().hex
            sep = b"--" + boundary.encode()
            part_head = b"\r\nContent-Type: application/dicom\r\n\r\n"
            body = b"".join(sep + part_head + Path(f).read_bytes() + b"\r\n" for f in files[i : i + batch])
            body += sep + b"--\r\n"
            headers = {
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": "application/dicom+json",
            }
            r = self._request("POST", "/studies", data=body, headers=headers)
            result = r.json() if r.content else {}
            failed = result.get("00081198", {}).get("Value", [])
            if failed:
                raise PacsError(
                    f"PACS {self.shown_url}: refused {len(failed)} of {len(files[i : i + batch])} instances"
                )
            accepted += len(result.get("00081199", {}).get("Value", []))
        return accepted
