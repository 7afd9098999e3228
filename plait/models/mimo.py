"""MIMO: any set of modality encoders, their projections and a language model, composed into one model.

    modality_inputs = {"images": {"clip": {"pixel_values": ...}}, "audio": {"whisper": {"input_features": ...}}}
        -> each encoder -> its projection to the LM width -> (N, H) per encoder, concatenated per modality
    input_ids -> text embeddings of the non-special tokens
        -> align_embeddings_by_token_positions: every modality's rows at its special-token positions
        -> the language model, called with inputs_embeds

The language model is a native plait model or any stock transformers causal LM (from a config or a
local checkpoint). Encoders: plait's MiniMax-M3 vision tower, a transformers model (CLIP / SigLIP vision
models, the Whisper encoder, ...) from a config or a local dir, or any nn.Module given by import path.
The semantics follow Megatron-Core's `models/mimo`; the layout is plait's (batch-first inside, the
sequence-first `(S, B, H)` contract kept at `align_embeddings_by_token_positions`).

Under pipeline parallelism (plait.parallel.pipeline) the first stage holds the encoders, projections and
the LM's embedding; later stages receive the previous stage's hidden states through `set_input_tensor`.
A saved MIMO model is one dir: `config.json` (model_type "plait_mimo", the whole composition with every
config inline) + `model.safetensors`, loadable by `plait.from_pretrained`.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

TEXT = "text"
LANGUAGE_MODEL = "language_model"
MIMO_MODEL_TYPE = "plait_mimo"


class EncoderSpec(BaseModel):
    """One encoder and its projection to the language model's width."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["minimax_m3_vision", "transformers", "import"]
    config: dict[str, Any] = Field(default_factory=dict, description="the encoder's config (HF dict, or kwargs)")
    pretrained: Path | None = Field(None, description="transformers: a local model dir instead of a config")
    target: str | None = Field(None, description="import: 'package.module:ClassName'")
    output_dim: int | None = Field(None, gt=0, description="the encoder's feature width (read from config if unset)")
    projection: Literal["linear", "mlp"] = "mlp"

    @model_validator(mode="after")
    def _check(self) -> "EncoderSpec":
        if self.kind == "import" and (not self.target or ":" not in self.target):
            raise ValueError(f"encoder target: expected 'package.module:ClassName' for kind 'import', got {self.target!r}")
        if self.kind == "transformers" and not self.config and self.pretrained is None:
            raise ValueError("encoder: kind 'transformers' needs a config (with model_type) or a pretrained dir")
        return self


class MimoModelConfig(BaseModel):
    """YAML-configurable composition: the language model, encoders per modality, special token ids."""

    model_config = ConfigDict(extra="forbid")
    model_type: ClassVar[str] = MIMO_MODEL_TYPE
    language_model: dict[str, Any] | None = Field(None, description="HF config dict with model_type")
    language_model_pretrained: Path | None = None
    modalities: dict[str, dict[str, EncoderSpec]] = Field(default_factory=dict)
    special_token_ids: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "MimoModelConfig":
        if (self.language_model is None) == (self.language_model_pretrained is None):
            raise ValueError("MIMO: set exactly one of language_model (a config) and language_model_pretrained (a dir)")
        if TEXT in self.modalities or TEXT in self.special_token_ids:
            raise ValueError(f"MIMO: {TEXT!r} is the language model's own modality, not an encoder modality")
        missing = sorted(set(self.modalities) - set(self.special_token_ids))
        if missing:
            raise ValueError(f"MIMO special_token_ids: no token id for modality {missing}")
        ids = list(self.special_token_ids.values())
        if len(set(ids)) != len(ids):
            raise ValueError(f"MIMO special_token_ids: each modality needs its own token id, got {self.special_token_ids}")
        return self


# ---------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------


class _M3VisionEncoder(nn.Module):
    """plait's MiniMax-M3 vision tower: pixel_values (N, C*T*P*P), grid_thw -> (N, vision hidden)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        from transformers.models.minimax_m3_vl.configuration_minimax_m3_vl import MiniMaxM3VLVisionConfig

        from plait.models.minimax_m3_vision import VisionTower

        self.tower = VisionTower(MiniMaxM3VLVisionConfig(**config))
        self.output_dim = self.tower.config.hidden_size

    def forward(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        return self.tower(pixel_values, grid_thw)

    def batch_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised images (n, C, H, W) -> this tower's keyword inputs (patches and grid)."""
        from plait.models.minimax_m3_vision import patchify_images

        c = self.tower.config
        patches, grid = patchify_images(images, c.patch_size, c.spatial_merge_size, c.temporal_patch_size)
        return {"pixel_values": patches, "grid_thw": grid}


