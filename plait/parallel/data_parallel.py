"""Data parallelism, alone or beside pipeline stages: one process per (pipeline rank, replica) under `torchrun`,
gloo on CPU and NCCL on GPU. With `parallel.dp_shard` the data-parallel ranks shard the model instead
(FSDP2, `plait.parallel.fsdp`); the batch is split over all of them the same way.

The processes form a 2-D device mesh with dims ("pp", "dp"), pipeline outermost as in torchtitan: rank
`pp_rank * dp + dp_rank`. Each dp replica is a whole pipeline (or a whole model) and runs it on its own shard
of every batch; the pp ranks of a replica see the same shard (stage 0 reads its ids, the last stage its labels).

`train.batch_size` is the global batch: every rank draws the same global micro-batch from the shared sample
order and keeps its replica's slice (`dp_rank::dp`), so a multi-process run sees exactly the samples a
1-process run sees. Every loss is a sum over tokens divided by the target count of the whole step (all
replicas), so the step's gradient is the *sum* of the replicas' gradients: DDP sums them through a comm hook,
pipeline stages with `sum_gradients_over_replicas` after the schedule's backward. The update then equals the
single-process one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from plait.config import ParallelSettings

MESH_DIMS = ("pp", "dp")
FSDP_MESH_DIMS = ("dp_replicate", "dp_shard")


@dataclass(frozen=True)
class DistContext:
    """This process in the launch: `rank` / `world_size` over all processes, its coordinates in the
    ("pp", "dp") mesh, and the process groups along each dim (None in a single process)."""

    rank: int = 0
    world_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    pp_group: object = None  # the pipeline this rank is a stage of
    dp_group: object = None  # the replicas of this rank's stages (under FSDP: every data-parallel rank)
    fsdp_mesh: object = None  # parallel.dp_shard > 1: the ("dp_replicate", "dp_shard") mesh FSDP2 shards over

    @property
    def sharded(self) -> bool:
        return self.fsdp_mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def replicas(self) -> int:
        return self.dp_size

    def shard(self, indices: list[int]) -> list[int]:
        """This replica's rows of a global micro-batch."""
        return indices if self.dp_size == 1 else indices[self.dp_rank :: self.dp_size]

    def sum(self, value: float) -> float:
        """All-reduce a Python number over the replicas (float64, so token counts stay exact)."""
        return _all_reduce_number(value, self.dp_group) if self.dp_size > 1 else value

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        """Sum a tensor over the replicas, in place."""
        if self.dp_size > 1:
            dist.all_reduce(tensor, group=self.dp_group)

    def sum_over_stages(self, value: float) -> float:
        """Sum a Python number over the pipeline ranks of this replica (each holds its own stages' part)."""
        return _all_reduce_number(value, self.pp_group) if self.pp_size > 1 else value

    def max_over_stages(self, value: float) -> float:
        return _all_reduce_number(value, self.pp_group, dist.ReduceOp.MAX) if self.pp_size > 1 else value

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


def _all_reduce_number(value: float, group, op=dist.ReduceOp.SUM) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=op, group=group)
    return float(t.item())


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world_size(settings: ParallelSettings, world: int) -> None:
    """A launch must have exactly parallel.pp x parallel.dp (x parallel.dp_shard) processes."""
    expected = settings.data_parallel * settings.pp
    if world != expected:
        how = f"torchrun --nproc-per-node {expected} -m plait train ..." if expected > 1 else "a single process"
        product = (f"parallel.dp x parallel.dp_shard = {settings.dp} x {settings.dp_shard}" if settings.dp_shard > 1
                   else f"parallel.dp x parallel.pp = {settings.dp} x {settings.pp}")
        raise ValueError(f"{product} = {expected} processes expected, but {world} were launched; run it as {how}")


def init_distributed(settings: ParallelSettings, device: torch.device) -> DistContext:
    """Check the launch matches `parallel.*`, join the process group and build the ("pp", "dp") mesh;
    nothing is written before this."""
    world = launched_world_size()
    check_world_size(settings, world)
    if world == 1:
        return DistContext()
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if settings.dp_shard > 1:  # FSDP2 over every rank (no pipeline): HSDP when there are replicas too
        fsdp_mesh = init_device_mesh(device.type, (settings.dp, settings.dp_shard), mesh_dim_names=FSDP_MESH_DIMS)
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), dp_rank=dist.get_rank(),
                           dp_size=dist.get_world_size(), dp_group=dist.group.WORLD, fsdp_mesh=fsdp_mesh)
    mesh = init_device_mesh(device.type, (settings.pp, settings.dp), mesh_dim_names=MESH_DIMS)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       pp_rank=mesh.get_local_rank("pp"), pp_size=settings.pp, pp_group=mesh.get_group("pp"),
                       dp_rank=mesh.get_local_rank("dp"), dp_size=settings.dp, dp_group=mesh.get_group("dp"))


def _sum_hook(group, bucket):
    """DDP comm hook: sum a gradient bucket over the replicas (DDP's default averages)."""
    return dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])


def wrap_data_parallel(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    if ctx.replicas == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.cuda.current_device()] if device.type == "cuda" else None
    # No buffer broadcast: every rank applies the same all-reduced updates to its buffers (MoE
    # correction biases), and per-rank expert counts must not be overwritten by rank 0's.
    ddp = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False, process_group=ctx.dp_group)
    ddp.register_comm_hook(ctx.dp_group, _sum_hook)
    return ddp


def clip_grad_norm_over_stages(params, max_norm: float | None, ctx: DistContext) -> torch.Tensor:
    """clip_grad_norm_ over the parameters of every pipeline stage: the squared norms are summed over the
    pipeline's ranks (after `sum_gradients_over_replicas` every replica holds the same gradients, so each
    parameter counts once, as in torchtitan). Returns the total norm; no clipping when `max_norm` is falsy."""
    grads = [p.grad for p in params if p.grad is not None]
    sq = float(sum(g.float().pow(2).sum() for g in grads)) if grads else 0.0
    total = torch.tensor(ctx.sum_over_stages(sq)).sqrt()
    if max_norm:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return total


# gradients go over the wire in buckets of this many elements (one flat buffer per bucket)
_BUCKET_ELEMENTS = 1 << 24


@torch.no_grad()
def sum_gradients_over_replicas(params: list[torch.nn.Parameter], ctx: DistContext) -> None:
    """After a pipeline's backward: each parameter's gradient summed over the replicas of its stage, in place.

    A parameter that got no gradient on any replica keeps none (AdamW then skips it, as the single process
    does); one that got a gradient on some replicas only counts zeros for the others."""
    if ctx.replicas == 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    ctx.all_reduce_(has_grad)
    live = [p for p, n in zip(params, has_grad.tolist()) if n]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(live):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        ctx.all_reduce_(flat)
        for p, g in zip(bucket, flat.split([p.numel() for p in bucket])):
            p.grad.copy_(g.view_as(p.grad))


def _buckets(params: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """Consecutive runs of parameters of one dtype and device, each up to `_BUCKET_ELEMENTS` (a larger single
    parameter gets a bucket of its own). Every replica of a stage holds the same parameters in the same order,
    so the buckets line up across ranks."""
    out: list[list[torch.nn.Parameter]] = []
    kind, size = None, 0
    for p in params:
        if not out or (p.grad.dtype, p.grad.device) != kind or size + p.numel() > _BUCKET_ELEMENTS:
            out.append([])
            kind, size = (p.grad.dtype, p.grad.device), 0
        out[-1].append(p)
        size += p.numel()
    return out
