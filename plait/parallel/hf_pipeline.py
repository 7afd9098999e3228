"""Unmodified transformers models as pipeline stages.

A stage is a deep copy of the stock model pruned the way plait prunes its own (see `pipeline.py`): the
decoder layers become a ModuleDict keyed by `str(original index)` (checkpoint keys do not move), the
embedding (and the vision tower and projector of a VLM) stay on the first stage only, the final norm and
the LM head on the last only. transformers' own forwards expect the whole module tree and return
`ModelOutput`s, so `patch_hf_model_for_pp` replaces them with stage-aware forwards that return a tensor:
hidden states on every stage but the last, logits there. Between stages hidden states travel positionally,
in the `input_ids` slot.

    validate_hf_model_for_pipeline_support(model)     # ValueError before any process-group work
    build_hf_pipeline(model, rank=..., ranks=..., schedule=..., microbatches=..., loss_fn=..., device=...)

Vision-language models get their images on stage 0 only: `PipelineRun.step(ids, labels, vision=...)` cuts
`pixel_values` into per-microbatch chunks (`_vlm_pixel_values_chunks`) from the number of images in each
row, and stage 0 receives, beside the token ids, the index of the microbatch it is running, so each
microbatch gets exactly its own images whatever the schedule's order and whichever microbatches have none.
"""

from __future__ import annotations

import copy
import inspect
import types
from collections.abc import Callable, MutableMapping

import torch
from torch import nn

from plait.models.native import text_config_of
from plait.parallel.pipeline import (  # noqa: F401 (part of this API)
    ImageFeedingStage,
    StageParts,
    _vlm_pixel_values_chunks,
)

TEXT_MODULE_ATTRS = ("language_model", "text_model", "text_decoder")
# children of a VLM's inner model that only the first stage runs
MULTIMODAL_SUFFIXES = ("vision_tower", "visual", "vision_model", "image_encoder", "vision_encoder", "embed_vision",
                       "audio_tower", "audio_encoder", "audio_model", "embed_audio", "mm_projector",
                       "multi_modal_projector", "multimodal_projector", "vision_projector", "audio_projector")
# VLMs whose images are routed by a forward written for them here; other VLMs must opt out of patching
_PP_VLM_MODEL_TYPES_WITH_DEDICATED_FORWARD: tuple[str, ...] = ("gemma4", "mistral3")
# text-side modules that only the first stage runs (Gemma4's per-layer input embeddings beside embed_tokens)
_FIRST_STAGE_TEXT_MODULES = ("embed_tokens", "embed_tokens_per_layer", "per_layer_model_projection",
                             "per_layer_projection_norm")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------
# what a model is


def get_text_module(model: nn.Module) -> nn.Module:
    """The nested language model of a VLM (`model.language_model`, ...), or `model` itself."""
    for name in TEXT_MODULE_ATTRS:
        nested = getattr(model, name, None)
        if isinstance(nested, nn.Module):
            return nested
    return model


def _model_types(model: nn.Module) -> tuple[str | None, str | None]:
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None)
    return getattr(config, "model_type", None), getattr(text_config, "model_type", None)


def _is_vlm(model: nn.Module) -> bool:
    """A nested text config, or a vision tower on the model or its inner model."""
    if getattr(getattr(model, "config", None), "text_config", None) is not None:
        return True
    inner = getattr(model, "model", None)
    return any(hasattr(m, name) for m in (model, inner) if m is not None for name in ("vision_tower", "visual"))


def _is_gemma4_vlm(model: nn.Module) -> bool:
    """Gemma4 by its HF model_type: other VLMs share the `model.model.language_model` shape and must not get
    Gemma4's masks, rotary and softcapping."""
    return _model_types(model)[0] == "gemma4"


def _is_mistral3_vlm(model: nn.Module) -> bool:
    return _model_types(model)[0] == "mistral3"


def _is_gemma4_text(model: nn.Module) -> bool:
    return _model_types(model)[0] == "gemma4_text"


def model_keeps_self_forward(model: nn.Module) -> bool:
    """A model class may declare `_pp_keep_self_forward = True` when its own forward is already stage-aware;
    then it is not patched."""
    return bool(getattr(type(model), "_pp_keep_self_forward", False))


