"""config.py: every field is a documented flag; presets, files and flags layer in order; bad values fail clearly."""

from __future__ import annotations

import dataclasses

import pytest

from config import ConfigError, EvalConfig, TrainConfig, parse_config


def test_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(TrainConfig, ["--help"], "train")
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "--preset {smoke,demo}" in text and "--config CONFIG" in text
    assert "(default: meta-llama/Llama-2-7b-hf)" in text and "(default: 16)" in text


def test_defaults_are_the_qlora_recipe():
    cfg, _ = parse_config(TrainConfig, [], "train")
    assert (cfg.base_model, cfg.dataset, cfg.output_dir) == ("meta-llama/Llama-2-7b-hf", "databricks/databricks-dolly-15k", "llama_adapter")
    assert (cfg.quantization, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == ("4bit", 16, 32, 0.0)
    assert (cfg.packing, cfg.pack_tokens, cfg.liger) == (True, 4096, True)
    assert cfg.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (cfg.lr_scheduler, cfg.gradient_checkpointing, cfg.max_length) == ("cosine", True, 1024)


def test_layers_preset_then_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_r: 8\nlearning_rate: 0.01\n")
    cfg, _ = parse_config(
        TrainConfig, ["--preset", "smoke", "--config", str(path), "--learning-rate", "0.5", "--no-gradient-checkpointing"], "t"
    )
    assert cfg.base_model == "tiny-random-llama"  # from the preset
    assert cfg.lora_r == 8  # the file beats the preset
    assert cfg.learning_rate == 0.5  # the flag beats the file
    assert cfg.gradient_checkpointing is False
    cfg, _ = parse_config(TrainConfig, ["--lora-target-modules", "q_proj", "v_proj"], "t")
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]


def test_eval_preset_points_at_the_preset_adapter():
    cfg, _ = parse_config(EvalConfig, ["--preset", "smoke"], "e")
    assert cfg.adapter == "outputs/smoke" and cfg.max_new_tokens == 16


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora-r", "0"], "lora_r must be positive"),
        (["--learning-rate", "-1"], "learning_rate must be positive"),
        (["--val-fraction", "1"], r"val_fraction must be in \[0, 1\)"),
        (["--max-length", "4"], "max_length must be at least 16"),
        (["--attention", "varlen", "--no-packing"], r"attention varlen needs --packing .*\(got varlen\)"),
    ],
)
def test_impossible_values_are_rejected(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(TrainConfig, flags, "t")


def test_unknown_keys_in_a_file_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_rank: 8\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown setting\(s\) lora_rank"):
        parse_config(TrainConfig, ["--config", str(path)], "t")


def test_bad_choice_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(TrainConfig, ["--quantization", "3bit"], "t")
    assert exit_.value.code == 2
    assert "invalid choice: '3bit'" in capsys.readouterr().err
