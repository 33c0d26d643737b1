"""Storage that survives: on a cluster of several nodes a node-local path fails before any work."""

import pytest

from msgan.config import ConfigError
from tests.conftest import tiny_config
from tests.ray_procs import short_temp_dir

pytestmark = pytest.mark.slow


def test_local_storage_on_a_two_node_cluster_fails_fast_unless_marked_shared(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from msgan.distributed.pipeline import alive_nodes, check_shared_storage, run_training_job

    monkeypatch.setenv("MSGAN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("MSGAN_SHARED_PATHS", raising=False)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "temp_dir": str(short_temp_dir())},
    )
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        assert alive_nodes() == 2
        cfg = tiny_config(**{"num_scales": 2, "job.storage": "store"})
        lines: list[str] = []
        with pytest.raises(ConfigError, match=r"job.storage file://.*/home/store is a local path.*2 nodes.*s3://"):
            run_training_job(cfg, log=lines.append)
        assert not (tmp_path / "home" / "store").exists() and not lines  # nothing started, nothing written
        monkeypatch.setenv("MSGAN_SHARED_PATHS", str(tmp_path))  # an NFS mount every node has
        check_shared_storage(f"file://{tmp_path}/home/store", f"sqlite:///{tmp_path}/mlflow.db", alive_nodes())
        from msgan.distributed.prepare import VolumeSource

        pair = VolumeSource("pair", "/scratch/ct/s.nii.gz", target=f"{tmp_path}/t.nii.gz", row=2, manifest="pairs.csv")
        with pytest.raises(ConfigError, match=r"pairs.csv row 2: source /scratch/ct/s.nii.gz is a local path"):
            check_shared_storage(f"file://{tmp_path}/s", f"sqlite:///{tmp_path}/m.db", alive_nodes(), [pair])
        shared = VolumeSource("pair", f"{tmp_path}/s.nii.gz", target="s3://bucket/t.zarr", row=3, manifest="p.csv")
        check_shared_storage(f"file://{tmp_path}/s", f"sqlite:///{tmp_path}/m.db", alive_nodes(), [shared])
    finally:
        ray.shutdown()
        cluster.shutdown()