def _decoder_of(model: nn.Module) -> nn.Module:
    """The module holding embed_tokens / layers / norm / rotary_emb: `model.model` for a causal LM,
    `model.model.language_model` for a VLM, the model itself for a bare backbone."""
    inner = getattr(model, "model", None)
    decoder = get_text_module(inner if isinstance(inner, nn.Module) else model)
    if not isinstance(getattr(decoder, "layers", None), (nn.ModuleList, nn.ModuleDict)):
        raise ValueError(f"{type(model).__name__}: expected decoder layers at model.layers, model.model.layers or "
                         f"model.model.language_model.layers, found none")
    return decoder


# ----------------------------------------------------------------------------------------------------------
# checks and buffers


def validate_hf_model_for_pipeline_support(model: nn.Module) -> None:
    """A `ValueError` listing what keeps `model` from being split into stages; `use_cache` is switched off
    (a training pipeline keeps no KV cache) rather than refused."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__}: expected a transformers model with a config, got none")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} cannot be pipelined: model_type {config.model_type!r} is an "
                         "encoder-decoder model; expected a decoder-only one")
    issues = []
    embed = getattr(_decoder_of(model), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    if embed is not None and head is not None and head.weight is embed.weight:
        issues.append("tie_word_embeddings=True: the first and last stages would each hold the shared matrix; "
                      "expected untied input and output embeddings (tie_word_embeddings=false)")
    if _is_vlm(model) and not model_keeps_self_forward(model):
        outer, inner = _model_types(model)
        if outer not in _PP_VLM_MODEL_TYPES_WITH_DEDICATED_FORWARD:
            issues.append(f"vision-language model_type {outer!r} (text {inner!r}) has no pipeline forward that routes "
                          f"its images; expected one of {list(_PP_VLM_MODEL_TYPES_WITH_DEDICATED_FORWARD)}, or a "
                          f"class declaring _pp_keep_self_forward = True")
    if issues:
        raise ValueError(f"{type(model).__name__} cannot be pipelined:\n  " + "\n  ".join(issues))
    for cfg in {id(c): c for c in (config, text_config_of(model.config))}.values():
        if getattr(cfg, "use_cache", False):
            cfg.use_cache = False


def init_hf_model_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Recompute the non-persistent buffers (rotary `inv_freq`, embedding scales, ...) that a checkpoint does
    not carry, after the model was built on the meta device and materialised with `to_empty`.

    Each module owning such buffers is rebuilt from its own config on the CPU and its buffers copied over:
    whatever formula transformers uses (per-layer-type rotary, YaRN, ...) is the one applied."""
    device = torch.device(device)
    for name, module in model.named_modules():
        buffers = [b for b in module._buffers if b in module._non_persistent_buffers_set]
        if not buffers:
            continue
        with torch.device("cpu"):
            if hasattr(module, "scalar_embed_scale"):  # scaled word embeddings: the scale is the only buffer
                fresh = {"embed_scale": torch.tensor(module.scalar_embed_scale)}
            elif getattr(module, "config", None) is not None:
                try:
                    fresh = dict(type(module)(module.config).named_buffers(recurse=False))
                except TypeError as e:
                    raise ValueError(f"init_hf_model_buffers: {name} ({type(module).__name__}) has non-persistent "
                                     f"buffers {buffers} and cannot be rebuilt from its config alone: {e}") from None
            else:
                raise ValueError(f"init_hf_model_buffers: {name or 'model'} ({type(module).__name__}) has "
                                 f"non-persistent buffers {buffers} and no config to rebuild them from")
        for b in buffers:
            old = module._buffers[b]
            module._buffers[b] = fresh[b].to(device=device, dtype=fresh[b].dtype if old is None else old.dtype)


# ----------------------------------------------------------------------------------------------------------
# masks and embeddings shared by the forwards


def _layer_types(config) -> list[str] | None:
    return getattr(config, "layer_types", None)


