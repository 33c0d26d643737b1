import numpy as np
import pytest
import zarr

from msgan.io.volume import Geometry, open_zarr, read_volume, write_volume, write_zarr

OBLIQUE = Geometry(
    spacing=(0.7, 0.8, 2.5),
    origin=(-120.5, 33.0, 410.25),
    direction=tuple(np.array([[0.96592583, -0.25881905, 0], [0.25881905, 0.96592583, 0], [0, 0, 1.0]]).ravel()),
)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd", ".zarr"])
def test_roundtrip_keeps_geometry_and_values(tmp_path, suffix, rng):
    a = rng.normal(size=(7, 9, 11)).astype(np.float32)
    path = tmp_path / f"v{suffix}"
    write_volume(path, a, OBLIQUE)
    b, g = read_volume(path)
    np.testing.assert_array_equal(a, b)
    assert g.allclose(OBLIQUE, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no staging files left behind"


def test_zarr_has_ome_multiscales(tmp_path, rng):
    levels = [rng.normal(size=(8, 8, 8)).astype(np.float32), rng.normal(size=(4, 4, 4)).astype(np.float32)]
    write_zarr(tmp_path / "m.zarr", levels, OBLIQUE, attrs={"model": "x"})
    arr, geom, meta = open_zarr(tmp_path / "m.zarr", level=1)
    assert arr.shape == (4, 4, 4) and meta["model"] == "x" and geom == OBLIQUE
    import zarr

    ome = zarr.open_group(str(tmp_path / "m.zarr"), mode="r").attrs["ome"]
    ds = ome["multiscales"][0]["datasets"]
    assert [d["path"] for d in ds] == ["0", "1"]
    assert ds[1]["coordinateTransformations"][0]["scale"] == pytest.approx([5.0, 1.6, 1.4])
    assert [a["name"] for a in ome["multiscales"][0]["axes"]] == ["z", "y", "x"]


def test_errors_name_the_input(tmp_path):
    with pytest.raises(ValueError, match="unknown volume format"):
        read_volume(tmp_path / "v.png")
    with pytest.raises(FileNotFoundError, match=r"v\.nii\.gz"):
        read_volume(tmp_path / "v.nii.gz")
    (tmp_path / "bad.mha").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"bad\.mha"):
        read_volume(tmp_path / "bad.mha")
    with pytest.raises(FileNotFoundError, match=r"missing\.zarr"):
        open_zarr(tmp_path / "missing.zarr")


@pytest.mark.parametrize("shape", [(6, 8, 10), (8, 10)])
def test_ome_zarr_validates_and_opens_with_the_reference_reader(tmp_path, shape):
    from tests.ngff import assert_valid_ome_zarr

    a = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    half = a[tuple(slice(None, None, 2) for _ in shape)]
    geom = OBLIQUE if len(shape) == 3 else Geometry.identity(2, (0.5, 0.25))
    write_zarr(tmp_path / "v.zarr", [a, half], geom)
    assert_valid_ome_zarr(str(tmp_path / "v.zarr"))
    assert zarr.open_array(str(tmp_path / "v.zarr" / "0"), mode="r").metadata.dimension_names == tuple(
        "zyx"[-len(shape) :]
    )


def test_a_bare_zarr_array_is_refused_with_how_to_wrap_it_and_ingest_wraps_it(tmp_path):
    from msgan.io.convert import ingest

    a = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    zarr.create_array(str(tmp_path / "bare.zarr"), shape=a.shape, dtype="float32")[...] = a
    with pytest.raises(ValueError, match=r"bare zarr array.*msgan ingest"):
        open_zarr(tmp_path / "bare.zarr")
    with pytest.warns(UserWarning, match="identity assumed"):
        report = ingest(tmp_path / "bare.zarr", tmp_path / "v.zarr")
    assert report.notes and "identity" in next(iter(report.notes.values()))[0]
    b, g = read_volume(tmp_path / "v.zarr")
    np.testing.assert_array_equal(a, b)
    assert g == Geometry.identity(3)


def test_a_foreign_ome_zarr_is_ingested_with_its_spacing(tmp_path):
    from msgan.io.convert import ingest

    a = np.ones((3, 4, 5), np.float32)
    write_zarr(tmp_path / "f.zarr", [a], Geometry((0.5, 0.6, 2.0), (1.0, 2.0, 3.0), tuple(np.eye(3).ravel())))
    g = zarr.open_group(str(tmp_path / "f.zarr"), mode="r+")
    del g.attrs["msgan"]  # as another tool would write it: OME metadata only
    with pytest.warns(UserWarning, match="direction"):
        ingest(tmp_path / "f.zarr", tmp_path / "v.zarr")
    _, geom = read_volume(tmp_path / "v.zarr")
    assert geom.allclose(Geometry((0.5, 0.6, 2.0), (1.0, 2.0, 3.0), tuple(np.eye(3).ravel())))


def test_a_foreign_ome_zarr_in_micrometres_with_a_multiscale_transform_gets_its_size_in_mm(tmp_path):
    """NGFF: axis units and the multiscale-level transform (after the dataset's) count; a channel axis is refused."""
    from msgan.io.convert import ingest

    a = np.ones((3, 4, 5), np.float32)
    write_zarr(tmp_path / "f.zarr", [a], Geometry((500.0, 600.0, 1000.0), (10.0, 20.0, 30.0), tuple(np.eye(3).ravel())))
    g = zarr.open_group(str(tmp_path / "f.zarr"), mode="r+")
    ome = dict(g.attrs["ome"])
    ms = ome["multiscales"][0]
    ms["axes"] = [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    ms["coordinateTransformations"] = [{"type": "scale", "scale": [2.0, 2.0, 2.0]},
                                       {"type": "translation", "translation": [1.0, 1.0, 1.0]}]  # fmt: skip
    g.attrs["ome"] = ome
    del g.attrs["msgan"]
    with pytest.warns(UserWarning, match="direction"):
        ingest(tmp_path / "f.zarr", tmp_path / "v.zarr")
    _, geom = read_volume(tmp_path / "v.zarr")  # x: 500 um * 2 = 1 mm; origin (10 um * 2 + 1 um) = 0.021 mm
    assert geom.allclose(Geometry((1.0, 1.2, 2.0), (0.021, 0.041, 0.061), tuple(np.eye(3).ravel())), atol=1e-9)
    ms["axes"][0] = {"name": "c", "type": "channel"}
    g.attrs["ome"] = ome
    with pytest.raises(ValueError, match="space axes only"):
        ingest(tmp_path / "f.zarr", tmp_path / "w.zarr")
