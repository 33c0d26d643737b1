import numpy as np
import pytest

from msgan import registry
from msgan.cascade import Cascade
from msgan.config import load_config
from tests.conftest import TINY as CONF_TINY

TINY = {**CONF_TINY, "num_scales": 2}


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_job_runs_created_once_and_found_again(tracking, tmp_path):
    cfg = load_config(None, TINY)
    a = registry.job_runs("exp", "job-1", 2, cfg.to_dict(), artifact_root=f"file://{tmp_path}/store")
    b = registry.job_runs("exp", "job-1", 2, cfg.to_dict(), artifact_root=f"file://{tmp_path}/store")
    assert a == b and set(a.children) == {0, 1}
    other = registry.job_runs("exp", "job-2", 2, cfg.to_dict())
    assert other.parent != a.parent
    from mlflow import MlflowClient

    child = MlflowClient(tracking).get_run(a.children[1])
    assert child.data.tags["mlflow.parentRunId"] == a.parent
    parent = MlflowClient(tracking).get_run(a.parent)
    assert parent.data.params["train.hr_patch"] == "8"
    log = registry.RunLogger(tracking, a.children[0])
    log.metric_rows([({"loss_g": 1.0}, 1), ({"loss_g": 0.5}, 2)])
    history = MlflowClient(tracking).get_metric_history(a.children[0], "loss_g")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]


def test_register_load_and_promote(tracking, rng):
    cfg = load_config(None, TINY)
    cascade = Cascade.untrained(cfg, seed=2)
    runs = registry.job_runs("exp", "job-r", 2, cfg.to_dict())
    v1 = registry.register_cascade(cascade, runs.parent, "reg-test")
    v2 = registry.register_cascade(Cascade.untrained(cfg, seed=3), runs.parent, "reg-test")
    assert (v1, v2) == ("1", "2")
    image = rng.uniform(-1000, 500, (24, 20, 26)).astype(np.float32)
    loaded = registry.load_cascade("models:/reg-test@candidate")  # the alias follows the newest version
    np.testing.assert_array_equal(loaded.translate(image), Cascade.untrained(cfg, seed=3).translate(image))
    registry.promote("reg-test", v1, "champion")
    champion = registry.load_cascade("models:/reg-test@champion")
    np.testing.assert_array_equal(champion.translate(image), cascade.translate(image))
    with pytest.raises(ValueError, match="no version '9'"):
        registry.promote("reg-test", "9", "champion")
    with pytest.raises(ValueError, match="models:/reg-test@nope"):
        registry.load_cascade("models:/reg-test@nope")


def test_cli_promote_and_translate_from_registry(tracking, tmp_path, rng):
    from msgan.cli import main
    from msgan.io.volume import Geometry, read_volume, write_volume

    cfg = load_config(None, TINY)
    runs = registry.job_runs("exp", "job-c", 2, cfg.to_dict())
    version = registry.register_cascade(Cascade.untrained(cfg, seed=4), runs.parent, "cli-test")
    assert main(["promote", "cli-test", version, "--alias", "champion"]) == 0
    write_volume(tmp_path / "in.mha", rng.uniform(-1000, 0, (16, 16, 16)).astype(np.float32), Geometry.identity(3))
    assert main(["translate", str(tmp_path / "in.mha"), str(tmp_path / "out.mha"), "--model",
                 "models:/cli-test@champion", "--quiet"]) == 0  # fmt: skip
    assert read_volume(tmp_path / "out.mha")[0].shape == (16, 16, 16)
