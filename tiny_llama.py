"""The tiny random Llama the smoke preset and the tests train: 2 layers, hidden 64, built in code, in seconds.

Its tokenizer is a byte-level BPE with Llama's conventions (<unk>=0, <s>=1 prepended, </s>=2, no pad),
trained on the template and the shipped sample, so dolly-like text takes realistic numbers of tokens.
Same seed, same weights: the golden losses in tests/test_cli.py rest on that.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch
from transformers import PreTrainedTokenizerBase

import atomic
from dataset import SAMPLE_PATH, TEMPLATE
from hub import CACHE_DIR, TINY_MODEL


def tiny_llama_corpus() -> Iterable[str]:
    """Text the tiny tokenizer learns its merges from: the template and the shipped sample."""
    yield from TEMPLATE.values()
    with open(SAMPLE_PATH, encoding="utf-8") as fh:
        for line in fh:
            yield from json.loads(line).values()


def build_tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerBase:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(tiny_llama_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_tiny_llama(path: str, seed: int = 0) -> str:
    """Write a 2-layer random Llama (and its tokenizer) to `path`, atomically. Same seed, same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG (LoRA init, data order) untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    try:
        with atomic.folder(path) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not os.path.isfile(os.path.join(path, "config.json")):  # else another process won the race; its copy is identical
            raise
    return path


def ensure_tiny_llama() -> str:
    path = os.path.join(CACHE_DIR, TINY_MODEL)
    return path if os.path.isfile(os.path.join(path, "config.json")) else build_tiny_llama(path)
