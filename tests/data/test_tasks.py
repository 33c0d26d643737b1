"""msgan.data.tasks: the translation tasks' phantoms and their fixed seed splits."""

import functools

import numpy as np
import pytest

from msgan.data.phantom import KERNELS, Label
from msgan.data.tasks import SEEDS, TASKS, make_task, split_of

SHAPE = (24, 32, 32)


@functools.cache
def task(name, seed):
    return make_task(name, seed, SHAPE)


def test_seed_splits_are_disjoint_and_fixed():
    sets = {k: set(v) for k, v in SEEDS.items()}
    assert not (sets["train"] & sets["validation"]) and not (sets["train"] & sets["heldout"])
    assert not (sets["validation"] & sets["heldout"])
    assert len(SEEDS["heldout"]) == 8  # n of the paired tests, fixed before any run
    assert split_of(301) == "heldout" and split_of(101) == "train"
    with pytest.raises(ValueError, match="no split"):
        split_of(999)


@pytest.mark.parametrize("name", TASKS)
def test_tasks_reproducible_from_seed(name):
    a, b = make_task(name, 101, SHAPE), task(name, 101)
    for array in ("input", "target", "noiseless", "labels"):
        np.testing.assert_array_equal(getattr(a, array), getattr(b, array))
    c = make_task(name, 102, SHAPE)
    assert np.mean(np.abs(c.input - a.input)) > 1.0
    assert a.input.dtype == a.target.dtype == a.noiseless.dtype == np.float32 and a.labels.dtype == np.uint8
    assert a.input.shape == a.target.shape == a.noiseless.shape == a.labels.shape == SHAPE


def test_task_definitions():
    k = task("sharp-to-soft", 101)
    s = task("soft-to-sharp", 101)
    np.testing.assert_array_equal(k.input, s.target)  # the same acquisition, both directions
    np.testing.assert_array_equal(k.target, s.input)
    outside = k.labels == Label.OUTSIDE
    assert (~outside).any()
    assert float((k.target - k.noiseless)[outside].std()) == pytest.approx(KERNELS["soft"].noise_hu, rel=0.3)

    d = task("low-dose", 101)
    extra = d.input - d.target
    factor = d.params["dose_factor"]
    assert 4.0 <= factor <= 10.0
    want = KERNELS["soft"].noise_hu * np.sqrt(factor - 1.0)
    assert float(extra.std()) == pytest.approx(want, rel=1e-3)  # input = target + extra quantum noise

    c = task("contrast", 101)
    blood = np.isin(c.labels, (Label.AORTA, Label.HEART_BLOOD))
    assert blood.any()
    rise = c.noiseless - d.noiseless  # same phantom, soft MTF, no noise
    assert float(np.median(rise[blood])) > 150  # raised towards 250-350 HU (partial volume at 32^3)
    far = np.isin(c.labels, (Label.FAT,))
    assert float(np.median(np.abs(rise[far]))) < 5  # everything else unchanged
    noise_in, noise_out = c.input[outside] - d.noiseless[outside], c.target[outside] - c.noiseless[outside]
    assert abs(np.corrcoef(noise_in, noise_out)[0, 1]) < 0.1  # separate acquisitions
    with pytest.raises(ValueError, match="did you mean 'low-dose'"):
        make_task("low_dose", 101, SHAPE)


def test_the_unpaired_split_keeps_every_subject_on_one_side():
    from msgan.data.tasks import UNPAIRED_METHODS, UNPAIRED_SEEDS

    sources, targets = set(UNPAIRED_SEEDS["train_sources"]), set(UNPAIRED_SEEDS["train_targets"])
    assert not sources & targets and sources | targets == set(SEEDS["train"])
    assert UNPAIRED_SEEDS["heldout"] == SEEDS["heldout"] and len(UNPAIRED_SEEDS["heldout"]) == 8
    assert not (sources | targets) & set(UNPAIRED_SEEDS["validation"] + UNPAIRED_SEEDS["heldout"])
    assert UNPAIRED_METHODS[-2:] == ("ours", "paired") and "cyclegan" in UNPAIRED_METHODS