def _build_masks(module: nn.Module, inputs_embeds: torch.Tensor, attention_mask, position_ids) -> dict:
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = module.config
    kwargs = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, past_key_values=None,
                  position_ids=position_ids)
    types_ = _layer_types(config)
    if types_ is None:
        # one mask for every layer; Mistral-style configs without layer types slide all layers when a window is set
        sliding = getattr(config, "sliding_window", None) is not None
        return {"full_attention": (create_sliding_window_causal_mask if sliding else create_causal_mask)(**kwargs)}
    builders = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    unknown = set(types_) - builders.keys()
    if unknown:
        raise ValueError(f"{type(module).__name__}: layer types {sorted(unknown)} have no pipeline mask; expected "
                         f"{sorted(builders)}")
    return {t: builders[t](**kwargs) for t in set(types_)}


def _build_or_reuse_pp_causal_mask(module: nn.Module, inputs_embeds: torch.Tensor, attention_mask,
                                   position_ids) -> dict:
    """The stage's masks by layer type ({"full_attention": ..., "sliding_attention": ...}).

    Without an attention mask and without explicit position ids (which may mark packed documents) the
    masks depend only on (seq_len, dtype, device): built once per stage, kept on the module, and reused by
    every later microbatch and step. An explicit mask is rebuilt on each call. Same numbers either way."""
    if isinstance(attention_mask, dict):  # already a mapping by layer type
        return attention_mask
    if attention_mask is not None or position_ids is not None:
        return _build_masks(module, inputs_embeds, attention_mask, position_ids)
    key = (inputs_embeds.shape[1], inputs_embeds.dtype, inputs_embeds.device)
    cache = getattr(module, "_pp_causal_mask_cache", None)
    if not isinstance(cache, MutableMapping):
        cache = module._pp_causal_mask_cache = {}
    if key not in cache:
        cache[key] = _build_masks(module, inputs_embeds, None, None)
    return cache[key]


def _embed_or_hidden(module: nn.Module, input_ids, inputs_embeds, what: str) -> torch.Tensor:
    """Stage 0 embeds token ids; later stages receive the previous stage's hidden states in `input_ids`."""
    if inputs_embeds is not None:
        return inputs_embeds
    embed = getattr(module, "embed_tokens", None)
    if input_ids is None:
        raise ValueError(f"{what}: expected input_ids (token ids or hidden states) or inputs_embeds, got neither")
    if embed is not None:
        if input_ids.dtype in _FLOAT_DTYPES:
            raise ValueError(f"{what}: the stage holding embed_tokens expected integer token ids, got {input_ids.dtype}")
        return embed(input_ids)
    if input_ids.dtype not in _FLOAT_DTYPES or input_ids.dim() != 3:
        raise ValueError(f"{what}: a stage without embed_tokens expected hidden states (B, S, H) in a float dtype, "
                         f"got {tuple(input_ids.shape)} {input_ids.dtype}")
    return input_ids


def _refuse_extra(kwargs: dict, what: str) -> None:
    """A stage forward takes what a training pipeline passes; anything else would be silently dropped."""
    extra = sorted(k for k, v in kwargs.items() if v is not None and not (k == "use_cache" and not v))
    if extra:
        raise ValueError(f"{what}: unexpected arguments {extra}; a pipeline stage takes input_ids (or hidden "
                         "states), attention_mask, position_ids, inputs_embeds and its model's image inputs")


def _layers(module: nn.Module) -> list[tuple[int, nn.Module]]:
    """(original index, layer) for a pruned ModuleDict or a whole ModuleList."""
    layers = module.layers
    if isinstance(layers, nn.ModuleDict):
        return [(int(k), layer) for k, layer in layers.items()]
    return list(enumerate(layers[: module.config.num_hidden_layers]))


