"""model.py: the real 4-bit QLoRA path on a tiny random Llama, save/load, adapter on/off."""

from __future__ import annotations

import json
import os

import pytest
import torch

import generation
from config import CONFIG_NAME, TrainConfig, save_config
from conftest import answers
from dataset import create_question
from hub import TINY_MODEL, ModelError, explain_load_error
from loading import load_base_model, load_for_training
from model import Llama
from runtime import runtime

QUESTIONS = [
    create_question({"instruction": "What is the capital of France?", "context": ""}),
    create_question({"instruction": "When was it built?", "context": "The tower was built in 1889."}),
    create_question({"instruction": "Name three colours.", "context": ""}),
]


def one_training_step(model, tokenizer) -> float:
    """One AdamW step on the LoRA weights with a large learning rate, so the adapter changes outputs."""
    model.train()
    batch = tokenizer(["### Response:\nParis is the capital of France."], return_tensors="pt").to(model.device)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05).step()
    return loss.item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """load (4-bit NF4) -> LoRA -> one training step -> save, as main.py does."""
    torch.manual_seed(0)
    cfg = TrainConfig(base_model=TINY_MODEL, quantization="4bit")
    model, tokenizer, _ = load_for_training(cfg)
    loss = one_training_step(model, tokenizer)
    out = str(tmp_path_factory.mktemp("adapter"))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_config(cfg, os.path.join(out, CONFIG_NAME))
    return model, tokenizer, out, loss


def test_base_is_4bit_nf4_and_only_lora_trains(trained):
    import bitsandbytes as bnb

    model, _, _, loss = trained
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # r=16 on 7 linear layers x 2 layers: (q,k,v,o) 4*16*(64+64) + (gate,up) 2*16*(64+192) + down 16*(192+64)
    assert trainable == 2 * (4 * 16 * 128 + 2 * 16 * 256 + 16 * 256) == 40960
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert 6.0 < loss < 8.0  # ~ln(1024) for a random model


def test_saved_adapter_is_peft_format(trained):
    _, _, out, _ = trained
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))
    with open(os.path.join(out, "adapter_config.json")) as fh:
        config = json.load(fh)
    assert config["r"] == 16 and config["lora_alpha"] == 32
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def test_reloaded_adapter_answers_like_the_in_memory_model(trained):
    model, tokenizer, out, _ = trained
    in_memory = answers(Llama(model, tokenizer), QUESTIONS, batch_size=2, max_new_tokens=12)
    loaded = Llama.load_pretrained_model(out)
    assert loaded.has_adapter and loaded.base_model == TINY_MODEL
    assert answers(loaded, QUESTIONS, batch_size=2, max_new_tokens=12) == in_memory
    assert loaded.ask_model(QUESTIONS[0], max_new_tokens=12) == in_memory[0]  # batch of 1 == left-padded batch


def test_adapter_off_is_exactly_the_base_model(trained):
    _, _, out, _ = trained
    llama = Llama.load_pretrained_model(out)
    base = Llama(load_base_model(_tiny_path()), llama.tokenizer)
    with_adapter = answers(llama, QUESTIONS, max_new_tokens=12)
    without = answers(llama, QUESTIONS, max_new_tokens=12, use_adapter=False)
    assert without == answers(base, QUESTIONS, max_new_tokens=12)
    assert with_adapter != without  # the trained adapter really changes the answers
    batch = llama.tokenizer(QUESTIONS[:1], return_tensors="pt").to(llama.model.device)
    with torch.no_grad(), llama.adapter(False):
        logits_off = llama.model(**batch).logits
    assert torch.equal(logits_off, base.model(**batch).logits)


def _tiny_path() -> str:
    from tiny_llama import ensure_tiny_llama

    return ensure_tiny_llama()


def test_answer_has_no_prompt_echo_and_stops_at_eos(trained):
    model, tokenizer, _, _ = trained
    llama = Llama(model, tokenizer)
    answer = llama.ask_model(QUESTIONS[0], max_new_tokens=12)
    assert "### Response" not in answer and "Below is an instruction" not in answer
    eos = tokenizer.eos_token_id
    # Force EOS as the most likely token: generation must stop at once and return nothing.
    bias = torch.zeros(model.config.vocab_size, device=model.device)
    bias[eos] = 1e4
    lm_head = model.base_model.model.lm_head
    lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        assert llama.ask_model(QUESTIONS[0], max_new_tokens=12) == ""
    finally:
        lm_head.bias = None


