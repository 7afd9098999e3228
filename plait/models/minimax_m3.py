"""MiniMax-M3 (text backbone) and MiniMax-M3-VL (with the vision side), plait's native implementation.

Reads the Hugging Face config (`model_type: minimax_m3_vl`, text config `minimax_m3_vl_text`) and
checkpoints with their on-disk key names.

    embed_tokens (+ image / video features spliced at their placeholder tokens)
      -> layers[i]: (1 + w) RMSNorm -> attention (per-head (1 + w) QK norm, partial RoPE; on
                    "minimax_m3_sparse" layers only the key blocks the lightning indexer picks)
                 -> (1 + w) RMSNorm -> dense swigluoai MLP, or MoE (sigmoid router with correction bias,
                    normalised top-k, routed_scaling_factor on the routed sum, one shared expert)
      -> norm -> lm_head

The lightning indexer scores every key for each query with a few small heads, max-pools the scores over
blocks of `index_block_size` keys, and keeps the `index_topk_blocks` best blocks plus the
`index_local_blocks` blocks ending at the query's own. It is a selection only: discrete top-k, no
gradient reaches it (as in the reference).

The forward is pipeline-ready: `embed_tokens`, `norm` and `lm_head` may be None on a stage, and `layers`
is a ModuleDict keyed by the original layer index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from plait.checkpoint import check_model_dir
from plait.models.hf import load_hf_config
from plait.models.minimax_m3_vision import MultiModalProjector, VisionTower, to_grid_list
from plait.models.native import (
    CausalLMOutput,
    PipelineStageHooks,
    TrunkOutput,
    check_forward_kwargs,
    check_hidden_states,
    check_labels,
    check_layer_lists,
    check_positive_sizes,
    embed_token_ids,
    init_reference_weights,
    lm_output,
    load_checkpoint_into,
    mtp_decode_step,
    mtp_layers_in_checkpoint,
    positions_and_mask,
    refuse_attention_dropout,
    save_checkpoint,
    text_config_of,
)
from plait.nn.attention import Attention, AttentionMask, KeyBlocks, KVCache, document_ranks
from plait.mtp import MTPConfig, MTPModule, cu_seqlens_from_documents
from plait.nn.mlp import MLP, Activation
from plait.nn.moe import MoE, MoEConfig, pooled_load_balancing_loss, router_logits_kept
from plait.nn.norm import RMSNorm
from plait.nn.rope import apply_rotary, rotary_from_parameters

VL_MODEL_TYPE, TEXT_MODEL_TYPE = "minimax_m3_vl", "minimax_m3_vl_text"
FULL, SPARSE = "full_attention", "minimax_m3_sparse"
# queries per matmul of the indexer's causal block scores (whole blocks of them)
INDEXER_QUERY_ROWS = 256

VISION_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                "patch_size", "temporal_patch_size", "spatial_merge_size")


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


def content_blocks(valid: torch.Tensor | None, documents: torch.Tensor | None, n_keys: int,
                   block_size: int, queries_are_keys: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Key blocks that follow each row's content: a block is `block_size` consecutive real keys of one document,
    counted from the document's first real key, so padding and packing leave every document the blocks it has
    alone. -> (key_block (B, Sk): block id per key, ids consecutive along the row; rank (B, Sk): each key's index
    among its document's real keys), or None when the blocks are the slots' for every real query: nothing
    padded and one document, or (`queries_are_keys`: no cache) padding only at the rows' ends, which no real
    query sees."""
    if documents is None and valid is not None and queries_are_keys and bool((valid[:, 1:] <= valid[:, :-1]).all()):
        return None
    if documents is None and (valid is None or bool(valid.all())):
        return None
    B = (valid if valid is not None else documents).shape[0]
    real = valid if valid is not None else torch.ones(B, n_keys, dtype=torch.bool, device=documents.device)
    before = document_ranks(real, documents)
    opens = real & (before % block_size == 0)
    key_block = (opens.long().cumsum(dim=1) - 1).clamp(min=0)  # a padded key joins the block about it
    return key_block, before


