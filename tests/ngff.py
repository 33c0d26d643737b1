"""OME-Zarr checks for tests: NGFF 0.5 validation (ome-zarr-models) and the reference reader (ome-zarr).

Missing packages skip the test with the reason, except in CI (CI=true), where they fail it."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import zarr

from msgan import storage


def _need(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"{package} is not installed (a dev dependency)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def assert_valid_ome_zarr(uri: str, groups: tuple[str, ...] = ("",)) -> None:
    """Each multiscales group (``""`` = the root) validates as an NGFF 0.5 image and, when local, opens with
    ome-zarr's reader with the same levels as zarr sees."""
    v05 = _need("ome_zarr_models.v05", "ome-zarr-models")
    uri = storage.normalize_uri(uri)
    store, opts = storage.zarr_store(uri)
    root = zarr.open_group(store, mode="r", storage_options=opts)
    for name in groups:
        group = root[name] if name else root
        assert isinstance(group, zarr.Group)
        v05.Image.from_zarr(group)  # raises a pydantic ValidationError naming what is wrong
        levels = [d["path"] for d in group.attrs["ome"]["multiscales"][0]["datasets"]]
        if storage.is_s3(uri):
            continue
        _need("ome_zarr", "ome-zarr")
        from ome_zarr.io import parse_url
        from ome_zarr.reader import Reader

        location = parse_url(os.path.join(str(storage.local_path(uri)), name))
        assert location is not None, f"ome-zarr cannot open {uri}/{name}"
        node = next(iter(Reader(location)()))
        assert [tuple(d.shape) for d in node.data] == [group[p].shape for p in levels]
        np.testing.assert_array_equal(np.asarray(node.data[-1]), group[levels[-1]][...])