def test_runtime_on_cpu_is_fp32():
    rt = runtime()
    if torch.cuda.is_available():
        pytest.skip("CPU fallback check; this machine has CUDA")
    assert rt.device == "cpu" and rt.dtype == torch.float32


def test_gated_and_offline_errors_say_what_to_do():
    gated = explain_load_error(OSError("You are trying to access a gated repo. 401 Client Error"), "meta-llama/Llama-2-7b-hf")
    assert isinstance(gated, ModelError) and "huggingface-cli login" in str(gated) and "HF_TOKEN" in str(gated)
    offline = explain_load_error(OSError("We couldn't connect to 'https://huggingface.co' to load the files"), "x/y")
    assert "hub is unreachable" in str(offline) and "--preset demo" in str(offline)


def test_missing_model_directory_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="neither an adapter"):
        Llama.load_pretrained_model(str(tmp_path))


@pytest.mark.gpu  # bf16 compute and GPU placement of the 4-bit base
def test_cuda_runtime_uses_bf16_or_fp16():
    rt = runtime()
    assert rt.cuda and rt.dtype in (torch.bfloat16, torch.float16)


def test_batched_answers_come_back_in_input_order(trained):
    model, tokenizer, _, _ = trained
    llama = Llama(model, tokenizer)
    one_by_one = [llama.ask_model(q, max_new_tokens=10) for q in QUESTIONS]
    # generate sorts by prompt length internally (longest first) and must restore the input order.
    assert answers(llama, QUESTIONS, batch_size=2, max_new_tokens=10) == one_by_one
    assert answers(llama, QUESTIONS[::-1], batch_size=3, max_new_tokens=10) == one_by_one[::-1]


def test_dequantized_base_gives_the_4bit_logits_and_answers(trained):
    """dequantize="yes": the 4-bit layers become dense layers with the same values; the adapter stays switchable."""
    import bitsandbytes as bnb

    _, _, out, _ = trained
    plain = Llama.load_pretrained_model(out, dequantize="no")
    fast = Llama.load_pretrained_model(out, dequantize="yes")
    with torch.no_grad():
        fast.model(**plain.tokenizer(QUESTIONS[:1], return_tensors="pt"))  # on some CPUs bitsandbytes repacks the weights here
    example = {"input_ids": plain.tokenizer(QUESTIONS[0])["input_ids"], "labels": plain.tokenizer(QUESTIONS[0])["input_ids"]}
    fast.nll([example])  # the first call converts, where eval.py's first call does: inside torch.inference_mode()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in fast.model.modules())
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in plain.model.modules())
    q_proj = fast.model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer) is torch.nn.Linear and q_proj.base_layer.weight.shape == (64, 64)
    batch = plain.tokenizer(QUESTIONS[1:2], return_tensors="pt")
    for use_adapter in (True, False):
        with torch.no_grad(), plain.adapter(use_adapter), fast.adapter(use_adapter):
            expected, actual = plain.model(**batch).logits, fast.model(**batch).logits
        # Same weight values, another kernel (a dense matmul instead of bitsandbytes' fused 4-bit one): rounding only.
        torch.testing.assert_close(actual, expected, rtol=0, atol=5e-3)
        kwargs = {"batch_size": 3, "use_adapter": use_adapter, "max_new_tokens": 10}
        assert answers(fast, QUESTIONS, **kwargs) == answers(plain, QUESTIONS, **kwargs)
    with torch.no_grad():
        with fast.adapter(True):  # the switch keeps its last state: a raw model call outside adapter() gets that side
            tuned = fast.model(**batch).logits
        with fast.adapter(False):
            base = fast.model(**batch).logits
    assert (tuned - base).abs().max() > 1e-3  # the adapter still changes the outputs: it was not lost


