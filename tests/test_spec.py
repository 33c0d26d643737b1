"""The model spec (msgan.spec): torch-free, checked at construction, the model's part of a config."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from msgan.config import RUN_MAY_OVERRIDE, SPEC_KEYS, Config, ConfigError, data_path_keys, load_config
from msgan.spec import HRGeneratorConfig, InferenceDefaults, ModelSpec, RuleError
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]


def test_the_spec_module_imports_no_torch():
    code = (
        "import sys\n"
        "from msgan.spec import ModelSpec\n"
        "spec = ModelSpec.from_dict({'num_scales': 3, 'hr_patch': 24, 'hr_generator': {'context': 'wide'}})\n"
        "assert spec.num_scales == 3 and spec.channels == ('edges',)\n"
        "try:\n"
        "    ModelSpec(hr_patch=16)\n"
        "except ValueError as err:\n"
        "    assert 'PatchGAN' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('the PatchGAN rule did not run')\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'yaml', 'dask', 'zarr', 'ray') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_scales": 0}, r"num_scales=0: must be >= 1"),
        ({"dims": 4}, r"dims=4: must be 2 or 3"),
        ({"hr_patch": 15}, r"^hr_patch=15: must be even"),
        ({"hr_patch": 16}, r"^hr_patch=16: is smaller than the 24 voxels a PatchGAN"),
        ({"hr_generator": HRGeneratorConfig(norm="instance")}, r"hr_generator .*per-tile statistics"),  # type: ignore[arg-type]
        ({"source_residual": True}, r"residual=True and source_residual=True"),
        ({"inference": InferenceDefaults(memory_budget_mb=0)}, r"inference\.memory_budget_mb=0: must be > 0"),
        ({"inference": InferenceDefaults(batch_size=0)}, r"inference\.batch_size=0: must be >= 1"),
    ],
)
def test_the_networks_rules_are_checked_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ModelSpec(**kwargs)


def test_from_dict_refuses_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigError, match=r"unknown key 'train'; valid keys here: dims, num_scales"):
        ModelSpec.from_dict({"train": {"steps": 3}})
    with pytest.raises(ConfigError, match=r"unknown key inference\.'actors'"):
        ModelSpec.from_dict({"inference": {"actors": 3}})
    with pytest.raises(ConfigError, match=r"condition='bones': must be one of"):
        ModelSpec.from_dict({"condition": "bones"})
    with pytest.raises(ConfigError, match="expected a mapping of ModelSpec fields"):
        ModelSpec.from_dict(["dims", 3])  # type: ignore[arg-type]


def test_a_config_names_the_spec_rules_by_its_own_keys(tmp_path):
    with pytest.raises(RuleError, match=r"^train\.hr_patch=16: is smaller than the 24 voxels") as err:
        Config().replace(**{"train.hr_patch": 16})
    assert err.value.key == "train.hr_patch"
    (tmp_path / "c.yaml").write_text("num_scales: 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.hr_patch=15: must be even"):
        load_config(tmp_path / "c.yaml", ["train.hr_patch=15"])


def test_every_spec_field_has_one_place_in_a_config():
    spec_leaves = set(_leaves(ModelSpec().to_dict()))
    covered = {leaf for leaf in spec_leaves if any(leaf == s or leaf.startswith(s + ".") for s in SPEC_KEYS)}
    assert covered == spec_leaves
    config_leaves = set(_leaves(Config().to_dict()))
    for c in SPEC_KEYS.values():
        assert any(leaf == c or leaf.startswith(c + ".") for leaf in config_leaves), c
    assert len(set(SPEC_KEYS.values())) == len(SPEC_KEYS)
    assert Config().spec() == ModelSpec()  # one set of defaults


def _leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def test_spec_to_config_to_spec_and_config_to_spec_plus_run_to_config():
    cfg = load_config(
        None,
        {**TINY, "condition": "image+edges", "source_residual": True, "hr_generator.residual": False,
         "intensity.outside": "source", "train.amp": True, "inference.batch_size": 3, "inference.actors": 5,
         "train.steps": 7, "data.source": "files", "data.paths": ["/data/a.nii.gz"], "job.storage": "s3://b/p"},
    )  # fmt: skip
    spec = cfg.spec()
    assert spec.hr_patch == 8 and spec.inference == InferenceDefaults(2048.0, 3, True)
    assert Config.from_spec(spec).spec() == spec
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    run = cfg.run_settings()
    assert Config.from_spec(spec, run) == cfg
    assert "hr_patch" not in run["train"] and "amp" not in run["train"]
    assert set(run["inference"]) == {"actors", "cpus_per_actor", "gpus_per_actor", "device"}
    assert not {"dims", "num_scales", "condition", "intensity", "edges", "hr_generator"} & set(run)
    fresh = Config.from_spec(spec)  # default run settings
    assert fresh.train.steps == Config().train.steps and fresh.data == Config().data
    assert fresh.inference.actors == Config().inference.actors


def test_a_run_may_override_the_inference_defaults_never_the_model():
    spec = load_config(None, TINY).spec()
    over = Config.from_spec(spec, {"inference.batch_size": 4, "inference": {"memory_budget_mb": 64.0}})
    assert over.inference.batch_size == 4 and over.inference.memory_budget_mb == 64.0
    assert over.spec() == dataclasses.replace(spec, inference=InferenceDefaults(64.0, 4, False))
    assert set(RUN_MAY_OVERRIDE) == {"inference.memory_budget_mb", "inference.batch_size", "train.amp"}
    for run in ({"hr_generator.width": 8}, {"train": {"hr_patch": 16}}, {"intensity": {"low": -500}}):
        with pytest.raises(ConfigError, match=r"run setting .*belongs to the model spec .*a run may override only"):
            Config.from_spec(spec, run)


def test_a_2d_spec_makes_a_config_with_default_run_settings():
    spec = ModelSpec(dims=2, num_scales=2, hr_patch=24)
    cfg = Config.from_spec(spec)
    assert cfg.dims == 2 and cfg.data.phantom.shape == (64, 64) and cfg.spec() == spec


def test_data_paths_are_marked():
    assert data_path_keys() == (
        "data.paths",
        "data.validation_paths",
        "data.holdout_paths",
        "data.pairs",
        "data.sources",
        "data.targets",
    )


# ----------------------------------------------------------------------------- intensity normalisation (MR)


@pytest.mark.parametrize(
    ("intensity", "message"),
    [
        ({"percentiles": [0.0, 99.0]}, r"^intensity\.percentiles=\[0\.0, 99\.0\]: must be \[low, high\] with 0 < low"),
        ({"percentiles": [5.0, 100.0]}, r"^intensity\.percentiles=\[5\.0, 100\.0\]: must be"),
        ({"percentiles": [99.0, 1.0]}, r"^intensity\.percentiles=\[99\.0, 1\.0\]: must be"),
        ({"percentiles": [1.0]}, r"intensity\.percentiles=\[1\.0\]: expected a list of 2 values"),
        ({"normalize": "zscore"}, r"intensity\.normalize='zscore': must be one of \['none', 'percentile'\]"),
        ({"normalize": "percentile", "outside": "source"}, r"^intensity\.outside='source': must be 'clip' with "
                                                           r"intensity\.normalize='percentile'"),
    ],
)  # fmt: skip
def test_the_normalisation_rules_are_checked_at_construction(intensity, message):
    with pytest.raises(ConfigError, match=message):
        ModelSpec.from_dict({"intensity": intensity})


def test_a_percentile_normalised_spec_round_trips_and_a_config_loads_it_from_yaml(tmp_path):
    (tmp_path / "mr.yaml").write_text(
        "intensity:\n  normalize: percentile\n  percentiles: [0.5, 99.5]\n  low: -200\n  high: 1400\n"
    )
    spec = load_config(tmp_path / "mr.yaml").spec()
    assert spec.intensity.normalize == "percentile" and spec.intensity.percentiles == (0.5, 99.5)
    values = spec.to_dict()
    assert values["intensity"]["percentiles"] == [0.5, 99.5]
    assert ModelSpec.from_dict(values) == spec


def test_a_spec_saved_before_the_normalisation_keys_loads_as_none():
    """A ``msgan-cascade/2`` manifest written before ``intensity.normalize`` existed: its window is in the
    input's own units (HU)."""
    old = ModelSpec().to_dict()
    del old["intensity"]["normalize"], old["intensity"]["percentiles"]
    assert set(old["intensity"]) == {"low", "high", "outside", "blend"}
    spec = ModelSpec.from_dict(old)
    assert spec.intensity.normalize == "none" and spec == ModelSpec()
