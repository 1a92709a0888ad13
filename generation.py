"""Generation: batched greedy (or sampled) answers with out-of-memory back-off, and the 16-bit copy of a 4-bit base.

    results = generate(model, tokenizer, prompts, batch_size=64, stop_strings=["### Instruction:"])
    # [{"answer", "raw", "answer_tokens", "stop": "eos" | "stop_string" | "length", "ended_with_eos"}]

Prompts go longest first, in batches of similar length (less left padding; an out-of-memory error shows up
at once, and halves the batch for the rest of the run); results come back in input order.

Stopping: an answer ends at EOS, at the first stop string (eval.py passes the template's section markers, the
same for every model), or at max_new_tokens, whichever comes first; `stop` says which. A sequence that has
stopped no longer decides when its batch ends. `raw` keeps the decoded text before the cut.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase


def generation_kwargs(tokenizer: PreTrainedTokenizerBase, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                      **extra: Any) -> dict[str, Any]:
    """generate() arguments: greedy at temperature 0 (sampling knobs a model's generation_config carries are cleared)."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": temperature > 0,
    }
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs | extra


ENGINES = ("auto", "padded", "evict", "static", "compiled", "flash", "compiled_flash", "triton", "compiled_triton", "continuous")
# decode_static, with or without its two options: compiled layers, and a decode attention reading each row's own positions
# (flash: FlashAttention's variable-length kernel; triton: decode_kernel's one-query kernel)
STATIC_ENGINES = ("static", "compiled", "flash", "compiled_flash", "triton", "compiled_triton")


AUTO_COMPILE_TOKENS = 131072  # auto compiles the decode step (compiled_triton) from this many prompts x max_new_tokens


