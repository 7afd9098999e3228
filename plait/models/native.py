"""What every native plait model shares: its output type, the reference init scheme, and loading and
saving Hugging Face checkpoints through the model's state-dict adapter (on-disk names <-> plait's).

A model file keeps what is its own (the architecture and the key-name mapping); this file keeps the
plumbing, so a new native model is a model file plus an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

import re

from plait.checkpoint import read_model_weights, write_model_weights
from plait.fp8 import dequantize_checkpoint, quantize_checkpoint, take_quantization_config
from plait.mtp import MTPConfig, mtp_labels
from plait.nn.loss import IGNORE_INDEX, causal_lm_chunked_loss_sum, shift_labels
from plait.nn.attention import Attention, AttentionMask, KVCache, document_starts
from plait.nn.moe import MoE, Router, collect_aux_loss
from plait.nn.norm import RMSNorm


@dataclass
class CausalLMOutput:
    """A native model's output. After a forward with labels, `logits` and `mtp_per_depth_logits` are made when
    first read, from the final hidden states the loss keeps anyway: a training step that reads only the loss
    never holds the (B, S, V) logits. Read them before the optimizer step: once the LM head (or the hidden
    states) changed in place they would no longer be this forward's, and reading them is a `ValueError`."""

    logits: torch.Tensor | None = field(default=None, repr=False)
    loss: torch.Tensor | None = None
    mtp_per_depth_logits: list[torch.Tensor] | None = field(default=None, repr=False)
    past_key_values: KVCache | None = None
    hidden_states: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None  # the main cross-entropy alone
    mtp_losses: list[torch.Tensor] | None = None  # per-depth cross-entropy (unscaled means)
    pre_norm_hidden_states: torch.Tensor | None = None  # the last layer's output: what MTP depth 1 reads

    @property
    def mtp_logits(self) -> list[torch.Tensor] | None:
        return self.mtp_per_depth_logits


class Deferred:
    """A value made by `make()` when first read, under the grad mode of the forward that deferred it; refused
    once a tensor it is made from changed in place since."""

    def __init__(self, make: Callable[[], object], inputs: tuple[torch.Tensor, ...]):
        self.make, self.grad_enabled = make, torch.is_grad_enabled()
        self.versions = [(t, t._version) for t in inputs]

    def resolve(self, name: str):
        if any(t._version != version for t, version in self.versions):
            raise ValueError(f"output.{name}: the LM head or the hidden states changed in place after the forward "
                             f"(an optimizer step); read {name} before the step, or run the forward again")
        with torch.set_grad_enabled(self.grad_enabled):
            return self.make()


def _made_when_read(name: str) -> property:
    def get(self):
        value = self.__dict__.get(name)
        if isinstance(value, Deferred):
            value = self.__dict__[name] = value.resolve(name)
        return value

    def set(self, value):
        self.__dict__[name] = value

    return property(get, set)


# after the dataclass is made, so that its __init__ (defaults None) assigns through these
CausalLMOutput.logits = _made_when_read("logits")
CausalLMOutput.mtp_per_depth_logits = _made_when_read("mtp_per_depth_logits")


# transformers-style callers pass these; they change nothing in a native model's forward
_IGNORED_FORWARD_KWARGS = {"output_attentions", "output_hidden_states", "return_dict"}
_VISION_KWARGS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def check_forward_kwargs(kwargs: dict, model_name: str, text_only: bool) -> None:
    """Extra forward keywords: harmless transformers flags pass; pixels given to a text-only model, and
    anything unknown, are a `ValueError`."""
    if text_only:
        for key in ("pixel_values", "pixel_values_videos"):
            if kwargs.get(key) is not None:
                raise ValueError(f"{model_name} is text-only: got {key}")
    allowed = _IGNORED_FORWARD_KWARGS | (set(_VISION_KWARGS) if text_only else set())
    unknown = set(kwargs) - allowed
    if unknown:
        raise ValueError(f"{model_name}.forward: unexpected argument(s) {sorted(unknown)}")


