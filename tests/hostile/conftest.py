"""Shared pieces of the hostile-input suite: a tiny cascade (in memory and as a folder), small volumes,
and a snapshot of a folder to prove that nothing outside an output was touched."""

from pathlib import Path

import numpy as np
import pytest

from msgan.cascade import Cascade
from msgan.io.volume import Geometry, write_zarr
from tests.conftest import tiny_config

GEOM = Geometry((0.8, 0.8, 2.0), (-10.0, 5.0, 100.0), (1, 0, 0, 0, 0, 1, 0, -1, 0))


@pytest.fixture(scope="session")
def hostile_cascade():
    return Cascade.untrained(tiny_config(**{"inference.memory_budget_mb": 1.0}), seed=3)


@pytest.fixture(scope="session")
def hostile_model(tmp_path_factory, hostile_cascade):
    """The tiny cascade saved as a model folder (what `msgan translate --model DIR` loads)."""
    return str(hostile_cascade.save(tmp_path_factory.mktemp("model") / "m"))


def small_volume(path: Path, shape=(16, 16, 16), seed=0) -> np.ndarray:
    img = np.random.default_rng(seed).uniform(-1000, 500, shape).astype(np.float32)
    write_zarr(path, [img], GEOM)
    return img


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """(size, mtime_ns, inode) of everything under ``root``, symlinks not followed."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out