def pick_engine(engine: str, device: torch.device, greedy: bool, tokens: int = 0) -> str:
    """auto, greedy answers, on CUDA cards of compute capability 8.0+ where Triton imports (it comes with CUDA builds of
    torch): triton (decode_kernel: 1.24x flash, 6,822 vs 5,488 new tokens/s on an H200, session 10), or compiled_triton
    when the call asks for at least AUTO_COMPILE_TOKENS (prompts x max_new_tokens: 1.16x triton after ~2-4 s more of
    compilation per process, which that many tokens repay; eval.py on dolly's validation split asks for ~192k per
    model); flash (FlashAttention's kernel) without Triton; static on older cards; evict on a CPU (finished rows leave the
    batch). The base in 4 bits or a 16-bit copy. Sampled answers: padded (plain model.generate).

    static: a static KV cache, the decode step captured in a CUDA graph per batch. compiled: static with the decoder
    layers compiled for the decode steps (decoder_step_layers: Inductor fuses the element-wise kernels; 1.14x static on
    an H200, after ~8 s of compilation per process). flash, triton: static with each row's query attending only to its
    own cache positions (flash_decode_attention: FlashAttention's variable-length kernel, or decode_kernel's one-query
    Triton kernel, reading the cache in place) instead of SDPA over the whole cache with a mask; compiled_flash,
    compiled_triton: both options. continuous: transformers' generate_batch (paged attention, a finished sequence frees
    its slot at once), 3.6x slower than static on an H200. All decode greedily; every static engine runs the prompt in
    groups of rows of similar length (prefill).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)} (got {engine!r})")
    if not greedy:
        return "padded"  # evict, static and continuous decode greedily; sampling goes through model.generate
    if engine == "auto":
        if device.type != "cuda":
            return "evict"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "static"
        import decode_kernel

        if not decode_kernel.available():
            return "flash"
        return "compiled_triton" if tokens >= AUTO_COMPILE_TOKENS else "triton"
    return engine


def generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], batch_size: int | None = 8,
             progress: bool = False, label: str = "answers", engine: str = "auto", stats: dict | None = None,
             **generation: Any) -> list[dict[str, Any]]:
    """Each prompt's answer (new text only, cut at EOS or a stop string), its token count and how it ended, in input order.

    batch_size None: on a GPU, batches planned from free memory and the prompts' lengths (plan_batches: long prompts
    apart from short ones, so that few rows are padded far); on a CPU, auto_batch_size. engine: see pick_engine;
    when auto's static or flash engine fails other than by running out of memory, the rest of the answers come from evict, said
    in one line. stats (a dict), for the benchmark: the rows of each batch ("batches"); with static, the CUDA graphs
    captured ("captures") and the host seconds their capture took (decode_static).
    """
    from tqdm.auto import tqdm

    greedy = generation.get("temperature", 0.0) <= 0
    chosen = pick_engine(engine, model.device, greedy, len(prompts) * generation.get("max_new_tokens", 256))
    if chosen == "continuous" and prompts:
        return generate_continuous(model, tokenizer, prompts, progress=progress, **generation)
    fallback = engine == "auto" and chosen in STATIC_ENGINES
    engine = chosen
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    sized = batch_size is None  # batches planned from free memory and the prompts' lengths (planned_batches)
    new_tokens = generation.get("max_new_tokens", 256)
    cap = None  # after an out-of-memory error: rows per batch (batch_size given), cache positions per batch (sized)
    plan: list[int] = []  # rows of the coming batches (sized)
    results: list[dict[str, Any]] = [{}] * len(prompts)
    bar = tqdm(total=len(prompts), desc=f"generating ({label})", unit="answer", disable=not progress)
    start = 0
    while start < len(prompts):
        if sized:
            if not plan:  # once, and again for what is left after an out-of-memory error
                plan = planned_batches(model, [lengths[i] for i in order[start:]], new_tokens, cap)
            batch_size = plan[0]
        elif cap:
            batch_size = min(batch_size, cap)
        chunk = order[start : start + batch_size]
        try:
            generated = generate_batch(model, tokenizer, [prompts[i] for i in chunk], engine=engine, stats=stats, **generation)
        except torch.cuda.OutOfMemoryError as e:
            if len(chunk) == 1:
                raise
            half, longest = max(1, batch_size // 2), lengths[chunk[0]]
            # sized: half the rows at this prompt length, as cache positions, so shorter prompts still get more rows
            cap, plan = half * (longest + new_tokens) if sized else half, []
            torch.cuda.empty_cache()
            if stats is not None:
                stats["oom_retries"] = stats.get("oom_retries", 0) + 1
            print(f"[model] out of GPU memory at {len(chunk)} rows of up to {longest} prompt tokens ({str(e).splitlines()[0][:120]}); "
                  f"retrying with batch size {half}", flush=True)
            continue
        except (RuntimeError, AttributeError) as e:  # AttributeError: a transformers whose StaticCache changed (cumulative_length)
            if not fallback:
                raise
            print(f"[model] the {engine} engine failed ({type(e).__name__}: {str(e)[:200]}); answering with --engine evict",
                  flush=True)
            fallback, engine = False, "evict"
            continue
        for i, result in zip(chunk, generated, strict=True):
            results[i] = result
        if stats is not None:
            stats.setdefault("batches", []).append(len(chunk))
        plan = plan[1:]  # planned sizes already respect the cap, so this batch was plan[0]
        start += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return results


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], stop_strings: list[str] | None = None,
    engine: str = "padded", stats: dict | None = None, **generation: Any,
) -> list[dict[str, Any]]:
    """One left-padded batch: through model.generate (padded), decode_static (STATIC_ENGINES) or decode_evicting (evict)."""
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    if engine in STATIC_ENGINES:
        kernel = engine.removeprefix("compiled_") if engine.endswith(("flash", "triton")) else None
        rows = decode_static(model, tokenizer, batch, stop_strings or [], stats=stats, compiled=engine.startswith("compiled"),
                             kernel=kernel, **generation)
    elif engine == "evict":
        rows = decode_evicting(model, tokenizer, batch, stop_strings or [], **generation)
    else:
        stops = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
        rows = model.generate(**batch, **stops, **generation_kwargs(tokenizer, **generation))[:, batch["input_ids"].shape[1] :].tolist()
    return [end_answer(row, tokenizer, stop_strings or []) for row in rows]


@torch.inference_mode()
def decode_evicting(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, batch: Any, stop_strings: list[str],
                    max_new_tokens: int = 256, min_new_tokens: int = 0, **_: Any) -> list[list[int]]:
    """Greedy decoding in which a row leaves the batch (and its KV cache) as soon as it ends: finished rows cost nothing.

    The same steps as model.generate's greedy search (left padding, positions from the attention mask, argmax of the last
    logits), so the tokens agree up to the rounding of a smaller batch. A row ends at EOS, once its new text contains a
    stop string, or at max_new_tokens; min_new_tokens (the benchmark's forced length) bans EOS and stop strings before it.
    """
    from transformers import DynamicCache

    eos = tokenizer.eos_token_id
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, past_key_values=cache, logits_to_keep=1)
    alive, rows = list(range(mask.shape[0])), [[] for _ in range(mask.shape[0])]
    for step in range(max_new_tokens):
        logits = out.logits[:, -1]
        if step < min_new_tokens and eos is not None:
            logits[:, eos] = -float("inf")
        tokens = logits.argmax(-1)
        for r, t in zip(alive, tokens.tolist(), strict=True):
            rows[r].append(t)
        done = [step + 1 == max_new_tokens or (step + 1 >= min_new_tokens and row_ended(rows[r], eos, tokenizer, stop_strings))
                for r in alive]
        if all(done):
            break
        if any(done):
            keep = torch.tensor([i for i, d in enumerate(done) if not d], device=mask.device)
            cache.batch_select_indices(keep)
            mask, positions, tokens = mask[keep], positions[keep], tokens[keep]
            alive = [r for r, d in zip(alive, done, strict=True) if not d]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache, logits_to_keep=1)
    return rows


@torch.inference_mode()
def decode_static(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, batch: Any, stop_strings: list[str],
                  max_new_tokens: int = 256, min_new_tokens: int = 0, cuda_graphs: bool | None = None, check_every: int = 8,
                  compiled: bool = False, kernel: str | None = None, stats: dict | None = None,
                  **_: Any) -> list[list[int]]:
    """Greedy decoding with a static KV cache (prompt + max_new_tokens, allocated once) and, on CUDA, the decode step
    captured once per batch in a CUDA graph and replayed: one launch per generated token instead of ~1,000 kernels
    launched from Python, which is what bounds the eager decoders at eval.py's batch sizes.

    Every step has the same shapes: token (rows, 1), positions (rows, 1), a boolean mask over all cache positions
    (rows, 1, 1, prompt + max_new_tokens), updated in place outside the graph; the cache advances itself. The same
    tokens as decode_evicting up to rounding (the same left padding, positions and argmax); finished rows keep
    decoding until every row has ended (checked every `check_every` steps); each row is then cut where decode_evicting
    would have ended it, so `raw` is the same too.
    cuda_graphs None: on CUDA. Without graphs (a CPU) the same steps run eagerly. compiled: the decode steps run the
    decoder layers compiled (decoder_step_layers); the prompt runs eagerly. kernel "flash" or "triton": the decode steps
    attend through flash_decode_attention (each row reads only its own cache positions, in place; no mask), on CUDA with
    FlashAttention's variable-length kernel or decode_kernel; None: SDPA over the whole cache with a mask. stats (a
    dict): "captures" and the host seconds of the captures' warm-up (with compiled, the first one compiles), recording and instantiation
    ("capture_*_s") added up, for the benchmark.
    """
    from transformers import StaticCache

    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    rows, prompt = ids.shape
    device, eos, length = ids.device, tokenizer.eos_token_id, prompt + max_new_tokens
    cache = StaticCache(config=model.config, max_cache_len=length)
    visible = torch.zeros(rows, length, dtype=torch.bool, device=device)  # the cache positions each row attends to
    visible[:, :prompt] = mask
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    flash = kernel is not None  # the cache relaid for flash_decode_attention
    init_cache(cache, rows, model)
    if flash:
        relayout_cache(cache)
    logits = prefill(model, ids, mask, cache, relaid=flash)

    def next_tokens(logits: torch.Tensor, step: int) -> torch.Tensor:
        if step < min_new_tokens and eos is not None:
            logits[:, eos] = -float("inf")
        return logits.argmax(-1)

    history = torch.empty(rows, max_new_tokens, dtype=torch.long, device=device)
    history[:, 0] = next_tokens(logits, 0)
    step_ids, step_positions, step_mask = history[:, :1].clone(), positions[:, -1:] + 1, visible[:, None, None]

    bounds: dict[str, torch.Tensor] = {}
    if flash:  # each row's cache positions: from its first real prompt token to the token fed now (grows by 1 a step)
        padding = (~mask).sum(-1)
        row_starts = torch.arange(rows, device=device) * length + padding
        bounds = {"decode_cu_q": torch.arange(rows + 1, device=device, dtype=torch.int32),
                  "decode_starts": torch.cat([row_starts, row_starts.new_tensor([rows * length])]).to(torch.int32),
                  "decode_lengths": (prompt + 1 - padding).to(torch.int32)}

    def forward() -> torch.Tensor:
        return model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_positions, past_key_values=cache,
                     logits_to_keep=1, **bounds).logits[:, -1]

    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    column = torch.tensor([prompt], device=device) if flash and compiled else None  # the cache position written at a step
    if compiled:
        forward = decoder_step_layers(model, forward, cache, column)
    if flash:
        forward = with_flash_decode_attention(model, forward, kernel)
    times: dict[str, float] = {}
    replay = capture_decode_step(forward, cache, prompt, times) if cuda_graphs and max_new_tokens > 1 else forward
    ends: dict[int, int] = {}  # row -> its length: the first step at which decode_evicting would have ended it (row_ended)
    checked = 0

    def check(upto: int) -> list[list[int]]:
        nonlocal checked
        host = history[:, :upto].tolist()
        for r, row in enumerate(host):
            if r not in ends and row_ended_anywhere(row, eos, tokenizer, stop_strings):
                first = max(checked + 1, min_new_tokens, 1)
                ends[r] = next((k for k in range(first, upto + 1) if row_ended(row[:k], eos, tokenizer, stop_strings)), upto)
        checked = upto
        return [row[: ends.get(r, upto)] for r, row in enumerate(host)]

    for step in range(1, max_new_tokens):
        visible[:, prompt + step - 1] = True  # the token fed now is written at cache position prompt + step - 1
        tokens = next_tokens(replay(), step)
        history[:, step] = tokens
        step_ids.copy_(tokens[:, None])
        step_positions.add_(1)
        if flash:
            bounds["decode_lengths"].add_(1)
        if column is not None:
            column.add_(1)
        if (step + 1) % check_every == 0 and step + 1 >= min_new_tokens:
            cut = check(step + 1)
            if len(ends) == rows:
                break
    else:
        cut = check(max_new_tokens)
    if stats is not None:
        stats["captures"] = stats.get("captures", 0) + int(replay is not forward)
        for name, seconds in times.items():
            stats[name] = stats.get(name, 0.0) + seconds
    return cut


DECODE_ATTENTION = {"flash": "flash_decode", "triton": "triton_decode"}  # decode kernel -> attn_implementation name


def init_cache(cache: Any, rows: int, model: torch.nn.Module) -> None:
    """A StaticCache's buffers allocated for `rows` rows in the model's 16-bit (or CPU float) dtype, before the prompt."""
    weight = model.get_input_embeddings().weight
    cache.early_initialization(rows, model.config.num_key_value_heads, head_dim(model), weight.dtype, weight.device)


def relayout_cache(cache: Any) -> None:
    """Each layer's keys and values as a (rows, length, heads, dim) buffer kept as a (rows, heads, length, dim) view of it:
    the shape every transformers cache path expects, the layout FlashAttention's variable-length kernel and
    decode_kernel read in place (flash_decode_attention). On an initialized cache, before the prompt."""
    for layer in cache.layers:
        layer.flash_keys, layer.flash_values = layer.keys.transpose(1, 2).contiguous(), layer.values.transpose(1, 2).contiguous()
        layer.keys, layer.values = layer.flash_keys.transpose(1, 2), layer.flash_values.transpose(1, 2)


PREFILL_TOKENS = 16384  # tokens (padding included) per prefill chunk at most


def prefill_chunks(lengths: list[int], budget: int = PREFILL_TOKENS, waste: float = 0.25) -> list[list[int]]:
    """The rows of a batch in groups for the prompt's forward pass: longest first, a group closed before it would pass
    `budget` tokens padded to its longest row, or before padding would be more than `waste` of it. A batch padded to its
    longest prompt (dolly: p50 60 tokens, max 1,126) would spend most of its prefill on padding."""
    chunks: list[list[int]] = []
    for r in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if chunks:
            chunk = chunks[-1]
            longest, n = lengths[chunk[0]], len(chunk) + 1
            if n * longest <= budget and sum(lengths[i] for i in chunk) + lengths[r] >= (1 - waste) * n * longest:
                chunk.append(r)
                continue
        chunks.append([r])
    return chunks


class PrefillCache:
    """The cache the prompt's forward pass sees, for a group of rows padded to `span` tokens: a layer's keys and values
    go into the static cache's last `span` prompt positions of those rows (right-aligned: where the full batch's
    left-padded prompt puts them), and attention runs over the group's own keys and values."""

    def __init__(self, cache: Any, rows: torch.Tensor, prompt: int, span: int, relaid: bool):
        self.cache, self.rows, self.prompt, self.span, self.relaid = cache, rows, prompt, span, relaid

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        layer, where = self.cache.layers[layer_idx], slice(self.prompt - self.span, self.prompt)
        if self.relaid:  # (rows, length, heads, dim) buffers
            layer.flash_keys[self.rows, where] = key_states.transpose(1, 2)
            layer.flash_values[self.rows, where] = value_states.transpose(1, 2)
        else:
            layer.keys[self.rows, :, where] = key_states
            layer.values[self.rows, :, where] = value_states
        return key_states, value_states


