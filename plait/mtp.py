"""Multi-token prediction (MTP), for any plait model.

D extra depths sit on top of a model's trunk. Depth d = 1..D, at position t, predicts token
x_{t+d+1} from the previous depth's hidden state (the trunk's final hidden state for d = 1) and the
embedding of x_{t+d}:

    h_d = final_layernorm(blocks(eh_proj(cat([enorm(embed(x rolled left by d)), hnorm(h_{d-1})], -1))))

The fusion order (normed embedding first, then normed hidden state) is the released checkpoints'
convention: DeepSeek-V3 (`inference/model.py`, MTP `eh_proj`), Megatron-Core's
`MultiTokenPredictionLayer` and the MiMo-V2-Flash inference code all concatenate [embedding, hidden].

Layout: `MTPModule.layers` is one flat ModuleList of `num_physical_depths * pattern_length`
sublayers, so weights live at `mtp.layers.{i}.*`. A depth's first sublayer carries the fusion
modules (`enorm`, `hnorm`, `eh_proj`), its last carries `final_layernorm`. With
`use_repeated_layer`, one physical depth serves every depth (weights tied across depths).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def roll_tensor(t: torch.Tensor, shifts: int = -1, dim: int = -1, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Roll along `dim` and zero the slots that would wrap around.

    With `cu_seqlens` (packed documents along `dim`, offsets from 0 to its length), each document
    rolls on its own and the slots that would cross a document boundary are zeroed too."""
    if shifts == 0:
        return t.clone()
    dim = dim % t.ndim
    n = t.shape[dim]
    if cu_seqlens is not None and dim == t.ndim - 1 and t.ndim > 1 and int(cu_seqlens[-1]) == t.numel() != n:
        # packed (B, S) rows whose cu_seqlens count the flattened B * S stream
        return roll_tensor(t.reshape(-1), shifts, 0, cu_seqlens).view(t.shape)
    if cu_seqlens is None:
        bounds = [0, n]
    else:
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != n or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
            raise ValueError(f"cu_seqlens: expected increasing offsets from 0 to {n}, got {bounds}")
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        doc = t.narrow(dim, start, end - start)
        rolled = torch.roll(doc, shifts, dims=dim)
        k = min(abs(shifts), end - start)
        if k:
            wrapped = rolled.narrow(dim, end - start - k, k) if shifts < 0 else rolled.narrow(dim, 0, k)
            wrapped.zero_()
        pieces.append(rolled)
    return torch.cat(pieces, dim=dim) if len(pieces) > 1 else pieces[0]


