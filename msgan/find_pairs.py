"""Harvest training pairs from DICOM studies: ``msgan find-pairs``.

A scanner reconstructs one acquisition several ways (kernels, doses, phases) and a site keeps each as a series of
one study. This finds, per study and frame of reference, the one series that matches the ``--source`` patterns
and the one that matches the ``--target`` patterns (:mod:`msgan.io.patterns`: ``Keyword=REGEX``, the whole value,
any case, any value of a multi-valued attribute; several patterns on one side must all match), ingests both to
OME-Zarr under the storage, splits the pairs by patient and writes the pairs manifest (``source,target,split,
patient``) that ``data.source: pairs`` trains on.

The series come from a folder (every file below it; headers only, pixels are read by the ingest) or from a PACS
over DICOMweb (``--pacs``: QIDO-RS search with paging, WADO-RS metadata of the candidates, the streamed WADO-RS
fetch of ``pacs-sync`` for the matched series only; ``--dry-run`` lists what it would fetch and fetches nothing).

Rules:

- a group (PatientID, StudyInstanceUID, FrameOfReferenceUID) gives a pair when exactly one series matches each side
  and they are two series; several on one side: *ambiguous* (listed, skipped); none: *unmatched* (with the reason);
- never across patients: a study whose files name more than one PatientID (or none) is refused whole;
- splits are by patient: ``--validation`` and ``--holdout`` are fractions of the patients, drawn with
  ``numpy.random.default_rng(seed)``; one patient's studies are all in one split; each requested split gets at
  least one patient when there are enough (one more than the requested splits, for training), and it says so when
  there are not;
- volumes are named by checked UIDs (``<storage>/<StudyInstanceUID>/<SeriesInstanceUID>.zarr``, never by a
  description); one that holds the same instances (the same SOP Instance UIDs) is reused, one that holds other
  content is replaced only with ``--replace``, anything msgan did not write never;
- the manifest's ``patient`` column is a pseudonym (HMAC-SHA256 of the PatientID with a secret key kept in
  ``$MSGAN_HOME/pseudonym.key``, first 12 hex digits), never the PatientID; it is written whole (a temporary
  renamed) and an existing manifest is replaced only with ``--replace``;
- a series' attributes are those of its first file (first instance of the PACS's metadata); its files must agree
  on study and frame of reference, or it is refused;
- every file that is not a DICOM image is listed as skipped, never fatal.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import hmac
import io
import math
import os
import secrets
import tempfile
import textwrap
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msgan import storage
from msgan.console import Progress
from msgan.io import outputs, patterns
from msgan.io.patterns import Pattern
from msgan.io.uids import check_uid, shown, uid_problem
from msgan.redact import redact_text

Log = Callable[[str], None]

COLUMNS = ("source", "target", "split", "patient")
SPLITS = ("train", "validation", "holdout")
SIDES = ("source", "target")
DEFAULT_STORAGE = "pairs"  # under MSGAN_HOME
KEY_FILE = "pseudonym.key"  # under MSGAN_HOME: the secret the patient pseudonyms are keyed with
PSEUDONYM_CHARS = 12
# What every series is read for besides the patterns' own keywords.
BASE = (
    "SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "PatientID",
    "Modality", "SeriesDescription", "ImageType", "Rows",
)  # fmt: skip
# What a QIDO-RS result says of a series; a pattern on any other attribute needs the series' metadata.
QIDO_KEYWORDS = ("SeriesDescription", "Modality", "StudyDate", "PatientID", "SeriesInstanceUID", "StudyInstanceUID")


@dataclass
class Series:
    """One series as its headers (or the PACS's metadata) describe it."""

    study_uid: str
    series_uid: str
    frame_uid: str | None  # "" when the series has none; None: not looked at (a PACS series that matches no side)
    patient_id: str = field(repr=False)  # in memory only: never written, never shown
    modality: str = ""
    description: str = ""
    values: dict[str, list[str]] = field(default_factory=dict, repr=False)
    instances: list[str] = field(default_factory=list, repr=False)  # SOP Instance UIDs the ingest keeps
    count: int = 0  # files (or PACS instances)
    files: list[Path] = field(default_factory=list, repr=False)  # a folder's series: its own files
    problem: str | None = None  # why it cannot be used
    patients: set[str] = field(default_factory=set, repr=False)  # every PatientID its instances name

    @property
    def label(self) -> str:
        return f"{self.series_uid} {_clean(self.description)!r}"


@dataclass
class Pair:
    study_uid: str
    frame_uid: str
    source: Series
    target: Series
    patient_id: str = field(repr=False)
    source_uri: str = ""
    target_uri: str = ""
    split: str = "train"
    patient: str = ""  # the pseudonym
    error: str | None = None  # why it could not be ingested


@dataclass
class Outcome:
    """What became of one group (study and frame of reference): paired, ambiguous, unmatched, refused, failed."""

    study_uid: str
    frame_uid: str | None
    status: str
    reason: str

    def line(self, several_frames: bool = False) -> str:
        where = f"study {self.study_uid}" + (f" (frame of reference {self.frame_uid or 'none'})" * several_frames)
        return f"  {self.status:<9} {where}: {self.reason}"


@dataclass
class FindResult:
    pairs: list[Pair] = field(default_factory=list)  # the pairs in the manifest (in a dry run: the planned ones)
    failed: list[Pair] = field(default_factory=list)  # matched, but a side could not be fetched or ingested
    outcomes: list[Outcome] = field(default_factory=list)
    skipped_files: dict[str, str] = field(default_factory=dict)  # file -> why it is not part of any series
    notes: list[str] = field(default_factory=list)
    csv: str | None = None  # the manifest written (URI); None in a dry run or without pairs
    storage: str = ""
    ingested: int = 0
    reused: int = 0
    dry_run: bool = False

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    def by_split(self) -> dict[str, tuple[int, int]]:
        """split -> (pairs, patients)."""
        return {
            s: (sum(p.split == s for p in self.pairs), len({p.patient_id for p in self.pairs if p.split == s}))
            for s in SPLITS
        }


def _clean(text: str, most: int = 48) -> str:
    """A value from a file or a PACS as it may stand in a console line: printable ASCII, cut."""
    out = "".join(c if " " <= c <= "~" else "?" for c in str(text))
    return out[:most] + ("..." if len(out) > most else "")


# --------------------------------------------------------------------------------------------------- reading


def _list_files(root: Path) -> list[Path]:
    """Every regular file below ``root`` (a symlink to a file counts; linked folders are not followed)."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            if path.is_file():
                found.append(path)
    return found


def _read_header(path: Path, names: Sequence[str]) -> dict[str, list[str]]:
    """The values of ``names`` in a DICOM file's header (pixels never read, large values deferred); a
    :class:`~msgan.io.dicom.DicomError` saying why the file is not a DICOM image."""
    import pydicom

    from msgan.io.dicom import NOT_IMAGES, DicomError, check_deflated

    try:
        check_deflated(path)  # a deflated file is inflated in bounded pieces and held to the size rules first
        ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size="1 KB")
    except DicomError:
        raise
    except pydicom.errors.InvalidDicomError:
        raise DicomError(f"{path}: not a DICOM file") from None
    except Exception as err:  # truncated or malformed headers raise anything
        raise DicomError(f"{path}: unreadable DICOM header ({type(err).__name__})") from None
    values = patterns.dataset_values(ds, names)
    sop_class = next(iter(values.get("SOPClassUID", [])), "")
    if sop_class in NOT_IMAGES:
        raise DicomError(f"{path}: {NOT_IMAGES[sop_class]}, not an image")
    if "Rows" not in values:
        raise DicomError(f"{path}: not an image (no Rows: a report, presentation state or other non-image object)")
    if not values.get("SeriesInstanceUID"):
        raise DicomError(f"{path}: no SeriesInstanceUID; it belongs to no series")
    return values


def _one(values: Mapping[str, list[str]], key: str) -> str:
    got = values.get(key) or [""]
    return got[0]


def _localizer(values: Mapping[str, list[str]]) -> bool:
    return "LOCALIZER" in [v.upper() for v in values.get("ImageType", [])]


def _series_from(uid: str, members: list[tuple[Path | None, dict[str, list[str]]]]) -> Series:
    """A series from its instances' values (files or PACS metadata), its attributes those of the first; ``problem``
    set when its UIDs are not DICOM UIDs or its instances disagree on study or frame of reference (the patients
    they name are kept in ``patients``: a study that names two is refused whole)."""
    first = members[0][1]
    s = Series(
        study_uid=_one(first, "StudyInstanceUID"),
        series_uid=uid,
        frame_uid=_one(first, "FrameOfReferenceUID"),
        patient_id=_one(first, "PatientID"),
        modality=_one(first, "Modality"),
        description=_one(first, "SeriesDescription"),
        values=dict(first),
        instances=sorted({_one(v, "SOPInstanceUID") for _, v in members if not _localizer(v)}),
        count=len(members),
        files=[p for p, _ in members if p is not None],
        patients={_one(v, "PatientID") for _, v in members},
    )
    problems = []
    for key in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        value = uid if key == "SeriesInstanceUID" else _one(first, key)
        if key == "FrameOfReferenceUID" and not value:
            continue
        if (why := uid_problem(value)) is not None:
            problems.append(f"{key} {shown(value)} is not a valid DICOM UID ({why})")
    bad_sop = [_one(v, "SOPInstanceUID") for _, v in members if uid_problem(_one(v, "SOPInstanceUID"))]
    if bad_sop:
        problems.append(f"{len(bad_sop)} instance(s) without a valid SOPInstanceUID (e.g. {shown(bad_sop[0])})")
    for key, what in (("StudyInstanceUID", "studies"), ("FrameOfReferenceUID", "frames of reference")):
        seen = {_one(v, key) for _, v in members}
        if len(seen) > 1:
            problems.append(f"its instances name {len(seen)} {what} ({key} differs)")
    if len(first.get("PatientID", [])) > 1:
        problems.append("PatientID holds several values")
    if problems:
        s.problem = "; ".join(problems)
        # what stands in console lines and grouping keys is printable: an invalid UID is shown, never echoed
        s.study_uid, s.series_uid = shown(s.study_uid), shown(s.series_uid)
        s.frame_uid = shown(s.frame_uid) if s.frame_uid else s.frame_uid
    return s


def read_folder(
    root: str | os.PathLike[str], names: Sequence[str], progress: Progress | None = None
) -> tuple[list[Series], dict[str, str]]:
    """Every series below ``root`` from its files' headers, and the files that are not DICOM images (with why)."""
    from msgan.io.dicom import DicomError

    folder = Path(root)
    if not folder.is_dir():
        raise DicomError(f"{root}: no such folder (DICOM_DIR is a folder of DICOM studies)")
    files = _list_files(folder)
    if not files:
        raise DicomError(f"{root}: no files below it")
    wanted = list(dict.fromkeys([*BASE, *names]))
    skipped: dict[str, str] = {}
    groups: dict[str, list[tuple[Path | None, dict[str, list[str]]]]] = defaultdict(list)
    if progress is not None:
        progress.add("headers", "reading headers", len(files), unit="files")
    for k, path in enumerate(files, 1):
        try:
            values = _read_header(path, wanted)
        except DicomError as err:
            skipped[str(path)] = str(err)
        else:
            groups[_one(values, "SeriesInstanceUID")].append((path, values))
        if progress is not None:
            progress.update("headers", k)
    return [_series_from(uid, members) for uid, members in groups.items()], skipped


def _may_match(side: Sequence[Pattern], qido: Mapping[str, str]) -> bool:
    """Whether a series may match ``side``: no pattern on what QIDO-RS told already fails."""
    return all(p.matches(qido) for p in side if p.keyword in QIDO_KEYWORDS)


def read_pacs(
    client: Any,
    source: Sequence[Pattern],
    target: Sequence[Pattern],
    modality: str | None = None,
    study_date: str | None = None,
    progress: Progress | None = None,
) -> tuple[list[Series], dict[str, str]]:
    """Every series the PACS finds (QIDO-RS, paged); the metadata (WADO-RS) of those that may match a side, in
    one request per series. Series that cannot match a side by what QIDO-RS told are kept without their frame of
    reference (``frame_uid`` None): nothing more is asked of them."""
    from msgan.io.pacs import PacsError

    found = client.find_series(modality, study_date)
    wanted = list(dict.fromkeys([*BASE, *patterns.keywords([*source, *target])]))
    series: list[Series] = []
    ignored: dict[str, str] = {}
    candidates = []
    for s in found:
        pid = s.patient_id.strip(" \x00")
        bad = [f"{k} {shown(v)} is not a valid DICOM UID ({why})"
               for k, v in (("SeriesInstanceUID", s.series_uid), ("StudyInstanceUID", s.study_uid))
               if (why := uid_problem(v))]  # fmt: skip
        if bad:  # it names no request, folder or file
            series.append(Series(shown(s.study_uid), shown(s.series_uid), "", pid, s.modality,
                                 s.description, problem="; ".join(bad)))  # fmt: skip
            continue
        if s.description.startswith("msgan "):
            ignored[s.series_uid] = "an msgan output (a translation), never a training image"
            continue
        qido = s.values()
        if _may_match(source, qido) or _may_match(target, qido):
            candidates.append(s)
        else:
            series.append(Series(s.study_uid, s.series_uid, None, pid, s.modality, s.description,
                                 values={k: [v] for k, v in qido.items()}, count=s.instances or 0))  # fmt: skip
    if progress is not None and candidates:
        progress.add("metadata", "reading series metadata", len(candidates), unit="series")
    for k, s in enumerate(candidates, 1):
        try:
            meta = client.series_metadata(s.study_uid, s.series_uid)
        except (PacsError, ValueError) as err:  # this series only: the others are still paired
            meta, why = [], f"its metadata could not be read ({err})"
        else:
            why = "the PACS answered no instance metadata"
        members: list[tuple[Path | None, dict[str, list[str]]]] = [(None, patterns.json_values(m, wanted))
                                                                   for m in meta]  # fmt: skip
        if not members:
            series.append(Series(s.study_uid, s.series_uid, "", s.patient_id.strip(" \x00"), s.modality,
                                 s.description, problem=why))  # fmt: skip
        else:
            got = _series_from(s.series_uid, members)
            told = s.patient_id.strip(" \x00")
            if got.study_uid != s.study_uid or (told and got.patient_id != told):
                got.problem = (got.problem + "; " if got.problem else "") + (
                    "its metadata names another study or patient than the search answered"
                )
                got.study_uid = s.study_uid
            series.append(got)
        if progress is not None:
            progress.update("metadata", k)
    return series, ignored


# --------------------------------------------------------------------------------------------------- matching


def _listed(series: Sequence[Series], most: int = 4) -> str:
    more = f", and {len(series) - most} more" if len(series) > most else ""
    return ", ".join(s.label for s in series[:most]) + more


def match(
    series: Sequence[Series], source: Sequence[Pattern], target: Sequence[Pattern]
) -> tuple[list[Pair], list[Outcome]]:
    """Pairs per (patient, study, frame of reference), and what became of every group."""
    pairs: list[Pair] = []
    outcomes: list[Outcome] = []
    studies: dict[str, list[Series]] = defaultdict(list)
    for s in series:
        studies[s.study_uid].append(s)
    for study_uid in sorted(studies):
        members = studies[study_uid]
        patients = set().union(*(s.patients or {s.patient_id} for s in members))
        if len(patients) > 1:
            outcomes.append(Outcome(study_uid, None, "refused",
                                    f"its files name {len(patients)} different patients (PatientID); a study is one "
                                    "patient and a pair never spans two: the whole study is skipped"))  # fmt: skip
            continue
        for s in members:
            if s.problem:
                outcomes.append(Outcome(study_uid, s.frame_uid, "refused", f"series {s.label}: {s.problem}"))
        usable = [s for s in members if not s.problem]
        if not usable:
            continue
        if patients == {""}:
            outcomes.append(Outcome(study_uid, None, "refused",
                                    "no PatientID: its patient could not be kept to one split; skipped"))  # fmt: skip
            continue
        groups: dict[str, list[Series]] = defaultdict(list)
        for s in usable:
            if s.frame_uid is not None:
                groups[s.frame_uid].append(s)
        if not groups:  # a PACS study none of whose series may match a side
            outcomes.append(Outcome(study_uid, None, "unmatched",
                                    f"no series matches --source or --target ({len(usable)} series)"))  # fmt: skip
            continue
        for frame in sorted(groups):
            pair, outcome = _match_group(study_uid, frame, groups[frame], source, target)
            outcomes.append(outcome)
            if pair is not None:
                pairs.append(pair)
    return pairs, outcomes


def _match_group(
    study_uid: str, frame: str, group: list[Series], source: Sequence[Pattern], target: Sequence[Pattern]
) -> tuple[Pair | None, Outcome]:
    src = [s for s in group if patterns.matches_all(source, s.values)]
    tgt = [s for s in group if patterns.matches_all(target, s.values)]

    def out(status: str, reason: str) -> tuple[None, Outcome]:
        return None, Outcome(study_uid, frame, status, reason)

    if not src or not tgt:
        sides = [n for n, found in (("--source", src), ("--target", tgt)) if not found]
        what = " or ".join(f"{n} {patterns.describe_all(source if n == '--source' else target)}" for n in sides)
        return out("unmatched", f"no series matches {what} (of {len(group)}: {_listed(group)})")
    if len(src) > 1 or len(tgt) > 1:
        many = [(n, f) for n, f in (("--source", src), ("--target", tgt)) if len(f) > 1]
        what = "; ".join(f"{len(f)} series match {n}: {_listed(f)}" for n, f in many)
        return out("ambiguous", f"{what}; skipped (make the patterns narrower)")
    s, t = src[0], tgt[0]
    if s is t:
        return out("unmatched", f"the one series matching both --source and --target is {s.label}; a pair is two "
                                "series")  # fmt: skip
    if s.modality != t.modality:
        return out("unmatched", f"source {s.label} is {_clean(s.modality) or 'of no modality'}, target {t.label} "
                                f"{_clean(t.modality) or 'of no modality'}; a pair has one modality")  # fmt: skip
    pair = Pair(study_uid, frame, s, t, s.patient_id)
    return pair, Outcome(study_uid, frame, "paired", f"source {s.label} ({s.count}) -> target {t.label} ({t.count})")


# --------------------------------------------------------------------------------------------------- splits


def _check_fractions(validation: float, holdout: float) -> None:
    for name, value in (("--validation", validation), ("--holdout", holdout)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value < 1.0):
            raise ValueError(f"{name} {value}: a fraction of the patients, from 0 up to (not including) 1")
    if validation + holdout >= 1.0:
        raise ValueError(
            f"--validation {validation} + --holdout {holdout} = {validation + holdout:g}: leaves no patient for "
            "training; their sum must stay below 1"
        )


def split_patients(
    patients: Iterable[str], validation: float = 0.0, holdout: float = 0.0, seed: int = 0
) -> tuple[dict[str, str], list[str]]:
    """Each patient's split, and notes on what could not be honoured. ``validation`` and ``holdout`` are fractions
    of the patients (rounded; at least one patient for each requested split while one is left for training, the
    holdout first when there are too few for all), drawn with ``numpy.random.default_rng(seed)`` from the patients
    in sorted order: the same patients and seed give the same splits."""
    import numpy as np

    _check_fractions(validation, holdout)
    ids = sorted(set(patients))
    n = len(ids)
    requested = [(name, frac) for name, frac in (("validation", validation), ("holdout", holdout)) if frac > 0]
    counts = {name: max(1, math.floor(frac * n + 0.5)) for name, frac in requested}
    notes = []
    while sum(counts.values()) > max(0, n - 1):  # keep one patient for training: take from the largest split
        largest = max(counts, key=lambda k: (counts[k], k == "validation"))  # a tie: holdout keeps its patient
        counts[largest] -= 1
    for name, frac in requested:
        if counts[name] == 0:
            notes.append(
                f"{name}: no patient ({n} patient{'s' * (n != 1)} with pairs; {len(requested) + 1} are needed for "
                f"training plus one per requested split), so --{name} {frac:g} gives none"
            )
    order = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    splits: dict[str, str] = {}
    at = 0
    for name in ("holdout", "validation"):
        for pid in order[at : at + counts.get(name, 0)]:
            splits[pid] = name
        at += counts.get(name, 0)
    for pid in order[at:]:
        splits[pid] = "train"
    return splits, notes


def pseudonym_key(path: str | os.PathLike[str] | None = None, create: bool = True) -> bytes:
    """The secret the patient pseudonyms are keyed with (``$MSGAN_HOME/pseudonym.key``, made on first use,
    readable by its owner only): without it a pseudonym cannot be turned back into a PatientID by trying IDs."""
    from msgan.settings import home

    where = Path(path) if path is not None else home() / KEY_FILE
    if create and not where.exists() and not where.is_symlink():
        where.parent.mkdir(parents=True, exist_ok=True)
        # written whole under a private name, then linked into place: a second process never reads it half-written
        tmp = where.with_name(f".{where.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, where)
        except FileExistsError:
            pass  # made by another process meanwhile: read that one
        finally:
            tmp.unlink()
    if path is None and where.exists() and not where.is_symlink():
        st = where.stat()  # the default key: its owner's alone (an explicit --pseudonym-key is the user's choice)
        if st.st_mode & 0o077 or st.st_uid != os.geteuid():
            raise ValueError(
                f"{where}: the pseudonym key must belong to you and be readable by you alone (chmod 600 {where}): "
                f"anyone who can read it can turn pseudonyms back into PatientIDs"
            )
    try:
        text = storage.read_local_small(where, limit=1024).decode("ascii", errors="replace").strip()
    except OSError as err:
        raise ValueError(f"{where}: the pseudonym key cannot be read ({err.strerror or err})") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise ValueError(f"{where}: not a pseudonym key (expected at least 32 hexadecimal digits on one line)")
    return key


def pseudonym(patient_id: str, key: bytes) -> str:
    """The ``patient`` column: the first 12 hex digits of HMAC-SHA256(key, PatientID)."""
    return hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:PSEUDONYM_CHARS]


# --------------------------------------------------------------------------------------------------- volumes


def volume_uri(root: str, s: Series) -> str:
    """Where a series' volume goes: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>.zarr`` (checked UIDs)."""
    return storage.join(root, check_uid(s.study_uid, "StudyInstanceUID"),
                        f"{check_uid(s.series_uid, 'SeriesInstanceUID')}.zarr")  # fmt: skip


def existing(uri: str, s: Series) -> str:
    """What is at ``uri`` for series ``s``: ``absent``, ``same`` (an msgan volume of this series holding the same
    instances), ``other`` (an msgan volume of other content) or ``foreign`` (anything msgan did not write)."""
    from msgan.io.volume import VolumeError, open_group

    if not outputs.exists(uri):
        return "absent"
    if not outputs.is_msgan_volume(uri):
        return "foreign"
    try:
        meta = open_group(uri, "r").attrs.get("msgan")
    except (VolumeError, OSError):
        return "foreign"
    ids = meta.get("dicom") if isinstance(meta, dict) else None
    if not isinstance(ids, dict):
        return "other"
    kept = ids.get("SourceInstances")
    same = (
        ids.get("SeriesInstanceUID") == s.series_uid
        and isinstance(kept, list)
        and sorted({str(x) for x in kept}) == s.instances
    )
    return "same" if same else "other"


def _ingest_side(s: Series, uri: str, replace: bool, client: Any) -> None:
    """Fetch (PACS) or link (folder) the series' own files into a temporary folder and ingest them to ``uri``."""
    from msgan.io.convert import ingest

    with tempfile.TemporaryDirectory(prefix="msgan-pairs-") as tmp:
        if client is not None:
            client.fetch_series(s.study_uid, s.series_uid, tmp)
        else:  # a study folder mixes series: the ingest sees this series' files only
            for k, f in enumerate(s.files):
                os.symlink(os.path.abspath(f), Path(tmp) / f"{k:06d}.dcm")
        _keep_own_instances(Path(tmp), s)
        report = ingest(tmp, uri, replace=replace)
    if s.series_uid not in report.written:
        why = report.errors.get(s.series_uid) or "; ".join(report.errors.values()) or "no image series in its files"
        raise ValueError(why)
    if storage.normalize_uri(report.written[s.series_uid]) != storage.normalize_uri(uri):
        raise ValueError(f"its volume was written to {report.written[s.series_uid]}, not {uri}")


def _keep_own_instances(folder: Path, s: Series) -> None:
    """Only the instances the search found stay for the ingest: a file of another series, or an instance the
    search did not list (a PACS answering with more than was asked, a folder changed since it was read), is
    dropped, so the ingest writes this one series and nothing else at its place."""
    from msgan.io.dicom import DicomError

    wanted = set(s.instances)
    for f in sorted(folder.iterdir()):
        try:  # the header rules of the search (deflated files held to the size caps first)
            values = _read_header(f, ["SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Rows"])
            series, instance = _one(values, "SeriesInstanceUID"), _one(values, "SOPInstanceUID")
        except DicomError:  # not a DICOM image: the ingest has nothing to take from it
            series, instance = "", ""
        if series != s.series_uid or (wanted and instance not in wanted):
            f.unlink()


# --------------------------------------------------------------------------------------------------- manifest


def _is_manifest(uri: str) -> bool:
    """Whether ``uri`` is a pairs manifest this command wrote (its header line)."""
    try:
        fs, path = storage.filesystem(uri)
        if not fs.isfile(path):
            return False
        with fs.open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    return head.split(b"\n", 1)[0].rstrip(b"\r") == ",".join(COLUMNS).encode()


def check_manifest_output(out: str | os.PathLike[str], inputs: Sequence[str], replace: bool) -> str:
    """The manifest's URI; refused when it exists (without ``--replace``), is not a file msgan may replace, or
    lies in an input (:mod:`msgan.io.outputs`)."""
    uri = outputs.resolve_output(out, inputs)
    outputs.refuse_unless_replace(uri, _is_manifest, replace, "a pairs manifest")
    return uri


def manifest_path(volume: str, csv_dir: Path | None) -> str:
    """A volume as the manifest names it: relative to the manifest's folder when local and below it, an absolute
    path when local elsewhere, an ``s3://`` URI as it is."""
    if storage.is_s3(volume):
        return volume
    path = storage.local_path(volume)
    if csv_dir is not None and csv_dir in path.parents:
        return path.relative_to(csv_dir).as_posix()
    return str(path)


def manifest_text(pairs: Sequence[Pair], csv_uri: str) -> str:
    csv_dir = None if storage.is_s3(csv_uri) else storage.local_path(csv_uri).parent
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    order = {name: k for k, name in enumerate(SPLITS)}
    for p in sorted(pairs, key=lambda p: (order[p.split], p.patient, p.study_uid, p.source.series_uid)):
        w.writerow([manifest_path(p.source_uri, csv_dir), manifest_path(p.target_uri, csv_dir), p.split, p.patient])
    return buf.getvalue()


def write_manifest(pairs: Sequence[Pair], csv_uri: str, replace: bool) -> None:
    """The manifest, whole or not at all (a temporary renamed; an S3 put); an existing one only with ``replace``."""
    text = manifest_text(pairs, csv_uri)
    if storage.is_s3(csv_uri):
        storage.write_text(csv_uri, text)
        return
    with storage.staged_file(storage.local_path(csv_uri), replace=replace) as tmp:
        tmp.write_text(text)


# --------------------------------------------------------------------------------------------------- the command


def find_pairs(
    dicom_dir: str | os.PathLike[str] | None,
    source: Sequence[str | Pattern],
    target: Sequence[str | Pattern],
    *,
    out: str | os.PathLike[str] | None = None,
    storage_uri: str | None = None,
    validation: float = 0.0,
    holdout: float = 0.0,
    seed: int = 0,
    replace: bool = False,
    dry_run: bool = False,
    client: Any = None,
    modality: str | None = None,
    study_date: str | None = None,
    key_file: str | os.PathLike[str] | None = None,
    log: Log = print,
    progress: Progress | None = None,
) -> FindResult:
    """Find, ingest and split the pairs of a DICOM folder (``dicom_dir``) or of a PACS (``client``, a
    :class:`~msgan.io.pacs.DicomWebClient`), and write the manifest ``out``; ``dry_run``: list what would be
    ingested (fetched) and write (fetch) nothing. Every refusal of the arguments comes before any work."""
    from msgan.io.dicom import DicomError

    say: Log = (lambda line: log(redact_text(line))) if client is not None else log
    if (dicom_dir is None) == (client is None):
        raise ValueError("find-pairs: give a DICOM folder or --pacs (one of them)")
    src, tgt = patterns.parse_all(source), patterns.parse_all(target)
    if not src or not tgt:
        raise ValueError("find-pairs: give at least one --source and one --target pattern (KEYWORD=REGEX)")
    _check_fractions(validation, holdout)
    inputs = [str(dicom_dir)] if dicom_dir is not None else []
    if dicom_dir is not None and not Path(dicom_dir).is_dir():
        raise DicomError(f"{dicom_dir}: no such folder (DICOM_DIR is a folder of DICOM studies)")
    root = outputs.resolve_output(storage.resolve_storage(storage_uri or DEFAULT_STORAGE), inputs)
    if out is None and not dry_run:
        raise ValueError("find-pairs: --out PAIRS.csv is needed (it may be left out with --dry-run only)")
    if out is not None and storage.is_s3(str(out)) and not storage.is_s3(root):
        raise ValueError(
            f"find-pairs: --out {out} is in the object store but --storage {root} is local: a manifest from the "
            "object store may not name local files (msgan.data.pairs refuses them); give an s3:// --storage too"
        )
    csv_uri = check_manifest_output(out, inputs, replace) if out is not None else None
    key = pseudonym_key(key_file) if csv_uri is not None and not dry_run else b""
    result = FindResult(storage=root, dry_run=dry_run)

    if client is not None:
        series, ignored = read_pacs(client, src, tgt, modality, study_date, progress)
        if ignored:
            result.notes.append(f"{len(ignored)} msgan output series in the PACS left out (translations)")
    else:
        assert dicom_dir is not None
        series, result.skipped_files = read_folder(dicom_dir, patterns.keywords([*src, *tgt]), progress)
    if progress is not None:
        progress.close()
    pairs, result.outcomes = match(series, src, tgt)
    frames: dict[str, set[str | None]] = defaultdict(set)
    for o in result.outcomes:
        frames[o.study_uid].add(o.frame_uid)
    for o in result.outcomes:
        say(o.line(len(frames[o.study_uid]) > 1))
    found_notes = list(result.notes)
    result.notes = found_notes + _assign_splits(pairs, validation, holdout, seed)
    todo: list[tuple[Pair, Series, str, str]] = []  # (pair, side, its volume, what is there now)
    for p in pairs:
        p.source_uri, p.target_uri = volume_uri(root, p.source), volume_uri(root, p.target)
        todo += [(p, s, uri, existing(uri, s)) for s, uri in ((p.source, p.source_uri), (p.target, p.target_uri))]

    if dry_run:
        _list_plan(todo, client is not None, replace, say)
        result.pairs = pairs
        _summary(result, say)
        return result

    _ingest_all(todo, client, replace, progress, result)
    result.pairs = [p for p in pairs if p.error is None]
    for p in pairs:
        if p.error is not None:
            result.failed.append(p)
            result.outcomes.append(Outcome(p.study_uid, p.frame_uid, "failed", p.error))
            say(f"  failed    study {p.study_uid}: {p.error}")
    if result.failed:  # drawn again over the patients whose pairs are in the manifest
        result.notes = found_notes + _assign_splits(result.pairs, validation, holdout, seed)
    if result.pairs and csv_uri is not None:
        for p in result.pairs:
            p.patient = pseudonym(p.patient_id, key)
        write_manifest(result.pairs, csv_uri, replace)
        result.csv = csv_uri
    _summary(result, say)
    return result


def _assign_splits(pairs: Sequence[Pair], validation: float, holdout: float, seed: int) -> list[str]:
    splits, notes = split_patients([p.patient_id for p in pairs], validation, holdout, seed)
    for p in pairs:
        p.split = splits[p.patient_id]
    return notes


def _list_plan(todo: Sequence[tuple[Pair, Series, str, str]], pacs: bool, replace: bool, say: Log) -> None:
    """A dry run's list: per side of every pair, what would be fetched (ingested), or why not."""
    verb, unit = ("fetch", "instances") if pacs else ("ingest", "files")
    for p, s, uri, there in todo:
        side = "source" if s is p.source else "target"
        head = f"study {p.study_uid} series {s.series_uid} ({side}, {s.count} {unit}, {p.split})"
        if there == "same":
            say(f"  already there    {head}: {_shown(uri)}")
        elif there == "absent" or (there == "other" and replace):
            say(f"  would {verb:<10} {head} -> {_shown(uri)}")
        else:
            what = "other content (pass --replace)" if there == "other" else "what msgan did not write"
            say(f"  would refuse     {head}: {_shown(uri)} holds {what}")


def _ingest_all(
    todo: Sequence[tuple[Pair, Series, str, str]],
    client: Any,
    replace: bool,
    progress: Progress | None,
    result: FindResult,
) -> None:
    """Ingest (fetch first, from a PACS) every side not there yet; a pair whose side fails gets its ``error``."""
    from msgan.io.dicom import DicomError
    from msgan.io.pacs import PacsError

    work = [t for t in todo if t[3] != "same"]
    result.reused = len(todo) - len(work)
    if progress is not None and work:
        progress.add("ingest", "fetching and ingesting" if client is not None else "ingesting", len(work), "series")
    for k, (p, s, uri, there) in enumerate(work, 1):
        if p.error is not None:
            pass  # its other side failed already
        elif there == "foreign":
            p.error = f"{uri}: exists and is not a volume msgan wrote; it is never replaced (move it away)"
        elif there == "other" and not replace:
            p.error = (
                f"{uri}: an msgan volume of other content (other instances) is there; pass --replace to replace it"
            )
        else:
            try:
                _ingest_side(s, uri, there == "other", client)
                result.ingested += 1
            except (DicomError, PacsError, ValueError, OSError) as err:
                p.error = redact_text(f"series {s.series_uid}: {err}")
        if progress is not None:
            progress.update("ingest", k)
    if progress is not None:
        progress.close()


def _shown(uri: str) -> str:
    """A URI as the console shows it: a local path as a path."""
    return uri if storage.is_s3(uri) else str(storage.local_path(uri))


def _summary(result: FindResult, say: Log) -> None:
    splits = result.by_split()
    parts = [f"{name} {n} ({k} patient{'s' * (k != 1)})" for name, (n, k) in splits.items()]
    patients = len({p.patient_id for p in result.pairs})
    head = "would pair" if result.dry_run else "paired"
    others = ", ".join(
        f"{result.count(s)} {s}" for s in ("ambiguous", "unmatched", "refused", "failed") if result.count(s)
    )
    say(f"find-pairs: {head} {len(result.pairs)} (of {patients} patient{'s' * (patients != 1)}): {', '.join(parts)}"
        + (f"; {others}" if others else ""))  # fmt: skip
    for note in result.notes:
        say(f"  note: {note}")
    if result.skipped_files:
        items = sorted(result.skipped_files.items())
        say(f"  {len(items)} file(s) skipped (not DICOM images):")
        for path, why in items[:10]:
            say(f"    {why}" if why.startswith(path) else f"    {path}: {why}")
        if len(items) > 10:
            say(f"    ... and {len(items) - 10} more")
    if result.dry_run:
        say("  dry run: nothing fetched, ingested or written")
        return
    if result.pairs or result.reused or result.ingested:
        say(
            f"  volumes under {_shown(result.storage)}: {result.ingested} ingested, {result.reused} reused "
            "(same instances)"
        )
    if result.csv:
        say(f"  wrote {_shown(result.csv)} ({len(result.pairs)} pairs)")
    elif not result.pairs:
        say("  no pairs: no manifest written")


# --------------------------------------------------------------------------------------------------- the CLI

DESCRIPTION = (
    "Find (source, target) series pairs in DICOM studies (a folder, or a PACS with --pacs), ingest them to "
    "OME-Zarr and write the pairs manifest (source,target,split,patient) that data.source: pairs trains on."
)
EPILOG = f"""{textwrap.fill("pattern syntax (--source, --target): " + patterns.HELP + ".", 100)}

examples:
  msgan find-pairs /data/dicom --source ConvolutionKernel=B70f --target ConvolutionKernel=B30f \\
      --validation 0.1 --holdout 0.2 --out pairs.csv
  msgan find-pairs --pacs --modality CT --source 'SeriesDescription=.*NATIVE.*' \\
      --target 'SeriesDescription=.*ARTERIAL.*' --dry-run

A study gives a pair when exactly one series matches every --source pattern and one other series every
--target pattern (per frame of reference); several matching one side: ambiguous, skipped. Splits are by
patient. The CSV's patient column is a keyed pseudonym ($MSGAN_HOME/{KEY_FILE}), never the PatientID.
With --pacs: MSGAN_PACS_URL, MSGAN_PACS_USER and MSGAN_PACS_PASSWORD, as pacs-sync."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``msgan find-pairs`` options (the pattern syntax in its help)."""
    parser.description = textwrap.fill(DESCRIPTION, 100)
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "dicom_dir",
        nargs="?",
        default=None,
        metavar="DICOM_DIR",
        help="folder of DICOM studies (every file below it; not with --pacs)",
    )
    parser.add_argument(
        "--pacs", action="store_true", help="search the PACS over DICOMweb instead of a folder (MSGAN_PACS_URL, ...)"
    )
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        required=True,
        metavar="KEYWORD=REGEX",
        help="what the source series matches (repeat: all must match)",
    )
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        required=True,
        metavar="KEYWORD=REGEX",
        help="what the target series matches (repeat: all must match)",
    )
    parser.add_argument(
        "--validation",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="fraction of the patients for validation (default 0)",
    )
    parser.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="fraction of the patients held out for the final scoring (default 0)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split by patient (default 0)")
    parser.add_argument(
        "--storage", default=None, help=f"where the volumes go (path or s3://; default $MSGAN_HOME/{DEFAULT_STORAGE})"
    )
    parser.add_argument("--out", default=None, metavar="PAIRS.csv", help="the pairs manifest to write")
    parser.add_argument(
        "--replace",
        action="store_true",
        help="replace an existing manifest, and volumes of the same series with other content "
        "(a volume with the same instances is reused anyway; what msgan did not write, never)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list the pairs and what would be fetched or ingested; fetch and write nothing",
    )
    parser.add_argument("--modality", default=None, help="with --pacs: search only this modality (e.g. CT)")
    parser.add_argument("--study-date", default=None, help="with --pacs: DICOM date range, e.g. 20260101-")
    parser.add_argument(
        "--pseudonym-key",
        default=None,
        metavar="FILE",
        help=f"the secret the patient pseudonyms are keyed with (default $MSGAN_HOME/{KEY_FILE}, "
        "made on first use; share it to get the same pseudonyms elsewhere)",
    )