def test_out_of_memory_halves_the_batch_and_keeps_the_order(trained, monkeypatch, capsys):
    model, tokenizer, _, _ = trained
    llama = Llama(model, tokenizer, dequantize="no")
    expected = answers(llama, QUESTIONS, batch_size=1, max_new_tokens=6)
    real, sizes = generation.generate_batch, []

    def generate_at_most_one(model, tokenizer, prompts, **kwargs):
        sizes.append(len(prompts))
        if len(prompts) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(generation, "generate_batch", generate_at_most_one)
    assert answers(llama, QUESTIONS, batch_size=4, max_new_tokens=6) == expected
    assert sizes == [3, 2, 1, 1, 1]  # 4 -> 2 -> 1, then the rest at 1
    assert capsys.readouterr().out.count("retrying with batch size") == 2


def test_out_of_memory_with_sized_batches_caps_cache_positions_not_rows(trained, monkeypatch, capsys):
    """batch_size None: an out-of-memory error at n rows of prompts of up to P tokens caps every later batch at n/2 x
    (P + new tokens) cache positions: half the rows at that length, more rows for the shorter prompts that follow (a cap
    on rows would keep them at n/2). Answers and their order unchanged."""
    model, tokenizer, _, _ = trained
    llama = Llama(model, tokenizer, dequantize="no")
    prompts = [" ".join(QUESTIONS) * 4, " ".join(QUESTIONS[::-1]) * 4] + QUESTIONS * 4  # 2 long prompts, 12 short
    tokens = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    new, long, short = 6, max(tokens), max(tokens[2:])
    budget = 3 * (long + new)  # cache positions that "fit": 3 rows of the long prompts
    assert (len(prompts) - 3) * (short + new) <= budget  # ... and all 11 short prompts left after them
    expected = answers(llama, prompts, batch_size=1, max_new_tokens=new)
    real, sizes = generation.generate_batch, []

    def generate_within_budget(model, tokenizer, chunk, **kwargs):
        sizes.append(len(chunk))
        if len(chunk) * (max(len(ids) for ids in tokenizer(chunk)["input_ids"]) + new) > budget:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, tokenizer, chunk, **kwargs)

    monkeypatch.setattr(generation, "generate_batch", generate_within_budget)
    assert answers(llama, prompts, batch_size=None, max_new_tokens=new) == expected
    assert sizes == [14, 7, 3, 11]  # all -> 7 -> 3 rows of the long prompts; then the 11 short ones in one batch
    assert capsys.readouterr().out.count(f"out of GPU memory at 14 rows of up to {long} prompt tokens") == 1


def test_free_memory_sizes_each_batch_for_its_own_longest_prompt(trained, monkeypatch):
    """batch_size None: longest prompts first, each batch sized (auto_batch_size) for its own longest prompt, so the
    batches of shorter prompts hold more rows; the answers and their order do not change."""
    model, tokenizer, _, _ = trained
    llama = Llama(model, tokenizer, dequantize="no")
    longest = max(len(ids) for ids in tokenizer(QUESTIONS)["input_ids"])
    expected = answers(llama, QUESTIONS, batch_size=1, max_new_tokens=6)
    monkeypatch.setattr(generation, "auto_batch_size", lambda model, prompt_tokens, *_: 1 if prompt_tokens == longest else 8)
    stats: dict = {}
    assert [g["answer"] for g in llama.generate(QUESTIONS, batch_size=None, max_new_tokens=6, stats=stats)] == expected
    assert stats["batches"] == [1, 2]


def test_liger_backend_import_errors_for_other_hardware_are_dropped_and_nothing_else(caplog):
    """liger-kernel 0.8.5 logs one line per kernel for other hardware (CuTe DSL, Ascend, cuTile) in every process."""
    import logging

    from runtime import silence_harmless_logs

    silence_harmless_logs()
    logger = logging.getLogger("liger_kernel.backends.registry")
    template = "Backend impl '%s' for op '%s' could not be imported: %s: %s"
    with caplog.at_level(logging.WARNING):
        logger.warning(template, "liger_kernel.ops.backends._cutedsl.rms_norm", "rms_norm", "ImportError", "No module named 'cutlass'")
        logger.warning(template, "liger_kernel.ops.backends._ascend.swiglu", "swiglu", "ImportError", "No module named 'torch_npu'")
        logger.warning(template, "liger_kernel.ops.rms_norm", "rms_norm", "ImportError", "triton is broken")  # a real failure
    assert [r.getMessage() for r in caplog.records] == [
        "Backend impl 'liger_kernel.ops.rms_norm' for op 'rms_norm' could not be imported: ImportError: triton is broken"
    ]


