"""Hostile PACS servers and texts that carry our secrets: nothing leaks in any encoding, nothing is lost or loops.

Every server here is a real HTTP server on loopback (``http.server`` in a thread) that misbehaves on purpose:
it echoes our request (credentials included) in an error body, caps or repeats its QIDO-RS results, never
ends them, or answers garbage. The client, the pass and the redaction are the real ones."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, quote_plus, urlsplit

import pytest
import requests

from msgan.io import pacs
from msgan.io.pacs import DicomWebClient, PacsError
from msgan.redact import redact_text

USER, PASSWORD = "pacs-reader", "s3cr3tPW-7d2!"  # the password needs percent-encoding in a URL
TOKEN = "mlflow-Tok3n-0a9f81"
S3_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzz"  # as AWS keys are: '/' and '+' change under quote and base64
MLFLOW_PW = "mlfl0w Pass/word"  # a space and a slash


def forms(*secrets: str, user: str = USER) -> list[str]:
    """Every form in which a secret could leak: plain, percent-encoded, base64 (alone and as Basic)."""
    out = []
    for s in secrets:
        raw = s.encode()
        out += [s, quote(s, safe=""), quote(s), quote_plus(s), base64.b64encode(raw).decode().rstrip("=")]
        out += [base64.urlsafe_b64encode(raw).decode().rstrip("="), base64.b64encode(f"{user}:{s}".encode()).decode()]
    return sorted(set(out))


def leaks(text: str, *secrets: str, user: str = USER) -> list[str]:
    return [f for f in forms(*secrets, user=user) if f in text]


Route = Callable[[BaseHTTPRequestHandler, str, dict[str, list[str]], bytes], tuple[int, str, bytes]]


@pytest.fixture
def server() -> Iterator[Callable[[Route], str]]:
    """``server(route)`` starts a loopback HTTP server answering every request with ``route(handler, path,
    query, body) -> (status, content type, body)``; returns its DICOMweb root URL."""
    started: list[ThreadingHTTPServer] = []

    def start(route: Route) -> str:
        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                url = urlsplit(self.path)
                status, ctype, out = route(self, url.path, parse_qs(url.query), body)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:  # quiet
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True).start()
        started.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web"

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


def echo(handler: BaseHTTPRequestHandler, path: str, query: dict, body: bytes) -> tuple[int, str, bytes]:
    """HTTP 500 with the request in the body: its credentials first (within the 300 characters an error shows),
    then the request line and every header."""
    text = (
        f"bad request; Authorization: {handler.headers.get('Authorization')}\n{handler.requestline}\n{handler.headers}"
    )
    return 500, "text/plain", text.encode()


def series_json(uid: str, study: str = "1.2.3") -> dict:
    return {"0020000D": {"vr": "UI", "Value": [study]}, "0020000E": {"vr": "UI", "Value": [uid]},
            "00080060": {"vr": "CS", "Value": ["CT"]}}  # fmt: skip


def qido(results: Callable[[int, int], list[dict]]) -> Route:
    """A QIDO-RS /series endpoint answering ``results(limit, offset)``; anything else: 404."""

    def route(handler, path, query, body):
        if not path.endswith("/series"):
            return 404, "text/plain", b"no"
        limit, offset = int(query.get("limit", ["0"])[0]), int(query.get("offset", ["0"])[0])
        return 200, "application/dicom+json", json.dumps(results(limit, offset)).encode()

    return route


UIDS = [f"1.2.826.0.1.3680043.10.1.{k}" for k in range(1, 12)]


# ----------------------------------------------------------------------------- secrets in every form


def test_an_echoed_basic_header_leaks_neither_the_password_nor_its_base64(server):
    """The issue's finding: a server echoing `Authorization: Basic base64(user:password)` in its error body."""
    url = server(echo)
    client = DicomWebClient(url, USER, PASSWORD, timeout=5)
    with pytest.raises(PacsError, match="HTTP 500") as info:
        client.find_series("CT")
    text = str(info.value)
    assert "Authorization: Basic ***" in text and not leaks(text, PASSWORD), text
    assert PASSWORD not in repr(client)


def test_a_percent_encoded_password_in_url_userinfo_leaks_in_no_form(server):
    """user:password@ in MSGAN_PACS_URL, percent-encoded: neither the encoded nor the decoded password, nor the
    Basic header built from it, reaches the error."""
    url = server(echo).replace("http://", f"http://{USER}:{quote(PASSWORD, safe='')}@")
    client = DicomWebClient(url, timeout=5)
    with pytest.raises(PacsError, match="HTTP 500") as info:
        client.series_metadata("1.2.3", "1.2.3.4")
    text = str(info.value) + repr(client) + client.shown_url
    assert not leaks(text, PASSWORD), text
    assert "@" not in client.shown_url


