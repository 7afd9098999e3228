"""FSDP2 (`parallel.dp_shard`): every data-parallel rank holds a shard of each parameter, its gradient and
its AdamW state, and gathers a block's full parameters only while that block runs.

    apply_fsdp(model, mesh)     shard each block, then the rest at the root, as torchtitan does
    fsdp_param_dtype(...)       the dtype the groups gather parameters in (bfloat16 under bf16 autocast)

A block is each child of a `layers` / `blocks` container (decoder layers, MTP depths, vision-tower layers: the
`ModuleDict` layout every plait model has, and the `ModuleList`s of stock transformers models). A group's
parameters are gathered when its module is *called*, so the modules an MTP sublayer carries but the MTP module
calls itself (the fusion norms and projection, the depth's final norm) are groups of their own. The root group
holds what is left (embeddings, final norm, LM head, projector), so tied embeddings stay in one group. The root
keeps its parameters gathered after the forward (FSDP2's default for the root), so logits made when first read
find the LM head whole.

Gradients are *summed* over the ranks (FSDP divides by their number by default): every loss is already a sum
over tokens divided by the target count of the whole step, as for DDP, so the update equals the single-process
one. Training state goes through torch.distributed.checkpoint, sharded, each rank writing its own part (it loads
into any layout, a single process included); the HF export gathers the full state on rank 0
(`full_state_dict`).
"""

from __future__ import annotations

import torch
from torch import nn

from plait.mtp import FUSION_MODULES

BLOCK_CONTAINERS = ("layers", "blocks")
# modules an MTP sublayer holds that `MTPModule.depth_forward` calls directly, outside the sublayer's forward
CALLED_BY_THE_PARENT = (*FUSION_MODULES, "final_layernorm")


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks, deepest first (FSDP groups are made bottom-up)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleDict, nn.ModuleList)) and name.rsplit(".", 1)[-1] in BLOCK_CONTAINERS:
            found += [(name.count(".") + 1, child) for child in module.children()]
    return [child for _, child in sorted(found, key=lambda pair: -pair[0])]


def fsdp_param_dtype(setting: str, autocast: torch.dtype | None) -> torch.dtype:
    """The dtype FSDP2 gathers parameters in (`parallel.fsdp_param_dtype`) for a step under `autocast`.

    bfloat16 only under bf16 autocast: autocast casts every matmul's float32 weight to bfloat16 anyway, so
    gathering them in bfloat16 changes the rounding of the non-matmul parameters (norm scales, biases, the
    router, which upcasts its weight) and makes the text residual stream bfloat16 (it starts from the embedding),
    while without autocast every op, norms and losses included, would run in bfloat16."""
    if setting == "bfloat16" and autocast != torch.bfloat16:
        raise ValueError("parallel.fsdp_param_dtype='bfloat16': bfloat16 parameters need the step under bf16 autocast "
                         f"(train.autocast=bf16, or auto on a GPU), but it runs in "
                         f"{'float32' if autocast is None else str(autocast).removeprefix('torch.')}")
    if setting == "auto":
        return torch.bfloat16 if autocast == torch.bfloat16 else torch.float32
    return getattr(torch, setting)


def apply_fsdp(model: nn.Module, mesh, param_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Shard `model` in place over `mesh` (1-D: FSDP; 2-D ("dp_replicate", "dp_shard"): HSDP), gathering
    parameters in `param_dtype` (the shards, gradients and AdamW state stay float32)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if mesh.ndim == 2 and mesh.size(0) == 1:
        mesh = mesh["dp_shard"]  # no replicas: plain FSDP over the shard dim
    # Gradients are reduced in float32 whatever the gathered dtype (a bfloat16 sum over ranks loses the small
    # ones). Inputs are not cast: the residual stream and RoPE tables stay in the dtype autocast gives them.
    policy = MixedPrecisionPolicy(param_dtype=None if param_dtype == torch.float32 else param_dtype,
                                  reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in blocks(model):
        for name in CALLED_BY_THE_PARENT:
            if isinstance(getattr(block, name, None), nn.Module):
                fully_shard(getattr(block, name), mesh=mesh, mp_policy=policy)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum over ranks (see the module docstring)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no pre-scaled sum)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The sharded model's whole state on rank 0, on the CPU (a collective: every rank calls it; the other ranks
    get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def to_number(value) -> float:
    """A reduced value (the gradient norm of DTensor gradients is a replicated DTensor) as a Python float."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)