def _logits(llama, use_adapter):
    batch = llama.tokenizer(QUESTIONS[1:2], return_tensors="pt")
    with torch.no_grad(), llama.adapter(use_adapter):
        return llama.model(**batch).logits


def test_merge_on_switch_base_is_exact_and_tuned_is_the_unmerged_adapter(trained):
    """Fine-tuned = LoRA merged into the 16-bit copy; base = the copy rebuilt from the 4-bit weights, bit for bit, every time."""
    _, _, out, _ = trained
    plain = Llama.load_pretrained_model(out, dequantize="no")  # 4-bit + unmerged LoRA: the reference
    fast = Llama.load_pretrained_model(out, dequantize="yes")
    before = fast.ask_model(QUESTIONS[0], use_adapter=False, max_new_tokens=8)  # converts; the switch starts on the base
    assert fast.switch is not None and fast.switch.state == "base"
    base0 = _logits(fast, False)
    weights0 = [layer.base_layer.weight.clone() for layer in fast.switch.layers]
    tuned0 = _logits(fast, True)
    assert fast.switch.state == "tuned" and (tuned0 - base0).abs().max() > 1e-3  # the merge changed the outputs
    # merged (fp32 sum, cast once) vs unmerged LoRA on the 4-bit kernel: rounding only
    torch.testing.assert_close(tuned0, _logits(plain, True), rtol=0, atol=5e-3)
    torch.testing.assert_close(base0, _logits(plain, False), rtol=0, atol=5e-3)
    for _ in range(2):  # back and forth: exact, never W - delta
        assert torch.equal(_logits(fast, False), base0)
        assert all(torch.equal(layer.base_layer.weight, w) for layer, w in zip(fast.switch.layers, weights0, strict=True))
        assert torch.equal(_logits(fast, True), tuned0)
        assert fast.ask_model(QUESTIONS[0], use_adapter=False, max_new_tokens=8) == before  # ask_model between switches
        assert fast.ask_model(QUESTIONS[0], max_new_tokens=8) == plain.ask_model(QUESTIONS[0], max_new_tokens=8)
    assert not fast.switch.layers[0].merged  # PEFT's own merge is never used (it would unmerge by subtraction)


def test_merge_on_switch_on_an_unquantized_base_restores_the_saved_weights(trained):
    _, _, out, _ = trained
    reference = Llama.load_pretrained_model(out, quantization="none", merge=False)  # PEFT's disable_adapter(), branch on
    fast = Llama.load_pretrained_model(out, quantization="none")
    fast.dequantize_if_allowed()
    assert fast.switch is not None and reference.switch is None
    for _ in range(2):
        torch.testing.assert_close(_logits(fast, True), _logits(reference, True), rtol=0, atol=1e-5)
        assert torch.equal(_logits(fast, False), _logits(reference, False))  # exactly the base model's logits


def test_evicting_decoder_gives_model_generate_answers_and_stop_rules(trained):
    """engine="evict" (finished rows leave the batch) == model.generate in padded batches, stop strings and forced length too."""
    model, tokenizer, _, _ = trained
    llama = Llama(model, tokenizer)
    for kwargs in ({"max_new_tokens": 12}, {"max_new_tokens": 12, "stop_strings": [" the", "."]},
                   {"max_new_tokens": 6, "min_new_tokens": 6}):
        padded = llama.generate(QUESTIONS, batch_size=3, engine="padded", **kwargs)
        evict = llama.generate(QUESTIONS, batch_size=3, engine="evict", **kwargs)
        assert evict == padded, kwargs
    assert {g["answer_tokens"] for g in evict} == {6}


