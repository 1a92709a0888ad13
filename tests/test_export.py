"""export.py: the merged model loads with plain transformers and computes what base + adapter computes."""

from __future__ import annotations

import os

import pytest
import torch

from config import CONFIG_NAME, TrainConfig, save_config
from conftest import answers
from dataset import create_question
from hub import TINY_MODEL
from loading import load_for_training
from model import Llama

QUESTIONS = [create_question({"instruction": "Name three colours.", "context": ""}),
             create_question({"instruction": "When was it built?", "context": "The tower was built in 1889."})]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = TrainConfig(base_model=TINY_MODEL, quantization="none")
    model, tokenizer, _ = load_for_training(cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a non-zero adapter, so merging changes the weights
    out = str(tmp_path_factory.mktemp("adapter"))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_config(cfg, os.path.join(out, CONFIG_NAME))
    return out


def test_merged_equals_unmerged(adapter_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from export import export

    merged_dir = export(adapter_dir, str(tmp_path / "merged"))
    assert os.path.isfile(os.path.join(merged_dir, "model.safetensors"))
    assert not any(f.startswith("adapter_") for f in os.listdir(merged_dir))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # plain transformers, no peft
    unmerged = Llama.load_pretrained_model(adapter_dir)
    batch = AutoTokenizer.from_pretrained(merged_dir)(QUESTIONS[:1], return_tensors="pt")
    with torch.no_grad():
        a = merged(**batch).logits
        b = unmerged.model(**batch).logits
        with unmerged.adapter(False):
            base = unmerged.model(**batch).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a - base).abs().max() > 1e-2  # the adapter really is inside the merged weights
    llama_merged = Llama(merged, unmerged.tokenizer)
    assert answers(llama_merged, QUESTIONS, max_new_tokens=12) == answers(unmerged, QUESTIONS, max_new_tokens=12)


def test_export_refuses_to_overwrite_and_names_missing_adapters(adapter_dir, tmp_path):
    from config import ConfigError
    from export import export

    (tmp_path / "exists").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        export(adapter_dir, str(tmp_path / "exists"))
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        export(str(tmp_path), str(tmp_path / "out"))


def test_from_4bit_merges_into_the_evaluated_weights(adapter_dir, tmp_path):
    """--from-4bit: the 4-bit base's dequantized values + the adapter, i.e. what eval.py scored (4-bit base + adapter)."""
    import json

    from transformers import AutoModelForCausalLM

    from export import export

    from_4bit = export(adapter_dir, str(tmp_path / "from4bit"), from_4bit=True)
    with open(os.path.join(from_4bit, "config.json")) as fh:
        assert "quantization_config" not in json.load(fh)  # a plain model now: loads without bitsandbytes
    evaluated = Llama.load_pretrained_model(adapter_dir, quantization="4bit", dequantize="no")
    batch = evaluated.tokenizer(QUESTIONS[1:], return_tensors="pt")
    with torch.no_grad():
        expected = evaluated.model(**batch).logits
        merged_4bit = AutoModelForCausalLM.from_pretrained(from_4bit).eval()(**batch).logits
        merged_16bit = AutoModelForCausalLM.from_pretrained(export(adapter_dir, str(tmp_path / "from16bit"))).eval()(**batch).logits
    torch.testing.assert_close(merged_4bit.float(), expected.float(), rtol=0, atol=5e-3)  # a dense matmul instead of the 4-bit kernel
    assert (merged_16bit - expected).abs().max() > 10 * (merged_4bit - expected).abs().max()  # the 4-bit error: the other merge