def prefill(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache: Any, relaid: bool) -> torch.Tensor:
    """The prompt's forward pass for a left-padded batch, in groups of rows of similar length (prefill_chunks), each padded
    only to its own longest: the keys and values land in `cache` where one pass over the whole batch would put them, and
    each layer's cache position is set past the prompt. `cache` initialized (init_cache), relaid or not (relayout_cache).
    Returns each row's last-position logits."""
    rows, prompt = ids.shape
    lengths = mask.sum(-1).tolist()
    logits = None
    for chunk in prefill_chunks(lengths):
        span = max(lengths[i] for i in chunk)
        index = torch.tensor(chunk, device=ids.device)
        part = mask[index, prompt - span :]
        causal = torch.ones(span, span, dtype=torch.bool, device=ids.device).tril()
        own = torch.eye(span, dtype=torch.bool, device=ids.device)  # a padding query sees itself: no all-masked row (NaN)
        out = model(input_ids=ids[index, prompt - span :], attention_mask=((causal[None] & part[:, None]) | own[None])[:, None],
                    position_ids=(part.long().cumsum(-1) - 1).clamp(min=0),
                    past_key_values=PrefillCache(cache, index, prompt, span, relaid), logits_to_keep=1).logits[:, -1]
        if logits is None:
            logits = out.new_empty(rows, out.shape[-1])
        logits[index] = out
    for layer in cache.layers:
        layer.cumulative_length.fill_(prompt)
    return logits


