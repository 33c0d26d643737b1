"""Alignment of a pair's target onto its source's grid, and the field-of-view masks (msgan.align)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from msgan.align import METHODS, Aligned, AlignError, align_pair, fov_mask, same_grid
from msgan.data.phantom import apply_mtf, phantom_geometry, reconstruct, thorax_phantom
from msgan.data.tasks import make_task
from msgan.io.volume import Geometry, from_sitk, to_sitk

SHAPE = (48, 48, 48)


def round_fov(image: np.ndarray, padding: float) -> np.ndarray:
    """``image`` with ``padding`` outside the largest circle of each axial slice (a scanner's round field of view)."""
    out = image.copy()
    out[..., ~disc(image.shape[-2:])] = padding
    return out


def disc(shape: tuple[int, ...]) -> np.ndarray:
    ny, nx = shape
    y, x = np.ogrid[:ny, :nx]
    r = min(ny, nx) / 2.0
    return (y - (ny - 1) / 2.0) ** 2 + (x - (nx - 1) / 2.0) ** 2 <= r * r


def centre_of(shape: tuple[int, ...], geometry: Geometry) -> tuple[float, ...]:
    img = to_sitk(np.zeros(shape, np.uint8), geometry)
    return tuple(img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in reversed(shape)]))


def move(image: np.ndarray, geometry: Geometry, t: sitk.Transform, fill: float) -> np.ndarray:
    """moved(x) = image(t(x)) on the image's own grid."""
    img = to_sitk(image.astype(np.float32), geometry)
    return from_sitk(sitk.Resample(img, img, t, sitk.sitkLinear, fill, sitk.sitkFloat32))[0]


def rms_error(found: Aligned, truth: sitk.Transform, mask: np.ndarray, geometry: Geometry) -> float:
    """RMS over ``mask`` of |truth(found(x)) - x| in mm: zero when the registration undid the motion."""
    dims = geometry.dims
    t: sitk.Transform
    if found.method == "rigid":
        t = sitk.Euler3DTransform() if dims == 3 else sitk.Euler2DTransform()
    else:
        t = sitk.AffineTransform(dims)
    n = len(found.transform) - dims
    t.SetParameters(found.transform[:n])
    t.SetFixedParameters(found.transform[n:] + ((0.0,) if found.method == "rigid" and dims == 3 else ()))
    ref = to_sitk(mask.astype(np.uint8), geometry)
    pts = [ref.TransformIndexToPhysicalPoint([int(v) for v in i[::-1]]) for i in np.argwhere(mask)]
    err = [np.subtract(truth.TransformPoint(t.TransformPoint(p)), p) for p in pts]
    return float(np.sqrt(np.mean(np.sum(np.square(err), axis=1))))


@pytest.fixture(scope="module")
def contrast() -> tuple[np.ndarray, np.ndarray, np.ndarray, Geometry]:
    """A non-contrast / arterial-phase CT phantom pair (two acquisitions), its body mask and geometry."""
    v = make_task("contrast", 201, SHAPE, workers=1)
    return v.input, v.target, v.labels > 0, phantom_geometry(SHAPE)


# ----------------------------------------------------------------------------- field-of-view masks


@pytest.mark.parametrize("padding", [-2048.0, -3024.0, -2000.0])
def test_ct_padding_outside_the_round_field_of_view_is_masked(contrast, padding) -> None:
    source = contrast[0]
    padded = round_fov(source, padding).astype(np.int16).astype(np.float32)  # as read from an int16 series
    inside = np.broadcast_to(disc(SHAPE[1:]), SHAPE)
    assert np.array_equal(fov_mask(padded, modality="CT"), inside)
    assert np.array_equal(fov_mask(padded), inside)  # modality unknown, values in HU
    assert np.array_equal(fov_mask(padded.astype(np.int16), modality="ct"), inside)
    assert fov_mask(source, modality="CT").all()  # the same image without padding