def run(args: argparse.Namespace) -> int:
    """``msgan find-pairs``: 0 when a manifest was written (or a dry run listed the pairs), 1 when no pair was
    found or some pairs could not be ingested (the manifest then holds the others)."""
    client = None
    if args.pacs:
        if args.dicom_dir is not None:
            raise ValueError(f"find-pairs: give DICOM_DIR ({args.dicom_dir}) or --pacs, not both")
        from msgan.io.pacs import DicomWebClient

        client = DicomWebClient.from_env()
    elif args.dicom_dir is None:
        raise ValueError("find-pairs: give DICOM_DIR (a folder of DICOM studies) or --pacs")
    elif args.modality or args.study_date:
        raise ValueError("find-pairs: --modality and --study-date search a PACS; they go with --pacs")
    result = find_pairs(
        args.dicom_dir,
        args.source,
        args.target,
        out=args.out,
        storage_uri=args.storage,
        validation=args.validation,
        holdout=args.holdout,
        seed=args.seed,
        replace=args.replace,
        dry_run=args.dry_run,
        client=client,
        modality=args.modality,
        study_date=args.study_date,
        key_file=args.pseudonym_key,
        progress=Progress(),
    )
    return 0 if result.pairs and not result.failed else 1


__all__ = [
    "COLUMNS",
    "FindResult",
    "Outcome",
    "Pair",
    "Series",
    "add_arguments",
    "find_pairs",
    "match",
    "pseudonym",
    "pseudonym_key",
    "read_folder",
    "read_pacs",
    "run",
    "split_patients",
]
