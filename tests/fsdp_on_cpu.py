"""Test-only launcher: main.py under FSDP on the CPU (gloo), with the shipped configs/accelerate/fsdp_qlora.yaml.

    CUDA_VISIBLE_DEVICES= accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml tests/fsdp_on_cpu.py ARGS

runs `python main.py ARGS` in each process, wrapped by FullyShardedDataParallel (device_id cpu), so that Trainer takes
its FSDP paths: sharded optimizer checkpoints, --resume, the final save. Three things differ from a GPU run, each because
the library refuses it on a CPU, and are set here, from outside (nothing of this ships in the project's modules):

- accelerate turns ACCELERATE_USE_FSDP into FSDP only on GPU-like devices (accelerate/state.py, AcceleratorState.__init__):
  on a CPU its state stays MULTI_CPU and Trainer would train with DDP. The state is switched to FSDP after its set-up,
  with the device `cpu` (MULTI_CPU's `cpu:0` fails FSDP's check against its compute device, `cpu`).
- sync_module_states (forced by cpu_ram_efficient_loading) broadcasts rank 0's weights at wrapping, and torch refuses it
  for CPU tensors (torch/distributed/fsdp/_init_utils.py, _check_module_states_for_sync_module_states): both are off.
  Every process loads the same tiny model and draws the same LoRA initialisation (same seed), so nothing needs syncing.
- mixed precision bf16: the CPU computes in float32 here (runtime.py), so it is off.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import accelerate.state  # noqa: E402
import torch  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

import main  # noqa: E402

os.environ.update({"FSDP_SYNC_MODULE_STATES": "false", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false", "ACCELERATE_MIXED_PRECISION": "no"})


def init_with_fsdp_on_cpu(self, *args, _init=accelerate.state.AcceleratorState.__init__, **kwargs) -> None:
    _init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, plugin
        self.device = torch.device("cpu")  # not MULTI_CPU's cpu:0, which FSDP finds inconsistent with its compute device, cpu
        accelerate.state.PartialState._shared_state.update(distributed_type=DistributedType.FSDP, device=self.device)


accelerate.state.AcceleratorState.__init__ = init_with_fsdp_on_cpu

if __name__ == "__main__":
    raise SystemExit(main.main())
