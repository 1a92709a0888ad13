"""Padding-free packed batches: records stay isolated, so packed losses equal per-record losses."""

from __future__ import annotations

import datasets
import pytest
import torch

from conftest import record
from dataset import IGNORE_INDEX, DocumentBounds, PaddedPackedCollator, collate_packed, pack_examples, tokenize_record


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoModelForCausalLM

    from tiny_llama import ensure_tiny_llama

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_llama(), dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False  # as in training (model.add_lora): a KV cache disables the packed-sequence mask
    return model.eval()


def examples(tokenizer, n=5):
    rows = [record(f"Question number {i}?" * (i + 1), "Some context. " * i, f"Answer {i} " * (2 * i + 1)) for i in range(n)]
    return [tokenize_record(r, tokenizer, 256)[0] for r in rows]


def test_packed_forward_equals_per_record_forward(tiny_model, tiny_tokenizer):
    exs = examples(tiny_tokenizer)
    packed = pack_examples(datasets.Dataset.from_list(exs), max_tokens=100_000, seed=0)
    assert len(packed) == 1
    batch = collate_packed([packed[0]])
    with torch.no_grad():
        packed_out = tiny_model(**batch)
        sums, count, offset = 0.0, 0, 0
        order = []  # pack order is seeded-random: find each record by its tokens
        for ex in exs:
            ids = torch.tensor([ex["input_ids"]])
            out = tiny_model(input_ids=ids, labels=torch.tensor([ex["labels"]]))
            n = sum(t != IGNORE_INDEX for t in ex["labels"][1:])
            sums, count = sums + out.loss.item() * n, count + n
            order.append((ex["input_ids"], out.logits[0]))
    flat = batch["input_ids"][0].tolist()
    for ids, logits in order:
        start = next(i for i in range(len(flat)) if flat[i : i + len(ids)] == ids)
        torch.testing.assert_close(packed_out.logits[0, start : start + len(ids)], logits, rtol=1e-4, atol=1e-4)
        offset += len(ids)
    assert offset == len(flat)
    # The packed loss is the token-weighted mean of the per-record losses: the same training signal.
    assert packed_out.loss.item() == pytest.approx(sums / count, rel=1e-5)


def test_without_position_ids_records_would_leak(tiny_model, tiny_tokenizer):
    packed = pack_examples(datasets.Dataset.from_list(examples(tiny_tokenizer)), max_tokens=100_000, seed=0)
    batch = collate_packed([packed[0]])
    with torch.no_grad():
        isolated = tiny_model(**batch).loss.item()
        leaking = tiny_model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    assert leaking != pytest.approx(isolated, rel=1e-4)  # plain concatenation attends across records


def test_pack_examples_respects_the_budget_and_keeps_every_record(tiny_tokenizer):
    exs = examples(tiny_tokenizer, 12)
    packed = pack_examples(datasets.Dataset.from_list(exs), max_tokens=300, seed=3)
    assert all(len(row) <= 300 for row in packed["input_ids"])
    assert sum(len(r) for r in packed["input_ids"]) == sum(len(e["input_ids"]) for e in exs)
    starts = sum(p.count(0) for p in packed["position_ids"])
    assert starts == 12  # every record once, its positions restarting at 0
    for ids, labels, pos in zip(packed["input_ids"], packed["labels"], packed["position_ids"], strict=True):
        assert len(ids) == len(labels) == len(pos)
        for i, p in enumerate(pos):
            if p == 0:
                assert labels[i] == IGNORE_INDEX  # nothing learns to predict across a record boundary
    again = pack_examples(datasets.Dataset.from_list(exs), max_tokens=300, seed=3)
    assert again["input_ids"] == packed["input_ids"]


