"""A small checkpoint folder holding every file a real one has, written the way accelerate writes them.

For tests of checkpoint handling that need no model: ``kontext.training.checkpoint.verify_checkpoint`` reads these
files exactly as it reads a trained run's.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def write_checkpoint_files(folder: Path, num_processes: int = 1) -> Path:
    """Write a LoRA safetensors file, ``optimizer.bin``, ``scheduler.bin`` and ``random_states_<i>.pkl`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    layer = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    layer(torch.ones(1, 4)).sum().backward()
    opt.step()
    sched.step()
    torch.save(opt.state_dict(), folder / "optimizer.bin")
    torch.save(sched.state_dict(), folder / "scheduler.bin")
    for i in range(num_processes):
        rng = {
            "step": 0,
            "random_state": random.getstate(),
            "numpy_random_seed": np.random.get_state(),
            "torch_manual_seed": torch.get_rng_state(),
        }
        torch.save(rng, folder / f"random_states_{i}.pkl")
    lora = {"transformer.x.lora_A.weight": torch.randn(2, 4), "transformer.x.lora_B.weight": torch.zeros(4, 2)}
    save_file(lora, str(folder / "pytorch_lora_weights.safetensors"))
    return folder
