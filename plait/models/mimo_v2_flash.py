"""MiMo-V2-Flash (Xiaomi), plait's native implementation, built from plait.nn.

Reads the Hugging Face config (`model_type: mimo_v2_flash`) and checkpoints with their on-disk key names.

    embed_tokens -> layers[i] (attention by layer_types[i], MLP by mlp_layer_types[i]) -> norm -> lm_head
                                                                     \\-> mtp depths (SWA blocks) -> lm_head

- Hybrid attention: "sliding_attention" layers have twice `num_key_value_heads`, a window of
  `sliding_window` tokens (the query included) and a learnable sink logit per head; "full_attention"
  layers have neither.
- Q/K head dim `head_dim` (192 released), V head dim `v_head_dim` (128), V scaled by
  `attention_value_scale`.
- Dual-base partial RoPE: one rotary embedding per layer type from `rope_parameters`.
- MoE layers: sigmoid router with the score-correction bias, group-limited top-k, normalised top-k
  weights times `routed_scaling_factor`, no shared expert. Dense layers: SwiGLU MLP.
- MTP: the released checkpoint carries `model.mtp.layers.{d}.*` (transformers drops them). They are
  kept here as `MTPModule` depths, each one SWA attention + dense MLP block.

The forward is pipeline-ready: `embed_tokens`, `norm` and `lm_head` may be None on a pipeline stage,
and `layers` is a ModuleDict keyed by the original layer index.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from plait.checkpoint import check_model_dir
from plait.models.hf import load_hf_config
from plait.models.native import (
    CausalLMOutput,
    PipelineStageHooks,
    TrunkOutput,
    check_forward_kwargs,
    check_hidden_states,
    check_labels,
    check_layer_lists,
    embed_token_ids,
    init_reference_weights,
    lm_output,
    load_checkpoint_into,
    mtp_decode_step,
    mtp_layers_in_checkpoint,
    positions_and_mask,
    refuse_attention_dropout,
    save_checkpoint,
)
from plait.mtp import MTPConfig, MTPModule, cu_seqlens_from_documents
from plait.nn.attention import Attention, AttentionMask, KVCache
from plait.nn.mlp import MLP, Activation
from plait.nn.moe import MoE, MoEConfig
from plait.nn.norm import RMSNorm
from plait.nn.rope import rotary_per_layer_type

MODEL_TYPE = "mimo_v2_flash"
SLIDING, FULL = "sliding_attention", "full_attention"
# transformers' default when a layer type's rope parameters omit it
DEFAULT_PARTIAL_ROTARY_FACTOR = 0.334


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


def _attention(config: PretrainedConfig, layer_type: str, backend: str) -> Attention:
    if layer_type not in (SLIDING, FULL):
        raise ValueError(f"layer_types: expected {SLIDING!r} or {FULL!r}, got {layer_type!r}")
    sliding = layer_type == SLIDING
    return Attention(
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads * (2 if sliding else 1),
        config.head_dim,
        config.v_head_dim,
        qkv_bias=config.attention_bias,
        value_scale=config.attention_value_scale if config.attention_value_scale is not None else 1.0,
        sliding_window=config.sliding_window if sliding else None,
        sinks=sliding,
        backend=backend,
    )


def moe_config(config: PretrainedConfig, experts_impl: str = "auto") -> MoEConfig:
    return MoEConfig(
        hidden_size=config.hidden_size,
        num_experts=config.n_routed_experts,
        top_k=config.num_experts_per_tok,
        intermediate_size=config.moe_intermediate_size,
        activation=Activation(config.hidden_act),
        score_func="sigmoid",
        n_group=config.n_group,
        topk_group=config.topk_group,
        norm_topk_prob=config.norm_topk_prob,
        routed_scaling_factor=1.0 if config.routed_scaling_factor is None else config.routed_scaling_factor,
        score_correction_bias=True,
        # plait's own keys (transformers keeps unknown config keys): the aux-loss-free balancing rate, and an
        # optional Switch-style aux loss
        bias_update_rate=float(getattr(config, "router_bias_update_rate", 0.0) or 0.0),
        aux_loss_coef=float(getattr(config, "moe_aux_loss_coef", 0.0) or 0.0),
        experts_impl=experts_impl,
    )


class DecoderLayer(nn.Module):
    """h + attn(norm(h)), then + mlp(norm(h)); the MLP is the MoE on "sparse" layers."""

    def __init__(self, config: PretrainedConfig, layer_type: str, mlp_type: str, backend: str, experts_impl: str):
        super().__init__()
        if mlp_type not in ("dense", "sparse"):
            raise ValueError(f"mlp_layer_types: expected 'dense' or 'sparse', got {mlp_type!r}")
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = _attention(config, layer_type, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = (MoE(moe_config(config, experts_impl)) if mlp_type == "sparse"
                    else MLP(config.hidden_size, config.intermediate_size, config.hidden_act))

    def forward(self, h, rope, mask: AttentionMask, kv_cache=None):
        h = h + self.self_attn(self.input_layernorm(h), rope, mask, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h), mask.real_tokens())


class MTPLayer(nn.Module):
    """One MTP depth of the released checkpoint: the fusion (enorm, hnorm, eh_proj; applied by
    MTPModule), an SWA attention + dense MLP block, and final_layernorm."""

    layer_type = SLIDING

    def __init__(self, config: PretrainedConfig, backend: str, has_fusion: bool, has_final_norm: bool):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        if has_fusion:
            self.enorm, self.hnorm = RMSNorm(H, eps), RMSNorm(H, eps)
            self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.input_layernorm = RMSNorm(H, eps)
        self.self_attn = _attention(config, SLIDING, backend)
        self.pre_mlp_layernorm = RMSNorm(H, eps)
        self.mlp = MLP(H, config.intermediate_size, config.hidden_act)
        if has_final_norm:
            self.final_layernorm = RMSNorm(H, eps)

    def forward(self, h, rope, mask: AttentionMask, position_ids=None, kv_cache=None):
        h = h + self.self_attn(self.input_layernorm(h), rope, mask, kv_cache)
        return h + self.mlp(self.pre_mlp_layernorm(h), mask.real_tokens())


# ---------------------------------------------------------------------------------------------
# Backbone and LM
# ---------------------------------------------------------------------------------------------


class MiMoV2FlashModel(nn.Module):
    def __init__(self, config: PretrainedConfig, mtp_config: MTPConfig | None = None, backend: str = "sdpa",
                 experts_impl: str = "auto"):
        super().__init__()
        _check_config(config)
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleDict({
            str(i): DecoderLayer(config, config.layer_types[i], config.mlp_layer_types[i], backend, experts_impl)
            for i in range(config.num_hidden_layers)
        })
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = self._rotary(set(config.layer_types))
        self.backend = backend
        self.mtp = None
        if mtp_config is not None and mtp_config.enabled:
            self.build_mtp(mtp_config)

    def _rotary(self, layer_types: set[str]) -> nn.ModuleDict:
        return rotary_per_layer_type(self.config.head_dim, self.config.rope_parameters, DEFAULT_PARTIAL_ROTARY_FACTOR,
                                     layer_types, getattr(self.config, "max_position_embeddings", None))

    def build_mtp(self, mtp_config: MTPConfig) -> None:
        """The MTP depths (one SWA attention + dense MLP block each), with the construction-time init."""
        if mtp_config.layer_pattern != "*":
            raise ValueError(f"MiMo-V2-Flash MTP depths are one whole block: layer_pattern must be '*', "
                             f"got {mtp_config.layer_pattern!r}")
        if SLIDING not in self.rotary:  # no trunk layer is SWA: the depths alone read that entry
            if SLIDING not in (self.config.rope_parameters or {}):
                raise ValueError(f"config.rope_parameters: MTP depths use sliding-window attention and need a "
                                 f"{SLIDING!r} entry")
            self.rotary.update(self._rotary({SLIDING}))
        self.mtp = MTPModule(mtp_config, "*", lambda gi, d, j, kind, fusion, final:
                             MTPLayer(self.config, self.backend, fusion, final))

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, attention_mask=None, cu_seqlens=None,
                past_key_values: KVCache | None = None) -> TrunkOutput:
        if self.embed_tokens is not None:
            if (input_ids is None) == (inputs_embeds is None):
                raise ValueError("MiMoV2FlashModel: pass exactly one of input_ids and inputs_embeds")
            h = (embed_token_ids(self.embed_tokens, input_ids) if inputs_embeds is None
                 else check_hidden_states(inputs_embeds, self.config.hidden_size))
        else:  # a later pipeline stage: the input is the previous stage's hidden states
            h = check_hidden_states(inputs_embeds if inputs_embeds is not None else input_ids, self.config.hidden_size,
                                    "hidden states from the previous pipeline stage")
        position_ids, mask = positions_and_mask(h, position_ids, attention_mask, cu_seqlens, past_key_values)
        ropes = {kind: rotary(position_ids) for kind, rotary in self.rotary.items()}
        for key, layer in self.layers.items():
            cache = None
            if past_key_values is not None:
                cache = past_key_values.layer(key, layer.self_attn.sliding_window)
            h = layer(h, ropes[layer.layer_type], mask, cache)
        if past_key_values is not None:
            past_key_values.seen += h.shape[1]
        normed = self.norm(h) if self.norm is not None else h
        return TrunkOutput(normed, h, mask, position_ids, ropes)

    def mtp_hidden_states(self, input_ids: torch.Tensor | None, trunk: TrunkOutput, cu_seqlens=None,
                          depth_embeds: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per-depth final hidden states of the MTP depths. They attend with the trunk's mask and its
        sliding-window rotary angles (positions are not shifted for RoPE, as in DeepSeek-V3 and Megatron).
        `depth_embeds` replace the embedding of the rolled ids (a last pipeline stage has no embedding)."""
        if cu_seqlens is None:
            cu_seqlens = cu_seqlens_from_documents(trunk.mask.documents)
        return self.mtp(input_ids, trunk.pre_norm, self.embed_tokens, trunk.position_ids, cu_seqlens, depth_embeds,
                        rope=trunk.ropes[SLIDING], mask=trunk.mask)

    def mtp_decode(self, depth: int, h_prev, token_ids, position_ids, attention_mask, cache: KVCache) -> torch.Tensor:
        """One MTP depth on the next slots with its own KV cache (self-speculative drafting)."""
        return mtp_decode_step(self.mtp, self.embed_tokens, self.rotary[SLIDING], self.config.sliding_window, depth,
                               h_prev, token_ids, position_ids, attention_mask, cache)