def test_static_decoder_gives_the_evicting_decoders_answers(trained):
    """engine="static" (static KV cache, one mask over every cache position; on CUDA the decode step replayed from a CUDA
    graph, here the same steps eagerly) == engine="evict": stop strings, forced length, and rows that end before others."""
    model, tokenizer, _, _ = trained
    llama = Llama(model, tokenizer)
    for kwargs in ({"max_new_tokens": 12}, {"max_new_tokens": 12, "stop_strings": [" the", "."]},
                   {"max_new_tokens": 6, "min_new_tokens": 6}, {"max_new_tokens": 20, "stop_strings": ["\x19\x19"]}):
        evict = llama.generate(QUESTIONS, batch_size=3, engine="evict", **kwargs)
        assert llama.generate(QUESTIONS, batch_size=3, engine="static", **kwargs) == evict, kwargs
    assert len({len(g["raw"]) for g in evict}) > 1  # the last case: rows end at different steps (raw: up to the end)


def test_flash_engine_gives_the_static_engines_answers(trained, monkeypatch):
    """engine="flash": the decode steps attend only to each row's own cache positions (flash_decode_attention; on the
    CPU its masked form) in the relaid cache: static's answers, rows of different left padding, stop strings, forced
    length; the attention implementation is SDPA again afterwards."""
    model, tokenizer, _, _ = trained
    llama = Llama(model, tokenizer)
    config = generation_layers(model)[0].self_attn.config
    before = config._attn_implementation
    calls = []
    masked = generation.masked_decode_attention
    monkeypatch.setattr(generation, "masked_decode_attention", lambda *a, **k: calls.append(a[0].shape[0]) or masked(*a, **k))
    for kwargs in ({"max_new_tokens": 12}, {"max_new_tokens": 12, "stop_strings": [" the", "."]},
                   {"max_new_tokens": 6, "min_new_tokens": 6}):
        static = llama.generate(QUESTIONS, batch_size=3, engine="static", **kwargs)
        assert not calls  # static: SDPA over the whole cache
        assert llama.generate(QUESTIONS, batch_size=3, engine="flash", **kwargs) == static, kwargs
        assert calls and config._attn_implementation == before
        calls.clear()