def flash_decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           kernel: str = "flash", **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface for the flash engines' decode steps: row r's one query attends to the cache
    positions decode_starts[r] .. + decode_lengths[r] of the flattened (rows x length) cache (its first real prompt token
    to the token fed now), no mask and no other position read. The cache must be laid out by relayout_cache. On CUDA in
    16 bits, kernel "flash": FlashAttention's variable-length kernel (seqused_k); kernel "triton": decode_kernel's
    one-query kernel (also on a CPU under Triton's interpreter, TRITON_INTERPRET=1: the tests); elsewhere the same
    attention through SDPA and a mask."""
    cu_q, starts, lengths = kwargs.get("decode_cu_q"), kwargs.get("decode_starts"), kwargs.get("decode_lengths")
    if cu_q is None or starts is None or lengths is None:
        raise ValueError("flash decode attention needs decode_cu_q, decode_starts and decode_lengths (generation.decode_static)")
    rows, heads, _, dim = query.shape
    length = key.shape[2]
    k, v = key.transpose(1, 2), value.transpose(1, 2)  # (rows, length, kv heads, dim)
    if not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError("flash decode attention reads the cache in place: lay it out with generation.relayout_cache first")
    q = query.transpose(1, 2).reshape(rows, heads, dim)
    k, v = k.reshape(rows * length, k.shape[2], dim), v.reshape(rows * length, v.shape[2], dim)
    half = q.dtype in (torch.float16, torch.bfloat16)
    if kernel == "triton" and (q.is_cuda and half or _interpreted()):
        import decode_kernel

        out = decode_kernel.decode_attention(q, k, v, starts, lengths, scaling)
    elif kernel == "flash" and q.is_cuda and half:
        out = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, starts, 1, length, 0.0, False, False, scale=scaling,
                                                      seqused_k=lengths)[0]
    else:
        out = masked_decode_attention(q, k, v, starts, lengths, length, scaling)
    return out.view(rows, 1, heads, dim), None


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_decode_attention(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """flash_decode_attention through decode_kernel (the triton engines)."""
    return flash_decode_attention(*args, kernel="triton", **kwargs)


def masked_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                            length: int, scale: float | None) -> torch.Tensor:
    """flash_decode_attention's attention through SDPA and a boolean mask (the CPU; traceable: no host sync)."""
    rows, heads, dim = q.shape
    kr, vr = (t.view(rows, length, -1, dim).transpose(1, 2) for t in (k, v))
    first = starts[:-1] - torch.arange(rows, device=q.device) * length
    position = torch.arange(length, device=q.device)[None]
    visible = (position >= first[:, None]) & (position < (first + lengths)[:, None])
    out = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kr, vr, attn_mask=visible[:, None, None], scale=scale,
                                                           enable_gqa=heads != kr.shape[1])
    return out[:, :, 0]