def cu_seqlens_from_documents(documents: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) document ids of packed rows -> offsets of every document in the flattened B * S stream."""
    if documents is None:
        return None
    B, S = documents.shape
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    offsets = starts.reshape(-1).nonzero().squeeze(1)
    return torch.cat([offsets, offsets.new_tensor([B * S])])


def mtp_labels(labels: torch.Tensor, depth: int, documents: torch.Tensor | None = None,
               ignore_index: int = -100) -> torch.Tensor:
    """Depth `depth`'s labels in the unshifted (transformers) convention: (B, S) labels rolled left by
    `depth`, with `ignore_index` where the target falls off the end of its row or lies in another
    document than the position that predicts it (slot u is predicted from position u - 1)."""
    B, S = labels.shape
    rolled = torch.roll(labels, -depth, dims=1)
    lost = torch.arange(S, device=labels.device) >= S - depth
    lost = lost.unsqueeze(0).expand(B, S)
    if documents is not None:
        lost = lost | (torch.roll(documents, -depth, dims=1) != torch.roll(documents, 1, dims=1))
    return rolled.masked_fill(lost, ignore_index)


def get_mtp_loss_scaling_factor(model: nn.Module, default: float = 0.1) -> float:
    cfg = getattr(model, "mtp_config", None)
    return cfg.loss_scaling_factor if cfg is not None else default


@dataclass(frozen=True)
class MTPConfig:
    num_layers: int = 0
    layer_pattern: str = "*"  # per-depth block symbols; the model gives them meaning
    loss_scaling_factor: float = 0.1
    use_repeated_layer: bool = False

    def __post_init__(self):
        if self.num_layers < 0:
            raise ValueError(f"MTP num_layers: expected >= 0, got {self.num_layers}")
        if not self.layer_pattern:
            raise ValueError("MTP layer_pattern: expected at least one block symbol per depth, got ''")
        if self.loss_scaling_factor < 0:
            raise ValueError(f"MTP loss_scaling_factor: expected >= 0, got {self.loss_scaling_factor}")

    @property
    def pattern_length(self) -> int:
        return len(self.layer_pattern)

    @property
    def num_physical_depths(self) -> int:
        return min(self.num_layers, 1) if self.use_repeated_layer else self.num_layers

    @property
    def total_sublayers(self) -> int:
        return self.num_physical_depths * self.pattern_length

    @property
    def enabled(self) -> bool:
        return self.num_layers > 0


FUSION_MODULES = ("enorm", "hnorm", "eh_proj")

SublayerFactory = Callable[[int, int, int, str, bool, bool], nn.Module]


class MTPModule(nn.Module):
    def __init__(self, mtp_config: MTPConfig, block_types_per_sublayer: list[str] | str, sublayer_factory: SublayerFactory):
        super().__init__()
        types = list(block_types_per_sublayer)
        if len(types) != mtp_config.pattern_length:
            raise ValueError(
                f"MTP block types: {len(types)} given for a pattern of length {mtp_config.pattern_length} "
                f"({mtp_config.layer_pattern!r})"
            )
        self.mtp_config = mtp_config
        self.layers = nn.ModuleList()
        P = mtp_config.pattern_length
        for depth in range(mtp_config.num_physical_depths):
            for j in range(P):
                has_fusion, has_final_norm = j == 0, j == P - 1
                layer = sublayer_factory(depth * P + j, depth, j, types[j], has_fusion, has_final_norm)
                needed = (FUSION_MODULES if has_fusion else ()) + (("final_layernorm",) if has_final_norm else ())
                missing = [name for name in needed if getattr(layer, name, None) is None]
                if missing:
                    raise ValueError(f"MTP sublayer {depth * P + j} (depth {depth}, sublayer {j}): the factory's module "
                                     f"has no {', '.join(missing)}")
                self.layers.append(layer)

    @property
    def num_depths(self) -> int:
        return self.mtp_config.num_layers

    @property
    def pattern_length(self) -> int:
        return self.mtp_config.pattern_length

    def forward(self, input_ids: torch.Tensor | None, hidden_states: torch.Tensor,
                embed_fn: Callable[[torch.Tensor], torch.Tensor] | None, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, depth_embeds: list[torch.Tensor] | None = None,
                **block_kwargs) -> list[torch.Tensor]:
        """Per-depth hidden states (each like `hidden_states`). input_ids / position_ids roll left by one
        more slot at each depth; given position_ids reach the sublayers as `position_ids=`.
        `depth_embeds` (from `rolled_token_embeddings`, e.g. sent on by pipeline stage 0) stand in for
        `embed_fn` of the rolled ids."""
        if depth_embeds is None:
            if input_ids is None or embed_fn is None:
                raise ValueError("MTPModule: pass input_ids and embed_fn, or depth_embeds")
            depth_embeds = rolled_token_embeddings(input_ids, embed_fn, self.num_depths, cu_seqlens)
        elif len(depth_embeds) != self.num_depths:
            raise ValueError(f"MTPModule: {len(depth_embeds)} depth_embeds for {self.num_depths} depths")
        outputs = []
        h_prev, pos = hidden_states, position_ids
        for depth in range(self.num_depths):
            if pos is not None:
                pos = roll_tensor(pos, -1, -1, cu_seqlens)
                block_kwargs["position_ids"] = pos
            h_prev = self.depth_forward(depth, depth_embeds[depth], h_prev, **block_kwargs)
            outputs.append(h_prev)
        return outputs

    def depth_forward(self, depth: int, token_embeds: torch.Tensor, h_prev: torch.Tensor,
                      layer_caches: list | None = None, **block_kwargs) -> torch.Tensor:
        """One depth (0-based) on already aligned inputs: at each slot, the previous depth's state and the
        embedding of the token this depth reads there. `layer_caches` (one per sublayer) reach the
        sublayers as `kv_cache=` during incremental decoding."""
        P = self.pattern_length
        base = 0 if self.mtp_config.use_repeated_layer else depth * P
        first, last = self.layers[base], self.layers[base + P - 1]
        h = first.eh_proj(torch.cat([first.enorm(token_embeds), first.hnorm(h_prev)], dim=-1))
        for j in range(P):
            if layer_caches is not None:
                block_kwargs["kv_cache"] = layer_caches[j]
            h = self.layers[base + j](h, **block_kwargs)
        return last.final_layernorm(h)


def rolled_token_embeddings(input_ids: torch.Tensor, embed_fn: Callable[[torch.Tensor], torch.Tensor], depths: int,
                            cu_seqlens: torch.Tensor | None = None) -> list[torch.Tensor]:
    """What each MTP depth reads besides the previous depth's state: depth d (0-based) embeds the ids
    rolled left by d + 1 (wrapped and document-crossing slots get id 0, their targets are masked)."""
    out, ids = [], input_ids
    for _ in range(depths):
        ids = roll_tensor(ids, -1, -1, cu_seqlens)
        out.append(embed_fn(ids))
    return out