def test_pack_groups_fills_the_oldest_open_row_that_fits_and_closes_the_oldest_beyond_the_window(monkeypatch):
    """First fit over the open rows, exactly: records in the shuffled order (identity here) 6, 5, 3, 4, 1, 2, 5 tokens
    into rows of 8. Greedy filling (open_rows=1) closes a row at the first record that does not fit."""
    import random

    import dataset

    monkeypatch.setattr(random.Random, "shuffle", lambda self, x: None)  # keep the order readable
    lengths = [6, 5, 3, 4, 1, 2, 5]
    assert dataset.pack_groups(lengths, 8, 0, open_rows=1) == [[0], [1, 2], [3, 4, 5], [6]]
    # 2 open rows: 3 joins 5 (8); 4 opens a third row, so [0] closes; 1 and 2 join 4; 5 opens a row, closing [1, 2]
    assert dataset.pack_groups(lengths, 8, 0, open_rows=2) == [[0], [1, 2], [3, 4, 5], [6]]
    assert dataset.pack_groups(lengths, 8, 0, open_rows=4) == [[0, 4], [1, 2], [3, 5], [6]]
    assert dataset.pack_groups([5, 5, 3, 3], 8, 0, open_rows=2) == [[0, 2], [1, 3]]  # greedy: [[0], [1, 2], [3]]
    assert dataset.pack_groups([5, 5, 3, 3], 8, 0, open_rows=1) == [[0], [1, 2], [3]]
    from config import TrainConfig

    assert TrainConfig().open_rows == dataset.OPEN_ROWS == 1  # auto, rows not padded: greedy
    assert TrainConfig(pad_to_budget=True).open_rows == 4  # auto, every row padded to the budget: first fit
    assert TrainConfig(pad_to_budget=True, pack_open_rows=1).open_rows == 1  # given: kept


@pytest.mark.parametrize(("pad_to_budget", "open_rows", "how"), [(False, 1, "greedy filling, no padding"),
                                                                 (True, 4, "first fit over 4 open rows, each padded to the budget")])
def test_main_packs_by_first_fit_only_where_rows_are_padded_to_the_budget(tiny_tokenizer, capsys, pad_to_budget, open_rows, how):
    """--pack-open-rows auto (0) in main.prepare_data: padded rows all cost the same, so there the fuller rows of first
    fit are more tokens per step for free; unpadded rows stay greedy. The rows are exactly pack_groups' for that choice."""
    import dataset
    from config import TrainConfig
    from main import prepare_data

    cfg = TrainConfig(dataset="data/dolly_sample.jsonl", val_fraction=0, pack_tokens=512, max_length=512, pad_to_budget=pad_to_budget)
    assert cfg.pack_open_rows == 0  # the default: auto
    records = dataset.load_records(cfg.dataset)
    train_ds, _, summary = prepare_data(cfg, records, tiny_tokenizer)
    train_raw = dataset.split_records(records, 0, cfg.seed)[0]
    lengths = [len(ids) for ids in dataset.tokenize_records(train_raw, tiny_tokenizer, 512, cfg.dataset)[0]["input_ids"]]
    packs = dataset.pack_groups(lengths, 512, cfg.seed, open_rows)
    assert [len(ids) for ids in train_ds["input_ids"]] == [sum(lengths[i] for i in pack) for pack in packs]
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[data] packed")]
    fill = summary["train"]["tokens"] / (len(packs) * 512)
    assert line == [f"[data] packed {len(lengths)} training records into {len(packs)} rows of <= 512 tokens ({fill:.0%} full, {how})"]


def test_collate_packed_makes_one_unpadded_row():
    batch = collate_packed([{"input_ids": [1, 5], "labels": [-100, 5], "position_ids": [0, 1]},
                            {"input_ids": [1, 7, 8], "labels": [-100, 7, 8], "position_ids": [0, 1, 2]}])
    assert batch["input_ids"].tolist() == [[1, 5, 1, 7, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 5, -100, 7, 8]]
    assert "attention_mask" not in batch