def with_flash_decode_attention(model: torch.nn.Module, forward: Any, kernel: str = "flash") -> Any:
    """forward() with the model's attention implementation set to flash_decode_attention through `kernel` (registered
    with transformers as DECODE_ATTENTION[kernel]), then back to what it was."""
    from transformers import AttentionInterface

    from compile_layers import decoder_layers

    name = DECODE_ATTENTION[kernel]
    AttentionInterface.register(name, triton_decode_attention if kernel == "triton" else flash_decode_attention)
    config = decoder_layers(model)[0].self_attn.config

    def run() -> torch.Tensor:
        before = config._attn_implementation
        config._attn_implementation = name
        try:
            return forward()
        finally:
            config._attn_implementation = before

    return run


class LayerCache:
    """The KV cache as one decoder layer sees it: `update` writes that layer's keys and values whatever index it is
    given. decoder_step_layers runs every attention as layer 0 of its own LayerCache, so no layer index reaches the
    compiled graph (torch.compile specializes integer attributes of a module: 32 layer indices would be 32 recompiles,
    past the recompile limit)."""

    def __init__(self, layer: Any, column: torch.Tensor | None = None):
        self.layer, self.column = layer, column

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if self.column is None:
            return self.layer.update(key_states, value_states, *args, **kwargs)
        # a cache laid out by relayout_cache, compiled: the write goes to the contiguous (rows, length, heads, dim) buffers
        # at `column` (a 1-element tensor advanced outside the graph). Written through the (rows, heads, length, dim) view
        # (transformers' update), Inductor could not do it in place and copied both whole buffers at every step.
        keys, values = self.layer.flash_keys, self.layer.flash_values
        keys.index_copy_(1, self.column, key_states.transpose(1, 2))
        values.index_copy_(1, self.column, value_states.transpose(1, 2))
        return keys.transpose(1, 2), values.transpose(1, 2)