class _TransformersEncoder(nn.Module):
    """A stock transformers encoder (CLIPVisionModel, SiglipVisionModel, WhisperEncoder, ...): its
    last_hidden_state (B, T, D) becomes (B * T, D) rows."""

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        from transformers import AutoModel

        from plait.models.hf import to_hf_config

        if spec.pretrained is not None:
            self.model = AutoModel.from_pretrained(spec.pretrained, local_files_only=True)
        else:  # to_hf_config names a missing or unknown model_type and bad keys as ValueErrors
            self.model = AutoModel.from_config(to_hf_config(spec.config))
        if hasattr(self.model, "get_encoder") and not hasattr(self.model, "vision_model") and hasattr(self.model, "decoder"):
            self.model = self.model.get_encoder()  # encoder-decoder (Whisper): keep the encoder
        c = self.model.config
        self.output_dim = spec.output_dim or getattr(c, "hidden_size", None) or getattr(c, "d_model", None)

    def forward(self, **inputs) -> torch.Tensor:
        hidden = self.model(**inputs).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1])

    def batch_inputs(self, items: torch.Tensor) -> dict[str, torch.Tensor]:
        """A batch of raw items -> this model's main input: normalised images (n, C, H, W) as `pixel_values`,
        or log-mel features (n, frames, mels) as `input_features` (n, mels, frames)."""
        name, c = self.model.main_input_name, self.model.config
        if name == "pixel_values":
            return {name: items}
        if name == "input_features":
            feats = items.transpose(1, 2)  # (n, frames, mels) -> (n, mels, frames)
            if feats.shape[1] != c.num_mel_bins:
                raise ValueError(f"audio features: the {c.model_type} encoder takes {c.num_mel_bins} mel bands, "
                                 f"got {feats.shape[1]} (data.audio.n_mels)")
            # Whisper-style encoders take a fixed number of frames: two per source position (a stride-2 conv)
            frames = 2 * getattr(c, "max_source_positions", feats.shape[-1] // 2)
            if feats.shape[-1] != frames:
                raise ValueError(f"audio features: the {c.model_type} encoder takes {frames} frames "
                                 f"(2 x max_source_positions), got {feats.shape[-1]} (set data.audio.hop_length)")
            return {name: feats}
        raise ValueError(f"encoder {c.model_type}: plait cannot feed its main input {name!r} from images or audio")


def _imported_encoder(spec: EncoderSpec) -> nn.Module:
    module_name, class_name = spec.target.split(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"encoder target {spec.target!r}: cannot import it ({e})") from None
    module = cls(**spec.config)
    if not isinstance(module, nn.Module):
        raise ValueError(f"encoder target {spec.target!r}: expected an nn.Module, got {type(module).__name__}")
    return module


def build_encoder(spec: EncoderSpec) -> tuple[nn.Module, int]:
    if spec.kind == "minimax_m3_vision":
        enc = _M3VisionEncoder(spec.config)
    elif spec.kind == "transformers":
        enc = _TransformersEncoder(spec)
    else:
        enc = _imported_encoder(spec)
    dim = spec.output_dim or getattr(enc, "output_dim", None)
    if not dim:
        raise ValueError(f"encoder {spec.kind}: set output_dim, its feature width could not be read")
    return enc, int(dim)


def build_projection(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def align_embeddings_by_token_positions(modality_embeddings: dict[str, torch.Tensor], input_ids: torch.Tensor,
                                        special_token_ids: dict[str, int]) -> torch.Tensor:
    """Every modality's (N, H) rows at its special-token positions of input_ids, row-major over (B, S); the
    "text" rows, in order, everywhere else. input_ids (B, S) -> (S, B, H); (S,) -> (S, 1, H)."""
    ids = input_ids.unsqueeze(0) if input_ids.ndim == 1 else input_ids
    if ids.ndim != 2:
        raise ValueError(f"input_ids: expected (B, S) or (S,), got shape {list(input_ids.shape)}")
    if not modality_embeddings:
        raise ValueError("modality_embeddings: expected at least the 'text' embeddings, got none")
    first = next(iter(modality_embeddings.values()))
    H, device, dtype = first.shape[-1], first.device, first.dtype
    for name in modality_embeddings:
        if name != TEXT and name not in special_token_ids:
            raise ValueError(f"modality {name!r}: embeddings given but no special token id for it")
    taken = torch.zeros_like(ids, dtype=torch.bool)
    out = torch.zeros(*ids.shape, H, device=device, dtype=dtype)
    for name, token in special_token_ids.items():
        slots = ids == token
        n_tokens = int(slots.sum())
        emb = modality_embeddings.get(name)
        n_emb = 0 if emb is None else emb.shape[0]
        if n_tokens != n_emb:
            raise ValueError(f"modality {name!r}: {n_tokens} special tokens (id {token}) in input_ids but {n_emb} embeddings")
        if n_tokens:
            if emb.ndim != 2 or emb.shape[-1] != H:
                raise ValueError(f"modality {name!r}: expected embeddings (N, {H}), got {list(emb.shape)}")
            out[slots] = emb.to(dtype)
        taken |= slots
    text = modality_embeddings.get(TEXT)
    n_text = int((~taken).sum())
    if (0 if text is None else text.shape[0]) != n_text:
        raise ValueError(f"modality 'text': {n_text} text tokens in input_ids but "
                         f"{0 if text is None else text.shape[0]} embeddings")
    if n_text:
        out[~taken] = text.to(dtype)
    return out.transpose(0, 1)  # (B, S, H) -> (S, B, H)


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Packed documents (offsets into the flattened B * S stream) -> (B, S) positions restarting at 0."""
    from plait.nn.attention import documents_from_cu_seqlens

    docs = documents_from_cu_seqlens(cu_seqlens, batch, seq).view(-1)
    starts = cu_seqlens.to(torch.long)[:-1]
    return (torch.arange(batch * seq) - starts[docs]).view(batch, seq)


class MimoModel(nn.Module):
    def __init__(self, mimo_config: MimoModelConfig, cp_group=None, tp_group=None):
        super().__init__()
        if cp_group is not None or tp_group is not None:
            raise ValueError("MimoModel: context and tensor parallel groups are not supported yet")
        import plait

        self.config = mimo_config
        if mimo_config.language_model_pretrained is not None:
            self.language_model = plait.from_pretrained(mimo_config.language_model_pretrained)
        else:
            self.language_model = plait.from_config(dict(mimo_config.language_model))
        self.hidden_size = hidden = self.language_model.get_input_embeddings().embedding_dim
        self._input_tensors: dict[str, torch.Tensor] = {}  # set_input_tensor: what stands in for own inputs
        self.encoders = nn.ModuleDict()
        self.projections = nn.ModuleDict()
        for modality, encoders in mimo_config.modalities.items():
            self.encoders[modality] = nn.ModuleDict()
            self.projections[modality] = nn.ModuleDict()
            for name, spec in encoders.items():
                enc, dim = build_encoder(spec)
                self.encoders[modality][name] = enc
                self.projections[modality][name] = build_projection(spec.projection, dim, hidden)
        self.special_token_ids = dict(mimo_config.special_token_ids)

    align_embeddings_by_token_positions = staticmethod(align_embeddings_by_token_positions)

    def get_text_embeddings(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                            special_token_ids: dict[str, int]) -> torch.Tensor:
        """(N, H) embeddings of the non-special tokens, row-major."""
        special = torch.zeros_like(input_ids, dtype=torch.bool)
        for token in special_token_ids.values():
            special |= input_ids == token
        return self.language_model.get_input_embeddings()(input_ids[~special])

    def _has_encoder_tokens(self, modality: str, input_ids: torch.Tensor) -> bool:
        return bool((input_ids == self.special_token_ids[modality]).any())

    def _forward_encoders(self, modality_inputs: dict[str, dict[str, dict[str, Any]]],
                          input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for modality, per_encoder in (modality_inputs or {}).items():
            if modality not in self.encoders:
                raise ValueError(f"modality_inputs: unknown modality {modality!r}; configured: {sorted(self.encoders)}")
            if not self._has_encoder_tokens(modality, input_ids):
                continue  # none of this modality's tokens in the batch: nothing to encode
            rows = []
            for name, encoder in self.encoders[modality].items():  # declared order
                if name not in per_encoder:
                    continue
                feats = encoder(**per_encoder[name])
                rows.append(self.projections[modality][name](feats))
            unknown = set(per_encoder) - set(self.encoders[modality])
            if unknown:
                raise ValueError(f"modality_inputs[{modality!r}]: unknown encoder(s) {sorted(unknown)}")
            if rows:
                out[modality] = torch.cat(rows, dim=0)
        return out

    def set_input_tensor(self, input_tensor) -> None:
        """What stands in for this rank's own inputs under pipeline parallelism, until set again.

        - a tensor (B, S, H), or a list holding one (as pipeline schedules hand them over): the previous
          stage's hidden states, fed to the language model in place of the embeddings;
        - a dict per module: "language_model" -> those hidden states; a modality name -> its projected
          embeddings (N, H), computed elsewhere (an encoder-only rank), used in place of running its encoders;
        - None clears it."""
        if input_tensor is None:
            self._input_tensors = {}
            return
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"input_tensor: expected a list of one tensor (the previous stage's output), "
                                 f"got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        if isinstance(input_tensor, torch.Tensor):
            input_tensor = {LANGUAGE_MODEL: input_tensor}
        if not isinstance(input_tensor, dict):
            raise ValueError(f"input_tensor: expected a tensor, a list of one, or a dict per module, "
                             f"got {type(input_tensor).__name__}")
        modules = [LANGUAGE_MODEL, *self.special_token_ids]
        for name, t in input_tensor.items():
            if name not in modules:
                raise ValueError(f"input_tensor: unknown module {name!r}; expected one of {modules}")
            ndim = 3 if name == LANGUAGE_MODEL else 2
            if not isinstance(t, torch.Tensor) or t.ndim != ndim or t.shape[-1] != self.hidden_size:
                want = "(B, S, H)" if ndim == 3 else "(N, H)"
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"input_tensor[{name!r}]: expected a tensor {want} with H={self.hidden_size}, got {got}")
        self._input_tensors = dict(input_tensor)

    def _input_embeddings(self, input_ids, position_ids, modality_inputs) -> torch.Tensor:
        """(B, S, H): every modality's embeddings at its special tokens, text embeddings elsewhere."""
        if input_ids is None or input_ids.ndim != 2:
            got = None if input_ids is None else list(input_ids.shape)
            raise ValueError(f"input_ids: expected (B, S), got {got}")
        given = {k: v for k, v in self._input_tensors.items() if k != LANGUAGE_MODEL}
        both = sorted(set(given) & set(modality_inputs or {}))
        if both:
            raise ValueError(f"modality_inputs: {both} also given as input tensors (set_input_tensor); pass one")
        embeddings = {**self._forward_encoders(modality_inputs, input_ids), **given}
        embeddings[TEXT] = self.get_text_embeddings(input_ids, position_ids, self.special_token_ids)
        return align_embeddings_by_token_positions(embeddings, input_ids, self.special_token_ids).transpose(0, 1)

    def forward(self, input_ids: torch.Tensor | None, position_ids=None, attention_mask=None, loss_mask=None,
                labels=None, modality_inputs=None, packing_kwargs: dict | None = None, **lm_kwargs):
        """-> (the language model's output, loss_mask). Labels follow the transformers convention
        (unshifted, -100 ignored); positions where `loss_mask` is 0 carry no loss. `lm_kwargs` go to the
        language model as they are (`use_cache`, `past_key_values` for decoding). On a later pipeline stage
        (hidden states set with `set_input_tensor`) `input_ids` may be None."""
        inputs_embeds = self._input_tensors.get(LANGUAGE_MODEL)
        if inputs_embeds is None:
            inputs_embeds = self._input_embeddings(input_ids, position_ids, modality_inputs)
        B, S = inputs_embeds.shape[:2]
        extra = dict(lm_kwargs)
        if packing_kwargs:
            cu = packing_kwargs.get("cu_seqlens_q", packing_kwargs.get("cu_seqlens"))
            if cu is None:
                raise ValueError(f"packing_kwargs: expected cu_seqlens_q, got {sorted(packing_kwargs)}")
            position_ids = position_ids_from_cu_seqlens(cu, B, S).to(inputs_embeds.device)
            if "cu_seqlens" in inspect.signature(self.language_model.forward).parameters:  # native models
                extra["cu_seqlens"] = cu
            attention_mask = None  # documents are marked by the restarting positions
        if loss_mask is not None and labels is not None:
            if loss_mask.shape != labels.shape:
                raise ValueError(f"loss_mask: expected shape {list(labels.shape)}, got {list(loss_mask.shape)}")
            labels = labels.masked_fill(loss_mask == 0, -100)
        out = self.language_model(inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask,
                                  labels=labels, **extra)
        return out, loss_mask

    # --- feeding raw batches (the trainer) -------------------------------------------------------

    def batch_inputs(self, items: dict[str, torch.Tensor]) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """Raw items per modality (normalised images (n, C, H, W), audio features (n, frames, mels)) ->
        `modality_inputs` for forward: every encoder of the modality gets the same items in its own form."""
        out = {}
        for modality, batch in items.items():
            if modality not in self.encoders:
                raise ValueError(f"items: no encoder for modality {modality!r}; configured: {sorted(self.encoders)}")
            out[modality] = {}
            for name, encoder in self.encoders[modality].items():
                if not hasattr(encoder, "batch_inputs"):
                    raise ValueError(f"encoder {modality}.{name} ({type(encoder).__name__}): plait cannot build its "
                                     "inputs from raw items (an imported module); call forward with modality_inputs")
                out[modality][name] = encoder.batch_inputs(batch)
        return out

    @torch.no_grad()
    def tokens_per_item(self, modality: str, item: torch.Tensor) -> int:
        """How many special tokens one item (an image, a clip) becomes: the rows its encoders give for it,
        found by encoding it once."""
        inputs = self.batch_inputs({modality: item.unsqueeze(0)})[modality]
        return sum(int(enc(**inputs[name]).shape[0]) for name, enc in self.encoders[modality].items())

    # --- saving and loading ------------------------------------------------------------------------

    def self_contained_config(self) -> dict[str, Any]:
        """The composition with every config inline (local dirs it was built from replaced by their configs),
        so a saved model needs nothing but its own dir."""
        data = self.config.model_dump(mode="json")
        if data.pop("language_model_pretrained") is not None:
            data["language_model"] = self.language_model.config.to_dict()
        for modality, specs in data["modalities"].items():
            for name, spec in specs.items():
                if spec["kind"] == "transformers" and spec.get("pretrained") is not None:
                    spec["config"], spec["pretrained"] = self.encoders[modality][name].model.config.to_dict(), None
        return data

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_model

        from plait.checkpoint import CONFIG_FILE, WEIGHTS_FILE

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"model_type": MIMO_MODEL_TYPE, "mimo": self.self_contained_config()}
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_model(self, str(path / WEIGHTS_FILE))  # shared (tied) tensors are stored once

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "MimoModel":
        from safetensors.torch import load_model

        from plait.checkpoint import CONFIG_FILE, WEIGHTS_FILE, check_model_dir

        path = check_model_dir(path)
        config = json.loads((path / CONFIG_FILE).read_text())
        if config.get("model_type") != MIMO_MODEL_TYPE or not isinstance(config.get("mimo"), dict):
            raise ValueError(f"{path / CONFIG_FILE}: expected model_type {MIMO_MODEL_TYPE!r} with a 'mimo' section, "
                             f"got model_type {config.get('model_type')!r}")
        model = cls(MimoModelConfig.model_validate(config["mimo"]))
        try:
            load_model(model, str(path / WEIGHTS_FILE), strict=True)
        except RuntimeError as e:
            raise ValueError(f"model dir {str(path)!r}: weights do not fit the saved composition: {e}") from None
        return model

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict[str, torch.Tensor]:
        """The state for torch.distributed.checkpoint: one process holds every tensor whole."""
        if sharded_offsets:
            raise ValueError("sharded_state_dict: sharded offsets are not supported yet (no tensor parallelism)")
        return {prefix + k: v for k, v in self.state_dict().items()}

    def destroy(self) -> None:
        """MimoModel creates no process groups; nothing to release."""


class MimoForCausalLM(nn.Module):
    """A MIMO model behind the transformers calling convention: `model(input_ids=..., attention_mask=...,
    modality_inputs=..., use_cache=...)` returns the language model's output (`.logits`, `.past_key_values`),
    so plait's trainer, evaluation and decoding drive it like any captioning model. Saving saves the MIMO
    model itself."""

    def __init__(self, mimo: MimoModel):
        super().__init__()
        self.mimo = mimo
        self.config = mimo.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, modality_inputs=None, **lm_kwargs):
        out, _ = self.mimo(input_ids, position_ids=position_ids, attention_mask=attention_mask, labels=labels,
                           modality_inputs=modality_inputs, **lm_kwargs)
        return out

    def get_input_embeddings(self) -> nn.Module:
        return self.mimo.language_model.get_input_embeddings()

    def save_pretrained(self, path: str | Path) -> None:
        self.mimo.save_pretrained(path)
