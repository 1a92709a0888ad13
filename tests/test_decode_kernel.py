"""decode_kernel: the triton engines' decode attention (one query per row, each row's own stretch of the flat cache).

On the CPU the kernel itself runs under Triton's interpreter, which must be switched on before triton is first imported:
the checks below run in a fresh process (this file run as a script with TRITON_INTERPRET=1). The gpu test compiles it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import decode_kernel  # noqa: E402
import generation  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Why is the sky blue? Explain briefly."]


def by_hand(q, k, v, first, used, length, scale):
    """Row r, head h: softmax(q k^T * scale) v over that row's positions first[r] .. first[r] + used[r] (fp32)."""
    rows, heads, dim = q.shape
    group = heads // k.shape[1]
    out = torch.empty(rows, heads, dim)
    for r in range(rows):
        span = slice(r * length + first[r], r * length + first[r] + used[r])
        for h in range(heads):
            kk, vv = k[span, h // group].float(), v[span, h // group].float()
            out[r, h] = torch.softmax(q[r, h].float() @ kk.T * scale, -1) @ vv
    return out


def case(device="cpu", dtype=torch.float32, rows=4, heads=4, kv_heads=2, dim=16, length=80, seed=0):
    """A flat (rows x length) cache, rows that start at different positions and use 1, 33 (past two 16-blocks), all 80."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, dim, generator=g).to(device, dtype)
    k, v = (torch.randn(rows * length, kv_heads, dim, generator=g).to(device, dtype) for _ in range(2))
    first, used = [0, 5, 79, 40][:rows], [80, 33, 1, 17][:rows]
    starts = torch.tensor([r * length + f for r, f in enumerate(first)] + [rows * length], dtype=torch.int32, device=device)
    return q, k, v, starts, torch.tensor(used, dtype=torch.int32, device=device), first, used, length


def interpreted_checks() -> None:
    """Run under TRITON_INTERPRET=1 (a fresh process): the kernel against attention by hand, and engine="triton" against
    engine="static" on the tiny random Llama with the kernel doing every decode step's attention."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    q, k, v, starts, lengths, first, used, length = case()
    # 16: a row of 33 positions spans 3 blocks, the last one masked; fp32 here (the interpreter multiplies exactly)
    for config in ((16, 4, 2), decode_kernel.CONFIG):
        out = decode_kernel.decode_attention(q, k, v, starts, lengths, 0.3, config=config)
        torch.testing.assert_close(out, by_hand(q, k, v, first, used, length, 0.3), rtol=1e-5, atol=1e-5)
    print("kernel ok", flush=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny_llama import ensure_tiny_llama

    path = ensure_tiny_llama()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.unk_token  # left padding only (attention-masked): any id but EOS serves
    launches = []
    launch = decode_kernel._launch
    decode_kernel._launch = lambda *a, **kw: launches.append(a[0].shape) or launch(*a, **kw)
    for kwargs in ({"max_new_tokens": 12},):
        static = generation.generate(model, tokenizer, QUESTIONS, batch_size=3, engine="static", **kwargs)
        assert not launches
        assert generation.generate(model, tokenizer, QUESTIONS, batch_size=3, engine="triton", **kwargs) == static, kwargs
        # every decode step after the first (which the prompt's forward gives), in each of the 2 layers, 3 rows
        assert len(launches) == 2 * 11 and set(launches) == {(3, 4, 16)}, launches  # 2 layers x 11 steps, q (3, 4, 16)
        launches.clear()
    print("engine ok", flush=True)


def test_kernel_and_engine_under_the_triton_interpreter():
    """The kernel equals attention by hand (GQA, rows of 1, 17, 33 and 80 positions, two block sizes); engine="triton"
    gives engine="static"'s answers on the tiny model with the kernel run at every decode step (see interpreted_checks)."""
    env = os.environ | {"TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kernel ok" in proc.stdout and "engine ok" in proc.stdout


def test_kernel_refuses_what_it_would_read_wrongly():
    q, k, v, starts, lengths, *_ = case()
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        decode_kernel.check(q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), starts, lengths)
    with pytest.raises(ValueError, match="int32"):
        decode_kernel.check(q, k, v, starts.long(), lengths)
    with pytest.raises(ValueError, match="power of two"):
        decode_kernel.check(q[..., :12], k[..., :12], v[..., :12], starts, lengths)
    with pytest.raises(ValueError, match="contiguous"):
        decode_kernel.check(q, k.transpose(0, 2).contiguous().transpose(0, 2), v, starts, lengths)


@pytest.mark.gpu
def test_kernel_compiled_on_cuda_matches_the_masked_attention():
    """On CUDA in bf16, at Llama-2-7B's head size: the kernel at several launch configs against attention by hand, and
    the op inside torch.compile (fullgraph, dynamic) and a CUDA graph."""
    q, k, v, starts, lengths, first, used, length = case("cuda", torch.bfloat16, dim=128)
    expected = by_hand(q.cpu(), k.cpu(), v.cpu(), first, used, length, 128 ** -0.5)
    for config in ((16, 1, 1), (32, 4, 2), (64, 4, 3), (64, 8, 3), (128, 8, 2)):
        out = decode_kernel.decode_attention(q, k, v, starts, lengths, config=config)
        torch.testing.assert_close(out.float().cpu(), expected, rtol=2e-2, atol=2e-2)
    compiled = torch.compile(decode_kernel.decode_attention, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(q, k, v, starts, lengths).float().cpu(), expected, rtol=2e-2, atol=2e-2)
    graph = torch.cuda.CUDAGraph()
    out = decode_kernel.decode_attention(q, k, v, starts, lengths)
    with torch.cuda.graph(graph):
        out = decode_kernel.decode_attention(q, k, v, starts, lengths)
    out.zero_()
    graph.replay()
    torch.testing.assert_close(out.float().cpu(), expected, rtol=2e-2, atol=2e-2)


if __name__ == "__main__":
    interpreted_checks()


def test_a_card_with_less_shared_memory_gets_fewer_stages_then_smaller_blocks(monkeypatch):
    """Triton's OutOfResources (shared memory) at CONFIG: fewer pipeline stages, then half the block, the first that fits
    kept for later calls; none fitting is an error that says so."""
    from triton.runtime.errors import OutOfResources

    tried = []

    class Launcher:
        def __getitem__(self, grid):
            def launch(*args, BLOCK_N, num_stages, **kwargs):
                tried.append((BLOCK_N, num_stages))
                if BLOCK_N * num_stages > fits:
                    raise OutOfResources(BLOCK_N * num_stages * 512, fits * 512, "shared memory")
            return launch

    monkeypatch.setattr(decode_kernel, "_kernel", lambda: Launcher())
    monkeypatch.setattr(decode_kernel, "_FITTED", {})
    q, k, v, starts, lengths, *_ = case()
    fits = 128  # 64 keys x 2 stages
    decode_kernel._launch(q, k, v, starts, lengths, 0.3, (64, 4, 3))
    decode_kernel._launch(q, k, v, starts, lengths, 0.3, (64, 4, 3))
    assert tried == [(64, 3), (64, 2), (64, 2)]  # the second call goes straight to what fit
    assert decode_kernel.smaller_configs((64, 4, 3)) == [(64, 4, 3), (64, 4, 2), (64, 4, 1), (32, 4, 1)]
    fits = 8
    with pytest.raises(RuntimeError, match="no launch config"):
        decode_kernel._launch(q, k, v, starts, lengths, 0.3, (32, 4, 2))
