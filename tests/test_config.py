import pytest

from msgan.config import Config, ConfigError, load_config, parse_overrides


def test_defaults_are_valid_and_frozen():
    cfg = Config()
    assert cfg.num_scales == 4 and cfg.train.gan_loss == "lsgan" and cfg.train.lr == 2e-4
    with pytest.raises(AttributeError):
        cfg.num_scales = 3  # type: ignore[misc]


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("num_scales: 2\ntrain: {steps: 7, betas: [0.5, 0.9]}\n")
    cfg = load_config(p, ["train.steps=9", "hr_generator.context=wide"])
    assert cfg.num_scales == 2 and cfg.train.steps == 9 and cfg.train.betas == (0.5, 0.9)
    assert cfg.hr_generator.context == "wide"
    assert cfg.replace(**{"train.steps": 3}).train.steps == 3
    assert load_config(None, cfg.to_dict()) == cfg  # round trip through plain values


def test_unknown_key_lists_valid_ones(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {stpes: 3}\n")
    with pytest.raises(
        ConfigError, match=r"unknown key train\.'stpes'.*valid keys here: steps, .*Did you mean 'steps'"
    ):
        load_config(p)


@pytest.mark.parametrize(
    "override,message",
    [
        ("hr_generator.context=upscale", r"must be one of \['upscaled', 'wide'\]; did you mean 'upscaled'"),
        ("train.hr_patch=15", "must be even"),
        ("train.hr_patch=16", "smaller than the 24 voxels a PatchGAN"),
        ("train.steps=many", "expected an integer"),
        ("augment.noise_p=1.5", "probability"),
        ("intensity.high=-2000", "must exceed intensity.low"),
        ("data.phantom.shape=[8, 8]", "dims=3"),
        ("data.source=files", "at least one file"),
        ("hr_generator.norm=instance", r"must be one of \['batch', 'none'\]"),
        ("condition=image+edge", r"must be one of \['edges', 'image', 'image\+edges'\]; did you mean"),
        ("source_residual=true", r"residual=True and source_residual=True"),
        ("intensity.outside=keep", r"must be one of \['clip', 'source'\]"),
        ("intensity.blend=-0.1", "must be >= 0"),
    ],
)
def test_rules_checked_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_source_residual_excludes_the_previous_scale_residual():
    with pytest.raises(ConfigError, match=r"hr_generator .*residual=True and source_residual=True.*set residual=false"):
        load_config(None, ["condition=image", "source_residual=true"])
    with pytest.raises(ConfigError, match=r"source_residual=True needs the source image.*condition='edges'"):
        load_config(None, ["source_residual=true", "hr_generator.residual=false"])
    cfg = load_config(None, ["condition=image+edges", "source_residual=true", "hr_generator.residual=false"])
    assert cfg.source_residual and cfg.condition == "image+edges"


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["train.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    for p in sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")):
        load_config(p)


def test_loading_a_config_imports_no_torch():
    """The config checks the networks' rules through the torch-free msgan.netrules: no torch at load."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = (
        "import sys\n"
        "from msgan.config import load_config\n"
        "cfg = load_config('configs/demo.yaml', ['hr_generator.context=wide'])\n"
        "assert cfg.num_scales > 1  # the PatchGAN and HR option rules ran\n"
        "heavy = sorted(m for m in ('torch', 'dask', 'SimpleITK', 'ray') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_network_values_have_one_definition():
    """The config's conditioning, norm and context values are the networks' own (msgan.netrules)."""
    import typing

    from msgan import netrules
    from msgan.config import DiscriminatorConfig, HRGeneratorConfig

    hints = typing.get_type_hints(Config)
    assert hints["condition"] is netrules.ConditionKind
    assert typing.get_args(hints["condition"]) == netrules.CONDITIONS
    assert typing.get_type_hints(HRGeneratorConfig)["norm"] is netrules.VoxelNorm
    assert typing.get_type_hints(HRGeneratorConfig)["context"] is netrules.HRContext
    assert typing.get_type_hints(DiscriminatorConfig)["norm"] is netrules.NormKind
    assert set(typing.get_args(netrules.HRContext)) < set(netrules.CONTEXTS)
