"""Where and how a stage computes: device, precision, processes, and the conditions metrics record.

Written once, used by every stage. (The CPU kernels and threads are pinned before torch loads:
``hemaflow/__init__.py``.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from hemaflow.errors import HemaflowError

__all__ = ["Runtime", "autocast", "conditions", "seed_folder", "select_device"]

DeviceChoice = Literal["auto", "cpu", "cuda"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def conditions() -> dict:
    """What the numbers were computed under: kernel level and threads (recorded with metrics)."""
    return {
        "cpu_kernels": "native" if os.environ.get("HEMAFLOW_CPU_KERNELS") == "native" else "avx2",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def seed_folder(out: Path, seed: int, seeds: list[int]) -> Path:
    """Where a training seed's models live: ``out`` itself for the first seed (the pipeline's), else ``out/seeds/seed<s>``."""
    return out if seed == seeds[0] else out / "seeds" / f"seed{seed}"


def select_device(choice: DeviceChoice, key: str = "device") -> torch.device:
    """``auto``: the GPU when one is visible, else the CPU; ``cuda`` without a GPU is an error naming ``key``."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise HemaflowError(f"{key}: cuda requested but no GPU is visible (set it to auto or cpu)")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Mixed precision on the GPU (bf16 or fp16); the CPU always computes in fp32 (reproducible, and fast enough)."""
    enabled = device.type == "cuda" and precision != "fp32"
    return torch.autocast(device.type, dtype=_DTYPES[precision], enabled=enabled)


@dataclass(frozen=True)
class Runtime:
    """The device and, under ``torchrun``, this process's place in the group."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    @classmethod
    def start(cls, choice: DeviceChoice, key: str = "device") -> Runtime:
        """This process's device; under torchrun also the process group (NCCL on GPU, gloo on CPU)."""
        device = select_device(choice, key)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device(f"cuda:{local_rank}")
        return cls(device, dist.get_rank(), world_size)