def test_an_echoed_bearer_token_is_masked_known_or_unknown(server, monkeypatch):
    """MLflow's token (MLFLOW_TRACKING_TOKEN, a secret setting) sent as `Authorization: Bearer`, echoed back by
    a server: masked by value in every form, and a bearer token we do not know is masked by position."""
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    url = server(echo)
    for token in (TOKEN, "unknown-Token-5e6f7a8b"):
        r = requests.get(f"{url}/api/2.0/mlflow/experiments/list?token={token}",
                         headers={"Authorization": f"Bearer {token}"}, timeout=5)  # fmt: skip
        assert r.status_code == 500 and token in r.text  # the server did echo it, twice
        text = redact_text(r.text)
        assert "Authorization: Bearer ***" in text and "token=***" in text and token not in text, text
    assert not leaks(redact_text(f"{quote_plus(TOKEN)} {base64.b64encode(TOKEN.encode()).decode()}"), TOKEN)


def test_an_s3_key_in_an_error_text_is_masked_in_the_state_file(tmp_path, monkeypatch):
    """An S3 secret key quoted by a failing library (plain, in a presigned URL, base64'd) in a series' failure
    reason: state.json holds none of it, and a state file written before the rule is scrubbed on load."""
    from msgan.pacs_sync import State, SyncReport
    from msgan.storage import normalize_uri

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_KEY)
    reason = (f"botocore: SignatureDoesNotMatch for key {S3_KEY} "
              f"(https://b.s3/x?X-Amz-Credential=AKIA&sig={quote_plus(S3_KEY)}) "
              f"cfg={base64.b64encode(S3_KEY.encode()).decode()}")  # fmt: skip
    state = State(normalize_uri(tmp_path / "store"))
    state.record(UIDS[0], status="failed", reason=reason)
    written = (tmp_path / "store" / "pacs-sync" / "state.json").read_text()
    assert not leaks(written, S3_KEY) and "SignatureDoesNotMatch" in written, written
    report = SyncReport(model="m")
    report.skip(UIDS[0], reason)
    assert not leaks(report.summary(), S3_KEY)

    old = tmp_path / "old" / "pacs-sync" / "state.json"  # as an earlier version may have left it
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"series": {UIDS[1]: {"status": "failed", "reason": reason}}}))
    again = State(normalize_uri(tmp_path / "old"))
    again.record(UIDS[2], status="translated", derived_series_uid=UIDS[3])
    text = old.read_text()
    assert not leaks(text, S3_KEY) and json.loads(text)["series"][UIDS[2]]["derived_series_uid"] == UIDS[3]


def test_an_mlflow_password_in_a_uri_is_masked_in_every_encoding(monkeypatch):
    """MLFLOW_TRACKING_URI with user:password@ (a space and a slash in the password): the URI, the decoded and
    re-encoded password, and the Basic header MLflow would send are all masked wherever they show up."""
    enc = quote(MLFLOW_PW, safe="")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://mlflow-user:{enc}@mlflow:5000")
    basic = base64.b64encode(f"mlflow-user:{MLFLOW_PW}".encode()).decode()
    text = (f"cannot reach http://mlflow-user:{enc}@mlflow:5000 ({MLFLOW_PW!r}); retried with "
            f"password={quote_plus(MLFLOW_PW)}; sent {{'Authorization': 'Basic {basic}'}}; "
            f"{enc.lower()}")  # fmt: skip
    out = redact_text(text)
    assert not leaks(out, MLFLOW_PW, user="mlflow-user") and enc.lower() not in out, out
    assert "http://***:***@mlflow:5000" in out  # a user name of 8+ characters is masked too


def test_short_secrets_are_masked_only_where_they_cannot_be_words(server):
    """A 3-character password would mask innocent text in plain form: it is kept there (documented rule), but
    every encoded form and every credential position is masked."""
    url = server(echo)
    client = DicomWebClient(url, "msgan", "pw1", timeout=5)
    with pytest.raises(PacsError, match="HTTP 500") as info:
        client.find_series()
    text = str(info.value)
    assert base64.b64encode(b"msgan:pw1").decode() not in text and "Authorization: Basic ***" in text
    assert redact_text("msgan pacs-sync: pw1 is a word here") == "msgan pacs-sync: pw1 is a word here"


def test_a_pass_against_an_echoing_pacs_leaks_nothing(server, tmp_path, capsys):
    """pacs-sync's client with a user/password against a PACS that lists one series and answers its WADO-RS
    fetch with a 500 echoing our request: no form of the secret in the error, the report, state.json, or
    anything printed."""
    from msgan.cascade import Cascade
    from msgan.pacs_sync import SyncConfig, run_once
    from tests.conftest import tiny_config

    listing = qido(lambda limit, offset: [series_json(UIDS[0])][offset:])

    def route(handler, path, query, body):
        return (listing if path.endswith("/series") else echo)(handler, path, query, body)

    model = str(Cascade.untrained(tiny_config(num_scales=2), seed=1).save(tmp_path / "model"))
    client = DicomWebClient(server(route), USER, PASSWORD, timeout=5)
    report = run_once(SyncConfig(model=model, storage=str(tmp_path / "store")), client)
    print(report.summary())
    assert list(report.skipped) == [UIDS[0]] and "HTTP 500" in report.skipped[UIDS[0]]
    state = (tmp_path / "store" / "pacs-sync" / "state.json").read_text()
    out = capsys.readouterr()
    for where, text in {"reason": report.skipped[UIDS[0]], "summary": report.summary(), "state.json": state,
                        "stdout": out.out, "stderr": out.err}.items():  # fmt: skip
        assert not leaks(text, PASSWORD), f"{where}: {leaks(text, PASSWORD)}\n{text}"
    assert "Basic ***" in state and json.loads(state)["series"][UIDS[0]]["status"] == "failed"


