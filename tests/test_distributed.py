"""Several processes on the CPU: DDP over gloo, launched as a user would (`accelerate launch --config_file
configs/accelerate/ddp.yaml`), against one process with the same global batch; eval.py split across processes.

Why the two training runs must agree. The smoke preset packs its 72 training records into 17 rows and trains
8 optimizer steps. In DDP (2 processes x 1 row x 1 accumulation step) accelerate's seeded sampler draws one
permutation of the rows and hands the rows of each consecutive pair to rank 0 and rank 1; one process with
--gradient-accumulation-steps 2 draws the same permutation (same data seed) and takes the same pair as its two
micro-batches. Trainer normalizes each micro-batch loss by the supervised-token count of the whole step
(gathered across processes), and DDP averages the all-reduced gradients, (2*g0 + 2*g1) / 2 = g0 + g1: in binary
floating point this equals the one-process accumulation exactly. With OMP_NUM_THREADS=1 (deterministic
bitsandbytes CPU kernels) the expected difference is therefore 0. The tolerance, 1e-4 on losses of ~6.9, only
leaves room for a reordered reduction in a future library; it is below the smallest change between two
consecutive smoke losses (2e-4), so another data order, another learning-rate schedule or a gradient scaled by
the number of processes (the logged grad norm is compared too, since AdamW hides a constant gradient scale
from the losses) would fail it.

4-bit on the CPU: bitsandbytes' CPU backend runs under DDP/gloo (DDP broadcasts the frozen uint8 4-bit
weights once, at wrapping), so these tests use the real --quantization 4bit path.

FSDP on the CPU: the shipped configs/accelerate/fsdp_qlora.yaml through tests/fsdp_on_cpu.py, which says what it changes
for a CPU and why (accelerate makes FSDP on GPUs only; torch refuses sync_module_states for CPU tensors). Unquantized:
the CPU computes in float32, and a 4-bit base stored in bf16 beside float32 norms is refused by FSDP ("Must flatten
tensors with uniform dtype but got torch.bfloat16 and torch.float32"), which is why main.py refuses --fp32-upcast there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, inherited_env

ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # one thread: bitwise-reproducible 4-bit CPU kernels; no GPU
DDP_CONFIG = os.path.join(ROOT, "configs", "accelerate", "ddp.yaml")
FSDP_CONFIG = os.path.join(ROOT, "configs", "accelerate", "fsdp_qlora.yaml")
FSDP_ARGS = ("--preset", "smoke", "--quantization", "none", "--max-steps", "6", "--save-steps", "3", "--eval-steps", "6")
TOLERANCE = 1e-4  # see the module docstring
ADAPTER_MESSAGE = "[main] adapter, tokenizer"


def launch(script: str, *args: str, processes: int = 2, config: str = DDP_CONFIG) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes N script args` (torchrun underneath)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", str(processes),
               "--main_process_port", str(free_port()), os.path.join(ROOT, script), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**inherited_env(), **ENV}, timeout=600)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**inherited_env(), **ENV}, timeout=600)


def history(output_dir: str, step: int = 8) -> list[dict]:
    with open(os.path.join(output_dir, "checkpoints", f"checkpoint-{step}", "trainer_state.json")) as fh:
        return [h for h in json.load(fh)["log_history"] if "loss" in h]


def event_files(output_dir: str) -> int:
    return sum(len(files) for _, _, files in os.walk(os.path.join(output_dir, "tensorboard")))


def adapter_weights(output_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(output_dir, "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(DDP run dir, its process, one-process run dir). Evaluation only at the end (see test_cli's resume test)."""
    base = tmp_path_factory.mktemp("distributed")
    ddp, single = str(base / "ddp"), str(base / "single")
    proc = launch("main.py", "--preset", "smoke", "--output-dir", ddp, "--eval-steps", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = run("main.py", "--preset", "smoke", "--output-dir", single, "--eval-steps", "8", "--gradient-accumulation-steps", "2")
    assert one.returncode == 0, one.stderr[-3000:]
    return ddp, proc, single


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    ddp, proc, single = runs
    assert (
        "global batch per optimizer step: 2 process(es) x 1 packed row of <= 1024 tokens x 1 accumulation step(s) = 2 packed rows"
        in proc.stdout
    )
    two, one = history(ddp), history(single)
    assert len(two) == len(one) == 8
    for key in ("loss", "grad_norm"):
        assert [h[key] for h in two] == pytest.approx([h[key] for h in one], abs=TOLERANCE), key
    assert [h["learning_rate"] for h in two] == pytest.approx([h["learning_rate"] for h in one], rel=1e-9)
    assert [h["num_input_tokens_seen"] for h in two] == [h["num_input_tokens_seen"] for h in one]  # the same rows, counted globally
    with open(os.path.join(ddp, "metrics.json")) as a, open(os.path.join(single, "metrics.json")) as b:
        two_metrics, one_metrics = json.load(a), json.load(b)
    assert two_metrics["train_loss"] == pytest.approx(one_metrics["train_loss"], abs=TOLERANCE)
    # Held-out loss over the same 2 packed rows: token-weighted on both sides (NLL sums and token counts added across
    # processes), so one number up to the float noise of the training itself.
    assert two_metrics["eval_loss"] == pytest.approx(one_metrics["eval_loss"], abs=TOLERANCE)
    a, b = adapter_weights(ddp), adapter_weights(single)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_only_the_main_process_writes_outputs_and_reports(runs):
    ddp, proc, single = runs
    assert proc.stdout.count(ADAPTER_MESSAGE) == 1 and proc.stdout.count("[main] train_runtime") == 1  # not again from rank 1
    assert sorted(os.listdir(ddp)) == sorted(os.listdir(single))  # no .saving, no second set
    with open(os.path.join(ddp, "metrics.json")) as fh:
        json.load(fh)  # complete JSON, not two writers' interleaving
    with open(os.path.join(ddp, "train_config.yaml")) as fh:
        assert "base_model: tiny-random-llama" in fh.read()
    assert event_files(ddp) == event_files(single)  # TensorBoard logs from rank 0 only
    for step in (4, 8):
        files = os.listdir(os.path.join(ddp, "checkpoints", f"checkpoint-{step}"))
        assert {"COMPLETE", "adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= set(files), files


def test_resume_with_the_same_number_of_processes_equals_the_uninterrupted_run(runs, tmp_path):
    ddp, _, _ = runs
    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(ddp, "checkpoints", "checkpoint-4"), os.path.join(resumed, "checkpoints", "checkpoint-4"))
    proc = launch("main.py", "--preset", "smoke", "--output-dir", resumed, "--eval-steps", "8", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "[main] warning" not in proc.stdout
    assert [h["loss"] for h in history(resumed)] == [h["loss"] for h in history(ddp)]  # bitwise


@pytest.mark.parametrize("rank, resume", [(0, False), (1, True)])
def test_sigterm_to_one_process_stops_every_process_at_one_step_with_one_complete_checkpoint(rank, resume, runs, tmp_path):
    """SIGTERM to ONE worker (not the launcher): both processes agree at the next step, save it, exit 143; --resume is exact.

    Either rank may be the one signalled (rank 0 writes the checkpoint, rank 1 only its RNG state). The resume is
    checked once (rank 1's case): it is another launch, and the checkpoint is the same kind either way.

    The launcher (torchelastic under accelerate launch) itself exits 1 whenever a worker exits non-zero: it reports
    each worker's code (`exitcode  : 143`) in its summary; tests/hooked_main.py writes them to files for this test.
    """
    ddp, _, _ = runs
    out, pids, log = str(tmp_path / "run"), str(tmp_path / "pids"), str(tmp_path / "log.txt")
    proc = start_hooked_launch(out, pids, log)
    try:
        wait_until(os.path.join(out, "checkpoints", "checkpoint-4", "COMPLETE"), proc, log)
        with open(os.path.join(pids, f"rank{rank}.pid")) as fh:
            os.kill(int(fh.read()), signal.SIGTERM)  # one process only; steps 5-8 take >= 4 x 0.5 s, so it lands mid-training
        proc.wait(timeout=240)  # a hang fails here instead of blocking CI
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher's own session, started by this test
    with open(log) as fh:
        text = fh.read()
    assert proc.returncode == 1, text[-3000:]  # torchelastic's ChildFailedError; the workers' own codes follow
    codes = []
    for r in (0, 1):
        exit_file = os.path.join(pids, f"rank{r}.exit")
        assert os.path.exists(exit_file), f"rank {r} exited without main's exit code:\n{text[-6000:]}"
        with open(exit_file) as fh:
            codes.append(fh.read())
    assert codes == ["143", "143"], text[-3000:]
    assert "exitcode  : -" not in text, text[-3000:]  # no worker was killed by a signal (the agent's SIGTERM is ignored)
    stopped = [c for c in os.listdir(os.path.join(out, "checkpoints")) if c != "checkpoint-4"]
    assert len(stopped) == 1 and 4 < int(stopped[0].rsplit("-", 1)[1]) < 8, stopped  # one checkpoint, at the agreed step
    files = set(os.listdir(os.path.join(out, "checkpoints", stopped[0])))
    assert {"COMPLETE", "adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= files, files
    assert text.count("[main] stopped by SIGTERM: checkpoint saved: ") == 2, text[-3000:]  # both processes, same message
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    if not resume:
        return
    resumed = launch("main.py", "--preset", "smoke", "--output-dir", out, "--eval-steps", "8", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {os.path.join(out, 'checkpoints', stopped[0])}" in resumed.stdout
    assert [h["loss"] for h in history(out)] == [h["loss"] for h in history(ddp)]  # bitwise, as the DDP resume test


def start_hooked_launch(out: str, pids: str, log: str) -> subprocess.Popen:
    """The DDP smoke run of `runs`, through tests/hooked_main.py: 0.5 s after every step, per-rank pid and exit-code files."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", DDP_CONFIG, "--num_processes", "2",
               "--main_process_port", str(free_port()), os.path.join(ROOT, "tests", "hooked_main.py"),
               "--preset", "smoke", "--output-dir", out, "--eval-steps", "8"]
    env = {**os.environ, **ENV, "LLAMA_DOLLY_TEST_STEP_SLEEP": "0.5", "LLAMA_DOLLY_TEST_PID_DIR": pids}
    with open(log, "w") as fh:
        return subprocess.Popen(command, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_until(path: str, proc: subprocess.Popen, log: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            with open(log) as fh:
                pytest.fail(f"{path} never appeared (exit code {proc.poll()}):\n{fh.read()[-3000:]}")
        time.sleep(0.02)


def test_eval_split_across_two_processes_gives_the_one_process_report(runs, tmp_path):
    ddp, _, _ = runs
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    proc = run("eval.py", "--preset", "smoke", "--adapter", ddp, "--split", "validation", "--out", one)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = launch("eval.py", "--preset", "smoke", "--adapter", ddp, "--split", "validation", "--out", two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "split across 2 processes" in proc.stdout and proc.stdout.count("[eval] wrote") == 1
    with open(os.path.join(one, "report.json")) as a, open(os.path.join(two, "report.json")) as b:
        single, split = json.load(a), json.load(b)
    assert [i["id"] for i in split["items"]] == [i["id"] for i in single["items"]] and len(split["items"]) == 8
    # Each process gets 4 of the 8 records, i.e. exactly the one-process run's batches of --batch-size 4: same answers.
    assert split["items"] == single["items"] and split["aggregates"] == single["aggregates"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """6 optimizer steps under FSDP on 2 CPU processes (tests/fsdp_on_cpu.py), a checkpoint at step 3. (run dir, its process)."""
    out = str(tmp_path_factory.mktemp("fsdp") / "full")
    proc = launch(os.path.join("tests", "fsdp_on_cpu.py"), *FSDP_ARGS, "--output-dir", out, config=FSDP_CONFIG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_fsdp_checkpoints_and_the_final_adapter_hold_every_lora_weight(fsdp_run):
    """The final adapter (and each checkpoint's) in PEFT's format, with every LoRA weight, whole: what one process writes."""
    import torch
    from peft import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from config import TrainConfig, parse_config
    from loading import add_lora
    from model import Llama
    from tiny_llama import ensure_tiny_llama

    out, proc = fsdp_run
    assert proc.stdout.count(ADAPTER_MESSAGE) == 1
    cfg, _ = parse_config(TrainConfig, list(FSDP_ARGS), "")
    one_process = get_peft_model_state_dict(add_lora(AutoModelForCausalLM.from_pretrained(ensure_tiny_llama()), cfg))
    shapes = {k: v.shape for k, v in one_process.items()}
    assert len(shapes) == 28  # 2 layers x 7 targets x (lora_A, lora_B)
    for folder in (out, os.path.join(out, "checkpoints", "checkpoint-3")):
        assert {k: v.shape for k, v in adapter_weights(folder).items()} == shapes, folder
    weights = adapter_weights(out)
    assert all(weights[k].any() for k in weights if ".lora_B." in k)  # trained: lora_B starts at zero
    llama = Llama.load_pretrained_model(out)  # checks the adapter fits its base, then PeftModel.from_pretrained
    params = dict(llama.model.named_parameters())
    assert all(torch.equal(params[k.replace(".weight", ".default.weight")], v) for k, v in weights.items())


def test_fsdp_resume_equals_the_uninterrupted_run(fsdp_run, tmp_path):
    """The LoRA weights, the optimizer's moments, the data position and the RNG all come back: the same floats."""
    import torch

    out, _ = fsdp_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(out, "checkpoints", "checkpoint-3"), os.path.join(resumed, "checkpoints", "checkpoint-3"))
    proc = launch(os.path.join("tests", "fsdp_on_cpu.py"), *FSDP_ARGS, "--output-dir", resumed, "--resume", config=FSDP_CONFIG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout
    for key in ("loss", "grad_norm"):  # bitwise: a lost LoRA or AdamW state shows from step 4 or 5 on
        assert [h[key] for h in history(resumed, 6)] == [h[key] for h in history(out, 6)], key
    a, b = adapter_weights(out), adapter_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_resume_from_a_checkpoint_without_lora_weights_stops_in_one_line(fsdp_run, tmp_path):
    """A checkpoint of an FSDP run from before the fix holds no LoRA weights: say so, rather than train on from the initial ones."""
    out, _ = fsdp_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(out, "checkpoints", "checkpoint-3"), os.path.join(resumed, "checkpoints", "checkpoint-3"))
    os.remove(os.path.join(resumed, "checkpoints", "checkpoint-3", "adapter_model.safetensors"))
    proc = launch(os.path.join("tests", "fsdp_on_cpu.py"), *FSDP_ARGS, "--output-dir", resumed, "--resume", config=FSDP_CONFIG)
    assert proc.returncode != 0
    assert "checkpoint-3 has no adapter_model.safetensors" in proc.stderr and "start again with --overwrite" in proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_accelerate_configs_and_the_70b_preset_parse():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from config import load_train_config

    folder = os.path.join(ROOT, "configs", "accelerate")
    configs = {name: load_config_from_file(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}
    assert sorted(configs) == ["ddp.yaml", "fsdp_qlora.yaml", "multi_node.yaml", "single_gpu.yaml"]
    assert configs["single_gpu.yaml"].distributed_type == DistributedType.NO and configs["single_gpu.yaml"].num_processes == 1
    assert configs["ddp.yaml"].distributed_type == DistributedType.MULTI_GPU
    node = configs["multi_node.yaml"]
    assert node.num_machines == 2 and node.main_process_ip and node.main_process_port and node.machine_rank == 0
    fsdp = configs["fsdp_qlora.yaml"]
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.mixed_precision == "bf16"
    assert {
        "fsdp_sharding_strategy": "FULL_SHARD", "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_sync_module_states": True, "fsdp_use_orig_params": False, "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_activation_checkpointing": False,
    }.items() <= fsdp.fsdp_config.items()
    preset = load_train_config(os.path.join(ROOT, "configs", "llama2-70b-fsdp.yaml"))
    assert preset.base_model == "meta-llama/Llama-2-70b-hf" and preset.quant_storage == "bfloat16" and preset.quantization == "4bit"
    assert preset.gradient_checkpointing and preset.packing and preset.pack_tokens == 2048 and not preset.fp32_upcast


def test_quant_storage_reaches_bitsandbytes():
    import torch

    from runtime import Runtime, quantization_config

    rt = Runtime("cpu", torch.float32)
    assert quantization_config("4bit", rt).bnb_4bit_quant_storage == torch.uint8
    assert quantization_config("4bit", rt, "bfloat16").bnb_4bit_quant_storage == torch.bfloat16
