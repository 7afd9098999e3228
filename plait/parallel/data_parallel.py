"""Data parallelism: one process per replica under `torchrun`, gloo on CPU and NCCL on GPU.

`train.batch_size` is the global batch: every rank draws the same global micro-batch from the shared
sample order and keeps its own slice (`rank::world_size`), so a 2-process run sees exactly the samples a
1-process run sees. The loss is a sum over tokens divided by the global target count, times the world
size, because DDP averages gradients over ranks: the update equals the single-process one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from plait.config import ParallelSettings


@dataclass(frozen=True)
class DistContext:
    """This process in the launch: `rank` / `world_size` over all processes; `dp_size` of them are
    data-parallel replicas (the rest of the world is pipeline stages, which all see the same data)."""

    rank: int = 0
    world_size: int = 1
    dp_size: int | None = None  # None: every process is a replica

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def replicas(self) -> int:
        return self.world_size if self.dp_size is None else self.dp_size

    def shard(self, indices: list[int]) -> list[int]:
        if self.replicas == 1:
            return indices
        return indices[self.rank :: self.world_size]

    def sum(self, value: float) -> float:
        """All-reduce a Python number over the replicas (float64, so token counts stay exact)."""
        return _all_reduce_number(value) if self.replicas > 1 else value

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        """Sum a tensor over the replicas, in place."""
        if self.replicas > 1:
            dist.all_reduce(tensor)

    def sum_over_world(self, value: float) -> float:
        """Sum a Python number over every process (pipeline stages included)."""
        return _all_reduce_number(value) if self.enabled else value

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's Python object, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _all_reduce_number(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_data_parallel(settings: ParallelSettings, device: torch.device) -> DistContext:
    """Check the launch matches `parallel.*` and join the process group; nothing is written before this."""
    expected = settings.dp * settings.pp
    world = launched_world_size()
    if world != expected:
        how = f"torchrun --nproc-per-node {expected} -m plait train ..." if expected > 1 else "a single process"
        raise ValueError(
            f"parallel.dp x parallel.pp = {settings.dp} x {settings.pp} = {expected} processes expected, "
            f"but {world} were launched; run it as {how}"
        )
    if world == 1:
        return DistContext()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), dp_size=settings.dp)


def wrap_data_parallel(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    if ctx.replicas == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.cuda.current_device()] if device.type == "cuda" else None
    # No buffer broadcast: every rank applies the same all-reduced updates to its buffers (MoE
    # correction biases), and per-rank expert counts must not be overwritten by rank 0's.
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