def test_pixel_padding_value_is_used_when_given() -> None:
    image = np.full((8, 16, 16), 100.0, np.float32)
    image[:, :3] = -1024.0  # a padding value above the automatic rule's -1500 floor
    image[:, 3:5] = -1000.0
    assert fov_mask(image, modality="CT").all()  # not padding by the rule
    mask = fov_mask(image, padding=-1024.0, modality="CT")
    assert not mask[:, :3].any() and mask[:, 3:].all()
    mr = np.abs(np.random.default_rng(0).normal(100, 30, (16, 16))).astype(np.float32)
    mr[:4] = 0.0
    mask = fov_mask(mr, padding=0.0, modality="MR")  # MR with an explicit PixelPaddingValue
    assert not mask[:4].any() and mask[4:].all()
    with pytest.raises(ValueError, match="padding value"):
        fov_mask(mr, padding=float("nan"))


def test_mr_and_radiographs_have_no_padding_unless_given() -> None:
    mr = np.abs(np.random.default_rng(1).normal(300, 100, (8, 24, 24))).astype(np.float32)
    mr[:, :, :6] = 0.0  # background, not padding
    assert fov_mask(mr, modality="MR").all()
    signed = mr - 4000.0  # even values far below -1500 with many equal minima are not padding for MR
    assert fov_mask(signed, modality="MR").all()
    assert fov_mask(signed, modality="DX").all()
    assert not fov_mask(signed, modality="CT").all()  # the same values in a CT would be


def test_noise_and_clipped_air_are_not_padding() -> None:
    rng = np.random.default_rng(2)
    noisy = (rng.normal(-1000.0, 250.0, (16, 32, 32))).astype(np.float32)  # minimum far below -1500, but unique
    assert noisy.min() < -1500
    assert fov_mask(noisy, modality="CT").all()
    clipped = np.clip(noisy, -1024, None).astype(np.int16)  # many voxels at -1024: air, not padding
    assert fov_mask(clipped, modality="CT").all()
    few = noisy.copy()
    few.flat[:10] = -2048.0  # fewer than 0.1 % of the voxels
    assert fov_mask(few, modality="CT").all()


# ----------------------------------------------------------------------------- grids


def test_same_grid_tolerates_rounding_only() -> None:
    g = Geometry((0.7, 0.7, 2.0), (-150.0, -170.0, 30.0), tuple(np.eye(3).ravel()))
    assert same_grid((10, 20, 20), g, (10, 20, 20), g)
    nudged = Geometry((0.7000001, 0.7, 2.0), (-150.0001, -170.0, 30.0), g.direction)
    assert same_grid((10, 20, 20), g, (10, 20, 20), nudged)
    assert not same_grid((10, 20, 20), g, (20, 20, 20), g)
    assert not same_grid((10, 20, 20), g, (10, 20, 20), Geometry((0.7, 0.7, 1.0), g.origin, g.direction))
    assert not same_grid((10, 20, 20), g, (10, 20, 20), Geometry(g.spacing, (-150.0, -170.0, 31.0), g.direction))
    flipped = Geometry(g.spacing, g.origin, tuple(np.diag([1.0, -1.0, 1.0]).ravel()))
    assert not same_grid((10, 20, 20), g, (10, 20, 20), flipped)


def test_same_grid_none_uses_the_target_as_it_is(contrast) -> None:
    source, target, _, geom = contrast
    src = round_fov(source, -3024.0)
    tgt = target.copy()
    tgt[:, :, :4] = -2048.0  # another padding in the target
    out = align_pair(src, geom, tgt, geom, "none", modality="CT", label="row 2")
    assert out.same_grid and out.method == "none" and out.transform == ()
    assert out.target.dtype == np.float32 and np.array_equal(out.target, tgt)
    assert np.array_equal(out.valid, fov_mask(src, modality="CT") & fov_mask(tgt, modality="CT"))
    assert out.overlap == pytest.approx(out.valid.mean())
    assert 0.0 < out.residual < 0.1  # two phases of one anatomy
    assert "none" in METHODS


