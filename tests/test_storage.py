from pathlib import Path

import pytest

from msgan import storage
from tests.conftest import s3_keys


def test_normalize_and_join(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize_uri("runs/x") == f"file://{tmp_path}/runs/x"
    assert storage.normalize_uri("s3://b/p/") == "s3://b/p"
    assert storage.join("s3://b/p", "a", "b.json") == "s3://b/p/a/b.json"
    assert storage.join(f"file://{tmp_path}", "a") == f"file://{tmp_path}/a"
    with pytest.raises(ValueError, match="gs://"):
        storage.normalize_uri("gs://bucket/x")


def test_local_text_roundtrip(tmp_path):
    uri = storage.join(storage.normalize_uri(tmp_path), "d", "x.json")
    assert not storage.exists(uri)
    storage.write_text(uri, "hello")
    assert storage.read_text(uri) == "hello" and storage.exists(uri)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["x.json"]


def test_s3_text_roundtrip(s3_bucket):
    uri = f"s3://{s3_bucket}/p/x.json"
    storage.write_text(uri, "{}")
    assert storage.read_text(uri) == "{}"
    assert s3_keys(s3_bucket) == ["p/x.json"]
    path, fs = storage.pyarrow_storage(f"s3://{s3_bucket}/ray")
    assert path == f"{s3_bucket}/ray" and fs is not None
    assert Path(storage.pyarrow_storage("file:///tmp/r")[0]) == Path("/tmp/r")


def test_a_refused_uri_is_shown_without_its_password():
    with pytest.raises(ValueError, match=r"http://u:\*\*\*@host/x'?: only file:// and s3://") as err:
        storage.normalize_uri("http://u:pa55word@host/x")
    assert "pa55word" not in str(err.value)
