"""The bone-suppression radiograph pair (msgan.data.radiographs): the target is the same projection without bone."""

import functools

import numpy as np
import pytest
from scipy import ndimage

from msgan.data.phantom import Label, PhantomOptions
from msgan.data.radiographs import (
    NOISE,
    RADIOGRAPH_PHANTOM,
    bone_suppression_pair,
    radiograph_geometry,
    radiograph_spacing,
)

SIZE = (64, 48)
DEPTH = 32


@functools.cache
def pair(seed=301, noise=NOISE, dense=True):
    options = PhantomOptions(dense_bone=dense, metal=False, emphysema=True, aorta=True)
    return bone_suppression_pair(seed, SIZE, depth=DEPTH, noise=noise, slab=64, options=options)


def test_pair_is_a_pure_function_of_the_seed():
    a, b = pair(), bone_suppression_pair(301, SIZE, depth=DEPTH, slab=32, options=RADIOGRAPH_PHANTOM)  # other slabs
    for name in ("input", "target", "noiseless", "body", "bone"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.input.shape == a.target.shape == a.noiseless.shape == SIZE and a.input.dtype == np.float32
    assert a.spacing == radiograph_spacing(SIZE) == (400.0 / 64, 400.0 / 64)
    assert radiograph_geometry(SIZE).spacing == (400.0 / 64, 400.0 / 64)
    assert np.abs(pair(302).input - a.input).mean() > 0.01  # another subject


def test_target_has_no_bone_contrast_where_bone_was():
    # The bone's attenuation changes (cortical 750 HU vs a subject's 1500-2000 HU): the input changes where bone is
    # and the target not at all, anywhere: it holds soft tissue in the bone's place.
    dense, plain = pair(noise=0.0, dense=True), pair(noise=0.0, dense=False)
    np.testing.assert_allclose(dense.noiseless, plain.noiseless, atol=1e-6)
    np.testing.assert_array_equal(dense.target, dense.noiseless)  # noise 0: the target is its noiseless self
    assert dense.bone.mean() > 0.05 and (dense.bone <= dense.body).all()
    moved = dense.input - plain.input
    assert moved[dense.bone].mean() > 0.01  # denser cortex: brighter where bone is
    far = ~ndimage.binary_dilation(dense.bone, iterations=4)  # beyond the detector blur of any bone
    assert np.abs(moved[far]).max() < 1e-5
    # input - target is the bone's excess attenuation over soft tissue: positive on bone, nothing elsewhere
    excess = dense.input - dense.noiseless
    assert excess[dense.bone].mean() > 0.03 and np.abs(excess[far]).max() < 1e-5


def test_input_and_target_have_independent_noise_of_one_level():
    clean_in, p = pair(noise=0.0).input, pair()
    n_in, n_out = (p.input - clean_in).ravel(), (p.target - p.noiseless).ravel()
    assert n_in.std() == pytest.approx(NOISE, rel=0.1) and n_out.std() == pytest.approx(NOISE, rel=0.1)
    assert abs(np.corrcoef(n_in, n_out)[0, 1]) < 0.1


def test_refuses_bad_sizes():
    with pytest.raises(ValueError, match="must be positive"):
        bone_suppression_pair(1, (0, 8))
    with pytest.raises(ValueError, match="noise"):
        bone_suppression_pair(1, 8, noise=-1.0)


def test_bone_labels_cover_the_skeleton():
    from msgan.data.radiographs import BONE_LABELS

    assert set(BONE_LABELS) == {Label.CORTICAL, Label.CANCELLOUS}