def test_thick_slice_target_is_resampled_physically_onto_the_thin_grid() -> None:
    """A target reconstructed on twice the slice thickness and another in-plane field of view (same frame
    of reference) lands on the source's grid where it physically belongs; uncovered slices are not valid."""
    src_geom = Geometry((2.0, 2.0, 1.5), (-31.0, -31.0, -20.0), tuple(np.eye(3).ravel()))
    src_shape = (32, 32, 32)  # z, y, x
    # the target: 3 mm slices over a shorter z range, 2.5 mm pixels over a wider field of view
    tgt_geom = Geometry((2.5, 2.5, 3.0), (-40.0, -40.0, -14.2), tuple(np.eye(3).ravel()))
    tgt_shape = (10, 33, 33)

    def ramp(shape: tuple[int, ...], g: Geometry) -> np.ndarray:
        """A linear function of position: exact under linear interpolation."""
        z, y, x = np.meshgrid(*(g.origin[2 - a] + g.spacing[2 - a] * np.arange(n) for a, n in enumerate(shape)),
                              indexing="ij")  # fmt: skip
        return (3.0 * z - 2.0 * y + 0.5 * x + 40.0).astype(np.float32)

    target = ramp(tgt_shape, tgt_geom)
    out = align_pair(ramp(src_shape, src_geom), src_geom, target, tgt_geom, "none", modality="MR", label="thick")
    assert not out.same_grid and out.transform == ()
    truth = ramp(src_shape, src_geom)
    z = src_geom.origin[2] + src_geom.spacing[2] * np.arange(src_shape[0])
    covered = (z > -14.2 - 1.5) & (z < 12.8 + 1.5)  # target slice centres -14.2 .. 12.8 mm, +- half a slice
    assert np.array_equal(out.valid.any(axis=(1, 2)), covered)
    assert out.valid[covered].all()  # in-plane, the target's wider field of view covers the source
    assert out.overlap == pytest.approx(covered.mean())
    inner = (z >= -14.2) & (z <= 12.8)  # between the target's first and last slice centres: interpolated exactly
    np.testing.assert_allclose(out.target[inner], truth[inner], atol=1e-3)
    assert out.residual < 1e-3  # the half-slice rims beyond the last slice centres hold the last slice's value

    # a CT phantom (noiseless, so placement shows), the thick slices made by averaging pairs of thin ones
    shape, spacing = (32, 48, 48), (4.0, 8.0, 8.0)
    thin = apply_mtf(thorax_phantom(shape, spacing, seed=5), "soft", workers=1)
    thick = round_fov(0.5 * (thin[0::2] + thin[1::2]), -3024.0)
    g_thin = phantom_geometry(shape, spacing)

    def placed(dz: float) -> Aligned:  # thick slice j is centred between thin slices 2j and 2j+1: dz = 2 mm
        g_thick = Geometry((*g_thin.spacing[:2], 8.0), (*g_thin.origin[:2], dz), g_thin.direction)
        return align_pair(thin, g_thin, thick, g_thick, "none", modality="CT", label="ct")

    out = placed(2.0)
    assert not out.valid[:, ~disc(shape[1:])].any()  # the target's padding is outside the field of view
    assert out.valid[:, disc(shape[1:])].all()
    assert out.target[out.valid].min() > -1500.0  # and never interpolated into a valid voxel
    mae = np.abs(out.target - thin)[out.valid].mean()
    for wrong in (placed(0.0), placed(4.0)):  # half a thin slice off either way
        assert mae < 0.9 * np.abs(wrong.target - thin)[out.valid & wrong.valid].mean()
    assert out.residual < min(placed(0.0).residual, placed(4.0).residual)


def test_no_overlap_is_refused_by_name(contrast) -> None:
    source, target, _, geom = contrast
    far = Geometry(geom.spacing, (geom.origin[0] + 1000.0, *geom.origin[1:]), geom.direction)
    for method in METHODS:
        with pytest.raises(AlignError, match=r"pair 'patient 7 row 3'.*do not overlap in space"):
            align_pair(source, geom, target, far, method, modality="CT", label="patient 7 row 3")
    # a target that covers a sliver only (one slice of 48 at the edge, inside the round field of view)
    sliver = Geometry(geom.spacing, (*geom.origin[:2], geom.origin[2] + 47 * geom.spacing[2]), geom.direction)
    with pytest.raises(AlignError, match=r"pair 'thin'.*% of the source's voxels.*at least 1%"):
        align_pair(round_fov(source, -3024.0), geom, target[:1, :4, :4], sliver, "none", label="thin")