def _position_ids(hidden: torch.Tensor, position_ids):
    if position_ids is not None:
        return position_ids
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def _rotary_by_layer_type(rotary: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor,
                          layer_types: list[str] | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(cos, sin) for each layer type: per type where the rotary takes one (MiMo-V2-Flash, Gemma4: other
    bases, head dims), else one pair shared by every layer."""
    types_ = set(layer_types or ["full_attention"])
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        return {t: rotary(hidden, position_ids, layer_type=t) for t in types_}
    shared = rotary(hidden, position_ids=position_ids)
    return dict.fromkeys(types_, shared)


def _softcap(logits: torch.Tensor, config) -> torch.Tensor:
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


# ----------------------------------------------------------------------------------------------------------
# generic causal LM (Llama and any `model.model` LLM)


def create_pipeline_forward_inner(model_class_name: str) -> Callable:
    """Forward for a decoder backbone (`LlamaModel`, `Ministral3Model`, `MiMoV2FlashModel`, ...): embed if this
    stage holds `embed_tokens`, run this stage's layers with the mask and rotary of their layer type, norm if
    present.
    Returns the hidden states. `model_class_name` names the backbone in error messages."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        _refuse_extra(kwargs, f"{model_class_name} pipeline stage")
        hidden = _embed_or_hidden(self, input_ids, inputs_embeds, f"{model_class_name} pipeline stage")
        masks = _build_or_reuse_pp_causal_mask(self, hidden, attention_mask, position_ids)
        position_ids = _position_ids(hidden, position_ids)
        types_ = _layer_types(self.config)
        rotary = _rotary_by_layer_type(self.rotary_emb, hidden, position_ids, types_)
        for index, layer in _layers(self):
            layer_type = types_[index] if types_ is not None else "full_attention"
            out = layer(hidden, attention_mask=masks[layer_type], position_ids=position_ids, past_key_values=None,
                        use_cache=False, position_embeddings=rotary[layer_type])
            hidden = out[0] if isinstance(out, tuple) else out
        if getattr(self, "norm", None) is not None:
            hidden = self.norm(hidden)
        return hidden

    return forward


def _head(self, hidden: torch.Tensor) -> torch.Tensor:
    """The last stage's logits (softcapped where the config says so); other stages pass hidden states on."""
    if getattr(self, "lm_head", None) is None:
        return hidden
    return _softcap(self.lm_head(hidden), text_config_of(self.config))


def create_pipeline_forward_causal_lm() -> Callable:
    """Forward for a `...ForCausalLM`: the patched `self.model`, then lm_head on the last stage."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        _refuse_extra(kwargs, f"{type(self).__name__} pipeline stage")
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds)
        return _head(self, hidden)

    return forward


# ----------------------------------------------------------------------------------------------------------
# Mistral3 VLM


def _merge_image_features(input_ids: torch.Tensor, embeds: torch.Tensor, features: torch.Tensor,
                          image_token_id: int) -> torch.Tensor:
    """Image features written at the placeholder positions, in order."""
    mask = input_ids == image_token_id
    n_tokens, n_feats = int(mask.sum()), features.shape[0]
    if n_tokens != n_feats:
        raise ValueError(f"images: {n_tokens} placeholder tokens in the microbatch but {n_feats} image features")
    return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))


def create_pipeline_forward_mistral3_vlm() -> Callable:
    """Forward for `Mistral3ForConditionalGeneration`: on stage 0, token embeddings with the vision tower +
    projector's image features at the placeholder positions; then the patched language model; lm_head on
    the last stage."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                pixel_values=None, image_sizes=None, **kwargs):
        _refuse_extra(kwargs, "Mistral3 pipeline stage")
        inner = self.model
        decoder = inner.language_model
        hidden = _embed_or_hidden(decoder, input_ids, inputs_embeds, "Mistral3 pipeline stage")
        if pixel_values is not None:
            if getattr(inner, "vision_tower", None) is None:
                raise ValueError("Mistral3 pipeline stage: pixel_values given to a stage without the vision tower "
                                 "(images go to stage 0)")
            if image_sizes is None:
                raise ValueError("Mistral3 pipeline stage: pixel_values given without image_sizes")
            features = inner.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes,
                                                vision_feature_layer=self.config.vision_feature_layer,
                                                return_dict=True).pooler_output
            hidden = _merge_image_features(input_ids, hidden, torch.cat(features, dim=0), self.config.image_token_id)
        hidden = decoder(inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids)
        return _head(self, hidden)

    return forward


# ----------------------------------------------------------------------------------------------------------
# Gemma4 (text dense and MoE, and the VLM)
#
# Two things cross Gemma4's stage boundaries besides the hidden states: the per-layer input embeddings
# (computed once from the tokens on stage 0, read by every layer) and the keys / values that the last
# `num_kv_shared_layers` layers reuse from the last earlier layer of their attention type. Both travel
# packed behind the hidden states in the one tensor a stage sends: (B, S, H + carried widths); the
# gradient comes back the same way. What a boundary carries is fixed by the config and the split.


