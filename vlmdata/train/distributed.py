"""Data-parallel training under torchrun (DDP), and a no-op when the process is alone.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; the process group is NCCL on GPUs and gloo on
CPU (which is how the tests run two ranks on one machine). Sums are all-reduced in float64 on
the rank's device; RNG states are gathered so one checkpoint resumes every rank.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from vlmdata.errors import UserError


class Distributed:
    """torchrun's process group when this process is one of several, else a no-op."""

    def __init__(self, rank: int, world: int, local_rank: int, device: str = "cpu") -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = device  # resolved: cpu or cuda

    @classmethod
    def from_environment(cls, device: str) -> Distributed:
        """This process's place in torchrun's job (alone without torchrun) on ``device``."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        return cls(rank, world, local_rank, device)

    def __enter__(self) -> Distributed:
        if self.world > 1:
            import torch.distributed as dist

            if self.device == "cuda":
                gpus = torch.cuda.device_count()
                if self.local_rank >= gpus:
                    raise UserError(
                        f"torchrun started more processes on this machine than its {gpus} GPUs; "
                        f"pass --nproc-per-node {gpus} (or --device cpu)"
                    )
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group("nccl" if self.device == "cuda" else "gloo")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if self.device == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, wrapped: torch.nn.Module, sync: bool) -> object:
        return nullcontext() if sync or self.world == 1 else wrapped.no_sync()

    def sum(self, value: float | int) -> float | int:
        if self.world == 1:
            return value
        import torch.distributed as dist

        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device or "cpu")
        dist.all_reduce(tensor)
        return type(value)(tensor.item())

    def gather_rng(self, state: torch.Tensor) -> list[torch.Tensor]:
        if self.world == 1:
            return [state]
        import torch.distributed as dist

        states: list = [None] * self.world
        dist.all_gather_object(states, state)
        return states

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