class LightningIndexer(nn.Module):
    """Per query and indexer head, the key blocks to attend (KeyBlocks: (B, heads, Sq, key blocks) bool).

    Blocks are those of each document's own real tokens (`content_blocks`): unpadded, unpacked rows get the
    slots' blocks, as in the reference; a left-padded or packed row picks the blocks its documents would pick
    alone, and padding never enters a block's score."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.block_size, self.topk_blocks = config.index_block_size, config.index_topk_blocks
        self.local_blocks = config.index_local_blocks
        if config.num_attention_heads % self.num_heads:
            raise ValueError(f"config: num_attention_heads {config.num_attention_heads} is not a multiple of "
                             f"index_n_heads {self.num_heads}")
        if not isinstance(self.local_blocks, int) or self.local_blocks < 0:
            raise ValueError(f"text_config.index_local_blocks: expected a block count >= 0, got {self.local_blocks!r}")
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=True)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=True)

    def keeps_every_block(self, seq_len: int, kv_cache=None) -> bool:
        """Whether the selection would keep every block a query can see, so that it narrows nothing: no more
        slot blocks than `index_topk_blocks` (a document, padded or packed, has no more blocks than the row). A
        cache needs the indexer's keys, so it always runs there."""
        return kv_cache is None and -(-seq_len // self.block_size) <= self.topk_blocks

    def _block_scores(self, q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor,
                      key_block: torch.Tensor | None, n_blocks: int) -> torch.Tensor:
        """(B, h, Sq, n_blocks) maxima of the scores q . k over each block's keys that the query can see
        (`visible`: (B | 1, 1, Sq, Sk), the attention's own rule); -inf for a block it sees nothing of."""
        B, h, S, _ = q.shape
        Sk = k.shape[2]
        scores = (q.float() @ k.float().transpose(-1, -2)).masked_fill(~visible, float("-inf"))  # (B, h, Sq, Sk)
        if key_block is None:
            scores = nn.functional.pad(scores, (0, n_blocks * self.block_size - Sk), value=float("-inf"))
            return scores.view(B, h, S, n_blocks, self.block_size).amax(dim=-1)
        pooled = scores.new_full((B, h, S, n_blocks), float("-inf"))
        return pooled.scatter_reduce_(-1, key_block.view(B, 1, 1, Sk).expand(B, h, S, Sk), scores, "amax")

    def _causal_block_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Block maxima of the scores under the plain causal rule (slot blocks, no padding, no cache): each
        group of query blocks scores only the keys up to its own end, and only its own keys need the causal mask,
        so about half the scores are computed and no (S x S) mask is built. A group is as many whole blocks as
        make INDEXER_QUERY_ROWS queries: one matmul per block of queries is mostly fixed cost at small blocks, and
        a later key block inside the group comes out -inf (all its keys masked), as the blocks after it do."""
        B, h, S, _ = q.shape
        bs = self.block_size
        n_blocks = -(-S // bs)
        q, kt = q.float(), k.float().transpose(-1, -2)
        block_scores = q.new_full((B, h, S, n_blocks), float("-inf"))
        rows = bs * max(1, INDEXER_QUERY_ROWS // bs)
        later = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu_(1)  # key after query, one group
        for lo in range(0, S, rows):
            hi = min(lo + rows, S)
            scores = q[:, :, lo:hi] @ kt[..., :hi]  # (B, h, the group's queries, keys up to the group's end)
            scores[..., lo:].masked_fill_(later[: hi - lo, : hi - lo], float("-inf"))
            seen = -(-hi // bs)  # key blocks 0 .. seen - 1, the last one maybe partial
            if seen * bs > hi:
                scores = nn.functional.pad(scores, (0, seen * bs - hi), value=float("-inf"))
            block_scores[:, :, lo:hi, :seen] = scores.unflatten(-1, (seen, bs)).amax(dim=-1)
        return block_scores

    @torch.no_grad()
    def forward(self, x, rope, mask: AttentionMask, kv_cache=None) -> KeyBlocks:
        B, S, _ = x.shape
        cos, sin = rope
        q = apply_rotary(self.q_norm(self.q_proj(x).view(B, S, self.num_heads, self.head_dim)),
                         cos[..., : self.head_dim], sin[..., : self.head_dim]).transpose(1, 2)  # (B, h, S, D)
        k = apply_rotary(self.k_norm(self.k_proj(x).view(B, S, 1, self.head_dim)),
                         cos[..., : self.head_dim], sin[..., : self.head_dim]).transpose(1, 2)  # (B, 1, S, D)
        k_positions, k_valid = mask.positions, mask.valid  # the keys' stream slots and padding
        if kv_cache is not None:  # the indexer's keys are cached beside the layer's K and V (all slots: no window)
            if kv_cache.index_keys is not None:
                k = torch.cat([kv_cache.index_keys, k], dim=2)
                k_positions, k_valid = kv_cache.slots_with(mask, B)
            kv_cache.index_keys = k
        Sk = k.shape[2]
        layout = content_blocks(k_valid, mask.documents, Sk, self.block_size, queries_are_keys=kv_cache is None)
        if layout is None:  # the slots' blocks: a query's own block is its slot's
            key_block, n_blocks = None, -(-Sk // self.block_size)
            own = (mask.positions // self.block_size).view(1, 1, S, 1)
            first = torch.zeros_like(own)
            if kv_cache is None:
                block_scores = self._causal_block_scores(q, k)
            else:
                block_scores = self._block_scores(q, k, mask.dense(None, k_positions, k_valid), None, n_blocks)
        else:
            key_block, rank = layout
            n_blocks = int(key_block[:, -1].max()) + 1
            block_scores = self._block_scores(q, k, mask.dense(None, k_positions, k_valid), key_block, n_blocks)
            slots = mask.positions  # each query is the key at its own stream slot
            own = key_block[:, slots].view(B, 1, S, 1)
            first = own - (rank[:, slots] // self.block_size).view(B, 1, S, 1)  # its document's first block
        if self.local_blocks > 0:  # the query's own block and the ones before it in its document always win
            distance = torch.arange(self.local_blocks, device=x.device)
            local = torch.maximum(own - distance.view(1, 1, 1, -1), first).expand(B, self.num_heads, S, -1)
            # above any real score, nearer blocks higher: with more local blocks than picks the nearest are kept
            # (the reference's +inf ties leave that to topk's order), the query's own block first
            boost = torch.finfo(block_scores.dtype).max * 0.5 ** distance.to(block_scores.dtype)
            block_scores.scatter_(-1, local, boost.expand_as(local).contiguous())
        # a stable sort, not topk: tied blocks resolve to the lowest index whatever the key count, so a query
        # picks the same blocks in one forward, step by step, or after a crop
        ranked, order = block_scores.sort(dim=-1, descending=True, stable=True)
        ranked, order = ranked[..., : self.topk_blocks], order[..., : self.topk_blocks]
        keep = torch.zeros(B, self.num_heads, S, n_blocks + 1, dtype=torch.bool, device=x.device)
        chosen = order.masked_fill(ranked == float("-inf"), n_blocks)  # empty picks -> a spare column
        keep.scatter_(-1, chosen, True)
        return KeyBlocks(keep[..., :n_blocks], self.block_size, key_block)


class IndexedAttention(Attention):
    """M3 attention; on sparse layers each query head attends only the key blocks its indexer head picked."""

    def __init__(self, config: PretrainedConfig, sparse: bool, backend: str):
        super().__init__(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                         qk_norm="rms_unit_offset", norm_eps=config.rms_norm_eps, backend=backend)
        self.indexer = LightningIndexer(config) if sparse else None

    def forward(self, x, rope, mask: AttentionMask, kv_cache=None):
        restrict = None
        if self.indexer is not None and not self.indexer.keeps_every_block(x.shape[1], kv_cache):
            restrict = self.indexer(x, rope, mask, kv_cache)
        return super().forward(x, rope, mask, kv_cache, restrict=restrict)


def build_moe_config(config: PretrainedConfig, dtype: torch.dtype | None = None, experts_impl: str = "auto") -> MoEConfig:
    """The routed experts' settings from an M3 text config; `dtype` is their parameters' (None: torch's default)."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"build_moe_config: dtype expected a torch.dtype or None, got {dtype!r} "
                         f"(the experts implementation is the keyword experts_impl)")
    return MoEConfig(
        hidden_size=config.hidden_size,
        num_experts=config.num_local_experts,
        top_k=config.num_experts_per_tok,
        intermediate_size=config.intermediate_size,
        activation=_swigluoai(config),
        score_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=config.routed_scaling_factor,
        score_correction_bias=True,
        bias_update_rate=float(getattr(config, "router_bias_update_rate", 0.0) or 0.0),
        # plait's own key: a per-layer Switch balance loss, which also works on pipeline stages (transformers'
        # pooled one, under output_router_logits, is the model's); M3's balancing is the correction bias
        aux_loss_coef=float(getattr(config, "moe_aux_loss_coef", 0.0) or 0.0),
        shared_intermediate_size=config.shared_intermediate_size,
        experts_impl=experts_impl,
        dtype=dtype,
    )


def _swigluoai(config: PretrainedConfig) -> Activation:
    return Activation("swigluoai", config.swiglu_alpha, config.swiglu_limit)


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_type: str, mlp_type: str, backend: str, moe_cfg: MoEConfig):
        super().__init__()
        if layer_type not in (FULL, SPARSE):
            raise ValueError(f"text_config.layer_types: expected {FULL!r} or {SPARSE!r}, got {layer_type!r}")
        if mlp_type not in ("dense", "sparse"):
            raise ValueError(f"text_config.mlp_layer_types: expected 'dense' or 'sparse', got {mlp_type!r}")
        H, eps = config.hidden_size, config.rms_norm_eps
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(H, eps, unit_offset=True)
        self.self_attn = IndexedAttention(config, layer_type == SPARSE, backend)
        self.post_attention_layernorm = RMSNorm(H, eps, unit_offset=True)
        self.mlp = (MoE(moe_cfg) if mlp_type == "sparse"
                    else MLP(H, config.dense_intermediate_size, _swigluoai(config)))

    def forward(self, h, rope, mask: AttentionMask, kv_cache=None):
        h = h + self.self_attn(self.input_layernorm(h), rope, mask, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h), mask.real_tokens())