def _gemma4_carries(config, layers_per_stage: list[list[str]], boundary: int) -> list[tuple[str, int]]:
    """(name, width) of what crosses into stage `boundary` from the stages before it; [] at the two ends."""
    if boundary == 0 or boundary == len(layers_per_stage):
        return []
    carries = []
    if config.hidden_size_per_layer_input:
        carries.append(("per_layer_inputs", config.num_hidden_layers * config.hidden_size_per_layer_input))
    before = {int(k) for stage in layers_per_stage[:boundary] for k in stage}
    modes = config.kv_sharing_modes
    for layer_type in sorted(set(config.layer_types)):
        store = [i for i, m in enumerate(modes) if m == "store" and config.layer_types[i] == layer_type]
        readers_after = [i for i, m in enumerate(modes)
                         if m == "reuse" and config.layer_types[i] == layer_type and i not in before]
        if store and store[0] in before and readers_after:
            layer = config.per_layer_config[store[0]]
            width = layer.num_key_value_heads * layer.head_dim
            carries += [(f"key:{layer_type}", width), (f"value:{layer_type}", width)]
    return carries


def _unpack_carries(x: torch.Tensor, hidden_size: int, carries: list[tuple[str, int]], what: str):
    expected = hidden_size + sum(w for _, w in carries)
    if x.shape[-1] != expected:
        raise ValueError(f"{what}: expected hidden states of width {hidden_size} + carried "
                         f"{[name for name, _ in carries]} = {expected}, got {x.shape[-1]}")
    pieces = x.split([hidden_size, *(w for _, w in carries)], dim=-1)
    return pieces[0], dict(zip((name for name, _ in carries), pieces[1:]))