class MiMoV2FlashForCausalLM(PipelineStageHooks, nn.Module):
    model_type = MODEL_TYPE
    supports_mtp = True
    text_attr = "model"

    def __init__(self, config: PretrainedConfig, num_mtp_layers: int | None = None, backend: str = "sdpa",
                 experts_impl: str = "auto", mtp_loss_scaling_factor: float = 0.1, mtp_repeated_layer: bool = False):
        super().__init__()
        n_mtp = mtp_layers_in_config(config) if num_mtp_layers is None else num_mtp_layers
        self.config = config
        self.mtp_config = MTPConfig(num_layers=n_mtp, loss_scaling_factor=mtp_loss_scaling_factor,
                                    use_repeated_layer=mtp_repeated_layer)
        self.model = MiMoV2FlashModel(config, self.mtp_config, backend, experts_impl)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # --- forward ---------------------------------------------------------------------------

    def forward(self, input_ids=None, labels=None, position_ids=None, attention_mask=None, inputs_embeds=None,
                cu_seqlens=None, past_key_values: KVCache | None = None, use_cache: bool = False,
                return_logits: bool = True, return_mtp_logits: bool = False,
                mtp_depth_embeds: list[torch.Tensor] | None = None, **unused) -> CausalLMOutput:
        """Logits (B, S, V); with `labels` (unshifted, -100 ignored) the loss: the mean cross-entropy over
        target tokens plus, when MTP depths exist, loss_scaling_factor / D x the sum of the per-depth
        means (depth d's labels are the labels rolled left by d, masked at row and document ends).
        Cross-entropies run in chunks from the hidden states; with labels the (B, S, V) logits are made when
        first read (`CausalLMOutput`), and `return_logits=False` leaves them out. MTP depths run when labels are given or
        `return_mtp_logits` is set (never during cached generation); they embed the rolled `input_ids`, or
        read `mtp_depth_embeds` (`plait.mtp.rolled_token_embeddings`, sent on by pipeline stage 0)."""
        check_forward_kwargs(unused, type(self).__name__, text_only=True)
        refuse_attention_dropout(self.config, self.training)
        input_ids, inputs_embeds = self._stage_inputs(input_ids, inputs_embeds)
        check_labels(labels, input_ids, inputs_embeds, self.config.vocab_size)
        if use_cache and past_key_values is None:
            past_key_values = KVCache()
        trunk = self.model(input_ids, inputs_embeds, position_ids, attention_mask, cu_seqlens, past_key_values)
        if self.lm_head is None:  # a non-last pipeline stage
            out = CausalLMOutput(logits=None, hidden_states=trunk.hidden_states, past_key_values=past_key_values)
        else:
            out = lm_output(self, self.model, trunk, input_ids, cu_seqlens, labels, return_logits, return_mtp_logits,
                            past_key_values, use_cache, mtp_depth_embeds)
        return self._stage_result(out, labels, return_mtp_logits)

    # --- construction, weights, checkpoints -------------------------------------------------

    @classmethod
    def from_config(cls, config: PretrainedConfig, num_mtp_layers: int | None = None, **kwargs) -> MiMoV2FlashForCausalLM:
        model = cls(config, num_mtp_layers, **kwargs)
        model.init_weights()
        return model

    @torch.no_grad()
    def init_weights(self) -> None:
        """The reference's scheme (normal(0, initializer_range) weights and sinks, identity norms)."""
        init_reference_weights(self, self.config.initializer_range)

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head is not None and self.lm_head.weight is self.model.embed_tokens.weight

    @classmethod
    def from_pretrained(cls, path: str | Path, backend: str = "sdpa", experts_impl: str = "auto") -> MiMoV2FlashForCausalLM:
        path = check_model_dir(path)
        config = load_hf_config(path)
        if config.model_type != MODEL_TYPE:
            raise ValueError(f"{path}: config model_type is {config.model_type!r}, expected {MODEL_TYPE!r}")
        # the MTP depth count is not in the config: it is the checkpoint's model.mtp.layers.N
        return load_checkpoint_into(lambda hf_state: cls(config, mtp_layers_in_checkpoint(hf_state, "model."), backend,
                                                         experts_impl),
                                    StateDictAdapter(config), path, config)

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None,
                        fp8_block_size: tuple[int, int] | None = None) -> None:
        """HF layout with the on-disk key names; transformers loads it (and ignores `model.mtp.*`).
        `fp8_block_size` (the release's is (128, 128)): the linear weights block-quantized to float8 (plait.fp8)."""
        save_checkpoint(self, StateDictAdapter(self.config), path, "MiMoV2FlashForCausalLM", state_dict,
                        fp8_block_size)

    @property
    def mtp_backbone(self) -> MiMoV2FlashModel:
        """The module whose `mtp_decode` drafts tokens (plait.speculative)."""
        return self.model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


