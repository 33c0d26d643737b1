"""One pass of the scheduled translation of PACS exports.

Find series in the PACS that match the filter and were not translated yet (by this model,
or at all), fetch and ingest them, translate them with the Ray Data batch job, export each
result as a derived DICOM series and push it back (and/or write it to an export prefix).
State lives in the object store (``<storage>/pacs-sync/state.json``): which source series
were translated by which model version into which derived series, and which were refused
and why. A rerun translates nothing twice; a new model version re-translates only with
``retranslate``. One bad series never stops the pass: it is reported with its reason.
Running the pass every N minutes is the scheduler's job (a Kubernetes CronJob in infra/).
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msgan import storage
from msgan.io import patterns
from msgan.io.pacs import DicomWebClient, PacsError, SeriesInfo
from msgan.io.uids import is_uid, shown, uid_problem
from msgan.redact import redact_text

Log = Callable[[str], None]


STATE_MAX_BYTES = 512 * 2**20  # the pass state of a large archive (one entry per series) stays far below this


@dataclass(frozen=True)
class SyncConfig:
    model: str  # models:/NAME@ALIAS or a cascade folder
    storage: str = "runs/pacs"  # state, ingested and translated volumes (file:// or s3://)
    modality: str = "CT"
    kernel: str | None = None  # regex searched in ConvolutionKernel (any of its values, case counts), e.g. "B[6-9]0f"
    description: str | None = None  # regex searched in SeriesDescription (case counts)
    match: tuple[str, ...] = ()  # Keyword=REGEX patterns (msgan.io.patterns, as find-pairs): every one must match
    study_date: str | None = None  # DICOM date range, e.g. "20260101-"
    push: bool = True  # store the derived series back into the PACS
    export_prefix: str | None = None  # also write outputs here (local folder)
    export_format: str = "dicom"  # dicom | nifti
    retranslate: bool = False  # translate again series done by another model version
    retry_failed: bool = False  # try again series refused in an earlier pass
    limit: int | None = None  # at most this many series per pass
    inference: dict[str, Any] = field(default_factory=dict)  # overrides, e.g. {"actors": 4}


@dataclass
class SyncReport:
    model: str = ""
    translated: dict[str, str] = field(default_factory=dict)  # source series -> derived series
    skipped: dict[str, str] = field(default_factory=dict)  # source series -> reason (bad input, failure)
    already: int = 0  # matched, but translated in an earlier pass
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"pacs-sync with {redact_text(self.model)}: {len(self.translated)} translated, {self.already} done before, "
            f"{len(self.skipped)} skipped, {self.seconds:.1f}s"
        ]
        # redacted part by part (a reason may quote a PACS's echo of our request; a UID is kept as it is)
        lines += [f"  {_scrub(src)} -> {_scrub(dst)}" for src, dst in self.translated.items()]
        lines += [f"  SKIPPED {_scrub(src)}: {why}" for src, why in self.skipped.items()]  # why: redacted by skip()
        return "\n".join(lines)

    def skip(self, series: str, reason: str) -> str:
        """Record ``series`` as skipped; returns the reason as kept (redacted)."""
        self.skipped[series] = reason = redact_text(reason)
        return reason


def _scrub(data: Any) -> Any:
    """``data`` (JSON) with every string but DICOM UIDs (keys included) redacted."""
    if isinstance(data, str):
        return data if is_uid(data) else redact_text(data)
    if isinstance(data, dict):
        return {_scrub(k): _scrub(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_scrub(v) for v in data]
    return data


class State:
    """The pass's memory, one JSON document in the object store (written whole after each change).

    It never holds a secret in any form: every text recorded goes through :func:`msgan.redact.redact_text`
    (UIDs, checked before they name an entry, are kept as they are: a numeric password must not rewrite one),
    and a state file written before that rule is scrubbed when it is loaded (and so on its next write)."""

    def __init__(self, root: str) -> None:
        self.uri = storage.join(root, "pacs-sync", "state.json")
        self.data: dict[str, Any] = {"series": {}}
        if storage.exists(self.uri):
            try:
                data = json.loads(storage.read_text(self.uri, limit=STATE_MAX_BYTES))
            except ValueError as err:  # not JSON, not UTF-8
                raise ValueError(f"{self.uri}: not a pacs-sync state file ({type(err).__name__}); move it aside "
                                 "to start afresh (every series is then looked at again)") from None  # fmt: skip
            series = data.get("series") if isinstance(data, dict) else None
            if not isinstance(series, dict) or not all(isinstance(e, dict) for e in series.values()):
                raise ValueError(f"{self.uri}: not a pacs-sync state file (it needs a 'series' object of objects); "
                                 "move it aside to start afresh (every series is then looked at again)")  # fmt: skip
            self.data = _scrub(data)

    def entry(self, series_uid: str) -> dict[str, Any] | None:
        e = self.data["series"].get(series_uid)
        return e if isinstance(e, dict) else None

    def derived(self) -> set[str]:
        return {e["derived_series_uid"] for e in self.data["series"].values() if e.get("derived_series_uid")}

    def record(self, series_uid: str, **values: Any) -> None:
        entry = _scrub({**values, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.data["series"][series_uid] = entry
        storage.write_text(self.uri, json.dumps(self.data, indent=1))


# What a QIDO-RS result says of a series (msgan.io.pacs.SeriesInfo); a pattern on anything else needs its metadata.
QIDO_KEYWORDS = ("SeriesDescription", "Modality", "StudyDate", "PatientID", "SeriesInstanceUID", "StudyInstanceUID")


def filters(cfg: SyncConfig) -> list[patterns.Pattern]:
    """The series filter of ``cfg`` as patterns (:mod:`msgan.io.patterns`): ``kernel`` and ``description`` with
    their own rule (searched, case counts), ``match`` in the shared ``Keyword=REGEX`` syntax; a bad one is refused
    (a :class:`~msgan.io.patterns.PatternError` naming it) before anything is asked of the PACS."""
    found = [*patterns.parse_all(cfg.match)]
    if cfg.description:
        found.append(patterns.legacy("SeriesDescription", cfg.description))
    if cfg.kernel:
        found.append(patterns.legacy("ConvolutionKernel", cfg.kernel))
    return found


def _select(cfg: SyncConfig, client: DicomWebClient, state: State, model: str, report: SyncReport) -> list[SeriesInfo]:
    ours = state.derived()
    wanted = filters(cfg)
    early = [p for p in wanted if p.keyword in QIDO_KEYWORDS]
    late = [p for p in wanted if p.keyword not in QIDO_KEYWORDS]
    todo = []
    for s in client.find_series(cfg.modality, cfg.study_date):
        uids = {"SeriesInstanceUID": s.series_uid, "StudyInstanceUID": s.study_uid}
        bad = [f"{k} {shown(v)} is not a valid DICOM UID ({why})" for k, v in uids.items() if (why := uid_problem(v))]
        if bad:  # it names no state entry, folder, key or request: reported on every pass, never fetched
            report.skip(shown(s.series_uid), "refused, nothing fetched or written: " + "; ".join(bad))
            continue
        if s.series_uid in ours or s.description.startswith("msgan "):
            continue  # our own derived series
        if not patterns.matches_all(early, s.values()):
            continue
        done = state.entry(s.series_uid)
        if done is not None:
            if done.get("status") == "translated" and (done.get("model") == model or not cfg.retranslate):
                report.already += 1
                continue
            if done.get("status") == "failed" and not cfg.retry_failed:
                report.already += 1
                continue
        if late:  # the first instance's attributes (WADO-RS metadata); a multi-valued one matches by any value
            try:
                meta = client.series_metadata(s.study_uid, s.series_uid)
                values = patterns.json_values(meta[0], patterns.keywords(late)) if meta else {}
            except PacsError as err:  # this series only: the others are still looked at
                report.skip(s.series_uid, f"study {s.study_uid}: its metadata cannot be read to filter it ({err})")
                continue
            if not patterns.matches_all(late, values):
                continue
        todo.append(s)
        if cfg.limit and len(todo) >= cfg.limit:
            break
    return todo


def _redacting(log: Log) -> Log:
    return lambda line: log(redact_text(line))


def run_once(cfg: SyncConfig, client: DicomWebClient | None = None, log: Log = print) -> SyncReport:
    """One pass: find, ingest, translate, export and push; returns what happened to each series."""
    from msgan.distributed.translate import translate_batch
    from msgan.io.convert import export, ingest
    from msgan.io.dicom import DicomError
    from msgan.volumes.pinning import pin

    t0 = time.perf_counter()
    filters(cfg)  # a bad pattern is refused before the PACS or the model is touched
    log = _redacting(log)  # every line this pass logs, the batch's included
    client = client or DicomWebClient.from_env()
    root = storage.normalize_uri(cfg.storage)
    state = State(root)
    plan = pin(cfg.model, cfg.inference)  # the alias resolved once: state, manifests, every task
    model = plan.model_id
    report = SyncReport(model=model)
    todo = _select(cfg, client, state, model, report)
    log(f"[pacs-sync] {len(todo)} new series to translate with {model} ({report.already} done before)")
    if not todo:
        report.seconds = time.perf_counter() - t0
        return report

    ingested: dict[str, tuple[SeriesInfo, str]] = {}
    for s in todo:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                client.fetch_series(s.study_uid, s.series_uid, tmp)
                result = ingest(tmp, storage.join(root, "pacs-sync", "ingested", f"{s.series_uid}.zarr"), replace=True)
            except (DicomError, PacsError, ValueError) as err:
                state.record(s.series_uid, status="failed", model=model, reason=report.skip(s.series_uid, str(err)))
                continue
        mine = result.written.get(s.series_uid)
        if mine is None:
            reason = result.errors.get(s.series_uid) or "; ".join(result.errors.values()) or "no image series"
            state.record(s.series_uid, status="failed", model=model, reason=report.skip(s.series_uid, reason))
            continue
        ingested[s.series_uid] = (s, mine)
    if not ingested:
        report.seconds = time.perf_counter() - t0
        return report

    out_prefix = storage.join(root, "pacs-sync", "translated", re.sub(r"[^A-Za-z0-9._-]", "_", model))
    batch = translate_batch([u for _, u in ingested.values()], out_prefix, plan, log=log)
    for name, why in batch.failed.items():
        report.skip(name, f"translation failed: {why}")
        state.record(name, status="failed", model=model, reason=why)
    done = {m["volume"] for m in batch.published} | set(batch.skipped)
    for uid in sorted(done & set(ingested)):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                out_dir = Path(cfg.export_prefix) / uid if cfg.export_prefix else Path(tmp) / "series"
                exported = export(storage.join(out_prefix, f"{uid}.zarr"), out_dir, cfg.export_format, replace=True)
                if cfg.push:
                    if cfg.export_format != "dicom":
                        raise ValueError("push needs export_format=dicom")
                    client.store(exported.files)
            except (PacsError, ValueError, OSError) as err:
                report.skip(uid, f"export/push failed: {err}")
                state.record(uid, status="failed", model=model, reason=str(err))
                continue
        report.translated[uid] = str(exported.series_uid or out_dir)
        state.record(uid, status="translated", model=model, derived_series_uid=exported.series_uid)
    report.seconds = time.perf_counter() - t0
    return report