def test_bad_inputs_are_refused_by_name(contrast) -> None:
    source, target, _, geom = contrast
    bad = target.copy()
    bad[3, 4, 5] = np.nan
    with pytest.raises(AlignError, match=r"pair 'p1'.*target has 1 NaN"):
        align_pair(source, geom, bad, geom, "rigid", label="p1")
    with pytest.raises(AlignError, match=r"pair 'p1'.*'elastic' is not one of none, rigid, affine"):
        align_pair(source, geom, target, geom, "elastic", label="p1")
    with pytest.raises(AlignError, match=r"pair 'p1'.*source is a 2D array with a 3D geometry"):
        align_pair(source[0], geom, target, geom, label="p1")
    with pytest.raises(AlignError, match=r"pair 'p1'.*target holds padding only"):
        align_pair(source, geom, np.full(SHAPE, -2048.0, np.float32), geom, label="p1", target_padding=-2048.0)


# ----------------------------------------------------------------------------- registration


@pytest.mark.parametrize("method", ["rigid", "affine"])
def test_registration_recovers_a_known_rigid_motion(contrast, method) -> None:
    source, target, body, geom = contrast
    truth = sitk.Euler3DTransform()
    truth.SetCenter(centre_of(SHAPE, geom))
    truth.SetRotation(math.radians(4.0), math.radians(-3.0), math.radians(5.0))
    truth.SetTranslation((9.0, -12.0, 7.0))  # mm, about a voxel and a half of 8.3 mm per axis
    moved = round_fov(move(target, geom, truth, -1000.0), -3024.0)
    src = round_fov(source, -2048.0)
    before = align_pair(src, geom, moved, geom, "none", modality="CT", label="moved")
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    out = align_pair(src, geom, moved, geom, method, modality="CT", label="moved")
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == threads  # ITK's setting restored
    assert out.method == method and out.same_grid
    assert len(out.transform) == (6 if method == "rigid" else 12) + 3
    spacing = geom.spacing[0]
    sub = body & (np.indices(SHAPE).sum(axis=0) % 3 == 0)
    assert rms_error(out, truth, sub, geom) < 0.5 * spacing  # under half a voxel RMS over the body
    # compared with the unmoved target inside `valid`, the aligned target is far closer than the moved one
    v = out.valid & before.valid
    err_aligned = np.abs(out.target - target)[v].mean()
    err_moved = np.abs(moved - target)[v].mean()
    assert err_aligned < 0.5 * err_moved
    assert out.residual < 0.7 * before.residual
    # valid: inside the source's field of view and inside the moved target's field of view only
    assert not out.valid[:, ~disc(SHAPE[1:])].any()
    assert out.target[out.valid].min() > -1500.0
    assert 0.5 < out.overlap < before.overlap + 0.05
    assert out.seconds > 0
    if method == "affine":
        return
    again = align_pair(src, geom, moved, geom, method, modality="CT", label="moved")
    assert again.transform == out.transform and np.array_equal(again.target, out.target)  # deterministic


def test_2d_rigid_registration() -> None:
    spacing = (4.0, 4.0)
    slice_ = thorax_phantom((1, 96, 96), (4.0, *spacing), seed=3)[0]
    recon = reconstruct(slice_, ("soft", "sharp"), seed=11, workers=1)
    geom = Geometry.identity(2, spacing)
    truth = sitk.Euler2DTransform()
    truth.SetCenter(centre_of((96, 96), geom))
    truth.SetAngle(math.radians(6.0))
    truth.SetTranslation((7.0, -5.0))
    moved = round_fov(move(recon["soft"], geom, truth, -1000.0), -3024.0)
    out = align_pair(recon["sharp"], geom, moved, geom, "rigid", modality="CT", label="2d")
    assert len(out.transform) == 3 + 2
    body = slice_ > -500
    assert rms_error(out, truth, body, geom) < 0.5 * spacing[0]
    assert out.target.shape == (96, 96) and out.valid.shape == (96, 96)
    before = align_pair(recon["sharp"], geom, moved, geom, "none", modality="CT", label="2d")
    assert out.residual < 0.7 * before.residual
