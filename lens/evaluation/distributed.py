"""Process-group context (torchrun / accelerate) and device / dtype resolution."""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any

import torch

from lens.config import DTYPES  # one dtype table for training and evaluation


@dataclass
class DistContext:
    """Rank information; collectives are no-ops in a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls, device: str) -> DistContext:
        """Init the process group when torchrun / accelerate env vars are set (nccl on CUDA, gloo on CPU)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=_dt.timedelta(hours=3))
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)

    @property
    def active(self) -> bool:
        import torch.distributed as dist

        return self.world > 1 and dist.is_initialized()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def resolve_device(device: str, local_rank: int) -> str:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; bare ``cuda`` gets the local rank."""
    if device == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return f"cuda:{local_rank}" if device == "cuda" else device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[dtype]

