import json
import re

import pytest

from msgan.redact import redact_text, redact_uri


@pytest.mark.parametrize(
    ("uri", "want"),
    [
        ("http://alice:s3cr3t@pacs:8042/dicom-web", "http://alice:***@pacs:8042/dicom-web"),
        ("postgresql://mlflow:pw%40x@db/mlflow", "postgresql://mlflow:***@db/mlflow"),
        ("https://:tok@host/x", "https://:***@host/x"),
        ("s3://bucket/key?X-Amz-Signature=abc&x=1", "s3://bucket/key?X-Amz-Signature=***&x=1"),
        ("http://host:8042/dicom-web", "http://host:8042/dicom-web"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("http://alice:S3cr/etPass@pacs:8042/dicom-web", "http://alice:***@pacs:8042/dicom-web"),  # '/' unencoded
        ("see http://host:8042/dicom-web/studies, mail a@b", "see http://host:8042/dicom-web/studies, mail a@b"),
    ],
)
def test_redact_uri(uri, want):
    assert redact_uri(uri) == want


def test_redact_text_masks_every_uri():
    text = "failed: http://u:p1@a/x then https://v:p2@b/y"
    out = redact_text(text)
    assert "p1" not in out and "p2" not in out and out.count(":***@") == 2


SECRET = "pw/with+Sp ce&x"  # '/', '+', ' ' and '&' differ under quote, quote_plus and base64


def _forms(secret, user="reader"):
    import base64
    from urllib.parse import quote, quote_plus

    raw = secret.encode()
    return {
        "plain": secret,
        "quote": quote(secret),
        "quote safe=''": quote(secret, safe=""),
        "quote_plus": quote_plus(secret),
        "quote, lower-case hex": re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(), quote(secret, safe="")),
        "base64": base64.b64encode(raw).decode(),
        "base64 url-safe": base64.urlsafe_b64encode(raw).decode(),
        "Basic user:password": base64.b64encode(f"{user}:{secret}".encode()).decode(),
        "Basic, another user": base64.b64encode(f"someone-else:{secret}".encode()).decode(),
        "json": json.dumps(secret)[1:-1],
    }


@pytest.mark.parametrize(
    "name", ["MSGAN_PACS_PASSWORD", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN"]
)
def test_a_secret_setting_is_masked_in_every_encoding(monkeypatch, name):
    monkeypatch.setenv(name, SECRET)
    monkeypatch.setenv("MSGAN_PACS_USER", "reader")
    for form, value in _forms(SECRET).items():
        out = redact_text(f"error: got [{value}] back")
        assert value not in out and out == "error: got [***] back", (form, out)


def test_credentials_a_client_holds_are_masked_without_the_environment(monkeypatch):
    from msgan.redact import add_credentials

    secret = "client-Only-pw9"
    assert redact_text(f"x {secret}") == f"x {secret}"
    add_credentials("client-user-1", secret)
    for form, value in _forms(secret, "client-user-1").items():
        assert value not in redact_text(f"said {value}."), form
    assert "client-user-1" not in redact_text("user client-user-1")  # an identity of 8+ characters


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("Authorization: Basic dW5rbm93bjpzZWNyZXQ=", "Authorization: Basic ***"),
        ("{'Authorization': 'Bearer eyJhbGciOi.x.y'}", "{'Authorization': 'Bearer ***'}"),
        ('"authorization":"Token abc123def"', '"authorization":"Token ***"'),
        ("Proxy-Authorization: Digest-ish", "Proxy-Authorization: ***"),
        ("sent Bearer abcdef123456 to it", "sent Bearer *** to it"),
        ("a Basic dW5rbm93bjpzZWNyZXQ= header", "a Basic *** header"),
        ("Basic information, Basic c2VjcmV0 (no colon)", "Basic information, Basic c2VjcmV0 (no colon)"),
        ("retry with token=abc123 and access_token=x9", "retry with token=*** and access_token=***"),
        ('{"password": "hunter22", "user": "a"}', '{"password": "***", "user": "a"}'),
        ("the token expired; password reset", "the token expired; password reset"),
    ],
)
def test_unknown_secrets_are_masked_by_position(text, want):
    assert redact_text(text) == want


def test_short_secrets_follow_the_documented_rule(monkeypatch):
    """A password under 4 characters, a user name under 8: never masked in plain form (they would mask ordinary
    words, e.g. the user `msgan` in `msgan pacs-sync`), always in their encoded forms."""
    import base64

    monkeypatch.setenv("MSGAN_PACS_USER", "msgan")
    monkeypatch.setenv("MSGAN_PACS_PASSWORD", "pw1")
    basic = base64.b64encode(b"msgan:pw1").decode()
    assert redact_text("msgan pacs-sync: pw1 done") == "msgan pacs-sync: pw1 done"
    assert redact_text(f"echo {basic} and {base64.b64encode(b'msgan').decode()}") == "echo *** and ***"
    monkeypatch.setenv("MSGAN_PACS_PASSWORD", "pw12")  # 4 characters: masked in plain form too
    assert redact_text("said pw12") == "said ***"


def test_the_masks_are_compiled_once_per_set_of_secrets(monkeypatch):
    from msgan import redact

    monkeypatch.setenv("MSGAN_PACS_PASSWORD", "cache-Probe-pw")
    redact_text("warm")
    before = redact._compiled.cache_info()
    for _ in range(50):
        redact_text("a line with cache-Probe-pw")
    after = redact._compiled.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 50