def create_pipeline_forward_gemma4_text() -> Callable:
    """Forward for `Gemma4TextModel` (dense or MoE): stage 0 embeds and computes the per-layer inputs;
    every stage runs its layers with the mask and rotary of their layer type (sliding or full), sharing
    keys / values as transformers does; non-last stages return the hidden states with what the next stage
    needs packed behind them, the last its normed hidden states."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                per_layer_inputs=None, **kwargs):
        _refuse_extra(kwargs, "Gemma4 pipeline stage")
        config = self.config
        L, D = config.num_hidden_layers, config.hidden_size_per_layer_input
        carried = {}
        if getattr(self, "embed_tokens", None) is not None:
            hidden = _embed_or_hidden(self, input_ids, inputs_embeds, "Gemma4 pipeline stage")
            if D:
                if per_layer_inputs is None and input_ids is not None:
                    per_layer_inputs = self.get_per_layer_inputs(input_ids, None)
                per_layer_inputs = self.project_per_layer_inputs(hidden, per_layer_inputs)
        else:
            x = _embed_or_hidden(self, input_ids, inputs_embeds, "Gemma4 pipeline stage")
            hidden, carried = _unpack_carries(x, config.hidden_size, self._pp_carries_in, "Gemma4 pipeline stage")
            if D:
                per_layer_inputs = carried["per_layer_inputs"].unflatten(-1, (L, D))
        B, S = hidden.shape[:2]
        masks = _build_or_reuse_pp_causal_mask(self, hidden, attention_mask, position_ids)
        position_ids = _position_ids(hidden, position_ids)
        rotary = _rotary_by_layer_type(self.rotary_emb, hidden, position_ids, config.layer_types)
        from transformers.cache_utils import KVSharingDict

        shared_kv = KVSharingDict()
        for t in set(config.layer_types):  # (B, S, kv_heads * head_dim) -> (B, kv_heads, S, head_dim)
            if f"key:{t}" in carried:
                shared_kv[t] = tuple(carried[f"{kind}:{t}"].unflatten(-1, (-1, config.per_layer_config[
                    config.layer_types.index(t)].head_dim)).transpose(1, 2) for kind in ("key", "value"))
        for index, layer in _layers(self):
            layer_type = config.layer_types[index]
            hidden = layer(hidden, per_layer_inputs[:, :, index, :] if D else None, shared_kv_states=shared_kv,
                           position_embeddings=rotary[layer_type], attention_mask=masks[layer_type],
                           position_ids=position_ids, past_key_values=None)
        if getattr(self, "norm", None) is not None:
            return self.norm(hidden)
        out = [hidden]
        for name, _ in self._pp_carries_out:
            if name == "per_layer_inputs":
                out.append(per_layer_inputs.flatten(-2))
            else:
                kind, t = name.split(":")
                out.append(shared_kv[t][0 if kind == "key" else 1].transpose(1, 2).reshape(B, S, -1))
        return torch.cat(out, dim=-1) if len(out) > 1 else hidden

    return forward


def create_pipeline_forward_gemma4_vlm() -> Callable:
    """Forward for `Gemma4ForConditionalGeneration`: on stage 0, placeholder tokens embedded as padding
    (their per-layer inputs too, as transformers does), image features from the vision tower + embedder
    written at the placeholders; then the patched language model; lm_head and final-logit softcapping on
    the last stage. Images attend causally, as in transformers without `mm_token_type_ids`."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                pixel_values=None, image_position_ids=None, **kwargs):
        _refuse_extra(kwargs, "Gemma4 pipeline stage")
        inner = self.model
        decoder = inner.language_model
        per_layer_inputs = None
        if getattr(decoder, "embed_tokens", None) is not None and inputs_embeds is None:
            if input_ids is None or input_ids.dtype in _FLOAT_DTYPES:
                raise ValueError(f"Gemma4 pipeline stage 0: expected integer token ids, got "
                                 f"{None if input_ids is None else input_ids.dtype}")
            c = self.config
            placeholders = (input_ids == c.image_token_id) | (input_ids == c.video_token_id) | (input_ids == c.audio_token_id)
            text_ids = torch.where(placeholders, c.text_config.pad_token_id, input_ids)
            inputs_embeds = decoder.embed_tokens(text_ids)
            if c.text_config.hidden_size_per_layer_input:
                per_layer_inputs = decoder.get_per_layer_inputs(text_ids, None)
            if pixel_values is not None:
                if image_position_ids is None:
                    raise ValueError("Gemma4 pipeline stage: pixel_values given without image_position_ids")
                features = inner.get_image_features(pixel_values, image_position_ids, return_dict=True).pooler_output
                inputs_embeds = _merge_image_features(input_ids, inputs_embeds, torch.cat(features, dim=0),
                                                      c.image_token_id)
            input_ids = None
        elif pixel_values is not None:
            raise ValueError("Gemma4 pipeline stage: pixel_values given to a stage without the vision tower "
                             "(images go to stage 0)")
        hidden = decoder(input_ids=input_ids, inputs_embeds=inputs_embeds, per_layer_inputs=per_layer_inputs,
                         attention_mask=attention_mask, position_ids=position_ids)
        return _head(self, hidden)

    return forward


# ----------------------------------------------------------------------------------------------------------
# patching


def patch_hf_model_for_pp(model: nn.Module, patch_inner_model: bool = True, patch_causal_lm_model: bool = True) -> None:
    """Install the stage-aware forwards on `model` (the caller skips models that `model_keeps_self_forward`).

    - Gemma4 VLM (by model_type): the Gemma4 text forward on `model.model.language_model`, the Gemma4 VLM
      forward outside; Gemma4 text: the Gemma4 text forward inside, the generic causal-LM forward outside.
    - Mistral3 VLM: the generic backbone forward on `model.model.language_model`, the Mistral3 forward outside.
    - any other model with `model.model`: the generic backbone and causal-LM forwards.
    - a bare backbone: the generic backbone forward on the model itself."""
    inner = getattr(model, "model", None)
    inner_forward = None
    if inner is None:
        outer_forward, inner_module = None, model
    elif _is_gemma4_vlm(model):
        outer_forward, inner_module = create_pipeline_forward_gemma4_vlm(), inner.language_model
        inner_forward = create_pipeline_forward_gemma4_text()
    elif _is_mistral3_vlm(model):
        outer_forward, inner_module = create_pipeline_forward_mistral3_vlm(), inner.language_model
    elif _is_vlm(model):
        raise ValueError(f"{type(model).__name__}: no pipeline forward routes the images of model_type "
                         f"{_model_types(model)[0]!r}; expected one of {list(_PP_VLM_MODEL_TYPES_WITH_DEDICATED_FORWARD)}")
    else:
        outer_forward, inner_module = create_pipeline_forward_causal_lm(), inner
        if _is_gemma4_text(model):
            inner_forward = create_pipeline_forward_gemma4_text()
    if patch_inner_model:
        inner_forward = inner_forward or create_pipeline_forward_inner(type(inner_module).__name__)
        inner_module.forward = types.MethodType(inner_forward, inner_module)
    if patch_causal_lm_model and outer_forward is not None:
        model.forward = types.MethodType(outer_forward, model)