# ----------------------------------------------------------------------------- untrusted QIDO-RS answers


def test_a_server_that_caps_its_results_loses_nothing(server):
    """A cloud PACS that answers at most 3 results whatever the limit: paging on until an empty page finds
    all 11 (before: one request, 3 series, and nobody told)."""
    client = DicomWebClient(server(qido(lambda limit, offset: [series_json(u) for u in UIDS[offset:][:3]])))
    found = client.find_series("CT")
    assert [s.series_uid for s in found] == UIDS


def test_a_server_that_repeats_the_same_page_forever_is_refused(server):
    """A server that ignores offset: the second page brings nothing new, and the search stops saying why."""
    client = DicomWebClient(server(qido(lambda limit, offset: [series_json(u) for u in UIDS[:limit]])), page_size=4)
    with pytest.raises(PacsError, match=r"page 2, offset 4.*repeated 4 series.*does not page with offset"):
        client.find_series("CT")


def test_a_server_whose_results_never_end_hits_the_page_cap(server):
    """New UIDs on every page, forever: the search stops at the page cap with an error naming it."""
    endless = qido(lambda limit, offset: [series_json(f"1.2.3.{offset + k + 1}") for k in range(limit)])
    client = DicomWebClient(server(endless), page_size=2, max_pages=6)
    with pytest.raises(PacsError, match=r"still answered series after 6 pages \(12 series, page size 2\)"):
        client.find_series()
    client.max_pages, client.max_results = 100, 9
    with pytest.raises(PacsError, match="more than 9 series match, above the cap"):
        client.find_series()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"<html>Service Unavailable</html>", r"not JSON \(Expecting value at byte 0; starts '<html>"),
        (b'[{"0020000E": {"Value": ["1.2.3"]}}, {"trunc', "not JSON"),
        (b'{"error": "nope"}', "not a list of DICOM JSON objects"),
        (b'["1.2.3", 7]', "not a list of DICOM JSON objects"),
        (b'[{"00201209": {"Value": [Infinity]}}]', r"not JSON \(ValueError\)"),  # not DICOM JSON: no crash
        (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    ],
)
def test_garbage_json_from_qido_is_a_named_error(server, answer, error):
    client = DicomWebClient(server(lambda h, path, q, body: (200, "application/dicom+json", answer)))
    with pytest.raises(PacsError, match=rf"QIDO-RS /series \(page 1, offset 0, limit 500\) answered .*{error}"):
        client.find_series()


def test_wrongly_typed_values_read_as_empty_and_uids_are_checked(server, tmp_path):
    """Values of the wrong type do not crash the parse; a non-string UID reads as '' and the pass refuses it."""
    items = [{"0020000E": {"Value": [1.2]}, "0020000D": {"Value": "1.2"}, "00201209": {"Value": ["many"]}},
             {"0020000E": "x", "00080060": {"Value": [{"Alphabetic": 5}]}}]  # fmt: skip
    client = DicomWebClient(server(qido(lambda limit, offset: items if offset == 0 else [])))
    found = client.find_series()
    assert [(s.series_uid, s.study_uid, s.instances) for s in found] == [("", "", None)]  # one: '' twice
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        client.fetch_series(found[0].study_uid, found[0].series_uid, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_an_oversized_json_answer_is_refused_at_the_cap(server, monkeypatch):
    """A QIDO-RS answer bigger than the cap for one JSON answer is refused as it arrives, naming the cap."""
    monkeypatch.setattr(pacs, "MAX_JSON_BYTES", 100_000)
    big = json.dumps([series_json(f"1.2.3.{k}") for k in range(5000)]).encode()  # ~600 kB
    client = DicomWebClient(server(lambda h, path, q, body: (200, "application/dicom+json", big)))
    with pytest.raises(PacsError, match="more than 100000 bytes of JSON"):
        client.find_series()


def test_a_file_that_changes_while_stored_is_refused(server, tmp_path):
    """A STOW-RS body is streamed with the length declared up front: a file that grows meanwhile is not sent
    as a corrupt body."""
    f = tmp_path / "a.dcm"
    f.write_bytes(b"x" * 1000)
    body = pacs.StowBody([f])
    f.write_bytes(b"x" * 2000)
    with pytest.raises(PacsError, match=r"a.dcm: changed size while being stored \(1000 bytes before"):
        b"".join(body)
