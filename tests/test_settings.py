import pytest

from msgan import settings, storage


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MSGAN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MSGAN_SHARED_PATHS", raising=False)
    return tmp_path / "home"


def test_relative_paths_resolve_under_msgan_home_not_the_working_directory(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as `ray job submit --working-dir` does, into a temporary package folder
    assert storage.resolve_storage("runs/storage") == f"file://{home}/runs/storage"
    assert storage.resolve_storage("file://runs/x") == f"file://{home}/runs/x"
    assert storage.resolve_storage("/abs/store") == "file:///abs/store"
    assert storage.resolve_storage("s3://bucket/p/") == "s3://bucket/p"
    assert settings.default_tracking_uri() == f"sqlite:///{home}/runs/mlflow.db"
    with pytest.raises(ValueError, match="only file:// and s3://"):
        storage.resolve_storage("gs://b/p")


def test_default_home_is_in_the_user_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("MSGAN_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert settings.home() == tmp_path / ".msgan"


def test_registry_default_store_is_under_msgan_home(home, tmp_path, monkeypatch):
    from msgan.registry import tracking_uri

    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{home}/runs/mlflow.db"


def test_local_paths_fail_fast_on_a_multi_node_cluster(home, tmp_path, monkeypatch):
    local = f"file://{tmp_path}/store"
    settings.check_reachable_from_all_nodes("job.storage", local, nodes=1)  # one node: fine
    settings.check_reachable_from_all_nodes("job.storage", "s3://b/p", nodes=3)
    with pytest.raises(ValueError, match=r"job.storage file://.*3 nodes.*s3://.*MSGAN_SHARED_PATHS"):
        settings.check_reachable_from_all_nodes("job.storage", local, nodes=3)
    with pytest.raises(ValueError, match="the MLflow store sqlite:///"):
        settings.check_reachable_from_all_nodes("the MLflow store", settings.default_tracking_uri(), nodes=2)
    monkeypatch.setenv("MSGAN_SHARED_PATHS", f"/nowhere:{tmp_path}")
    settings.check_reachable_from_all_nodes("job.storage", local, nodes=3)  # a marked shared mount


def test_every_secret_setting_is_masked_by_redaction(monkeypatch):
    """Each setting marked secret (MLflow's token included) is masked in plain and base64 form by value."""
    import base64

    from msgan.redact import redact_text

    secrets = {s.name for s in settings.SETTINGS if s.secret}
    assert {"MLFLOW_TRACKING_TOKEN", "MSGAN_PACS_PASSWORD", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"} <= secrets
    for i, name in enumerate(sorted(secrets)):
        value = f"value-{i}-of-{name.lower()}"
        monkeypatch.setenv(name, value)
        b64 = base64.b64encode(value.encode()).decode()
        assert redact_text(f"[{value}] [{b64}]") == "[***] [***]", name


def test_the_pacs_page_size_setting(monkeypatch):
    from msgan.io.pacs import DEFAULT_PAGE_SIZE, page_size_from_env

    monkeypatch.delenv("MSGAN_PACS_PAGE_SIZE", raising=False)
    assert page_size_from_env() == DEFAULT_PAGE_SIZE == 500
    monkeypatch.setenv("MSGAN_PACS_PAGE_SIZE", "50")
    assert page_size_from_env() == 50
    for bad in ("0", "-3", "ten", "100000"):
        monkeypatch.setenv("MSGAN_PACS_PAGE_SIZE", bad)
        with pytest.raises(ValueError, match=rf"MSGAN_PACS_PAGE_SIZE='{bad}': expected an integer from 1 to 10000"):
            page_size_from_env()
