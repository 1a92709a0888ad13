"""Security: no remote code unless asked, adapters as safetensors only, no pickle loading without weights_only."""

from __future__ import annotations

import os
import re

import pytest

import model as model_lib
from config import TrainConfig
from conftest import ROOT
from model import Llama, ModelError, load_for_training


@pytest.fixture
def recorded(monkeypatch, tiny_tokenizer):
    """Replace from_pretrained for tokenizers (returns the tiny one) and models (refuses): record the keyword arguments."""
    calls = {}

    def tokenizer(name, **kwargs):
        calls["tokenizer"] = kwargs
        return tiny_tokenizer

    def base_model(name, **kwargs):
        calls["model"] = kwargs
        raise OSError("stop here: 404 not found")

    monkeypatch.setattr(model_lib.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(model_lib.AutoModelForCausalLM, "from_pretrained", base_model)
    return calls


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_is_off_unless_passed(recorded, trust):
    flags = {"trust_remote_code": True} if trust else {}
    with pytest.raises(ModelError):
        load_for_training(TrainConfig(base_model="someone/some-model", **flags))
    assert recorded["tokenizer"]["trust_remote_code"] is trust and recorded["model"]["trust_remote_code"] is trust
    assert TrainConfig().trust_remote_code is False


def test_eval_loads_without_remote_code(recorded):
    with pytest.raises(ModelError):
        Llama.load_pretrained_model("someone/some-model")
    assert recorded["tokenizer"]["trust_remote_code"] is False and recorded["model"]["trust_remote_code"] is False


def test_a_pickled_adapter_is_not_loaded(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "tiny-random-llama", "target_modules": ["q_proj"]}')
    (tmp_path / "adapter_model.bin").write_bytes(b"a pickle could run code")
    with pytest.raises(ModelError, match="adapter_model.bin is a pickle file and is not loaded"):
        Llama.load_pretrained_model(str(tmp_path))


def test_torch_load_is_always_weights_only():
    """The project reads no pickles; should it ever call torch.load, then only with weights_only=True."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.endswith(".py") and name != "test_security.py":
                with open(os.path.join(folder, name), encoding="utf-8") as fh:
                    for call in re.findall(r"torch\.load\([^)]*\)", fh.read()):
                        assert "weights_only=True" in call, f"{name}: {call}"