def test_the_training_model_keeps_packed_records_apart(tiny_tokenizer):
    """The real path: 4-bit base + LoRA from load_for_training, as main.py builds it."""
    from config import TrainConfig
    from hub import TINY_MODEL
    from loading import load_for_training

    model, tokenizer, _ = load_for_training(TrainConfig(base_model=TINY_MODEL))
    assert model.config.use_cache is False
    exs = examples(tokenizer, 3)
    batch = {k: v.to(model.device) for k, v in collate_packed([pack_examples(datasets.Dataset.from_list(exs), 100_000, 0)[0]]).items()}
    model.eval()  # no dropout, so both forwards see the same function
    as_batch = {"device": model.device}
    with torch.no_grad():
        packed = model(**batch).loss.item()
        per_record = [(model(input_ids=torch.tensor([e["input_ids"]], **as_batch),
                             labels=torch.tensor([e["labels"]], **as_batch)).loss.item(),
                       sum(t != IGNORE_INDEX for t in e["labels"][1:])) for e in exs]
    expected = sum(loss * n for loss, n in per_record) / sum(n for _, n in per_record)
    # fp32 compute on the CPU; bf16 on CUDA rounds differently for different sequence lengths.
    assert packed == pytest.approx(expected, rel=1e-4 if model.device.type == "cpu" else 1e-2)


def reference_varlen(q, k, v, cu, longest, scale):
    """What FlashAttention's varlen kernel computes: each [cu[i], cu[i+1]) span of tokens attends causally to itself."""
    out, bounds = torch.empty_like(q), cu.tolist()
    assert longest >= max(b - a for a, b in zip(bounds, bounds[1:], strict=False))  # an upper bound (fixed with --pad-to-budget)
    assert bounds[0] == 0 and bounds[-1] == len(q) and bounds == sorted(bounds)  # every token in one span; empty spans allowed
    for a, b in zip(bounds, bounds[1:], strict=False):
        if a == b:
            continue
        span = [t[a:b].transpose(0, 1) for t in (q, k, v)]  # (heads, tokens, dim)
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(*span, is_causal=True, scale=scale).transpose(0, 1)
    return out


@pytest.fixture
def varlen_model(monkeypatch):
    """The tiny model with attn_implementation="varlen" (runtime.register_varlen), the CPU reference kernel in place of
    PyTorch's FlashAttention one (CUDA only)."""
    from transformers import AutoModelForCausalLM

    import runtime
    from tiny_llama import ensure_tiny_llama

    monkeypatch.setattr(runtime, "_varlen_kernel", None)
    runtime.register_varlen(reference_varlen)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_llama(), dtype=torch.float32, attn_implementation="varlen")
    model.get_decoder().register_forward_pre_hook(runtime.padding_mask_hook, with_kwargs=True)  # as loading.load_base_model does
    model.config.use_cache = False
    return model.eval()


def test_varlen_attention_runs_each_packed_record_on_its_own(varlen_model, tiny_model, tiny_tokenizer):
    """--attention varlen: DocumentBounds gives each packed row's record bounds, transformers hands them to
    runtime.varlen_attention, and the logits and loss equal the SDPA model's with its packed-sequence mask."""
    exs = examples(tiny_tokenizer)
    batch = DocumentBounds(collate_packed)([pack_examples(datasets.Dataset.from_list(exs), max_tokens=100_000, seed=0)[0]])
    starts = [i for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0]
    lengths = [b - a for a, b in zip(starts, starts[1:] + [batch["input_ids"].shape[1]], strict=True)]
    assert batch["cu_seq_lens_q"].tolist() == starts + [sum(lengths)] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == max(lengths) and len(lengths) == len(exs)
    with torch.no_grad():
        varlen = varlen_model(**batch)
        sdpa = tiny_model(**{k: batch[k] for k in ("input_ids", "labels", "position_ids")})
    torch.testing.assert_close(varlen.logits, sdpa.logits, rtol=1e-5, atol=1e-5)
    assert varlen.loss.item() == pytest.approx(sdpa.loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs packed rows"):  # no bounds: refused, never attention across records
        varlen_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])