def check_labels(labels, input_ids, inputs_embeds, vocab_size: int) -> None:
    """Labels, before anything runs (a KV cache would take the tokens, the MoE counters would move): an integer
    tensor shaped like the tokens (B, S), each entry -100 or a token id of the vocabulary."""
    if labels is None:
        return
    tokens = input_ids if input_ids is not None else inputs_embeds
    shape = list(tokens.shape[:2]) if isinstance(tokens, torch.Tensor) else None
    if (not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex
            or labels.dtype == torch.bool or (shape is not None and list(labels.shape) != shape)):
        got = f"{labels.dtype} of shape {list(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels: expected an integer tensor of shape {shape} (the tokens'), got {got}")
    bad = (labels != -100) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        raise ValueError(f"labels: expected -100 or token ids in [0, {vocab_size}), got {labels[bad][:8].tolist()}")


def refuse_attention_dropout(config, training: bool) -> None:
    """plait's attention kernels run without dropout: a config that asks for it is refused in training rather than
    trained without it silently (inference never drops)."""
    p = getattr(config, "attention_dropout", 0.0) or 0.0
    if training and p > 0:
        raise ValueError(f"attention_dropout: not supported yet in training (plait's attention has no dropout); "
                         f"expected 0, got {p}")


def embed_token_ids(embed: nn.Embedding, input_ids) -> torch.Tensor:
    """embed(input_ids), once the ids are known to be a (batch, sequence) integer tensor within the vocabulary
    (the embedding itself would fail deep inside torch, or on a GPU with a device-side assert)."""
    if (not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype.is_floating_point
            or input_ids.dtype.is_complex or input_ids.dtype == torch.bool):
        got = (f"{input_ids.dtype} of shape {list(input_ids.shape)}" if isinstance(input_ids, torch.Tensor)
               else type(input_ids).__name__)
        raise ValueError(f"input_ids: expected a (batch, sequence) tensor of integer token ids, got {got}")
    if input_ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(input_ids))
        if lo < 0 or hi >= embed.num_embeddings:
            raise ValueError(f"input_ids: expected token ids in [0, {embed.num_embeddings}), got ids from {lo} to {hi}")
    return embed(input_ids)


def check_hidden_states(h, hidden_size: int, what: str = "inputs_embeds") -> torch.Tensor:
    """h itself, once it is a (batch, sequence, hidden_size) floating-point tensor: embeddings passed in, or a
    previous pipeline stage's hidden states (a norm or a projection would otherwise fail deep inside)."""
    if not isinstance(h, torch.Tensor) or h.ndim != 3 or h.shape[-1] != hidden_size or not h.is_floating_point():
        got = f"{h.dtype} of shape {list(h.shape)}" if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(f"{what}: expected a floating-point (batch, sequence, {hidden_size}) tensor, got {got}")
    return h


def positions_and_mask(h: torch.Tensor, position_ids, attention_mask, cu_seqlens,
                       past_key_values: KVCache | None) -> tuple[torch.Tensor, AttentionMask]:
    """(B, S) position ids (counting on from the cache when not given) and the forward's attention mask."""
    if h.ndim != 3:
        raise ValueError(f"inputs: expected (batch, sequence) token ids or (batch, sequence, hidden) embeddings, "
                         f"got hidden states of shape {list(h.shape)}")
    B, S = h.shape[:2]
    if S == 0 and B:
        raise ValueError(f"inputs: expected at least one token per row, got shape {list(h.shape[:2])}")
    past = past_key_values.seen if past_key_values is not None else 0
    derived = position_ids is None
    if derived:
        position_ids = torch.arange(past, past + S, device=h.device)
    elif position_ids.shape[-1] != S:
        raise ValueError(f"position_ids: expected {S} positions per row, got shape {list(position_ids.shape)}")
    elif (position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool or position_ids.ndim > 2
          or (position_ids.ndim == 2 and position_ids.shape[0] not in (1, B))):
        raise ValueError(f"position_ids: expected integer positions of shape ({B}, {S}) or ({S},), got "
                         f"{position_ids.dtype} of shape {list(position_ids.shape)}")
    if not derived and bool((position_ids < 0).any()):
        raise ValueError(f"position_ids: expected positions >= 0, got a minimum of {int(position_ids.min())}")
    position_ids = position_ids.expand(B, S)
    mask = AttentionMask.build(B, S, h.device, position_ids=None if derived else position_ids,
                               padding_mask=attention_mask, cu_seqlens=cu_seqlens, past_length=past)
    if derived and (mask.documents is not None or (attention_mask is not None and not bool(attention_mask.all()))):
        position_ids = positions_in_documents(attention_mask, mask.documents, S)
    return position_ids, mask