class MTPLayer(nn.Module):
    """One MTP depth: the fusion (enorm, hnorm, eh_proj; applied by MTPModule), a full-attention decoder
    block as `transformer_layer` (its MLP of the kind the last trunk layer has), and final_layernorm. The
    names are those NeMo AutoModel's M3 adapter reads: mtp.layers.{d}.transformer_layer.*."""

    def __init__(self, config: PretrainedConfig, backend: str, moe_cfg: MoEConfig, has_fusion: bool, has_final_norm: bool):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        if has_fusion:
            self.enorm, self.hnorm = RMSNorm(H, eps, unit_offset=True), RMSNorm(H, eps, unit_offset=True)
            self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.transformer_layer = DecoderLayer(config, FULL, config.mlp_layer_types[-1], backend, moe_cfg)
        if has_final_norm:
            self.final_layernorm = RMSNorm(H, eps, unit_offset=True)

    def forward(self, h, rope, mask: AttentionMask, position_ids=None, kv_cache=None):
        # RoPE uses the trunk's positions; the block is full attention, which reads no position ids
        return self.transformer_layer(h, rope, mask, kv_cache)


# ---------------------------------------------------------------------------------------------
# Text backbone and LM
# ---------------------------------------------------------------------------------------------


class MiniMaxM3TextModel(nn.Module):
    """`moe_config` replaces the MoE settings read from the config (e.g. another experts implementation)."""

    def __init__(self, config: PretrainedConfig, moe_config: MoEConfig | None = None, backend: str | None = None,
                 experts_impl: str = "auto", mtp_config: MTPConfig | None = None):
        super().__init__()
        backend = backend or "sdpa"  # None: the default attention implementation
        check_layer_lists(config, "text_config")
        self.config = config
        moe_cfg = moe_config or build_moe_config(config, experts_impl=experts_impl)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleDict({
            str(i): DecoderLayer(config, config.layer_types[i], config.mlp_layer_types[i], backend, moe_cfg)
            for i in range(config.num_hidden_layers)
        })
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True)
        self.rotary = rotary_from_parameters(config.head_dim, {"rope_theta": 5_000_000.0, **(config.rope_parameters or {})},
                                             1.0, getattr(config, "max_position_embeddings", None),
                                             name="text_config.rope_parameters")
        self.backend, self.moe_config = backend, moe_cfg
        self.mtp = None
        if mtp_config is not None and mtp_config.enabled:
            self.build_mtp(mtp_config)

    def build_mtp(self, mtp_config: MTPConfig) -> None:
        """The MTP depths (one full-attention decoder block each), with the construction-time init."""
        if mtp_config.layer_pattern != "*":
            raise ValueError(f"MiniMax-M3 MTP depths are one whole block: layer_pattern must be '*', "
                             f"got {mtp_config.layer_pattern!r}")
        self.mtp = MTPModule(mtp_config, "*", lambda gi, d, j, kind, fusion, final:
                             MTPLayer(self.config, self.backend, self.moe_config, fusion, final))

    def make_freqs_cis(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(position_ids)

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, padding_mask=None, inputs_embeds=None,
                cu_seqlens=None, past_key_values: KVCache | None = None, return_trunk: bool = False):
        """-> final hidden states (B, S, H), or with `return_trunk` what the MTP depths need as well.
        `padding_mask` is an alias of `attention_mask` (1 on real tokens)."""
        if attention_mask is None:
            attention_mask = padding_mask
        if self.embed_tokens is not None and inputs_embeds is None:
            if input_ids is None:
                raise ValueError("MiniMaxM3TextModel: pass input_ids or inputs_embeds")
            h = embed_token_ids(self.embed_tokens, input_ids)
        elif inputs_embeds is not None:
            h = check_hidden_states(inputs_embeds, self.config.hidden_size)
        else:  # a later pipeline stage: the previous stage's hidden states
            h = check_hidden_states(input_ids, self.config.hidden_size, "hidden states from the previous pipeline stage")
        position_ids, mask = positions_and_mask(h, position_ids, attention_mask, cu_seqlens, past_key_values)
        rope = self.rotary(position_ids)
        for key, layer in self.layers.items():
            cache = past_key_values.layer(key, None) if past_key_values is not None else None
            h = layer(h, rope, mask, cache)
        if past_key_values is not None:
            past_key_values.seen += h.shape[1]
        normed = self.norm(h) if self.norm is not None else h
        return TrunkOutput(normed, h, mask, position_ids, {FULL: rope}) if return_trunk else normed

    def mtp_hidden_states(self, input_ids: torch.Tensor | None, trunk: TrunkOutput, cu_seqlens=None,
                          depth_embeds: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per-depth final hidden states of the MTP depths (trunk's mask and rotary angles). `depth_embeds`
        replace the embedding of the rolled ids (a last pipeline stage has no embedding)."""
        if cu_seqlens is None:
            cu_seqlens = cu_seqlens_from_documents(trunk.mask.documents)
        return self.mtp(input_ids, trunk.pre_norm, self.embed_tokens, trunk.position_ids, cu_seqlens, depth_embeds,
                        rope=trunk.ropes[FULL], mask=trunk.mask)

    def mtp_decode(self, depth: int, h_prev, token_ids, position_ids, attention_mask, cache: KVCache) -> torch.Tensor:
        """One MTP depth on the next slots with its own KV cache (self-speculative drafting)."""
        return mtp_decode_step(self.mtp, self.embed_tokens, self.rotary, None, depth, h_prev, token_ids, position_ids,
                               attention_mask, cache)

    def mtp_logits(self, hidden_states: torch.Tensor, input_ids: torch.Tensor, lm_head: nn.Module,
                   position_ids=None, attention_mask=None, cu_seqlens=None) -> list[torch.Tensor]:
        """Per-depth logits sharing `lm_head`, from the trunk's last-layer (pre-norm) hidden states."""
        if self.mtp is None:
            raise ValueError("mtp_logits: this model has no MTP depths (num_mtp_layers=0)")
        position_ids, mask = positions_and_mask(hidden_states, position_ids, attention_mask, cu_seqlens, None)
        trunk = TrunkOutput(hidden_states, hidden_states, mask, position_ids, {FULL: self.rotary(position_ids)})
        return [lm_head(h) for h in self.mtp_hidden_states(input_ids, trunk, cu_seqlens)]

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        init_reference_weights(self, self.config.initializer_range)
        if buffer_device is not None:
            self.rotary.to(buffer_device)


class _M3Base(PipelineStageHooks, nn.Module):
    """What the text-only and the vision-language classes share: loss, construction, checkpoints, and the
    pipeline-stage protocol (`PipelineStageHooks`)."""

    text_attr = ""  # the attribute holding the text model (its prefix in this class's state dict)
    text_prefix_on_disk = ""  # the text model's key prefix in the HF checkpoint
    supports_mtp = True
    _keep_in_fp32_modules = ["rotary"]

    def _build_text(self, text_config: PretrainedConfig, moe_config, backend: str, experts_impl: str,
                    num_mtp_layers: int, mtp_loss_scaling_factor: float, mtp_repeated_layer: bool,
                    tie: bool) -> None:
        """The text model (with its MTP depths) under `text_attr`, and the LM head, tied when asked."""
        self.mtp_config = MTPConfig(num_layers=num_mtp_layers, loss_scaling_factor=mtp_loss_scaling_factor,
                                    use_repeated_layer=mtp_repeated_layer)
        setattr(self, self.text_attr,
                MiniMaxM3TextModel(text_config, moe_config, backend, experts_impl, self.mtp_config))
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        if tie:
            self.lm_head.weight = self.get_input_embeddings().weight

    @property
    def mtp_backbone(self) -> MiniMaxM3TextModel:
        """The module whose `mtp_decode` drafts tokens (plait.speculative)."""
        return self._text_model()

    def get_input_embeddings(self) -> nn.Module:
        return self._text_model().embed_tokens

    def set_input_embeddings(self, module: nn.Embedding) -> None:
        self._text_model().embed_tokens = module

    def _run(self, input_ids, inputs_embeds, position_ids, attention_mask, cu_seqlens, past_key_values, labels,
             return_logits, return_mtp_logits, use_cache, mtp_depth_embeds=None,
             output_router_logits: bool | None = None) -> MiniMaxM3CausalLMOutput:
        """The text model, the head, and the loss: main CE (+ MTP depths' CE) (+ MoE aux losses when enabled:
        plait's per-layer one, and transformers' pooled one under `output_router_logits`)."""
        refuse_attention_dropout(self._text_config(), self.training)
        pool_router_logits = self.router_aux_loss_enabled(output_router_logits)
        if pool_router_logits and self._is_pipeline_parallel_stage():
            raise ValueError("output_router_logits: transformers' load-balancing loss pools the router logits of "
                             "every decoder layer, which one pipeline stage does not hold; expected it off on a "
                             "stage (config.moe_aux_loss_coef gives a per-layer balance loss that works across stages)")
        if use_cache and past_key_values is None:
            past_key_values = KVCache()
        text = self._text_model()
        # the decoder layers' router logits only: transformers' model has no MTP depths
        with router_logits_kept(text.layers if pool_router_logits else None) as routers:
            trunk = text(input_ids if inputs_embeds is None else None, position_ids, attention_mask, None,
                         inputs_embeds, cu_seqlens, past_key_values, return_trunk=True)
            if self.lm_head is None:  # a non-last pipeline stage
                return MiniMaxM3CausalLMOutput(logits=None, hidden_states=trunk.hidden_states,
                                               past_key_values=past_key_values)
            out = lm_output(self, text, trunk, input_ids, cu_seqlens, labels, return_logits, return_mtp_logits,
                            past_key_values, use_cache, mtp_depth_embeds, MiniMaxM3CausalLMOutput)
            if pool_router_logits:
                out.aux_loss = pooled_load_balancing_loss(
                    [m.router_logits for m in routers if m.router_logits is not None],
                    self._text_config().num_experts_per_tok)
        if labels is not None and out.aux_loss is not None:
            out.loss = out.loss + self._text_config().router_aux_loss_coef * out.aux_loss
        return out

    def router_aux_loss_enabled(self, output_router_logits: bool | None = None) -> bool:
        """Whether the loss adds transformers' pooled load-balancing loss x `router_aux_loss_coef`: the forward's
        `output_router_logits`, else the text config's."""
        if output_router_logits is None:
            output_router_logits = getattr(self._text_config(), "output_router_logits", False)
        return bool(output_router_logits)

    @classmethod
    def from_config(cls, config: PretrainedConfig, moe_config=None, backend: str = "sdpa", **kwargs):
        model = cls(config, moe_config, backend, **kwargs)
        model.initialize_weights()
        return model

    @torch.no_grad()
    def initialize_weights(self, buffer_device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        init_reference_weights(self, self._text_config().initializer_range)
        if dtype is not None:
            self.to(dtype)  # rotary inv_freq stays float32 (RotaryEmbedding recomputes it on every move)
        if buffer_device is not None:
            self.to(buffer_device)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, module: nn.Linear) -> None:
        self.lm_head = module

    @classmethod
    def from_pretrained(cls, path: str | Path, backend: str = "sdpa", experts_impl: str = "auto"):
        path = check_model_dir(path)
        config = load_hf_config(path)
        if config.model_type not in (VL_MODEL_TYPE, TEXT_MODEL_TYPE):
            raise ValueError(f"{path}: config model_type is {config.model_type!r}, expected {VL_MODEL_TYPE!r} "
                             f"or {TEXT_MODEL_TYPE!r}")
        target = MiniMaxM3SparseForConditionalGeneration if config.model_type == VL_MODEL_TYPE else MiniMaxM3SparseForCausalLM
        if cls is not _M3Base and cls is not target:
            raise ValueError(f"{path}: a {config.model_type} checkpoint loads as {target.__name__}, not {cls.__name__}")
        return load_checkpoint_into(
            lambda hf_state: target(config, None, backend, experts_impl=experts_impl,
                                    num_mtp_layers=mtp_layers_in_checkpoint(hf_state, target.text_prefix_on_disk)),
            StateDictAdapter(config), path, config)

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head is not None and self.lm_head.weight is self.get_input_embeddings().weight

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None,
                        fp8_block_size: tuple[int, int] | None = None) -> None:
        """HF layout with the on-disk key names. `fp8_block_size`: the text model's linear weights block-quantized
        to float8 (plait.fp8); the vision tower and projector stay as they are."""
        save_checkpoint(self, StateDictAdapter(self.config), path, self.hf_architecture, state_dict, fp8_block_size)


@dataclass
class MiniMaxM3CausalLMOutput(CausalLMOutput):
    aux_loss: torch.Tensor | None = None  # transformers' pooled load-balancing loss, under output_router_logits


class MiniMaxM3SparseForCausalLM(_M3Base):
    """Text only (model_type `minimax_m3_vl_text`)."""

    model_type = TEXT_MODEL_TYPE
    hf_architecture = "MiniMaxM3VLForCausalLM"
    text_attr = "model"
    text_prefix_on_disk = "model."

    def __init__(self, config: PretrainedConfig, moe_config=None, backend: str | None = None, experts_impl: str = "auto",
                 num_mtp_layers: int = 0, mtp_loss_scaling_factor: float = 0.1, mtp_repeated_layer: bool = False):
        super().__init__()
        self.config = config
        self._build_text(config, moe_config, backend, experts_impl, num_mtp_layers, mtp_loss_scaling_factor,
                         mtp_repeated_layer, tie=config.tie_word_embeddings)

    def forward(self, input_ids=None, labels=None, position_ids=None, attention_mask=None, inputs_embeds=None,
                cu_seqlens=None, past_key_values=None, use_cache=False, return_logits=True, return_mtp_logits=False,
                mtp_depth_embeds=None, output_router_logits=None, **unused):
        check_forward_kwargs(unused, type(self).__name__, text_only=True)
        input_ids, inputs_embeds = self._stage_inputs(input_ids, inputs_embeds)
        check_labels(labels, input_ids, inputs_embeds, self._text_config().vocab_size)
        out = self._run(input_ids, inputs_embeds, position_ids, attention_mask, cu_seqlens, past_key_values, labels,
                        return_logits, return_mtp_logits, use_cache, mtp_depth_embeds, output_router_logits)
        return self._stage_result(out, labels, return_mtp_logits)


class MiniMaxM3SparseForConditionalGeneration(_M3Base):
    """Vision-language (model_type `minimax_m3_vl`): vision tower, projector, text model, LM head."""

    model_type = VL_MODEL_TYPE
    hf_architecture = "MiniMaxM3SparseForConditionalGeneration"
    text_attr = "language_model"
    text_prefix_on_disk = "language_model.model."

    def __init__(self, config: PretrainedConfig, moe_config=None, backend: str | None = None, experts_impl: str = "auto",
                 num_mtp_layers: int = 0, mtp_loss_scaling_factor: float = 0.1, mtp_repeated_layer: bool = False):
        super().__init__()
        self.config = config
        backend = backend or "sdpa"  # None: the default attention implementation
        check_layer_lists(config.text_config, "text_config")  # before anything is built from it
        check_positive_sizes(config.vision_config, "vision_config", VISION_SIZES)
        self.vision_tower = VisionTower(config.vision_config, backend)
        self.multi_modal_projector = MultiModalProjector(config)
        self._build_text(config.text_config, moe_config, backend, experts_impl, num_mtp_layers,
                         mtp_loss_scaling_factor, mtp_repeated_layer,
                         tie=config.text_config.tie_word_embeddings or getattr(config, "tie_word_embeddings", False))

    @staticmethod
    def _to_grid_list(grid_thw) -> list[list[int]]:
        """(t, h, w) per item, as lists of ints, from a tensor or nested lists (checked: `to_grid_list`)."""
        return to_grid_list(grid_thw).tolist()

    def _splice_multimodal(self, inputs_embeds: torch.Tensor, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                           grid_thw, token_index: int) -> torch.Tensor:
        """The images' (or a video's) features, from the vision tower and projector, at the `token_index`
        placeholders of `input_ids`: a new embedding tensor. The placeholders must match the features exactly,
        whole items per sample, or a ValueError says how many came per sample and per item."""
        kind = "videos" if token_index == self.config.video_token_index else "images"
        grid = to_grid_list(grid_thw)
        return splice_multimodal(inputs_embeds, input_ids, self.image_features(pixel_values, grid), token_index, grid,
                                 self.config.vision_config.spatial_merge_size, kind)

    def image_features(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        """(patches, C*T*P*P) -> (tokens, text hidden): m x m patches become one token."""
        grid = to_grid_list(grid_thw)
        m = self.config.vision_config.spatial_merge_size
        if bool((grid[:, 1] % m).any() or (grid[:, 2] % m).any()):
            raise ValueError(f"grid_thw: h and w must be multiples of spatial_merge_size {m}, got {grid.tolist()}")
        return self.multi_modal_projector(self.vision_tower(pixel_values, grid))

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw) -> tuple[torch.Tensor, ...]:
        """One (tokens, text hidden) tensor per image, in order."""
        grid = to_grid_list(image_grid_thw)
        sizes = (grid.prod(-1) // self.config.vision_config.spatial_merge_size**2).tolist()
        return torch.split(self.image_features(pixel_values, grid), sizes)

    def forward(self, input_ids=None, labels=None, position_ids=None, attention_mask=None, pixel_values=None,
                image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None, inputs_embeds=None,
                cu_seqlens=None, past_key_values=None, use_cache=False, return_logits=True, return_mtp_logits=False,
                mtp_depth_embeds=None, output_router_logits=None, **unused):
        check_forward_kwargs(unused, type(self).__name__, text_only=False)
        input_ids, inputs_embeds = self._stage_inputs(input_ids, inputs_embeds)
        check_labels(labels, input_ids, inputs_embeds, self._text_config().vocab_size)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MiniMaxM3SparseForConditionalGeneration: pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = embed_token_ids(self.get_input_embeddings(), input_ids)
            for kind, pixels, grid, token in (("images", pixel_values, image_grid_thw, self.config.image_token_index),
                                              ("videos", pixel_values_videos, video_grid_thw, self.config.video_token_index)):
                if pixels is None:
                    if grid is not None:
                        raise ValueError(f"{kind}: a grid_thw came without its pixel values")
                    # a prompt's placeholders would run as the placeholder token's own embedding; decode steps
                    # (a cache already filled) feed back generated tokens, which may be the placeholder id
                    prompt = past_key_values is None or past_key_values.seen == 0
                    placeholders = (input_ids == token).sum(dim=1).tolist() if prompt else []
                    if any(placeholders):
                        raise ValueError(f"{kind}: placeholder tokens per sample {placeholders} but no pixel values")
                    continue
                if grid is None:
                    raise ValueError(f"{kind}: pixel values came without their grid_thw")
                inputs_embeds = self._splice_multimodal(inputs_embeds, input_ids, pixels, grid, token)
        elif pixel_values is not None or pixel_values_videos is not None:
            raise ValueError("pass pixel values with input_ids (their placeholders), not with inputs_embeds")
        out = self._run(input_ids, inputs_embeds, position_ids, attention_mask, cu_seqlens, past_key_values, labels,
                        return_logits, return_mtp_logits, use_cache, mtp_depth_embeds, output_router_logits)
        return self._stage_result(out, labels, return_mtp_logits)


ModelClass = MiniMaxM3SparseForConditionalGeneration  # the top-level class a loader builds for this file


def splice_multimodal(embeds: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor, token_id: int,
                      grid: torch.Tensor, merge: int, kind: str) -> torch.Tensor:
    """Place `features` (one row per placeholder, images in order) at the `token_id` positions of
    `input_ids`, row-major over (batch, sequence). The counts must match exactly, sample by sample."""
    is_slot = input_ids == token_id  # (B, S)
    per_sample = is_slot.sum(dim=1).tolist()
    per_item = (grid.prod(-1) // merge**2).tolist()
    if sum(per_sample) != features.shape[0] or not _fits(per_sample, per_item):
        raise ValueError(f"{kind}: placeholder tokens per sample {per_sample} do not match the features per "
                         f"{kind[:-1]} {per_item} (total {features.shape[0]})")
    out = embeds.clone()
    out[is_slot] = features.to(embeds.dtype)
    return out


def _fits(per_sample: list[int], per_item: list[int]) -> bool:
    """Whole images fill each sample's placeholders, in order."""
    i = 0
    for need in per_sample:
        while need > 0 and i < len(per_item):
            need -= per_item[i]
            i += 1
        if need != 0:
            return False
    return i == len(per_item)


# ---------------------------------------------------------------------------------------------
# Checkpoint adapter
# ---------------------------------------------------------------------------------------------

_EXPERT_KEY = re.compile(r"^(.*)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_VISION_LAYER = re.compile(r"^vision_tower\.vision_model\.encoder\.layers\.(\d+)\.(.*)$")


class StateDictAdapter:
    """plait names <-> on-disk HF names (the hub's, which transformers' save writes).

    plait                                              on disk
    [lm.]layers.{i}.mlp.experts.gate_up_proj [E,2I,H]   [lm.]layers.{i}.block_sparse_moe.experts.{e}.{w1,w3}.weight
    [lm.]layers.{i}.mlp.experts.down_proj [E,H,I]       [lm.]layers.{i}.block_sparse_moe.experts.{e}.w2.weight
    [lm.]layers.{i}.mlp.gate.weight / .e_score_correction_bias
                                                        [lm.]layers.{i}.block_sparse_moe.gate.weight / .e_score_correction_bias
    [lm.]layers.{i}.mlp.shared_experts.*                [lm.]layers.{i}.block_sparse_moe.shared_experts.*
    [lm.]layers.{i}.self_attn.indexer.{q,k}_{proj,norm} [lm.]layers.{i}.self_attn.index_{q,k}_{proj,norm}
    language_model.* / lm_head                          language_model.model.* / language_model.lm_head
    vision_tower.patch_embed.weight [H, C*T*P*P]        vision_tower.vision_model.embeddings.patch_embedding.weight [H, C, T, P, P]
    vision_tower.pre_layrnorm, .layers.{i}.*            vision_tower.vision_model.pre_layrnorm, .encoder.layers.{i}.*
    vision_tower.layers.{i}.self_attn.o_proj            ... .self_attn.out_proj
    multi_modal_projector.merge_linear_{1,2}            patch_merge_mlp.linear_{1,2}
    Text-only checkpoints (transformers' MiniMaxM3VLForCausalLM) keep the in-memory names instead: plait's,
    with the dense and shared MLPs' gate and up fused into one `gate_up_proj`. Loading accepts either.
    """

    # on-disk prefixes an FP8 export leaves unquantized: the vision side, small beside the text model and run at
    # bf16 by serving stacks
    fp8_unquantized = ("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.")

    def __init__(self, config: PretrainedConfig):
        self.vl = config.model_type == VL_MODEL_TYPE
        self.text = text_config_of(config)
        if self.vl:
            v = config.vision_config
            self.patch_shape = (v.hidden_size, v.num_channels, v.temporal_patch_size, v.patch_size, v.patch_size)

    # plait -> disk
    def to_hf(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = self._with_empty_shared_experts(state)
        if not self.vl:  # transformers' text-only class writes its in-memory names
            return self._fuse_text_only(dict(state))
        out = {}
        for name, t in state.items():
            for key, value in self._one_to_hf(name, t):
                out[key] = value
        return out

    def _one_to_hf(self, name: str, t: torch.Tensor):
        if self.vl:
            if name.startswith("language_model."):
                name = "language_model.model." + name[len("language_model."):]
            elif name == "lm_head.weight":
                name = "language_model.lm_head.weight"
            elif name.startswith("vision_tower."):
                rest = name[len("vision_tower."):]
                if rest == "patch_embed.weight":
                    return [("vision_tower.vision_model.embeddings.patch_embedding.weight", t.reshape(self.patch_shape))]
                if rest.startswith("layers."):
                    rest = "encoder." + rest.replace(".self_attn.o_proj.", ".self_attn.out_proj.")
                return [("vision_tower.vision_model." + rest, t)]
            elif name.startswith("multi_modal_projector.merge_linear_"):
                return [("patch_merge_mlp.linear_" + name[len("multi_modal_projector.merge_linear_"):], t)]
        if ".mlp.experts.gate_up_proj" in name:
            prefix = name[: name.index(".mlp.experts.gate_up_proj")] + ".block_sparse_moe.experts"
            gate, up = t.chunk(2, dim=1)
            return [item for e in range(t.shape[0])
                    for item in ((f"{prefix}.{e}.w1.weight", gate[e]), (f"{prefix}.{e}.w3.weight", up[e]))]
        if ".mlp.experts.down_proj" in name:
            prefix = name[: name.index(".mlp.experts.down_proj")] + ".block_sparse_moe.experts"
            return [(f"{prefix}.{e}.w2.weight", t[e]) for e in range(t.shape[0])]
        if ".mlp.gate.e_score_correction_bias" in name:
            return [(name.replace(".mlp.gate.e_score_correction_bias", ".block_sparse_moe.e_score_correction_bias"), t)]
        if ".mlp.gate.weight" in name or ".mlp.shared_experts." in name:
            return [(name.replace(".mlp.", ".block_sparse_moe.", 1), t)]
        if ".self_attn.indexer." in name:
            return [(name.replace(".self_attn.indexer.", ".self_attn.index_"), t)]
        return [(name, t)]

    def _with_empty_shared_experts(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With shared_intermediate_size = 0 plait builds no shared expert, while transformers keeps one of
        width 0 in every MoE layer of the trunk and saves its zero-size weights: write them too, so that
        transformers loads the checkpoint with nothing missing."""
        if self.text.shared_intermediate_size:
            return state
        out = dict(state)
        for name, gate in state.items():
            if name.endswith(".mlp.gate.weight") and "mtp." not in name:
                prefix, H = name[: -len("gate.weight")] + "shared_experts.", gate.shape[1]
                out[prefix + "gate_proj.weight"] = gate.new_zeros(0, H)
                out[prefix + "up_proj.weight"] = gate.new_zeros(0, H)
                out[prefix + "down_proj.weight"] = gate.new_zeros(H, 0)
        return out

    def _fuse_text_only(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """transformers' text-only class stores dense and shared MLPs as one fused `gate_up_proj`."""
        for name in [n for n in out if n.endswith(".gate_proj.weight") and ".experts." not in n]:
            up = name.replace(".gate_proj.", ".up_proj.")
            out[name.replace(".gate_proj.", ".gate_up_proj.")] = torch.cat([out.pop(name), out.pop(up)], dim=0)
        return out

    # disk -> plait
    def from_hf(self, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out, experts = {}, {}
        E = self.text.num_local_experts
        for name, t in hf_state.items():
            if m := _EXPERT_KEY.match(name):
                experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = t
                continue
            local, t = self._one_from_hf(name, t)
            if ".mlp.shared_experts." in local and t.numel() == 0:  # a width-0 shared expert: none (above)
                continue
            if local.endswith(".gate_up_proj.weight"):  # fused dense / shared MLP (text-only checkpoints)
                gate, up = t.chunk(2, dim=0)
                out[local.replace(".gate_up_proj.", ".gate_proj.")] = gate
                out[local.replace(".gate_up_proj.", ".up_proj.")] = up
                continue
            out[local] = t
        for prefix, parts in experts.items():
            missing = [f"{prefix}.block_sparse_moe.experts.{e}.{w}.weight" for e in range(E) for w in ("w1", "w2", "w3")
                       if (e, w) not in parts]
            extra = [f"{prefix}.block_sparse_moe.experts.{e}.{w}.weight" for e, w in parts if e >= E]
            if missing or extra:
                raise ValueError(f"checkpoint experts under {prefix}: missing {missing[:4]}, unexpected {extra[:4]} "
                                 f"(config num_local_experts = {E})")
            local = self._strip(prefix)
            gate = torch.stack([parts[(e, "w1")] for e in range(E)])
            up = torch.stack([parts[(e, "w3")] for e in range(E)])
            out[f"{local}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
            out[f"{local}.mlp.experts.down_proj"] = torch.stack([parts[(e, "w2")] for e in range(E)])
        return out

    def _strip(self, name: str) -> str:
        if self.vl and name.startswith("language_model.model."):
            return "language_model." + name[len("language_model.model."):]
        return name

    def _one_from_hf(self, name: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
        if self.vl:
            if name == "language_model.lm_head.weight":
                return "lm_head.weight", t
            if name == "vision_tower.vision_model.embeddings.patch_embedding.weight":
                return "vision_tower.patch_embed.weight", t.reshape(t.shape[0], -1)
            if m := _VISION_LAYER.match(name):
                return f"vision_tower.layers.{m.group(1)}.{m.group(2).replace('.out_proj.', '.o_proj.')}", t
            if name.startswith("vision_tower.vision_model."):
                return "vision_tower." + name[len("vision_tower.vision_model."):], t
            if name.startswith("patch_merge_mlp.linear_"):
                return "multi_modal_projector.merge_linear_" + name[len("patch_merge_mlp.linear_"):], t
        name = self._strip(name)
        name = name.replace(".block_sparse_moe.e_score_correction_bias", ".mlp.gate.e_score_correction_bias")
        name = name.replace(".block_sparse_moe.", ".mlp.")
        name = re.sub(r"\.self_attn\.index_(q|k)_(proj|norm)\.", r".self_attn.indexer.\1_\2.", name)
        return name, t
