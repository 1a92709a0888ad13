"""main.py under a per-process GPU memory cap, for showing what fits where (bench/multi_gpu.sh).

    GPU_MEM_CAP_GIB=9 accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml bench/capped_main.py [main.py flags]

Each process limits PyTorch's allocator on its own GPU (LOCAL_RANK) to GPU_MEM_CAP_GIB with
torch.cuda.set_per_process_memory_fraction before main.py loads anything; going over the cap
raises CUDA out-of-memory exactly as a smaller card would.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    device = int(os.environ.get("LOCAL_RANK", "0"))
    cap = float(os.environ["GPU_MEM_CAP_GIB"]) * 2**30
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(device).total_memory, device)
    print(f"[capped] process {device}: GPU memory capped at {cap / 2**30:.2f} GiB", flush=True)
    import main

    sys.exit(main.main(sys.argv[1:]))