# ----------------------------------------------------------------------------------------------------------
# stages


class HFStage(ImageFeedingStage):
    """One pipeline stage of a stock transformers model: token ids (stage 0) or hidden states in, hidden
    states or logits out. Stage 0 of a VLM also takes the index of the microbatch it runs (a (rows,) long
    tensor, chunked by the schedule like the ids) and looks up that microbatch's images."""

    def __init__(self, model: nn.Module, first: bool, last: bool):
        super().__init__(takes_images=first and _is_vlm(model))
        self.model = model
        self.first, self.last = first, last

    def forward(self, x: torch.Tensor, microbatch: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x, **self.images_for(microbatch, x.device))


def hf_layer_keys(model: nn.Module) -> list[str]:
    return [str(i) for i in range(len(_decoder_of(model).layers))]


def make_hf_stage(full_model: nn.Module, stage: int, layers_per_stage: list[list[str]]) -> HFStage:
    """A copy of `full_model` pruned to stage `stage` and patched to return a tensor."""
    validate_hf_model_for_pipeline_support(full_model)
    n = len(layers_per_stage)
    first, last = stage == 0, stage == n - 1
    model = copy.deepcopy(full_model)
    decoder = _decoder_of(model)
    decoder.layers = nn.ModuleDict({k: decoder.layers[int(k)] for k in layers_per_stage[stage]})
    if not first:
        for name in _FIRST_STAGE_TEXT_MODULES:
            if getattr(decoder, name, None) is not None:
                setattr(decoder, name, None)
        inner = getattr(model, "model", None)
        for name in MULTIMODAL_SUFFIXES:
            if inner is not None and getattr(inner, name, None) is not None:
                setattr(inner, name, None)
    if not last:
        decoder.norm = None
        if hasattr(model, "lm_head"):
            model.lm_head = None
    if _is_gemma4_vlm(model) or _is_gemma4_text(model):
        config = text_config_of(model.config)
        decoder._pp_carries_in = _gemma4_carries(config, layers_per_stage, stage)
        decoder._pp_carries_out = _gemma4_carries(config, layers_per_stage, stage + 1)
    if not model_keeps_self_forward(model):
        patch_hf_model_for_pp(model)
    return HFStage(model, first, last)


def hf_stage_parts(model: nn.Module) -> StageParts:
    """The parts of a stock model, named as `make_hf_stage` places them: the decoder layers; the embeddings
    (Gemma4's per-layer ones too), vision tower and projector first; the final norm and LM head last."""
    from plait.summary import routed_expert_share

    decoder = _decoder_of(model)
    inner = getattr(model, "model", None)
    first = {name: getattr(inner, name) for name in MULTIMODAL_SUFFIXES
             if inner is not None and getattr(inner, name, None) is not None}
    first |= {name: getattr(decoder, name) for name in _FIRST_STAGE_TEXT_MODULES
              if getattr(decoder, name, None) is not None}
    last = {name: m for name, m in (("norm", getattr(decoder, "norm", None)),
                                    ("lm_head", getattr(model, "lm_head", None))) if m is not None}
    lookups = {"embed_tokens": 0.0, "embed_tokens_per_layer": 0.0}  # embedding lookups cost no compute
    return StageParts({k: decoder.layers[int(k)] for k in hf_layer_keys(model)}, first, last, lookups,
                      routed_expert_share(model.config))


def build_hf_pipeline(full_model: nn.Module, **kwargs):
    """`pipeline.build_pipeline` with stock-transformers stages; the same arguments."""
    from plait.parallel.pipeline import build_pipeline

    validate_hf_model_for_pipeline_support(full_model)
    return build_pipeline(full_model, make_stage=make_hf_stage, parts=hf_stage_parts(full_model), **kwargs)