ModelClass = MiMoV2FlashForCausalLM  # the top-level class a loader builds for this file


# ---------------------------------------------------------------------------------------------
# Config checks and the checkpoint adapter
# ---------------------------------------------------------------------------------------------


def _check_config(config: PretrainedConfig) -> None:
    check_layer_lists(config)
    missing = {t for t in config.layer_types} - set(config.rope_parameters or {})
    if missing:
        raise ValueError(f"config.rope_parameters: no entry for layer type(s) {sorted(missing)}")


_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def mtp_layers_in_config(config: PretrainedConfig) -> int:
    return int(getattr(config, "num_nextn_predict_layers", 0) or getattr(config, "num_mtp_layers", 0) or 0)


class StateDictAdapter:
    """plait names <-> on-disk HF names.

    plait (as transformers in memory)                     on disk (hub and transformers' save)
    model.layers.{i}.mlp.experts.gate_up_proj [E,2I,H]    model.layers.{i}.mlp.experts.{e}.{gate,up}_proj.weight [I,H]
    model.layers.{i}.mlp.experts.down_proj [E,H,I]        model.layers.{i}.mlp.experts.{e}.down_proj.weight [H,I]
    *.self_attn.sinks [heads]                             *.self_attn.attention_sink_bias
    everything else, model.mtp.* included                 the same name
    """

    def __init__(self, config: PretrainedConfig):
        self.num_experts = config.n_routed_experts

    def to_hf(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in state.items():
            if name.endswith(".mlp.experts.gate_up_proj"):
                prefix = name[: -len("gate_up_proj")]
                gate, up = t.chunk(2, dim=1)
                for e in range(t.shape[0]):
                    out[f"{prefix}{e}.gate_proj.weight"] = gate[e]
                    out[f"{prefix}{e}.up_proj.weight"] = up[e]
            elif name.endswith(".mlp.experts.down_proj"):
                prefix = name[: -len("down_proj")]
                for e in range(t.shape[0]):
                    out[f"{prefix}{e}.down_proj.weight"] = t[e]
            elif name.endswith(".self_attn.sinks"):
                out[name[: -len("sinks")] + "attention_sink_bias"] = t
            else:
                out[name] = t
        return out

    def from_hf(self, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out, experts = {}, {}
        for name, t in hf_state.items():
            if m := _EXPERT_KEY.match(name):
                experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = t
            elif name.endswith(".self_attn.attention_sink_bias"):
                out[name[: -len("attention_sink_bias")] + "sinks"] = t
            else:
                out[name] = t
        for prefix, parts in experts.items():
            missing = [f"{prefix}.{e}.{p}.weight" for e in range(self.num_experts)
                       for p in ("gate_proj", "up_proj", "down_proj") if (e, p) not in parts]
            extra = [f"{prefix}.{e}.{p}.weight" for e, p in parts if e >= self.num_experts]
            if missing or extra:
                raise ValueError(f"checkpoint experts under {prefix}: missing {missing[:4]}, unexpected {extra[:4]} "
                                 f"(config n_routed_experts = {self.num_experts})")
            gate = torch.stack([parts[(e, "gate_proj")] for e in range(self.num_experts)])
            up = torch.stack([parts[(e, "up_proj")] for e in range(self.num_experts)])
            out[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=1)
            out[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(self.num_experts)])
        return out