def positions_in_documents(attention_mask: torch.Tensor | None, documents: torch.Tensor | None,
                           seq_len: int) -> torch.Tensor:
    """Position ids when none are given: each slot's distance from the first real token of its document (0 on
    the padding before it). A left-padded row's document starts at 0, as `generate` places it and as it would
    stand alone; each packed document starts at 0; padding inside a document (a mask with holes) keeps its slots,
    as transformers counts them (RoPE sees only distances, so such a row matches transformers' arange).
    attention_mask (B, past + S), documents (B, S) or None -> (B, S)."""
    real = (attention_mask if attention_mask is not None else torch.ones_like(documents, dtype=torch.long)).bool()
    B, K = real.shape
    slots = torch.arange(K, device=real.device).expand(B, K)
    if documents is not None:  # documents come without a cache: real is (B, S) then
        starts = document_starts(documents)
    else:
        starts = torch.zeros_like(real)
        starts[:, 0] = True
    segment = starts.long().cumsum(dim=1) - 1 + torch.arange(B, device=real.device)[:, None] * K  # (row, document)
    first_real = torch.full((B * K,), K, device=real.device).scatter_reduce(
        0, segment.reshape(-1), torch.where(real, slots, K).reshape(-1), "amin")
    return (slots - first_real[segment]).clamp(min=0)[:, -seq_len:]


