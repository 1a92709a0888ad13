"""Configuration errors: each is one line that says what to do, a non-zero exit code, no traceback unless --debug."""

from __future__ import annotations

import os

import pytest

from config import CONFIG_NAME, ConfigError, EvalConfig, TrainConfig, parse_config
from conftest import FAKE_TOKEN, record, run, write_jsonl
from dataset import DataError, load_records
from hub import TINY_MODEL, ModelError
from loading import load_for_training, load_tokenizer
from model import Llama
from tiny_llama import ensure_tiny_llama


def one_line_error(proc) -> str:
    """The error line, after checking there is exactly one and no traceback (bitsandbytes may warn on import before it)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and FAKE_TOKEN not in proc.stdout + proc.stderr  # run() sets HF_TOKEN
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    return errors[0]


# --- flags and values ----------------------------------------------------------------------


def test_unknown_flag_is_one_line_with_a_suggestion():
    line = one_line_error(run("main.py", "--lora-rank", "8", "--learning_rate", "1e-4"))
    assert line.startswith("error: unrecognized arguments: --lora-rank 8 --learning_rate 1e-4")
    assert "did you mean --lora-r, --learning-rate?" in line and "`python main.py --help` lists every flag" in line


def test_argparse_errors_are_one_line(capsys):
    for argv, message in ((["--lora-r", "eight"], "argument --lora-r: invalid int value: 'eight'"),
                          (["--adaptr", "x"], "unrecognized arguments: --adaptr x (did you mean --adapter?)")):
        with pytest.raises(SystemExit) as exit_:
            parse_config(EvalConfig if "--adaptr" in argv else TrainConfig, argv, "t")
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: " + message) and err.count("\n") == 1 and "usage:" not in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora-r", "0"], "lora_r must be positive (got 0)"),
        (["--learning-rate", "-0.001"], "learning_rate must be positive (got -0.001)"),
        (["--val-fraction", "1"], "val_fraction must be in [0, 1) (got 1.0)"),
        (["--val-fraction", "1.5"], "val_fraction must be in [0, 1) (got 1.5)"),
        (["--max-length", "8192"], "pack_tokens must be >= max_length"),
    ],
)
def test_impossible_values_name_the_field_and_the_value(flags, message):
    with pytest.raises(ConfigError) as err:
        parse_config(TrainConfig, flags, "t")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_debug_shows_the_traceback():
    proc = run("main.py", "--lora-r", "0", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError: lora_r must be positive" in proc.stderr


def test_output_dir_that_is_a_file(tmp_path, capsys):
    import main

    path = tmp_path / "a_file"
    path.write_text("")
    with pytest.raises(SystemExit) as exit_:
        main.main(["--preset", "smoke", "--output-dir", str(path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: --output-dir {path} is a file; choose a directory\n"


# --- data ------------------------------------------------------------------------------------


def test_max_length_below_every_prompt_says_so(tiny_tokenizer):
    from main import prepare_data

    cfg = TrainConfig(base_model=TINY_MODEL, dataset="data/dolly_sample.jsonl", max_length=16)
    with pytest.raises(DataError) as err:
        prepare_data(cfg, load_records(cfg.dataset), tiny_tokenizer)
    assert str(err.value) == ("data/dolly_sample.jsonl: no training record left: 76 of 76 records whose prompt "
                              "(template + instruction + context) is longer than --max-length 16 (raise it)")


def test_empty_responses_are_named_as_the_cause(tiny_tokenizer, tmp_path):
    from main import prepare_data

    path = write_jsonl(tmp_path / "blank.jsonl", [record(f"Question {i}?", "", "  ") for i in range(6)])
    cfg = TrainConfig(base_model=TINY_MODEL, dataset=path, val_fraction=0)
    with pytest.raises(DataError) as err:
        prepare_data(cfg, load_records(cfg.dataset), tiny_tokenizer)
    assert str(err.value) == (
        f"{path}: no training record left: 6 of 6 records with an empty response (nothing to learn; fill the response column)"
    )


# --- eval.py: adapters ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> str:
    """A LoRA adapter of the tiny Llama (hidden 64, 2 layers), as main.py saves it, untrained."""
    from config import save_config

    cfg = TrainConfig(base_model=TINY_MODEL)
    model, tokenizer, _ = load_for_training(cfg)
    out = str(tmp_path_factory.mktemp("adapter"))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_config(cfg, os.path.join(out, CONFIG_NAME))
    return out


def other_base(folder, **sizes) -> str:
    """A random Llama with other sizes, and the tiny tokenizer: a base the adapter was not trained on."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(ensure_tiny_llama())
    config = LlamaConfig(vocab_size=len(tokenizer), num_attention_heads=4, num_key_value_heads=4, **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


@pytest.mark.parametrize(
    "sizes, problem",
    [
        (dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2), "is 96->32 in the base, 192->64 in the adapter"),
        (dict(hidden_size=64, intermediate_size=192, num_hidden_layers=3), "no weights for 7 of the base's layers (e.g. model.layers.2."),
    ],
)
def test_adapter_on_another_base_model_is_a_clear_error(adapter, tmp_path, sizes, problem):
    base = other_base(tmp_path / "other", **sizes)
    with pytest.raises(ModelError) as err:
        Llama.load_pretrained_model(adapter, base_model=base)
    message = str(err.value)
    assert message.startswith(f"the adapter in {adapter} does not fit the base {base} (hidden size {sizes['hidden_size']}, "
                              f"{sizes['num_hidden_layers']} layers, vocabulary 1024)")
    assert problem in message and "it was trained on tiny-random-llama: leave --base-model out" in message and "\n" not in message


def test_eval_with_another_base_model_exits_with_one_line(adapter, tmp_path):
    base = other_base(tmp_path / "other", hidden_size=32, intermediate_size=96, num_hidden_layers=2)
    line = one_line_error(run("eval.py", "--adapter", adapter, "--base-model", base, "--question", "Hi?"))
    assert line.startswith(f"error: the adapter in {adapter} does not fit the base {base}")


def test_the_adapter_still_loads_on_its_own_base(adapter):
    assert Llama.load_pretrained_model(adapter).has_adapter


def test_missing_adapter_directory(tmp_path, capsys):
    import eval as eval_script

    with pytest.raises(SystemExit) as exit_:
        eval_script.main(["--adapter", str(tmp_path / "nowhere")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no adapter directory {tmp_path / 'nowhere'}: train one with `python main.py`") and err.count("\n") == 1


def test_eval_out_that_is_a_file(adapter, tmp_path, capsys):
    import eval as eval_script

    path = tmp_path / "report"
    path.write_text("")
    with pytest.raises(SystemExit) as exit_:
        eval_script.main(["--adapter", adapter, "--out", str(path), "--split", "validation"])
    assert exit_.value.code == 2 and capsys.readouterr().err == f"error: --out {path} is a file; choose a directory for the report\n"
