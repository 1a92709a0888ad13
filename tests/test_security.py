"""Security: no remote code unless asked, adapters as safetensors only, no pickle loading without weights_only."""

from __future__ import annotations

import pytest

import loading
from config import TrainConfig
from hub import ModelError
from loading import load_for_training
from model import Llama


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

    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", base_model)
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


def test_every_torch_load_of_a_run_and_its_resume_is_weights_only(tmp_path, monkeypatch):
    """Pickles run code when loaded: every torch.load that training, --resume and adapter loading make must be weights_only.

    torch.load is wrapped (not grepped for): the calls transformers makes for us (the RNG, optimizer and scheduler
    states of a checkpoint) count too. Without an explicit argument torch >= 2.6 loads weights only.
    """
    import torch

    import main

    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "run")
    flags = ["--preset", "smoke", "--output-dir", out, "--save-steps", "1", "--eval-steps", "0"]
    assert main.main([*flags, "--max-steps", "1"]) == 0
    assert main.main([*flags, "--max-steps", "2", "--resume"]) == 0
    Llama.load_pretrained_model(out)
    assert len(calls) >= 3, "resuming must read the checkpoint's optimizer, scheduler and RNG states"
    assert all(w is None or w is True for w in calls), calls
    assert tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 6), "the default of weights_only is True from torch 2.6"