def mtp_decode_step(mtp: nn.Module, embed_tokens: nn.Module, rotary: nn.Module, window: int | None, depth: int,
                    h_prev: torch.Tensor, token_ids: torch.Tensor, position_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
    """MTP depth `depth` (0-based) on the next stream slots, reusing and extending that depth's own cache.

    At slot t, `h_prev` is the previous depth's state (the trunk's last-layer output for depth 0) and
    `token_ids` the token depth `depth` reads there, x[t + depth + 1]. RoPE uses the slots' own position
    ids, as in training; `attention_mask` covers the cached slots and the new ones."""
    position_ids, mask = positions_and_mask(h_prev, position_ids, attention_mask, None, cache)
    caches = [cache.layer(str(j), window) for j in range(mtp.pattern_length)]
    h = mtp.depth_forward(depth, embed_tokens(token_ids), h_prev, caches, rope=rotary(position_ids), mask=mask,
                          position_ids=position_ids)
    cache.seen += h.shape[1]
    return h


@dataclass
class TrunkOutput:
    """What a text backbone's forward leaves for the MTP depths."""

    hidden_states: torch.Tensor  # after the final norm (when this stage has it)
    pre_norm: torch.Tensor  # the last layer's output: what the first MTP depth reads
    mask: AttentionMask
    position_ids: torch.Tensor
    ropes: dict[str, tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def init_reference_weights(root: nn.Module, std: float) -> None:
    """The transformers reference scheme: normal(0, std) for linear, embedding, router, expert and sink
    weights; zero biases and padding embedding; norms at their identity (RMSNorm weight 1, or 0 for the
    (1 + w) form; LayerNorm (1, 0)); zero correction biases and expert counts."""
    for module in root.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            module.reset_parameters()
        elif isinstance(module, Router):
            nn.init.normal_(module.weight, std=std)
            if module.e_score_correction_bias is not None:
                module.e_score_correction_bias.zero_()
        elif isinstance(module, MoE):
            nn.init.normal_(module.experts.gate_up_proj, std=std)
            nn.init.normal_(module.experts.down_proj, std=std)
            module.tokens_per_expert.zero_()
        elif isinstance(module, Attention) and module.sinks is not None:
            nn.init.normal_(module.sinks, std=std)


@torch.no_grad()
def add_fresh_mtp_depths(model: nn.Module, mtp_config: MTPConfig) -> None:
    """Give a native model without MTP depths `mtp_config.num_layers` new ones, initialised like the
    reference initialises a model, on the device and in the dtype of its embeddings (for training them
    on a checkpoint that has none)."""
    backbone = model.mtp_backbone
    if model.mtp_config.enabled:
        raise ValueError(f"{type(model).__name__} already has {model.mtp_config.num_layers} MTP depths")
    if not mtp_config.enabled:
        raise ValueError(f"MTP depths to add: expected num_layers >= 1, got {mtp_config.num_layers}")
    backbone.build_mtp(mtp_config)
    init_reference_weights(backbone.mtp, backbone.config.initializer_range)
    reference = model.get_input_embeddings().weight
    backbone.mtp.to(device=reference.device, dtype=reference.dtype)
    model.mtp_config = mtp_config


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Every weight the model needs, of the right shape, and nothing else; `ValueError` naming them.
    A tied `lm_head.weight` is neither required nor accepted."""
    expected = model.state_dict()
    if getattr(model, "tied_embeddings", False):
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    both = sorted(set(expected) & set(state))
    wrong = [f"{k} (expected {list(expected[k].shape)}, got {list(state[k].shape)})"
             for k in both if expected[k].shape != state[k].shape]
    # floating weights load in whatever float dtype the checkpoint has (bf16 stays bf16); a float weight
    # stored as integers or bool, or the other way round, is a broken checkpoint
    wrong_dtype = [f"{k} (expected {expected[k].dtype}, got {state[k].dtype})" for k in both
                   if expected[k].dtype.is_floating_point != state[k].dtype.is_floating_point
                   or (not expected[k].dtype.is_floating_point and expected[k].dtype != state[k].dtype)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {missing[:5]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {unexpected[:5]}")
    if wrong:
        problems.append(f"wrong shape {len(wrong)}: {wrong[:5]}")
    if wrong_dtype:
        problems.append(f"wrong dtype {len(wrong_dtype)}: {wrong_dtype[:5]}")
    if problems:
        raise ValueError(f"{source}: checkpoint does not fit the model: " + "; ".join(problems))


def load_checkpoint_into(build: Callable[[dict], nn.Module], adapter, path: Path, config: PretrainedConfig) -> nn.Module:
    """Build the model (from the checkpoint's tensors, which may decide its shape: MTP depths) on the meta
    device (no init cost), map the checkpoint's on-disk names through
    `adapter.from_hf`, check every name and shape, then load by assignment. FP8 block-quantized weights (the
    releases' format, `config.quantization_config`) are dequantized first, and the quantization config leaves
    `config` (`plait.fp8`). Tied embeddings are re-tied; rotary buffers are recomputed on the move to CPU; expert
    counts start at zero."""
    quantization = take_quantization_config(config)
    hf_state = dequantize_checkpoint(read_model_weights(path), quantization, str(path))
    with torch.device("meta"):
        model = build(hf_state)
    state = adapter.from_hf(hf_state)
    check_state_dict(model, state, str(path))
    embed_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings()) + ".weight"
    tied = model.tied_embeddings  # loading by assignment unties; tie again after
    if tied:
        state["lm_head.weight"] = state[embed_name]
    model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    for module in model.modules():
        if isinstance(module, MoE):
            module.tokens_per_expert = torch.zeros_like(module.tokens_per_expert)
    return model


def save_checkpoint(model: nn.Module, adapter, path: str | Path, architecture: str,
                    state_dict: dict | None = None, fp8_block_size: tuple[int, int] | None = None) -> None:
    """config.json + safetensors under the on-disk names (`adapter.to_hf`); a tied LM head is not written.
    `state_dict`: the model's full state where the model itself holds only shards (FSDP), else its own.
    `fp8_block_size`: write the large linear weights block-quantized to float8 (`plait.fp8.quantize_checkpoint`;
    `adapter.fp8_unquantized` names on-disk prefixes that stay as they are)."""
    path = Path(path)
    state = dict(model.state_dict() if state_dict is None else state_dict)
    if model.tied_embeddings:
        state.pop("lm_head.weight", None)
    hf_state, quantization = adapter.to_hf(state), None
    if fp8_block_size is not None:  # before anything is written: a block that does not fit is a clean error
        hf_state, quantization = quantize_checkpoint(hf_state, tuple(fp8_block_size),
                                                     getattr(adapter, "fp8_unquantized", ()))
    path.mkdir(parents=True, exist_ok=True)
    config: PretrainedConfig = model.config
    config.architectures = [architecture]
    if quantization is None:
        config.save_pretrained(path)
    else:  # the model itself stays unquantized: its config carries the quantization only in the file
        config.quantization_config = quantization
        try:
            config.save_pretrained(path)
        finally:
            del config.quantization_config
    write_model_weights(path, hf_state)


# sizes a native model's config must give as positive integers, where it has them
POSITIVE_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "v_head_dim", "intermediate_size", "moe_intermediate_size", "dense_intermediate_size",
                  "n_routed_experts", "num_local_experts", "num_experts_per_tok", "n_group", "topk_group",
                  "swa_num_attention_heads", "swa_num_key_value_heads", "swa_head_dim", "swa_v_head_dim",
                  "index_n_heads", "index_head_dim", "index_block_size", "index_topk_blocks")


def check_positive_sizes(config: PretrainedConfig, prefix: str = "config", names=POSITIVE_SIZES) -> None:
    """Each of `names` the config has (and does not leave None) is a positive integer."""
    for key in names:
        value = getattr(config, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{prefix}.{key}: expected a positive integer, got {value!r}")


def check_layer_lists(config: PretrainedConfig, prefix: str = "config") -> None:
    """Sizes are positive integers; `layer_types` and `mlp_layer_types` have one entry per layer; the heads
    divide evenly."""
    check_positive_sizes(config, prefix)
    n = config.num_hidden_layers
    for key in ("layer_types", "mlp_layer_types"):
        value = getattr(config, key, None)
        if value is None or len(value) != n:
            raise ValueError(f"{prefix}.{key}: expected {n} entries (num_hidden_layers), got {value!r}")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(f"{prefix}: num_attention_heads {config.num_attention_heads} is not a multiple of "
                         f"num_key_value_heads {config.num_key_value_heads}")


def mean_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over target tokens, from hidden states and the LM head weight (chunked; it checks
    the labels' shape)."""
    loss_sum = causal_lm_chunked_loss_sum(hidden, weight, labels)
    return loss_sum / (shift_labels(labels) != IGNORE_INDEX).sum().clamp(min=1)


def lm_output(model: nn.Module, backbone: nn.Module, trunk: TrunkOutput, input_ids, cu_seqlens, labels,
              return_logits: bool, return_mtp_logits: bool, past_key_values: KVCache | None, use_cache: bool,
              mtp_depth_embeds=None, output_cls: type[CausalLMOutput] = CausalLMOutput) -> CausalLMOutput:
    """What a native LM makes of its trunk's output: the head's logits and, with `labels`, the loss = main CE
    (+ loss_scaling_factor / D x the sum of the per-depth CEs, depth d's labels rolled left by d and masked at
    row and document ends; per-depth values in out.mtp_losses) (+ the MoE aux loss left on the layers). MTP
    depths run when labels are given or `return_mtp_logits` is set, never with a cache; they embed the rolled
    `input_ids` or read `mtp_depth_embeds`. With labels, the logits asked for are made when first read
    (`CausalLMOutput`)."""
    h = trunk.hidden_states
    run_mtp = (backbone.mtp is not None and (input_ids is not None or mtp_depth_embeds is not None)
               and past_key_values is None and (labels is not None or return_mtp_logits))
    mtp_hidden = backbone.mtp_hidden_states(input_ids, trunk, cu_seqlens, mtp_depth_embeds) if run_mtp else None
    out = output_cls(logits=None, hidden_states=h, past_key_values=past_key_values if use_cache else None,
                     pre_norm_hidden_states=trunk.pre_norm)
    want_mtp_logits = mtp_hidden is not None and (return_logits or return_mtp_logits)
    if labels is None:
        out.logits = model.lm_head(h)
        if want_mtp_logits:
            out.mtp_per_depth_logits = [model.lm_head(x) for x in mtp_hidden]
        return out
    weight = model.lm_head.weight
    out.lm_loss = out.loss = mean_ce(h, weight, labels)
    if return_logits:
        out.logits = Deferred(lambda: model.lm_head(h), (weight, h))
    if mtp_hidden is not None:
        documents = trunk.mask.documents
        out.mtp_losses = [mean_ce(x, weight, mtp_labels(labels, d, documents)) for d, x in enumerate(mtp_hidden, 1)]
        if want_mtp_logits:
            out.mtp_per_depth_logits = Deferred(lambda: [model.lm_head(x) for x in mtp_hidden], (weight, *mtp_hidden))
        scale = model.mtp_config.loss_scaling_factor / len(mtp_hidden)
        out.loss = out.lm_loss + scale * torch.stack(out.mtp_losses).sum()
    aux = collect_aux_loss(model)
    if aux is not None:
        out.loss = out.loss + aux
    return out


def mtp_layers_in_checkpoint(hf_state: dict, prefix: str) -> int:
    """How many MTP depths a checkpoint holds: its `{prefix}mtp.layers.N` keys (configs do not say)."""
    pattern = re.compile(rf"^{re.escape(prefix)}mtp\.layers\.(\d+)\.")
    depths = {int(m.group(1)) for k in hf_state if (m := pattern.match(k))}
    if depths and depths != set(range(len(depths))):
        raise ValueError(f"checkpoint MTP layers: expected {prefix}mtp.layers.0..{len(depths) - 1}, got {sorted(depths)}")
    return len(depths)


# ---------------------------------------------------------------------------------------------
# The pipeline-stage protocol (what a schedule that runs a model's own forward per stage asks of it)
# ---------------------------------------------------------------------------------------------

MULTIMODAL_MODULES = ("vision_tower", "multi_modal_projector")


def text_config_of(config: PretrainedConfig) -> PretrainedConfig:
    """A vision-language config's text config; a text model's config itself."""
    return getattr(config, "text_config", None) or config


class PipelineStageHooks:
    """A native causal LM / VLM as a pipeline stage of its own: pruned in place (decoder layers deleted from the
    ModuleDict, `embed_tokens`, `norm`, `lm_head`, the vision side set to None), its forward takes token ids on
    the first stage and the previous stage's hidden states (in the `input_ids` slot, or as `inputs_embeds`)
    later, and returns a plain tensor: hidden states, or the logits on the stage with the head. The same names
    and conventions as NeMo AutoModel's native models, so a schedule written for those runs plait's too.
    plait's own pipeline (`plait.parallel.pipeline`) wraps the stages from outside and uses the same forward.

    A class sets `text_attr` (the attribute of its text model) and has `config`, `lm_head`."""

    _pp_keep_self_forward = True  # the forward is stage-aware: a schedule need not replace it
    text_attr = "model"

    def _text_model(self) -> nn.Module:
        return getattr(self, self.text_attr)

    def _text_config(self) -> PretrainedConfig:
        return text_config_of(self.config)

    def _is_pipeline_parallel_stage(self) -> bool:
        """Whether this is a pruned stage: no head, no embedding, or fewer decoder layers than the config."""
        text = self._text_model()
        return (self.lm_head is None or text.embed_tokens is None
                or len(text.layers) != self._text_config().num_hidden_layers)

    def get_pipeline_stage_metas(self, *, is_first: bool, microbatch_size: int, seq_len: int,
                                 dtype: torch.dtype) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Meta tensors of this stage's input and output, for a schedule's shape inference: the first stage
        takes (mb, S) int64 token ids, the others (mb, S, H) hidden states in `dtype`; the stage with the LM head
        gives (mb, S, V) logits in the head's dtype, the others hidden states."""
        for name, value in (("microbatch_size", microbatch_size), ("seq_len", seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"get_pipeline_stage_metas: {name} must be a positive integer, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"get_pipeline_stage_metas: dtype must be a floating torch.dtype, got {dtype!r}")
        cfg = self._text_config()
        hidden = torch.empty(microbatch_size, seq_len, cfg.hidden_size, device="meta", dtype=dtype)
        inputs = (torch.empty(microbatch_size, seq_len, device="meta", dtype=torch.long) if is_first else hidden,)
        if self.lm_head is None:
            return inputs, (hidden,)
        return inputs, (torch.empty(microbatch_size, seq_len, cfg.vocab_size, device="meta",
                                    dtype=self.lm_head.weight.dtype),)

    def customize_pipeline_stage_modules(self, module_names_per_stage: list[list[str]], *, layers_prefix: str,
                                         text_model: nn.Module | None = None) -> list[list[str]]:
        """A splitter's generic module names per stage -> this model's own paths. The generic names put the text
        stack under `layers_prefix` (say "model.language_model.") and the vision side under "model."; here the
        text model is `text_attr` and the vision modules are top-level. Every stage also keeps the text model's
        rotary embedding (no weights; each stage's layers need its angles), and the last stage the MTP depths.
        A name that matches no submodule is a ValueError."""
        del text_model  # this model knows its own text model
        prefix = f"{self.text_attr}."
        stages = []
        for names in module_names_per_stage:
            stage = []
            for name in names:
                if layers_prefix != prefix and name.startswith(layers_prefix):
                    name = prefix + name[len(layers_prefix):]
                elif name.startswith("model.") and name[len("model."):] in MULTIMODAL_MODULES:
                    name = name[len("model."):]
                stage.append(name)
            if prefix + "rotary" not in stage:
                stage.append(prefix + "rotary")
            stages.append(stage)
        if stages and getattr(self._text_model(), "mtp", None) is not None and prefix + "mtp" not in stages[-1]:
            stages[-1].append(prefix + "mtp")
        for name in (n for stage in stages for n in stage):
            try:
                self.get_submodule(name)
            except AttributeError:
                raise ValueError(f"pipeline stage modules: {name!r} is not a module of {type(self).__name__} "
                                 f"(text model at {self.text_attr!r})") from None
        return stages

    def _stage_inputs(self, input_ids, inputs_embeds):
        """On a stage without the embedding, the hidden states handed on by the previous stage may arrive in
        the `input_ids` slot (a float tensor); token ids are an error there."""
        if input_ids is None or self._text_model().embed_tokens is not None:
            return input_ids, inputs_embeds
        if not (torch.is_tensor(input_ids) and input_ids.is_floating_point()):
            raise ValueError(f"{type(self).__name__}: this pipeline stage has no embedding; pass the previous "
                             f"stage's hidden states (B, S, H), not token ids")
        if inputs_embeds is not None:
            raise ValueError(f"{type(self).__name__}: hidden states came as input_ids and as inputs_embeds")
        return None, input_ids

    def _stage_result(self, out: CausalLMOutput, labels, return_mtp_logits: bool):
        """A pruned stage answers with a plain tensor (unless a loss or MTP logits were asked for)."""
        if not self._is_pipeline_parallel_stage() or labels is not None or return_mtp_logits:
            return out
        return out.hidden_states if self.lm_head is None else out.logits