def test_varlen_model_runs_ordinary_padded_rows_like_sdpa(varlen_model, tiny_model, tiny_tokenizer):
    """A forward pass of one's own on the varlen training model (no record bounds: a left-padded batch, one row without a
    mask, and a cached generation step) gets SDPA's logits at every real position, not an error and not NaN."""
    tiny_tokenizer.padding_side = "left"
    batch = tiny_tokenizer(["### Response:\nParis is the capital of France.", "Hello"], return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        for inputs in (batch, {"input_ids": batch["input_ids"][:1]}):
            varlen, sdpa = varlen_model(**inputs).logits, tiny_model(**inputs).logits
            keep = real[: len(varlen)] if "attention_mask" in inputs else torch.ones(varlen.shape[:2], dtype=torch.bool)
            assert torch.isfinite(varlen).all()
            torch.testing.assert_close(varlen[keep], sdpa[keep], rtol=1e-5, atol=1e-5)
        models = {"varlen": varlen_model, "sdpa": tiny_model}
        generated = {name: m.generate(**batch, max_new_tokens=3, do_sample=False) for name, m in models.items()}
    assert generated["varlen"].tolist() == generated["sdpa"].tolist()


def test_the_varlen_training_model_gets_the_bounds_through_peft_and_the_collator(tiny_tokenizer, monkeypatch):
    """main.py's path with --attention varlen (4-bit base + LoRA from load_for_training, training.collator): the bounds
    pass through PEFT down to every attention layer, and the loss equals the SDPA training model's; a padded batch of
    one's own (no bounds) gets the SDPA model's logits too (load_base_model's padding_mask_hook)."""
    import runtime
    from config import TrainConfig
    from hub import TINY_MODEL
    from loading import load_for_training
    from training import collator

    register = runtime.register_varlen
    monkeypatch.setattr(runtime, "register_varlen", lambda kernel=None: register(reference_varlen))
    losses, padded = {}, {}
    for attention in ("varlen", "sdpa"):
        cfg = TrainConfig(base_model=TINY_MODEL, attention=attention, seed=0)
        model, tokenizer, _ = load_for_training(cfg)
        rows = pack_examples(datasets.Dataset.from_list(examples(tokenizer, 3)), 100_000, 0)
        batch = collator(cfg, tokenizer)([rows[0]])
        assert ("cu_seq_lens_q" in batch) == (attention == "varlen")
        tokenizer.padding_side = "left"
        own = tokenizer(["### Response:\nParis is the capital of France.", "Hello"], return_tensors="pt", padding=True)
        with torch.no_grad():
            losses[attention] = model.eval()(**batch).loss.item()
            padded[attention] = model(**own).logits[own["attention_mask"].bool()]
    assert losses["varlen"] == pytest.approx(losses["sdpa"], rel=1e-5)
    torch.testing.assert_close(padded["varlen"], padded["sdpa"], rtol=1e-4, atol=1e-4)


def test_varlen_trains_through_the_trainer_with_sdpa_s_losses(tiny_tokenizer, monkeypatch, tmp_path):
    """Two optimizer steps of main.py's Trainer (training.build_trainer, its collator, --attention varlen with the CPU
    reference kernel) log the same losses as the same steps with SDPA's packed-sequence mask."""
    import runtime
    from config import TrainConfig
    from hub import TINY_MODEL
    from loading import load_for_training
    from training import build_trainer

    register = runtime.register_varlen
    monkeypatch.setattr(runtime, "register_varlen", lambda kernel=None: register(reference_varlen))
    losses = {}
    for attention in ("varlen", "sdpa"):
        torch.manual_seed(0)
        cfg = TrainConfig(base_model=TINY_MODEL, attention=attention, seed=0, max_steps=2, pack_tokens=256, max_length=256, eval_steps=0,
                          logging_steps=1, learning_rate=1e-2, warmup_ratio=0.0, output_dir=str(tmp_path / attention))
        model, tokenizer, _ = load_for_training(cfg)
        rows = pack_examples(datasets.Dataset.from_list(examples(tokenizer, 8)), cfg.pack_tokens, 0)
        trainer = build_trainer(cfg, model, tokenizer, rows, datasets.Dataset.from_list([]))
        trainer.args.report_to = []
        trainer.train()
        losses[attention] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["varlen"]) == 2 and losses["varlen"][1] != losses["varlen"][0]  # it trained
    assert losses["varlen"] == pytest.approx(losses["sdpa"], rel=1e-4)


