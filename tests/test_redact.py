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
    ],
)
def test_redact_uri(uri, want):
    assert redact_uri(uri) == want


def test_redact_text_masks_every_uri():
    text = "failed: http://u:p1@a/x then https://v:p2@b/y"
    out = redact_text(text)
    assert "p1" not in out and "p2" not in out and out.count(":***@") == 2
