import pytest
import yaml

from llmcompress.config import (STAGE_CONFIGS, CalibrateConfig, QuantizeConfig, load_config, parse_override,
                                schema_rows)
from llmcompress.errors import ConfigError, UserError


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_valid_for_every_stage():
    for cls in STAGE_CONFIGS.values():
        cfg = load_config(cls)
        assert schema_rows(cls), cls
        assert cfg is not None


def test_typo_names_file_key_and_suggestion(tmp_path):
    p = write(tmp_path, "weights:\n  group_sise: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(QuantizeConfig, p)
    msg = str(e.value)
    assert str(p) in msg and "weights.group_sise" in msg and "group_size" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("text,key,expected", [
    ("weights:\n  group_size: '64'\n", "weights.group_size", "an integer"),
    ("weights:\n  group_size: 0\n", "weights.group_size", ">= 1"),
    ("weights:\n  format: int3\n", "weights.format", "one of"),
    ("weights:\n  symmetric: 1\n", "weights.symmetric", "a boolean"),
    ("include: lm_head\n", "include", "a list of a string"),
    ("weights:\n  percentile: 101\n", "weights.percentile", "<= 100"),
    ("weights:\n  observer: clip\n", "weights.clip_threshold", "threshold T > 0"),
    ("weights:\n  observer: clip\n  clip_threshold: 0\n", "weights.clip_threshold", "> 0"),
])
def test_wrong_types_and_ranges(tmp_path, text, key, expected):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(QuantizeConfig, p)
    assert e.value.key == key
    assert expected in str(e.value) and str(p) in str(e.value)


def test_percentile_list_checked(tmp_path):
    p = write(tmp_path, "percentiles: [99, 101]\n")
    with pytest.raises(ConfigError, match=r"percentiles\[1\]"):
        load_config(CalibrateConfig, p)


def test_malformed_yaml_is_one_line(tmp_path):
    p = write(tmp_path, "weights: [unclosed\n")
    with pytest.raises(UserError) as e:
        load_config(QuantizeConfig, p)
    assert "malformed YAML" in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError):
        load_config(QuantizeConfig, write(tmp_path, "- a\n- b\n"))


def test_set_overrides_types_and_nesting(tmp_path):
    p = write(tmp_path, yaml.safe_dump({"weights": {"format": "int4", "group_size": 128},
                                        "activations": {"format": "none"}}))
    cfg = load_config(QuantizeConfig, p, ["weights.group_size=64", "weights.symmetric=false",
                                          "exclude=[lm_head]", "model.name=some/model"])
    assert cfg.weights.format == "int4" and cfg.weights.group_size == 64 and cfg.weights.symmetric is False
    assert cfg.exclude == ["lm_head"] and cfg.model.name == "some/model"


def test_set_errors_name_the_override():
    with pytest.raises(ConfigError) as e:
        load_config(QuantizeConfig, None, ["weights.group_size=-3"])
    assert str(e.value).startswith("--set: weights.group_size")
    with pytest.raises(UserError):
        parse_override("no-equals-sign")


def test_nan_and_inf_rejected(tmp_path):
    from llmcompress.config import EvaluateConfig

    for text in ("gates:\n  max_ppl_increase_pct: .nan\n", "gates:\n  max_ppl_increase_pct: .inf\n"):
        with pytest.raises(ConfigError, match="finite"):
            load_config(EvaluateConfig, write(tmp_path, text))


def test_partial_nested_override_keeps_the_stage_defaults():
    cfg = load_config(CalibrateConfig, None, ["data.max_length=256"])
    default = load_config(CalibrateConfig)
    assert cfg.data.max_length == 256
    assert cfg.data.num_samples == default.data.num_samples and cfg.data.source == default.data.source


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    from llmcompress.config import TrainStudentConfig

    assert load_config(TrainStudentConfig, None, ["lr=3e-4"]).lr == 3e-4
    assert load_config(TrainStudentConfig, write(tmp_path, "lr: 2e-5\n")).lr == 2e-5
    with pytest.raises(ConfigError):
        load_config(TrainStudentConfig, None, ["lr=fast"])