def decoder_step_layers(model: torch.nn.Module, forward: Any, cache: Any, column: torch.Tensor | None = None) -> Any:
    """forward() with every decoder layer of `model` running its compiled forward: torch.compile of the layer's forward,
    dynamic shapes (rows and cache length change from batch to batch), no graph break allowed, a recompile-limit hit an
    error. All layers share one code object and, while forward() runs, one layer index (0, each with its own
    LayerCache over `cache`'s layer), so one compiled graph serves them all; the compiled functions are made once per
    model and kept on it, so the prompt (run before) and the other engines stay eager. Inductor's cache as for
    training (use_inductor_cache). column: the flash engines' cache position of the token fed now (LayerCache)."""
    from compile_layers import decoder_layers, never_fall_back, use_inductor_cache

    layers = decoder_layers(model)
    if "_decode_step_layers" not in model.__dict__:
        use_inductor_cache()
        never_fall_back()
        model.__dict__["_decode_step_layers"] = [torch.compile(layer.forward, dynamic=True, fullgraph=True) for layer in layers]
    compiled = model.__dict__["_decode_step_layers"]

    def layer_forward(fn: Any, view: LayerCache) -> Any:
        def run_layer(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            for name in ("cache", "past_key_values"):  # transformers >= 5.20 calls it cache
                if kwargs.get(name) is not None:
                    kwargs[name] = view
            # detached: after training, enable_input_require_grads' hook marks layer 0's input even under no_grad, and a
            # requires_grad flag that differs between layers would be one more compiled variant
            return fn(hidden_states.detach(), *args, **kwargs)

        return run_layer

    def run() -> torch.Tensor:
        indices = [layer.self_attn.layer_idx for layer in layers]
        for layer, fn, cache_layer in zip(layers, compiled, cache.layers, strict=True):
            layer.forward = layer_forward(fn, LayerCache(cache_layer, column))
            layer.self_attn.layer_idx = 0
        try:
            return forward()
        finally:
            for layer, index in zip(layers, indices, strict=True):
                del layer.forward  # the class's forward again
                layer.self_attn.layer_idx = index

    return run


def capture_decode_step(forward: Any, cache: Any, position: int, times: dict | None = None) -> Any:
    """forward() captured in a CUDA graph: a function that replays it and returns its (static) output tensor.

    One eager warm-up on a side stream first (workspaces), as torch.cuda.graphs asks; it writes a throw-away key and value
    at `position`, the one the first replay overwrites, and advances the cache's position, which is set back. Recorded
    with capture_begin/capture_end on that stream rather than `with torch.cuda.graph`, which also synchronizes the
    device and empties the allocator's cache. times (a dict): the host seconds of the warm-up, the recording and the
    instantiation, added as "capture_warmup_s", "capture_record_s", "capture_instantiate_s".
    """
    stream, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
    stream.wait_stream(torch.cuda.current_stream())
    marks = [time.perf_counter()]
    with torch.cuda.stream(stream):
        forward()
        for layer in cache.layers:
            layer.cumulative_length.fill_(position)
        marks.append(time.perf_counter())
        graph.capture_begin()
        try:
            out = forward()
            marks.append(time.perf_counter())
        finally:
            graph.capture_end()
            marks.append(time.perf_counter())
    torch.cuda.current_stream().wait_stream(stream)
    if times is not None:
        for name, a, b in zip(("warmup", "record", "instantiate"), marks, marks[1:], strict=False):
            times[f"capture_{name}_s"] = times.get(f"capture_{name}_s", 0.0) + b - a

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def row_ended_anywhere(row: list[int], eos: int | None, tokenizer: PreTrainedTokenizerBase, stop_strings: list[str]) -> bool:
    """Whether a row holds EOS or its text a stop string anywhere: decode_static's cheap test, every few steps, before it
    looks for the exact step with decode_evicting's own rule (row_ended)."""
    return (eos is not None and eos in row) or (bool(stop_strings) and any(s in tokenizer.decode(row, skip_special_tokens=True)
                                                                           for s in stop_strings))


def row_ended(row: list[int], eos: int | None, tokenizer: PreTrainedTokenizerBase, stop_strings: list[str], tail: int = 16) -> bool:
    """Whether a row has ended: its last token is EOS, or its recent text holds a stop string (confirmed on the whole text)."""
    if row and row[-1] == eos:
        return True
    if not stop_strings or not any(s in tokenizer.decode(row[-tail:], skip_special_tokens=True) for s in stop_strings):
        return False
    return any(s in tokenizer.decode(row, skip_special_tokens=True) for s in stop_strings)


@torch.no_grad()  # not inference_mode: generate_batch's thread updates in place tensors made here (inference tensors fail)
def generate_continuous(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                        stop_strings: list[str] | None = None, max_new_tokens: int = 256, min_new_tokens: int = 0,
                        cuda_graphs: bool | None = True, progress: bool = False, **_: Any) -> list[dict[str, Any]]:
    """All prompts through transformers' continuous batching (model.generate_batch): paged KV cache sized from free
    memory, a finished sequence frees its slot for the next prompt at once. Greedy. It has no per-request stop strings:
    rows end at EOS or max_new_tokens, and end_answer cuts at the first stop string afterwards (the same answers).
    min_new_tokens > 0 (forced length): EOS does not end a row. cuda_graphs (CUDA only): capture the forward passes in
    CUDA graphs (True), or leave it to transformers' heuristic (None: off for SDPA, which needs a mask).
    """
    from transformers import ContinuousBatchingConfig, GenerationConfig

    eos = None if min_new_tokens else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    cb = None
    if model.device.type == "cuda":
        cb = ContinuousBatchingConfig(max_memory_percent=memory_share(), use_cuda_graph=cuda_graphs)
    inputs = [tokenizer(p)["input_ids"] for p in prompts]
    outputs = model.generate_batch(inputs, generation_config=config, continuous_batching_config=cb, progress_bar=progress)
    failed = [o.error for o in outputs.values() if getattr(o, "error", None) is not None]
    if len(outputs) != len(prompts) or failed:  # generate_batch logs a failure and returns what it has: never misalign
        raise RuntimeError(f"continuous batching returned {len(outputs)} of {len(prompts)} answers"
                           + (f"; first error: {failed[0]}" if failed else "") + " (try --engine evict)")
    rows = [list(out.generated_tokens) for out in outputs.values()]  # in input order
    return [end_answer(row, tokenizer, stop_strings or []) for row in rows]


def free_memory(device: torch.device) -> int:
    """Bytes this process may still allocate on a CUDA device: the card's free memory, lowered to what a
    torch.cuda.set_per_process_memory_fraction cap leaves (mem_get_info does not know about the cap)."""
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    return max(0, min(free + reserved - allocated, int(fraction * total) - allocated))


def memory_share(use: float = 0.8) -> float:
    """The share of the card's free memory continuous batching may give its KV cache (`use` of what this process may take)."""
    free, _ = torch.cuda.mem_get_info()
    return max(0.05, min(0.9, use * free_memory(torch.device("cuda", torch.cuda.current_device())) / max(free, 1)))


MEMORY_USE = 0.6  # the share of free GPU memory a generation batch may take (KV cache + prefill activations)
MAX_ROWS = 256  # rows per batch at most


def auto_batch_size(model: torch.nn.Module, prompt_tokens: int, max_new_tokens: int, prompts: int, use: float = MEMORY_USE) -> int:
    """Rows per batch from free memory: each row's KV cache (prompt + answer) and prefill activations within `use` of it.

    On the CPU, 64: a decoding step there costs about the same for 16 rows as for 50 (it reads every weight once), and
    finished rows leave the batch, so one batch beats several that each run to their longest answer (50 dolly records,
    the demo's SmolLM2, base side, 2 cores: 100 s in one batch vs 167 s in batches of 16, the same answers).
    """
    if model.device.type != "cuda":
        return max(1, min(64, prompts))
    return max(1, min(prompts, MAX_ROWS, int(use * free_memory(model.device) // row_bytes(model, prompt_tokens, max_new_tokens))))


def head_dim(model: torch.nn.Module) -> int:
    """The size of one attention head: the config's head_dim, else hidden_size / num_attention_heads."""
    c = model.config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of 16-bit KV cache one token takes in every layer."""
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim(model) * 2


def row_bytes(model: torch.nn.Module, prompt_tokens: int, max_new_tokens: int) -> int:
    """GPU memory one row of a batch needs: its KV cache (prompt + answer) and its prefill activations (one layer's)."""
    c = model.config
    return kv_bytes_per_token(model) * (prompt_tokens + max_new_tokens) + prompt_tokens * (c.hidden_size + 3 * c.intermediate_size) * 2


def plan_batches(lengths: list[int], new_tokens: int, rows_fit: Any, weight_bytes: int, kv_per_token: int,
                 max_rows: int = MAX_ROWS) -> list[int]:
    """Rows per batch, in order, for prompts sorted longest first: the split that reads the least memory in all.

    A batch of n rows whose longest prompt has P tokens is left-padded to P, and each of its decoding steps (new_tokens of
    them at most) reads every weight once and n KV caches of P + new_tokens positions. One batch for everything reads the
    weights least but pads short prompts to the longest; one batch per length pads nothing but reads the weights most.
    Exact minimum by dynamic programming over the sorted lengths (O(len x max_rows)), each batch within rows_fit(P) rows
    (free memory) and max_rows; a batch also costs its prefill and set-up, counted as 8 more weight reads.
    """
    m = len(lengths)
    best, take = [0.0] * (m + 1), [0] * (m + 1)
    for i in range(m - 1, -1, -1):
        fit = max(1, min(max_rows, rows_fit(lengths[i]), m - i))
        per_row = new_tokens * kv_per_token * (lengths[i] + new_tokens)
        fixed = (new_tokens + 8) * weight_bytes
        best[i], take[i] = min((fixed + n * per_row + best[i + n], n) for n in range(1, fit + 1))
    sizes, i = [], 0
    while i < m:
        sizes.append(take[i])
        i += take[i]
    return sizes


def planned_batches(model: torch.nn.Module, lengths: list[int], max_new_tokens: int, cap: int | None = None) -> list[int]:
    """Rows per batch for prompts sorted longest first: plan_batches on a CUDA GPU (free memory read once); elsewhere
    the next batch only, auto_batch_size rows for its longest prompt (a CPU decodes best in one batch: see there).
    cap: at most this many cache positions (rows x (prompt + max_new_tokens)) per batch, after an out-of-memory error."""
    def within_cap(rows: int, length: int) -> int:
        return rows if cap is None else max(1, min(rows, cap // (length + max_new_tokens)))

    if model.device.type != "cuda":
        return [within_cap(auto_batch_size(model, lengths[0], max_new_tokens, len(lengths)), lengths[0])]  # then again
    free = MEMORY_USE * free_memory(model.device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows_fit = lambda length: within_cap(int(free // row_bytes(model, length, max_new_tokens)), length)  # noqa: E731
    return plan_batches(lengths, max_new_tokens, rows_fit, weights, kv_bytes_per_token(model))


def end_answer(new_tokens: list[int], tokenizer: PreTrainedTokenizerBase, stop_strings: list[str]) -> dict[str, Any]:
    """The answer in a row of generated tokens: up to EOS, then cut before the first stop string; and which rule ended it."""
    eos = tokenizer.eos_token_id
    length = new_tokens.index(eos) if eos in new_tokens else len(new_tokens)
    raw = tokenizer.decode(new_tokens[:length], skip_special_tokens=True)
    cut = min((raw.find(s) for s in stop_strings if s in raw), default=-1)
    if cut < 0:
        stop = "eos" if eos in new_tokens else "length"
        return {"answer": raw.strip(), "raw": raw, "answer_tokens": length, "stop": stop, "ended_with_eos": stop == "eos"}
    low, high = 0, length  # the most generated tokens whose text stays before the cut (binary search: decoding is monotone)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if len(tokenizer.decode(new_tokens[:mid], skip_special_tokens=True)) <= cut else (low, mid - 1)
    return {"answer": raw[:cut].strip(), "raw": raw, "answer_tokens": low, "stop": "stop_string", "ended_with_eos": False}


# --- fast generation: the 4-bit base dequantized once -------------------------------------


def linear4bit_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute, module) for every bitsandbytes 4-bit linear layer, LoRA's wrapped base layers included."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return []
    import bitsandbytes as bnb

    return children_where(model, lambda child: isinstance(child, bnb.nn.Linear4bit))


def children_where(model: torch.nn.Module, keep: Any) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute, module) for every submodule `keep(module)` accepts: what a layer swap needs to setattr."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children() if keep(child)]


def is_lora_layer(module: torch.nn.Module) -> bool:
    """A PEFT LoRA wrapper: its base layer plus the low-rank A and B."""
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def dequantized_bytes(model: torch.nn.Module) -> int:
    """Extra memory a 16-bit copy of the 4-bit linear weights takes (the 4-bit layers are kept: exact restore, MergeSwitch)."""
    return sum(m.in_features * m.out_features * 2 for _, _, m in linear4bit_modules(model))


def dequantize_4bit(model: torch.nn.Module) -> dict[torch.nn.Module, torch.nn.Module]:
    """Replace every 4-bit linear layer by a plain linear layer holding its dequantized weights; returns {dense: 4-bit}.

    The weight values are exactly the NF4 values bitsandbytes computes with; only the kernel changes (a dense
    16-bit matmul instead of unpacking the 4-bit weight inside every layer at every generated token), so the
    logits agree up to rounding, and batched generation gets faster at the memory of a 16-bit copy (13 GB
    for Llama-2-7B). The 4-bit layers are kept (3.5 GB for 7B) so that a dense weight can be rebuilt exactly
    (dense_weight) after a LoRA update was merged into it. The model can no longer be trained as QLoRA afterwards.
    """
    originals = {}
    for parent, name, q in linear4bit_modules(model):
        weight = dense_weight(q)
        # on the meta device: no initialization drawn from the RNG (training's LoRA init must not depend on the copy), no memory
        dense = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta", dtype=weight.dtype)
        dense.weight = torch.nn.Parameter(weight, requires_grad=False)
        if q.bias is not None:
            dense.bias = torch.nn.Parameter(q.bias.data.to(weight.dtype), requires_grad=False)
        setattr(parent, name, dense)
        originals[dense] = q
    if originals and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return originals


@torch.no_grad()
def dense_weight(q: torch.nn.Module) -> torch.Tensor:
    """The 16-bit weight a bitsandbytes 4-bit layer computes with (the same values every call: exact)."""
    import bitsandbytes as bnb

    dtype = q.compute_dtype or torch.bfloat16
    if getattr(q.weight.quant_state, "packing_format_for_cpu", False):
        # bitsandbytes repacked this weight for its CPU kernel at the first forward pass; read the values
        # back through that kernel: x = I gives x @ W.T = W.T.
        eye = torch.eye(q.in_features, dtype=dtype, device=q.weight.device)
        return (q(eye) - (q.bias if q.bias is not None else 0)).t().contiguous().to(dtype)
    return bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).to(dtype)


COPY_LEAVES = (4 * 2**30, 0.25)  # what the 16-bit copy must leave free for the KV cache: at least 4 GiB and a quarter


def dequantize_fits(extra_bytes: int, leaves: tuple[int, float] = COPY_LEAVES) -> bool:
    """Whether the 16-bit copy (`extra_bytes`, see dequantized_bytes) leaves at least max(leaves[0] bytes, leaves[1] of the
    free GPU memory) for the KV cache. A 7B copy (12.6 GiB) is made on an 80 GB card and under a 24 GiB cap (~7 GiB
    left), where it decoded 1.78x faster than the 4-bit base (session 10: 2,007 vs 1,130 new tokens/s fine-tuned,
    peak 20.9 GiB, no out-of-memory retry); not on a 16 GB card."""
    if not torch.cuda.is_available():
        return False  # on the CPU the 4-bit path is the documented low-memory fallback; opt in with dequantize="yes"
    free = free_memory(torch.device("cuda", torch.cuda.current_device()))
    return free - extra_bytes >= max(leaves[0], leaves[1] * free)


def lora_delta(layer: torch.nn.Module, adapter: str = "default") -> torch.Tensor:
    """The update a LoRA layer adds to its base weight, (alpha / r) * B @ A, computed in float32."""
    a, b = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()
    return (b @ a) * layer.scaling[adapter]


@torch.no_grad()
def fold_lora(peft_model: torch.nn.Module, adapter: str = "default") -> torch.nn.Module:
    """The base model with each LoRA update added into its dense weight (in float32, cast once) and the wrappers removed.

    For a base whose 4-bit layers were dequantized (dequantize_4bit): PEFT's own merge expects bitsandbytes layers there.
    """
    for parent, name, layer in children_where(peft_model, is_lora_layer):
        base = layer.base_layer
        if type(base) is not torch.nn.Linear:
            raise TypeError(f"{name}: fold_lora needs a dense base layer, got {type(base).__name__} (dequantize the base first)")
        base.weight.data = (base.weight.data.float() + lora_delta(layer, adapter)).to(base.weight.dtype)
        setattr(parent, name, base)
    return peft_model.get_base_model()


class MergeSwitch:
    """Fine-tuned answers from merged weights, base answers from the exact base weights, switched in place.

    "tuned": W = cast(fp32(W_base) + (alpha / r) * B @ A), cast once, LoRA branch off (a plain dense layer: the base's speed).
    "base": W = W_base rebuilt exactly (re-dequantized from the kept 4-bit layer, or copied back from a saved copy for an
    unquantized base), LoRA branch off: the same logits as the base model. Never W - delta (not exact in 16 bits).
    PEFT's own merge is not used: with the adapter disabled it unmerges by subtraction at the next forward pass.
    """

    def __init__(self, peft_model: torch.nn.Module, originals: dict[torch.nn.Module, torch.nn.Module], adapter: str = "default"):
        self.model, self.adapter, self.state = peft_model, adapter, "unmerged"
        self.layers = [m for m in peft_model.modules() if is_lora_layer(m) and adapter in m.lora_A]
        self.originals = originals  # dense base layer -> its 4-bit layer (dequantize_4bit)
        self.saved = {layer: layer.base_layer.weight.detach().to("cpu", copy=True)
                      for layer in self.layers if layer.base_layer not in originals}

    @staticmethod
    def supported(peft_model: torch.nn.Module) -> bool:
        """Every LoRA layer wraps a plain dense layer (a dequantized or unquantized base), and none is merged by PEFT."""
        layers = [m for m in peft_model.modules() if is_lora_layer(m)]
        return bool(layers) and all(type(m.base_layer) is torch.nn.Linear and not m.merged for m in layers)

    @torch.inference_mode()  # in place on weights that may be inference tensors (made under inference_mode)
    def use(self, use_adapter: bool) -> None:
        """Put the weights in the tuned (merged) or base state; nothing to do when they already are."""
        want = "tuned" if use_adapter else "base"
        if want == self.state:
            return
        if self.state == "tuned":
            for layer in self.layers:
                layer.base_layer.weight.copy_(self.base_weight(layer))
        self.model.base_model.disable_adapter_layers()  # what PeftModel.disable_adapter() switches off
        if want == "tuned":
            for layer in self.layers:
                w = layer.base_layer.weight
                w.copy_((w.float() + lora_delta(layer, self.adapter)).to(w.dtype))
        self.state = want

    def base_weight(self, layer: torch.nn.Module) -> torch.Tensor:
        dense = layer.base_layer
        if dense in self.originals:
            return dense_weight(self.originals[dense])
        return self.saved[layer]