def test_document_bounds_count_the_padding_of_a_padded_row_as_a_record():
    batch = DocumentBounds(PaddedPackedCollator(budget=8, pad_id=0))(
        [{"input_ids": [1, 5], "labels": [-100, 5], "position_ids": [0, 1]},
         {"input_ids": [1, 7, 8], "labels": [-100, 7, 8], "position_ids": [0, 1, 2]}])
    assert batch["cu_seq_lens_q"].tolist() == [0, 2, 5, 8] and batch["max_length_q"] == 3 and batch["num_tokens"] == 5


def test_fixed_bounds_give_every_micro_batch_one_shape_and_the_same_loss(varlen_model, tiny_tokenizer, monkeypatch):
    """--pad-to-budget with varlen (training.collator given the packed rows): every micro-batch has the same shapes and
    max_length (what CUDA graphs need): the padding cut into records of at most --max-length tokens, cu_seq_lens padded
    to a fixed count with empty records. The loss equals the unpadded row's; a row over the bounds is refused."""
    import runtime
    import training
    from config import TrainConfig

    monkeypatch.setattr(runtime, "attention_choice", lambda *a: runtime.VARLEN)
    monkeypatch.setattr(training, "attention_choice", lambda *a: runtime.VARLEN)
    rows = pack_examples(datasets.Dataset.from_list(examples(tiny_tokenizer)), 330, 0)  # records of 73-203 tokens
    cfg = TrainConfig(pad_to_budget=True, pack_tokens=400, max_length=256)
    collate = training.collator(cfg, tiny_tokenizer, (rows, rows.select([])))
    batches = [collate([row]) for row in rows]
    most = max(sum(p == 0 for p in row["position_ids"]) for row in rows)
    assert len(rows) > 1 and {(b["input_ids"].shape, b["cu_seq_lens_q"].shape, b["max_length_q"]) for b in batches} == {
        ((1, 400), (most + 2 + 1,), 256)}  # slots: the most records of a row + ceil(400 / 256) padding records
    for batch, row in zip(batches, rows, strict=True):
        cu = batch["cu_seq_lens_q"].tolist()
        assert cu[-1] == 400 and cu == sorted(cu) and max(b - a for a, b in zip(cu, cu[1:], strict=False)) <= 256
        plain = DocumentBounds(collate_packed)([row])
        with torch.no_grad():
            padded_loss = varlen_model(**{k: v for k, v in batch.items() if k != "num_tokens"}).loss.item()
            assert padded_loss == pytest.approx(varlen_model(**plain).loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="does not fit the fixed bounds"):
        DocumentBounds(collate_packed, slots=1, longest=1000)([rows[0]])


