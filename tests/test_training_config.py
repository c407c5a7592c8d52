"""The training config: keys, defaults, overrides, and errors before any training starts."""

from __future__ import annotations

import re

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from lavender.training.config import ConfigError, build_config, load_config, lora_target_regex, parse_overrides


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "targets").mkdir()
    return {
        "model_name_or_path": str(tmp_path / "model"),
        "train_file": str(tmp_path / "train.jsonl"),
        "targets_dir": str(tmp_path / "targets"),
        "output_dir": str(tmp_path / "out"),
    }


def test_paper_defaults(paths):
    config = build_config(paths)
    lavender, training = config.lavender, config.training
    assert lavender.att_weight == 10.0
    assert (lavender.lora_r, lavender.lora_alpha, lavender.lora_dropout) == (8, 32, 0.05)
    assert lavender.lora_target_modules == ["q_proj", "v_proj"] and lavender.use_peft
    assert (lavender.aggregation, lavender.aligner) == ("mean", "sim")
    assert lavender.att_normalization is None  # the targets' own normalisation
    assert training.learning_rate == 1e-4 and training.weight_decay == 0.0 and training.optim == "adamw_torch_fused"
    assert training.remove_unused_columns is False


def test_yaml_file_and_command_line_overrides(paths, tmp_path):
    # YAML reads 1e-4 as a string; the field's type decides
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**paths, "learning_rate": "2e-4", "max_steps": 5}) + "att_weight: 1e1\n")
    overrides = parse_overrides(
        ["--max_steps", "7", "--lora_target_modules", "q_proj,k_proj", "--att_text=both", "--bf16", "false",
         "--att_layers", "[1, 3]", "--use_peft"]
    )
    config = load_config(tmp_path / "c.yaml", overrides)
    assert config.training.learning_rate == 2e-4 and config.training.max_steps == 7
    assert config.training.bf16 is False
    assert config.lavender.att_weight == 10.0
    assert config.lavender.lora_target_modules == ["q_proj", "k_proj"]
    assert config.lavender.att_text == "both" and config.lavender.att_layers == [1, 3]
    assert config.lavender.use_peft is True


def test_yaml_words_no_and_off_stay_words_for_strategy_keys(paths, tmp_path):
    # YAML 1.1 reads `no` as false; TrainingArguments' strategies take the word "no"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(paths) + "eval_strategy: no\n")
    config = load_config(tmp_path / "c.yaml", parse_overrides(["--save_strategy", "no", "--bf16", "no"]))
    assert config.training.save_strategy == "no" and config.training.eval_strategy == "no"
    assert config.training.bf16 is False


@pytest.mark.parametrize("key, suggestion", [("learning_rat", "learning_rate"), ("att_wieght", "att_weight"), ("lora_rank", "lora_r")])
def test_unknown_key_names_the_closest(paths, key, suggestion):
    with pytest.raises(ConfigError, match=rf"{key} \(did you mean .*{suggestion}"):
        build_config({**paths, key: 1})


def test_missing_targets_folder_says_how_to_make_it(paths):
    with pytest.raises(ConfigError, match="targets_dir not found.*lavender targets"):
        build_config({**paths, "targets_dir": paths["targets_dir"] + "_nope"})


@pytest.mark.parametrize(
    "key, value, message",
    [("aligner", "simm", "aligner: 'simm' is not one of deep, light, none, sim"),
     ("att_text", "caption", "att_text"),
     ("aggregation", "median", "aggregation"),
     ("lora_dropout", 1.5, "lora_dropout"),
     ("att_weight", -1, "att_weight"),
     ("att_target_power", 0, "att_target_power must be positive"),
     ("att_loss", "l1", "att_loss: 'l1' is not one of kl, mse")],
)
def test_bad_values_are_refused(paths, key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config({**paths, key: value})


def test_kl_loss_takes_the_vlms_own_attention_only(paths):
    with pytest.raises(ConfigError, match="the output of aligner sim is not"):
        build_config({**paths, "att_loss": "kl"})  # the default aligner
    with pytest.raises(ConfigError, match="att_loss kl reads the VLM's maps as distributions"):
        build_config({**paths, "att_loss": "kl", "aligner": "none", "att_normalization": "minmax"})
    assert build_config({**paths, "att_loss": "kl", "aligner": "none"}).lavender.att_loss == "kl"


def test_required_keys(paths):
    for key in ("model_name_or_path", "train_file", "targets_dir", "output_dir"):
        with pytest.raises(ConfigError, match=key):
            build_config({k: v for k, v in paths.items() if k != key})


def test_lora_targets_are_scoped_to_the_language_model():
    pattern = lora_target_regex(["q_proj", "v_proj"])
    # PEFT full-matches a string target against module names
    assert re.fullmatch(pattern, "model.language_model.layers.0.self_attn.q_proj")
    assert re.fullmatch(pattern, "model.language_model.layers.3.cross_attn.v_proj")
    assert not re.fullmatch(pattern, "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")
    assert not re.fullmatch(pattern, "model.language_model.layers.0.self_attn.k_proj")
    assert re.fullmatch(pattern, "model.text_model.layers.1.self_attn.q_proj")  # Idefics3
    assert not re.fullmatch(pattern, "model.vision_model.encoder.layers.0.self_attn.q_proj")  # Idefics3
    assert lora_target_regex(r".*\.q_proj") == r".*\.q_proj"  # a string is the user's own regex
    both = lora_target_regex(["q_proj", "v_proj"], vision=True)
    assert re.fullmatch(both, "model.language_model.layers.0.self_attn.q_proj")
    assert re.fullmatch(both, "model.vision_model.transformer.layers.0.self_attn.v_proj")  # Mllama
    assert re.fullmatch(both, "model.vision_tower.encoder.layers.1.self_attn.q_proj")  # LLaVA
    assert not re.fullmatch(both, "model.multi_modal_projector.q_proj")


def test_overrides_need_dashes():
    with pytest.raises(ConfigError, match="expected --key value"):
        parse_overrides(["max_steps", "3"])


@given(st.dictionaries(st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True), st.integers(-5, 5) | st.booleans(), max_size=5))
def test_overrides_round_trip(values):
    items = []
    for key, value in values.items():
        items += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    assert parse_overrides(items) == values


def test_shipped_configs_use_known_keys(paths):
    from importlib import resources

    folder = resources.files("lavender") / "configs"
    names = [entry.name for entry in folder.iterdir() if entry.name.endswith(".yaml")]
    assert {"llava_lora.yaml", "mllama_lora.yaml"} <= set(names)
    for name in names:
        keys = yaml.safe_load((folder / name).read_text())
        keys.update(paths)
        keys.pop("bf16", None)  # needs a GPU to validate
        config = build_config(keys)
        assert config.lavender.att_weight == 10.0, name