def test_flash_decode_attention_reads_each_rows_span_of_the_flat_cache():
    """The kernel's contract (FlashAttention's cu_seqlens_k as each row's first position in the flattened rows x length
    cache, seqused_k as how many follow), checked against per-row attention computed by hand, with two KV heads shared
    by four query heads."""
    torch.manual_seed(0)
    rows, length, heads, kv_heads, dim = 3, 7, 4, 2, 8
    keys, values = torch.randn(rows, length, kv_heads, dim), torch.randn(rows, length, kv_heads, dim)
    query = torch.randn(rows, heads, 1, dim)
    first, used = [0, 2, 5], [4, 5, 2]
    starts = torch.tensor([r * length + f for r, f in enumerate(first)] + [rows * length], dtype=torch.int32)
    out, _ = generation.flash_decode_attention(None, query, keys.transpose(1, 2), values.transpose(1, 2), None, scaling=0.3,
                                               decode_cu_q=torch.arange(rows + 1, dtype=torch.int32), decode_starts=starts,
                                               decode_lengths=torch.tensor(used, dtype=torch.int32))
    for r in range(rows):
        for h in range(heads):
            k, v = keys[r, first[r] : first[r] + used[r], h // 2], values[r, first[r] : first[r] + used[r], h // 2]
            expected = torch.softmax(query[r, h, 0] @ k.T * 0.3, -1) @ v
            torch.testing.assert_close(out[r, 0, h], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="relayout_cache"):  # a cache in transformers' own layout is refused
        generation.flash_decode_attention(None, query, keys.transpose(1, 2).contiguous(), values.transpose(1, 2).contiguous(), None,
                                          decode_cu_q=torch.arange(rows + 1, dtype=torch.int32), decode_starts=starts,
                                          decode_lengths=torch.tensor(used, dtype=torch.int32))


@pytest.mark.slow
def test_compiled_engine_gives_the_static_engines_answers_and_compiles_once(trained):
    """engine="compiled" (and compiled_flash): the decode steps run the decoder layers compiled (one graph for all layers,
    dynamic shapes), the prompt and the other engines eager. The same answers as static across batches of different rows and lengths,
    stop strings and forced length; the layers' forward is the class's again afterwards."""
    model, tokenizer, _, _ = trained
    llama = Llama(model, tokenizer)
    layer = generation_layers(model)[0]
    for kwargs in ({"max_new_tokens": 12}, {"max_new_tokens": 12, "stop_strings": [" the", "."]},
                   {"max_new_tokens": 6, "min_new_tokens": 6}):
        static = llama.generate(QUESTIONS, batch_size=2, engine="static", **kwargs)  # batches of 2 rows, then 1
        assert llama.generate(QUESTIONS, batch_size=2, engine="compiled", **kwargs) == static, kwargs
        assert llama.generate(QUESTIONS, batch_size=2, engine="compiled_flash", **kwargs) == static, kwargs
        assert llama.generate(QUESTIONS, batch_size=2, engine="compiled_triton", **kwargs) == static, kwargs
        assert "forward" not in layer.__dict__  # eager again outside the decode steps
    assert len(model.__dict__["_decode_step_layers"]) == len(generation_layers(model))
    assert [m.self_attn.layer_idx for m in generation_layers(model)] == list(range(len(generation_layers(model))))
    # per engine (compiled, compiled_flash, compiled_triton: other attentions), one compiled variant for batches of 2 rows and one for 1
    # row (a size-1 dimension is specialized), whatever the number of layers: no layer index reaches the graph (on a GPU
    # a 32-layer model hit the recompile limit of 8 before)
    from compile_layers import compiled_entries

    assert compiled_entries(type(layer).forward.__code__) == 6


def generation_layers(model):
    from compile_layers import decoder_layers

    return decoder_layers(model)


@pytest.mark.gpu
def test_compiled_engine_replays_compiled_layers_in_a_cuda_graph(trained):
    """engine="compiled" on CUDA: the compiled decoder layers captured in the decode step's CUDA graph give static's
    answers, fine-tuned and base (marked gpu: Inductor's kernels inside a CUDA graph). 3 new tokens: in bf16 the fused
    kernels round differently from eager ones, so longer greedy answers of a tiny model may part."""
    _, _, out, _ = trained
    llama = Llama.load_pretrained_model(out)
    for use_adapter in (True, False):
        static = llama.generate(QUESTIONS, batch_size=3, engine="static", use_adapter=use_adapter, max_new_tokens=3, min_new_tokens=3)
        stats = {}
        compiled = llama.generate(QUESTIONS, batch_size=3, engine="compiled", use_adapter=use_adapter, stats=stats, max_new_tokens=3,
                                  min_new_tokens=3)
        assert compiled == static and stats["captures"] == 1


@pytest.mark.gpu
def test_flash_decode_kernel_matches_the_masked_attention_and_the_engine_static(trained):
    """On CUDA, flash_decode_attention runs FlashAttention's variable-length kernel (seqused_k): its output equals the
    masked SDPA form on rows with different first positions and lengths (bf16 tolerance); engine="flash",
    "compiled_flash", "triton" and "compiled_triton" (graphs captured) give static's 3-token answers, fine-tuned and base."""
    torch.manual_seed(0)
    rows, length, heads, dim = 5, 300, 4, 128
    cache = torch.randn(2, rows, length, heads, dim, device="cuda", dtype=torch.bfloat16)
    query = torch.randn(rows, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    first, used = torch.tensor([0, 17, 150, 3, 299]), torch.tensor([300, 120, 150, 1, 1])
    bounds = {"decode_cu_q": torch.arange(rows + 1, dtype=torch.int32, device="cuda"),
              "decode_starts": torch.cat([torch.arange(rows) * length + first, torch.tensor([rows * length])]).int().cuda(),
              "decode_lengths": used.int().cuda()}
    out, _ = generation.flash_decode_attention(None, query, cache[0].transpose(1, 2), cache[1].transpose(1, 2), None, **bounds)
    q, k, v = query.transpose(1, 2).reshape(rows, heads, dim), cache[0].reshape(-1, heads, dim), cache[1].reshape(-1, heads, dim)
    expected = generation.masked_decode_attention(q, k, v, bounds["decode_starts"], bounds["decode_lengths"], length, None)
    torch.testing.assert_close(out[:, 0], expected, rtol=2e-2, atol=2e-2)
    _, _, out_dir, _ = trained
    llama = Llama.load_pretrained_model(out_dir)
    for use_adapter in (True, False):
        gen = {"use_adapter": use_adapter, "max_new_tokens": 3, "min_new_tokens": 3}
        static = llama.generate(QUESTIONS, batch_size=3, engine="static", **gen)
        assert llama.generate(QUESTIONS, batch_size=3, engine="flash", **gen) == static
        assert llama.generate(QUESTIONS, batch_size=3, engine="compiled_flash", **gen) == static
        assert llama.generate(QUESTIONS, batch_size=3, engine="triton", **gen) == static
        assert llama.generate(QUESTIONS, batch_size=3, engine="compiled_triton", **gen) == static


@pytest.mark.gpu
def test_static_engines_on_a_4bit_base_give_the_evicting_decoders_answers(trained):
    """A base kept in 4 bits (dequantize="no", what a 24 GB card gets under dequantize="auto"): its bitsandbytes layers
    inside the decode step's CUDA graph (static, compiled, flash, triton, compiled_triton) give evict's answers,
    fine-tuned (LoRA unmerged) and base: what auto's triton (static on older cards) decodes with on a 24 GB card
    (generation.pick_engine)."""
    _, _, out, _ = trained
    llama = Llama.load_pretrained_model(out, dequantize="no")
    for use_adapter in (True, False):
        gen = {"use_adapter": use_adapter, "max_new_tokens": 3, "min_new_tokens": 3}
        evict = llama.generate(QUESTIONS, batch_size=3, engine="evict", **gen)
        for engine in ("static", "compiled", "flash", "triton", "compiled_triton"):
            assert llama.generate(QUESTIONS, batch_size=3, engine=engine, **gen) == evict, (engine, use_adapter)
    assert generation.linear4bit_modules(llama.model)  # still 4-bit throughout


@pytest.mark.gpu
def test_static_decoder_replays_a_cuda_graph_with_the_evicting_decoders_answers(trained):
    """On CUDA engine="static" captures the decode step in a CUDA graph (generation.capture_decode_step) and replays it:
    the same answers as engine="evict", fine-tuned (merged on switch) and base, stop strings and forced length."""
    _, _, out, _ = trained
    llama = Llama.load_pretrained_model(out)
    assert llama.model.device.type == "cuda"
    for use_adapter in (True, False, True):
        for kwargs in ({"max_new_tokens": 12}, {"max_new_tokens": 20, "stop_strings": ["\x19\x19"]},
                       {"max_new_tokens": 6, "min_new_tokens": 6}):
            evict = llama.generate(QUESTIONS, batch_size=3, engine="evict", use_adapter=use_adapter, **kwargs)
            stats = {}
            assert llama.generate(QUESTIONS, batch_size=3, engine="static", use_adapter=use_adapter, stats=stats, **kwargs) == evict
            assert stats["captures"] == len(stats["batches"]) and stats["capture_record_s"] > 0  # one graph per batch


def test_continuous_batching_gives_the_evicting_decoders_answers_in_input_order(trained):
    """engine="continuous" (transformers' generate_batch) == engine="evict": every answer back, in input order, stop rules
    applied afterwards. It refuses a partial result (generate_batch logs a failed request and returns the rest)."""
    model, tokenizer, _, _ = trained
    llama = Llama(model, tokenizer)
    questions = QUESTIONS + QUESTIONS[::-1]  # more prompts than one scheduling step, repeated: order must still hold
    for kwargs in ({"max_new_tokens": 8}, {"max_new_tokens": 8, "stop_strings": [" the", "."]}):
        assert llama.generate(questions, engine="continuous", **kwargs) == llama.generate(questions, batch_size=3, engine="evict", **kwargs)


def test_continuous_batching_refuses_a_partial_result(trained):
    """generate_batch logs a failed request and returns what it has: generate_continuous must raise, never misalign."""
    import types

    import generation

    _, tokenizer, _, _ = trained
    failed = types.SimpleNamespace(generated_tokens=[5], error="Inplace update to inference tensor outside InferenceMode")
    fake = types.SimpleNamespace(device=torch.device("cpu"), generate_batch=lambda inputs, **_: {"req_0": failed})
    with pytest.raises(RuntimeError, match="returned 1 of 2 answers; first error: Inplace update"):
        generation.generate_continuous(fake, tokenizer, ["a question", "another question"])


def test_auto_engine_is_triton_on_cuda_compiled_for_large_calls_and_falls_back_to_evict(trained, monkeypatch, capsys):
    """auto, greedy, on CUDA sm80+: triton (the fastest measured there without a compile, 16-bit copy or 4-bit base),
    compiled_triton from AUTO_COMPILE_TOKENS prompts x new tokens, flash where Triton is missing; static on older cards,
    evict on a CPU; padded when sampling. When auto's engine fails (not out of memory), the remaining answers come from
    evict, said in one line; an engine asked for by name never falls back."""
    import decode_kernel
    import generation

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert generation.pick_engine("auto", torch.device("cuda"), greedy=True) == "triton"
    assert generation.pick_engine("auto", torch.device("cuda"), greedy=True, tokens=750 * 256) == "compiled_triton"
    assert generation.pick_engine("auto", torch.device("cuda"), greedy=True, tokens=generation.AUTO_COMPILE_TOKENS - 1) == "triton"
    monkeypatch.setattr(decode_kernel, "available", lambda: False)
    assert generation.pick_engine("auto", torch.device("cuda"), greedy=True) == "flash"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: no FlashAttention
    assert generation.pick_engine("auto", torch.device("cuda"), greedy=True) == "static"
    assert generation.pick_engine("auto", torch.device("cpu"), greedy=True) == "evict"
    assert generation.pick_engine("auto", torch.device("cuda"), greedy=False) == "padded"
    assert generation.pick_engine("static", torch.device("cuda"), greedy=False) == "padded"
    model, tokenizer, _, _ = trained
    llama = Llama(model, tokenizer)
    expected = llama.generate(QUESTIONS, batch_size=2, engine="evict", max_new_tokens=6)

    def broken(*_, **__):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(generation, "decode_static", broken)
    for chosen in ("static", "flash", "triton"):
        monkeypatch.setattr(generation, "pick_engine", lambda engine, device, greedy, tokens=0, chosen=chosen: chosen)
        assert llama.generate(QUESTIONS, batch_size=2, max_new_tokens=6) == expected  # engine auto (the Llama's default)
        assert capsys.readouterr().out.count(f"the {chosen} engine failed (RuntimeError: operation not permitted") == 1
    with pytest.raises(RuntimeError, match="not permitted"):  # asked for by name: no silent fallback
        llama.generate(QUESTIONS, batch_size=2, engine="static", max_new_tokens=6)
    monkeypatch.setattr(generation, "generate_continuous", broken)
    with pytest.raises(RuntimeError, match="not permitted"):
        llama.generate(QUESTIONS, batch_size=2, engine="continuous", max_new_tokens=6)


def test_layer_cache_writes_a_relaid_cache_in_place_at_its_column():
    """The compiled flash engine's cache write (LayerCache with a column): into the contiguous (rows, length, heads, dim)
    buffers relayout_cache made, at the column tensor's position, returned as the (rows, heads, length, dim) views that
    transformers' attention expects, sharing their memory (no copy of the cache at a step)."""
    import generation

    class Layer:  # what relayout_cache leaves on a StaticCache layer
        keys = torch.zeros(2, 3, 5, 4)  # (rows, heads, length, dim)
        values = torch.zeros(2, 3, 5, 4)

    layer = Layer()
    generation.relayout_cache(type("Cache", (), {"layers": [layer]})())
    assert layer.flash_keys.shape == (2, 5, 3, 4) and layer.flash_keys.is_contiguous()
    column = torch.tensor([3])
    new_k, new_v = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    keys, values = generation.LayerCache(layer, column).update(new_k, new_v, 0)
    assert keys.shape == (2, 3, 5, 4) and keys.data_ptr() == layer.flash_keys.data_ptr() == layer.keys.data_ptr()
    torch.testing.assert_close(keys[:, :, 3:4], new_k)
    torch.testing.assert_close(values[:, :, 3:4], new_v)
    assert keys[:, :, [0, 1, 2, 4]].abs().sum() == 0  # nothing else written