def test_unpadded_rows_get_the_max_length_bound_and_the_same_loss(varlen_model, tiny_tokenizer, monkeypatch):
    """Without --pad-to-budget (python main.py's rows), each row keeps its length and record bounds, but max_length_q/k
    is --max-length for every row: a Python int that changed from row to row was one more guard of the compiled layers
    to fail (test_compile's two-variants test). An upper bound gives the same loss; a record over it is refused."""
    import runtime
    import training
    from config import TrainConfig

    monkeypatch.setattr(training, "attention_choice", lambda *a: runtime.VARLEN)
    rows = pack_examples(datasets.Dataset.from_list(examples(tiny_tokenizer)), 330, 0)
    collate = training.collator(TrainConfig(max_length=256), tiny_tokenizer, (rows, rows.select([])))
    for row in rows:
        batch, plain = collate([row]), DocumentBounds(collate_packed)([row])
        assert batch["max_length_q"] == batch["max_length_k"] == 256 > plain["max_length_q"]
        assert torch.equal(batch["cu_seq_lens_q"], plain["cu_seq_lens_q"]) and torch.equal(batch["input_ids"], plain["input_ids"])
        with torch.no_grad():
            assert varlen_model(**batch).loss.item() == pytest.approx(varlen_model(**plain).loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match="does not fit the fixed bounds of records of at most 10 tokens"):
        DocumentBounds(collate_packed, longest=10)([rows[0]])


def test_varlen_without_a_cuda_gpu_is_refused_in_one_line(monkeypatch):
    import runtime
    from cli import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="needs a CUDA GPU of compute capability 8.0"):
        runtime.register_varlen()


@pytest.mark.gpu
def test_varlen_flash_kernel_matches_sdpa_and_trains_on_a_gpu(tiny_tokenizer):
    """PyTorch's varlen FlashAttention (the kernel --attention varlen runs) vs SDPA with the packed-sequence mask, bf16,
    on the tiny model: the same logits up to bf16 rounding, the very same with --max-length as the longest-record bound
    (the kernel only sizes its grid by it), and gradients flow."""
    from transformers import AutoModelForCausalLM

    import runtime
    from tiny_llama import ensure_tiny_llama

    runtime.register_varlen()
    models = {name: AutoModelForCausalLM.from_pretrained(ensure_tiny_llama(), dtype=torch.bfloat16, attn_implementation=name).cuda()
              for name in ("varlen", "sdpa")}
    batch = DocumentBounds(collate_packed)([pack_examples(datasets.Dataset.from_list(examples(tiny_tokenizer)), 100_000, 0)[0]])
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    out = {name: m(**(batch if name == "varlen" else {k: batch[k] for k in ("input_ids", "labels", "position_ids")}), use_cache=False)
           for name, m in models.items()}
    torch.testing.assert_close(out["varlen"].logits.float(), out["sdpa"].logits.float(), rtol=0, atol=3e-2)
    bounded = batch | {"max_length_q": 1024, "max_length_k": 1024}  # python main.py's rows: --max-length as the bound
    assert torch.equal(models["varlen"](**bounded, use_cache=False).logits, out["varlen"].logits)
    out["varlen"].loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in models["varlen"].parameters() if p.requires_grad)



@pytest.mark.parametrize(("packing", "cuda", "varlen_ok", "world", "expected"), [
    (True, True, True, "1", "varlen"),  # measured: faster than flex, the same losses, 16 s of compilation instead of 75
    (True, True, False, "1", "flex_attention"),  # torch < 2.10 or a card before sm80
    (True, True, True, "2", "flex_attention"),  # several processes: measured with flex only
    (False, True, True, "1", "sdpa"),  # padded batches need no record bounds
    (True, False, True, "1", "sdpa"),  # the CPU
])
def test_attention_auto_picks_varlen_for_packed_rows_on_one_cuda_process(monkeypatch, packing, cuda, varlen_ok, world, expected):
    import runtime

    monkeypatch.setattr(runtime, "varlen_available", lambda: varlen_ok)
    monkeypatch.setenv("WORLD_SIZE", world)
    rt = runtime.Runtime("cuda:0" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)
    assert runtime.attention_choice("auto", packing, rt) == expected
    assert runtime.attention_choice("flex_attention", packing, rt) == "flex_attention"  # a named kernel is kept


