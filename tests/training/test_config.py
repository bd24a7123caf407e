import json

import pytest
import yaml

from brushnet.training.config import ConfigError, TrainConfig, parse_train_args, save_config

REQUIRED = ["--pretrained_model_name_or_path", "base", "--train_shards", "data/{0..3}.tar"]


def test_file_values_and_flag_override(tmp_path):
    config_file = tmp_path / "train.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "pretrained_model_name_or_path": "from-file",
                "train_shards": "shards/",
                "resolution": 256,
                "learning_rate": 3e-5,
                "use_ema": True,
                "mask": {"mode": "brush", "p_swap": 0.1},
            }
        )
    )
    config = parse_train_args(
        ["--config", str(config_file), "--resolution", "128", "--no-use_ema", "--mask_p_swap", "0.25"]
    )
    assert config.pretrained_model_name_or_path == "from-file"
    assert config.resolution == 128  # flag wins
    assert config.learning_rate == 3e-5  # file value kept
    assert config.use_ema is False
    assert config.mask.mode == "brush" and config.mask.p_swap == 0.25  # nested key merged with the flag
    assert config.train_batch_size == 2  # default


def test_json_config_file(tmp_path):
    config_file = tmp_path / "train.json"
    config_file.write_text(json.dumps({"pretrained_model_name_or_path": "b", "train_data_dir": "d"}))
    assert parse_train_args(["--config", str(config_file)]).train_data_dir == "d"


def test_unknown_key_in_file_is_an_error(tmp_path):
    config_file = tmp_path / "train.yaml"
    config_file.write_text("pretrained_model_name_or_path: b\ntrain_shards: s\nlearnig_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"learnig_rate: unknown option"):
        parse_train_args(["--config", str(config_file)])


def test_unknown_nested_mask_key_is_an_error(tmp_path):
    config_file = tmp_path / "train.yaml"
    config_file.write_text("pretrained_model_name_or_path: b\ntrain_shards: s\nmask: {p_swapp: 0.1}\n")
    with pytest.raises(ConfigError, match=r"mask.p_swapp: unknown option"):
        parse_train_args(["--config", str(config_file)])


def test_invalid_values_are_errors():
    with pytest.raises(ConfigError, match="exactly one of train_data_dir and train_shards"):
        parse_train_args(["--pretrained_model_name_or_path", "b"])
    with pytest.raises(ConfigError, match="caption_dropout"):
        parse_train_args([*REQUIRED, "--caption_dropout", "1.5"])
    with pytest.raises(ConfigError, match="go together"):
        parse_train_args([*REQUIRED, "--validation_prompts", "a", "b", "--validation_images", "x.png"])
    with pytest.raises(ConfigError, match=r"unknown flag --learnig_rate \(did you mean --learning_rate\?\)"):
        parse_train_args([*REQUIRED, "--learnig_rate", "1"])


def test_saved_config_round_trips(tmp_path):
    config = parse_train_args([*REQUIRED, "--validation_prompts", "a cat", "--validation_images", "i.png",
                               "--validation_masks", "m.png", "--mask_mode", "mix"])  # fmt: skip
    path = tmp_path / "out" / "train_config.yaml"
    save_config(config, path)
    assert TrainConfig(**yaml.safe_load(path.read_text())) == config
    assert [p.name for p in path.parent.iterdir()] == ["train_config.yaml"]  # no temporary file left