def test_the_collator_passes_record_bounds_when_auto_resolves_to_varlen(tiny_tokenizer, monkeypatch):
    """--attention auto resolved to varlen (a CUDA GPU, one process): the packed collator adds the record bounds."""
    import runtime
    import training
    from config import TrainConfig

    cfg = TrainConfig(base_model="unused", attention="auto")
    rows = pack_examples(datasets.Dataset.from_list(examples(tiny_tokenizer, 3)), 100_000, 0)
    monkeypatch.setattr(training, "runtime", lambda: runtime.Runtime("cuda:0", torch.bfloat16))
    for varlen_ok in (True, False):
        monkeypatch.setattr(runtime, "varlen_available", lambda ok=varlen_ok: ok)
        assert ("cu_seq_lens_q" in training.collator(cfg, tiny_tokenizer)([rows[0]])) == varlen_ok


def traceable_varlen(q, k, v, cu, longest, scale):
    """reference_varlen without a host sync (torch.compile traces it whole): each token's record from cu by
    searchsorted, a block-diagonal causal mask, SDPA. Empty records (fixed bounds) own no token."""
    tokens = torch.arange(q.shape[0], device=q.device)
    record = torch.searchsorted(cu, tokens.to(cu.dtype), right=True)
    mask = (record[:, None] == record[None, :]) & (tokens[:, None] >= tokens[None, :])
    return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)), attn_mask=mask[None],
                                                            scale=scale).transpose(0, 1)


@pytest.mark.slow  # ~2-3 minutes on 2 CPU cores: Inductor compiles the layer's forward and backward
def test_fixed_varlen_bounds_compile_once_across_micro_batches_with_eager_s_losses(tiny_tokenizer, monkeypatch, tmp_path):
    """--pad-to-budget with varlen and --compile on (what --compile-mode reduce-overhead's CUDA graphs need): rows with
    different numbers of records give every micro-batch one shape, so the compiled layer holds ONE variant over four
    steps, no graph break, and the losses equal the eager run's (a traceable reference kernel on the CPU)."""
    import runtime
    from compile_layers import check_compiled
    from config import TrainConfig
    from hub import TINY_MODEL
    from loading import load_for_training
    from training import build_trainer

    register = runtime.register_varlen
    monkeypatch.setattr(runtime, "register_varlen", lambda kernel=None: register(traceable_varlen))
    monkeypatch.setattr(runtime, "attention_choice", lambda *a: runtime.VARLEN)
    monkeypatch.setattr("training.attention_choice", lambda *a: runtime.VARLEN)
    torch._dynamo.reset()  # the layer class's code object is shared: other tests' compiled variants must not count here
    losses, counts = {}, set()
    for compiled in ("off", "on"):
        torch.manual_seed(0)
        cfg = TrainConfig(base_model=TINY_MODEL, attention="varlen", seed=0, max_steps=4, pack_tokens=400, max_length=256,
                          eval_steps=0, logging_steps=1, learning_rate=1e-2, warmup_ratio=0.0, pad_to_budget=True,
                          gradient_checkpointing=False, compile=compiled, output_dir=str(tmp_path / compiled))
        model, tokenizer, _ = load_for_training(cfg)
        rows = pack_examples(datasets.Dataset.from_list(examples(tokenizer, 8)), 330, 0)
        counts = {sum(p == 0 for p in row["position_ids"]) for row in rows}
        trainer = build_trainer(cfg, model, tokenizer, rows, datasets.Dataset.from_list([]))
        trainer.args.report_to = []
        trainer.train()
        losses[compiled] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if compiled == "on":
            watch = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "CompileWatch")
            report = check_compiled(watch.stats, max_variants=1)
            assert report["compiled_variants"] == 1 and report["graph_breaks"] == {}, report
    assert len(counts) > 1  # the rows really hold different numbers of records
    assert len(losses["on"]) == 4 and losses["on"] == pytest.approx(losses["off"], abs=2e-4)
