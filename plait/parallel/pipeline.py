"""Pipeline parallelism for plait's native language models, on torch.distributed.pipelining.

A stage is the model with the pieces it does not run removed, torchtitan's way: decoder layers stay
in their ModuleDict under their original index (so checkpoint keys do not move), and the embedding,
final norm and LM head are None where another stage owns them. The model's own forward handles that:
stage 0 turns token ids into hidden states, middle stages map hidden states to hidden states, the
last stage returns logits; the loss runs on the last stage.

    parts = native_stage_parts(full_model)          # decoder layers; what only the first / last stage runs
    stages = choose_split(parts, num_stages, ...)   # even, balanced, layer counts or module names per stage
    module = make_stage_module(full_model, stage_index, stages)   # prune a copy to one stage
    run = build_pipeline(...)                       # GPipe, 1F1B, interleaved, ZBV, DualPipeV

The loss of a step is `sum of per-token cross-entropies / target tokens of the whole step`, the same
normalisation as the single-process trainer, so microbatches here are exactly gradient accumulation
there (gradients are not rescaled by the schedule).

MTP depths run on the last stage. They read the embeddings of the ids rolled left by 1..D, which only
stage 0 can compute: stage 0 sends them on beside the hidden states, middle stages pass them through,
and their gradients flow back to stage 0's embedding like the hidden states' do. The last stage returns
(logits, depth 1 logits, ..., depth D logits), and `lm_and_mtp_loss` scores them.

A MIMO model (plait.models.mimo) is split the same way through its language model: the first stage also
holds the encoders and projections and takes the modality inputs as flat keyword tensors
(`mimo_stage_kwargs`); later stages hand their input to the model with `set_input_tensor`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from plait.mtp import mtp_labels, rolled_token_embeddings
from plait.nn.loss import causal_lm_loss_sum

SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")
# schedules with several stages per rank: "looped" places stage r + k * ranks on rank r, "v" places stages
# r and 2 * ranks - 1 - r (a V shape, so the last stage sits on rank 0 beside the first)
MULTI_STAGE_SCHEDULES = {"interleaved_1f1b": "looped", "looped_bfs": "looped", "interleaved_zb": "looped",
                         "zbv": "v", "dualpipev": "v"}
SCHEDULES = SINGLE_STAGE_SCHEDULES + tuple(MULTI_STAGE_SCHEDULES)


def _schedule_class(name: str):
    from torch.distributed.pipelining import schedules as S

    return {"gpipe": S.ScheduleGPipe, "1f1b": S.Schedule1F1B, "interleaved_1f1b": S.ScheduleInterleaved1F1B,
            "looped_bfs": S.ScheduleLoopedBFS, "interleaved_zb": S.ScheduleInterleavedZeroBubble,
            "zbv": S.ScheduleZBVZeroBubble, "dualpipev": S.ScheduleDualPipeV}[name]


def stages_per_rank(schedule: str, virtual_stages: int = 1) -> int:
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.schedule: expected one of {list(SCHEDULES)}, got {schedule!r}")
    if schedule in SINGLE_STAGE_SCHEDULES:
        if virtual_stages != 1:
            raise ValueError(f"parallel.schedule={schedule!r} runs one stage per rank, got {virtual_stages} virtual stages")
        return 1
    if MULTI_STAGE_SCHEDULES[schedule] == "v":
        return 2
    return max(virtual_stages, 2)


def stage_indices(schedule: str, rank: int, ranks: int, virtual_stages: int = 1) -> list[int]:
    """The global stage indices this rank runs."""
    per_rank = stages_per_rank(schedule, virtual_stages)
    if per_rank == 1:
        return [rank]
    if MULTI_STAGE_SCHEDULES[schedule] == "v":
        return [rank, 2 * ranks - 1 - rank]
    return [rank + k * ranks for k in range(per_rank)]


def split_layers(layer_keys: list[str], num_stages: int, layers_per_stage: list[int] | None = None,
                 layer_costs: list[float] | None = None, first_extra: float = 0.0,
                 last_extra: float = 0.0) -> list[list[str]]:
    """Decoder layers per stage, in order.

    - `layers_per_stage`: explicit counts (they must add up to the layer count, each >= 1).
    - `layer_costs`: a balanced split minimising the most expensive stage, with `first_extra` /
      `last_extra` charged to the first / last stage (embedding and vision tower; norm, LM head, MTP).
    - neither: an even split (earlier stages take the remainder)."""
    n = len(layer_keys)
    if num_stages < 1 or num_stages > n:
        raise ValueError(f"pipeline: {num_stages} stages for {n} decoder layers; every stage needs at least one layer")
    if layers_per_stage is not None:
        if len(layers_per_stage) != num_stages or sum(layers_per_stage) != n or min(layers_per_stage) < 1:
            raise ValueError(f"parallel.layers_per_stage: expected {num_stages} positive counts adding up to {n} "
                             f"layers, got {layers_per_stage}")
        counts = list(layers_per_stage)
    elif layer_costs is not None:
        if len(layer_costs) != n:
            raise ValueError(f"pipeline: {len(layer_costs)} layer costs for {n} layers")
        counts = _balanced_counts(layer_costs, num_stages, first_extra, last_extra)
    else:
        counts = [n // num_stages + (1 if s < n % num_stages else 0) for s in range(num_stages)]
    out, start = [], 0
    for c in counts:
        out.append(layer_keys[start : start + c])
        start += c
    return out


@dataclass
class StageParts:
    """What a model is split into: its decoder layers by key, and, by short name, the modules only the first
    stage runs (`embed_tokens`, a vision tower, MIMO encoders) and those only the last runs (`norm`, `lm_head`,
    `mtp`). For the compute estimate, `passes` says how often a token goes through a module (1 if absent; 0
    for an embedding lookup, 1 + D for the head of a model with D MTP depths), and `routed_share` the share of
    the routed experts one token runs (top_k / num_experts; None for dense models)."""

    layers: dict[str, nn.Module]
    first: dict[str, nn.Module]
    last: dict[str, nn.Module]
    passes: dict[str, float] = field(default_factory=dict)
    routed_share: float | None = None

    def names(self) -> list[str]:
        """Every name `parallel.stage_modules` may list, in model order."""
        return [*self.first, *(f"layers.{k}" for k in self.layers), *self.last]


def native_stage_parts(model: nn.Module) -> StageParts:
    """The parts of a plait causal LM, VLM (vision tower and projector first) or MIMO model (encoders and
    projections first; split through its language model)."""
    from plait.summary import routed_expert_share

    lm = causal_lm_of(model)
    inner = text_model_of(lm)
    first = {name: getattr(lm, name) for name in ("vision_tower", "multi_modal_projector")
             if getattr(lm, name, None) is not None}
    if lm is not model:
        first |= {"encoders": model.encoders, "projections": model.projections}
    first["embed_tokens"] = inner.embed_tokens
    last = {"norm": inner.norm, "lm_head": lm.lm_head}
    passes = {"embed_tokens": 0.0}
    mtp = getattr(inner, "mtp", None)
    if mtp is not None:  # D depths run the head D more times; a weight-tied depth's weights run D times
        last["mtp"] = mtp
        passes |= {"lm_head": 1.0 + mtp.num_depths, "mtp": mtp.num_depths / max(mtp.mtp_config.num_physical_depths, 1)}
    return StageParts(dict(inner.layers.items()), first, last, passes, routed_expert_share(lm.config))


def estimated_stage_costs(parts: StageParts) -> tuple[list[float], float, float]:
    """(cost per decoder layer, extra cost of the first stage, extra cost of the last stage) for a balanced
    split: a module's compute per token is about 2 x the parameters a token passes through (routed experts at
    `routed_share` of theirs), times the module's `passes`."""
    from plait.summary import idle_parameters

    def cost(name: str, module: nn.Module) -> float:
        active = sum(p.numel() for p in module.parameters()) - idle_parameters(module, parts.routed_share)
        return parts.passes.get(name, 1.0) * active

    layers = [cost("layers", layer) for layer in parts.layers.values()]
    return (layers, sum(cost(n, m) for n, m in parts.first.items()), sum(cost(n, m) for n, m in parts.last.items()))


def layers_from_stage_modules(stage_modules: list[list[str]], parts: StageParts) -> list[list[str]]:
    """The decoder-layer keys of each stage named in `parallel.stage_modules`, checked: every layer once, in
    model order, at least one per stage; the first-stage modules on the first stage and the last-stage ones on
    the last, each once; no other names."""
    where, n = "parallel.stage_modules", len(stage_modules)
    seen: dict[str, int] = {}
    split = []
    for s, names in enumerate(stage_modules):
        layers = []
        for name in names:
            if name in seen:
                raise ValueError(f"{where}: {name!r} is listed on stage {seen[name]} and again on stage {s}; "
                                 "expected every module once")
            seen[name] = s
            key = name.removeprefix("layers.")
            if name.startswith("layers.") and key in parts.layers:
                layers.append(key)
            elif name in parts.first or name in parts.last:
                home, which = (0, "first") if name in parts.first else (n - 1, "last")
                if s != home:
                    raise ValueError(f"{where}[{s}]: {name!r} runs on the {which} stage; expected it in stage "
                                     f"{home}, got it in stage {s}")
            else:
                raise ValueError(f"{where}[{s}]: {name!r} is not a module of this model; expected one of "
                                 f"{parts.names()}")
        if not layers:
            raise ValueError(f"{where}[{s}]: {names} holds no decoder layer; every stage needs at least one")
        split.append(layers)
    missing = [name for name in parts.names() if name not in seen]
    if missing:
        raise ValueError(f"{where}: {missing} not listed; expected every module of the model on a stage")
    order = [key for layers in split for key in layers]
    for listed, expected in zip(order, parts.layers):
        if listed != expected:
            raise ValueError(f"{where}: decoder layers out of model order: 'layers.{listed}' where 'layers.{expected}' "
                             "comes next; expected each stage to continue where the previous one stopped")
    return split


def choose_split(parts: StageParts, num_stages: int, split: str = "even", layers_per_stage: list[int] | None = None,
                 stage_modules: list[list[str]] | None = None) -> list[list[str]]:
    """Decoder-layer keys per stage: by module names, by layer counts, balanced by estimated compute, or even."""
    if split not in ("even", "balanced"):
        raise ValueError(f"parallel.split: expected 'even' or 'balanced', got {split!r}")
    if stage_modules is not None:
        if len(stage_modules) != num_stages:
            raise ValueError(f"parallel.stage_modules: expected {num_stages} stages (pipeline ranks x stages per rank),"
                             f" got {len(stage_modules)}")
        return layers_from_stage_modules(stage_modules, parts)
    costs = {}
    if split == "balanced" and layers_per_stage is None:
        layer_costs, first_extra, last_extra = estimated_stage_costs(parts)
        costs = dict(layer_costs=layer_costs, first_extra=first_extra, last_extra=last_extra)
    return split_layers(list(parts.layers), num_stages, layers_per_stage, **costs)


def _balanced_counts(costs: list[float], stages: int, first_extra: float, last_extra: float) -> list[int]:
    """Contiguous split with the smallest maximum stage cost (exact dynamic programme; L and stages are small)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(s: int, i: int, j: int) -> float:  # stage s holds layers i..j-1
        return prefix[j] - prefix[i] + (first_extra if s == 0 else 0.0) + (last_extra if s == stages - 1 else 0.0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(s, n - (stages - s) + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], cost(s - 1, i, j))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    counts, j = [], n
    for s in range(stages, 0, -1):
        i = cut[s][j]
        counts.append(j - i)
        j = i
    return counts[::-1]


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The causal LM whose decoder layers a model is split by: the model itself, or a MIMO model's LM."""
    from plait.models.mimo import MimoModel

    return model.language_model if isinstance(model, MimoModel) else model


def text_model_of(model: nn.Module) -> nn.Module:
    """The part of a native causal LM that holds embed_tokens / layers / norm."""
    for name in ("model", "language_model"):
        inner = getattr(model, name, None)
        if inner is not None and hasattr(inner, "layers"):
            return inner
    raise ValueError(f"{type(model).__name__}: no text model with decoder layers to split into stages")


def check_pipelinable(model: nn.Module) -> None:
    """A `ValueError` for what this pipeline cannot split yet, before any process-group work."""
    text_model_of(model)
    if getattr(model, "tied_embeddings", False):
        raise ValueError("pipeline parallelism needs untied input and output embeddings (tie_word_embeddings=false)")
    pooled = getattr(model, "router_aux_loss_enabled", None)
    if pooled is not None and pooled():
        raise ValueError("pipeline parallelism: output_router_logits pools every decoder layer's router logits into "
                         "one loss, which no stage holds; expected output_router_logits=false (moe_aux_loss_coef "
                         "gives a per-layer balance loss that works across stages)")


def _vlm_pixel_values_chunks(pixel_values: torch.Tensor, images_per_row: torch.Tensor | list[int], microbatches: int,
                             pixel_rows_per_image: torch.Tensor | None = None,
                             **per_image: torch.Tensor) -> list[dict[str, torch.Tensor] | None]:
    """One entry per microbatch: its rows' images (`pixel_values` and every per-image tensor in `per_image`,
    e.g. `image_sizes` or `image_grid_thw`), or None when its rows hold no image. Rows split into equal
    microbatches in order, as torch's pipeline splits the token ids. `pixel_values` holds one entry per image,
    or, with `pixel_rows_per_image`, that many rows (patches) per image."""
    counts = torch.as_tensor(images_per_row, dtype=torch.long).flatten()
    rows = counts.numel()
    n_images = pixel_values.shape[0] if pixel_rows_per_image is None else pixel_rows_per_image.numel()
    if microbatches < 1 or rows % microbatches:
        raise ValueError(f"images_per_row: {rows} rows do not split into {microbatches} equal microbatches")
    if int(counts.min()) < 0 or int(counts.sum()) != n_images:
        raise ValueError(f"images_per_row: expected non-negative counts adding up to the {n_images} "
                         f"images in pixel_values, got {counts.tolist()}")
    if pixel_rows_per_image is not None and int(pixel_rows_per_image.sum()) != pixel_values.shape[0]:
        raise ValueError(f"pixel_rows_per_image: expected counts adding up to the {pixel_values.shape[0]} rows of "
                         f"pixel_values, got {pixel_rows_per_image.tolist()}")
    for key, t in per_image.items():
        if t.shape[0] != n_images:
            raise ValueError(f"{key}: expected one entry per image ({n_images}), got {t.shape[0]}")
    pixel_rows = (torch.ones(n_images, dtype=torch.long) if pixel_rows_per_image is None
                  else pixel_rows_per_image.to(torch.long).cpu())
    out, start, pixel_start = [], 0, 0
    for n in counts.view(microbatches, -1).sum(1).tolist():
        n_rows = int(pixel_rows[start : start + n].sum())
        out.append(None if n == 0 else {"pixel_values": pixel_values[pixel_start : pixel_start + n_rows],
                                        **{k: t[start : start + n] for k, t in per_image.items()}})
        start, pixel_start = start + n, pixel_start + n_rows
    return out


class ImageFeedingStage(nn.Module):
    """What stage 0 of a vision-language model adds: the schedule splits only batch-major tensors into
    microbatches, so `feed` keeps the step's images here, cut per microbatch, and hands the schedule the ids
    plus each row's microbatch index; the stage looks its images up with `images_for`."""

    def __init__(self, takes_images: bool):
        super().__init__()
        self.takes_images = takes_images
        self.vision_chunks: list[dict | None] | None = None

    def feed(self, input_ids: torch.Tensor, vision: dict | None, microbatches: int) -> tuple[torch.Tensor, ...]:
        """Stage 0's inputs for one step: the ids, and for a VLM its microbatch indices (images kept here).
        `vision` holds the model's pixel inputs and `images_per_row`; patch-flattened pixels (a per-image
        `image_grid_thw`) are cut by each image's patch count."""
        if not self.takes_images:
            if vision is not None:
                raise ValueError(f"vision: {type(self.model).__name__} is a text model, got images")
            return (input_ids,)
        if vision is None:
            self.vision_chunks = [None] * microbatches
        else:
            vision = dict(vision)
            grid = vision.get("image_grid_thw")
            self.vision_chunks = _vlm_pixel_values_chunks(
                vision.pop("pixel_values"), vision.pop("images_per_row"), microbatches,
                pixel_rows_per_image=grid.prod(-1) if grid is not None else None, **vision)
        rows = input_ids.shape[0]
        index = torch.arange(microbatches, device=input_ids.device).repeat_interleave(rows // microbatches)
        return input_ids, index

    def images_for(self, microbatch: torch.Tensor | None, device: torch.device) -> dict[str, torch.Tensor]:
        if microbatch is None:
            return {}
        chunk = self.vision_chunks[int(microbatch[0])]
        return {k: v.to(device) for k, v in chunk.items()} if chunk is not None else {}


class StageModule(ImageFeedingStage):
    """One pipeline stage of a native causal LM or VLM: ids (with a VLM's images) or hidden states in, hidden
    states or logits out. The padding mask travels with the hidden states from stage to stage (every stage's
    feed-forward layers skip the padding, as in a single process). With `mtp_depths`, the MTP depths' token
    embeddings travel beside them too (made on stage 0) and the last stage returns the logits of every depth
    after the model's."""

    def __init__(self, model: nn.Module, first: bool, last: bool, mtp_depths: int = 0):
        super().__init__(takes_images=first and getattr(model, "vision_tower", None) is not None)
        self.model = model
        self.first, self.last = first, last
        self.mtp_depths = mtp_depths

    @staticmethod
    def padding_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Stage 0's mask input, right after the ids: `attention_mask` as long, all ones when none is given."""
        if attention_mask is None:
            return torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {list(input_ids.shape)} (the ids'), "
                             f"got {list(attention_mask.shape)}")
        return attention_mask.to(device=input_ids.device, dtype=torch.long)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, *extra: torch.Tensor):
        if self.first:  # stage 0 takes the ids and, for a VLM, the microbatch index of its images
            inputs = {"input_ids": x, **self.images_for(extra[0] if extra else None, x.device)}
            depth_embeds = (tuple(rolled_token_embeddings(x, self.model.get_input_embeddings(), self.mtp_depths))
                            if self.mtp_depths else ())
        else:  # later stages take the hidden states and the MTP depths' embeddings
            inputs, depth_embeds = {"inputs_embeds": x}, extra
        # stage 0 checked the mask (the model refuses values other than 0 / 1); a later stage reads it as bool, for
        # the schedule's shape inference runs the stages on buffers no stage has written
        inputs["attention_mask"] = mask if self.first else mask != 0
        if self.last and self.mtp_depths:
            out = self.model(**inputs, return_mtp_logits=True, mtp_depth_embeds=list(depth_embeds))
            return (out.logits, *out.mtp_logits)
        out = self.model(**inputs)  # a pruned stage answers with a plain tensor (PipelineStageHooks)
        if self.last:
            return out if torch.is_tensor(out) else out.logits
        return (out if torch.is_tensor(out) else out.hidden_states, mask, *depth_embeds)


def lm_and_mtp_loss(output: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor, lm_targets: float,
                    depth_targets: list[float], mtp_scale: float, record: dict | None = None) -> torch.Tensor:
    """A microbatch's share of the step loss on the last stage: its summed cross-entropy over the step's
    `lm_targets`, plus `mtp_scale` x depth d's summed cross-entropy (labels rolled left by d) over the
    step's `depth_targets[d - 1]`, for each depth's logits after the model's in `output`. `record`
    accumulates the unscaled parts ("lm" and "depths") for logging."""
    logits, *depth_logits = output if isinstance(output, tuple) else (output,)
    lm = causal_lm_loss_sum(logits, labels) / lm_targets
    loss = lm
    depths = []
    for d, x in enumerate(depth_logits, start=1):
        depths.append(causal_lm_loss_sum(x, mtp_labels(labels, d)) / depth_targets[d - 1])
        loss = loss + mtp_scale * depths[-1]
    if record is not None:
        record["lm"] = record.get("lm", 0.0) + float(lm.detach())
        sums = record.setdefault("depths", [0.0] * len(depths))
        for d, x in enumerate(depths):
            sums[d] += float(x.detach())
    return loss


MODALITY_KWARG_SEPARATOR = "."


def mimo_stage_kwargs(modality_inputs: dict[str, dict[str, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """`{modality: {encoder: {kwarg: tensor}}}` -> flat `{"modality.encoder.kwarg": tensor}`: the schedule splits
    flat tensors into microbatches along dim 0 (so every row of a tensor must belong to one sample, in order)."""
    flat = {}
    for modality, encoders in modality_inputs.items():
        for encoder, kwargs in encoders.items():
            for name, tensor in kwargs.items():
                if not isinstance(tensor, torch.Tensor):
                    raise ValueError(f"modality_inputs[{modality!r}][{encoder!r}][{name!r}]: pipeline stages take "
                                     f"tensors, got {type(tensor).__name__}")
                flat[MODALITY_KWARG_SEPARATOR.join((modality, encoder, name))] = tensor
    return flat


class MimoStageModule(nn.Module):
    """One pipeline stage of a MIMO model. The first takes token ids and the flat modality inputs, runs the
    encoders, projections, embedding and its layers; later stages take the previous hidden states, which
    they hand to the model with `set_input_tensor`."""

    def __init__(self, model: nn.Module, first: bool, last: bool):
        super().__init__()
        self.model = model
        self.first, self.last = first, last

    def forward(self, x: torch.Tensor, **flat_modality_inputs: torch.Tensor) -> torch.Tensor:
        if self.first:
            nested: dict = {}
            for key, tensor in flat_modality_inputs.items():
                modality, encoder, name = key.split(MODALITY_KWARG_SEPARATOR)
                nested.setdefault(modality, {}).setdefault(encoder, {})[name] = tensor
            self.model.set_input_tensor(None)
            out, _ = self.model(x, modality_inputs=nested)
        else:
            self.model.set_input_tensor(x)
            out, _ = self.model(None)
        if torch.is_tensor(out):  # a pruned native language model answers with a plain tensor
            return out
        return out.logits if self.last else out.hidden_states


def _prune_to_stage(model: nn.Module, stage: int, layers_per_stage: list[list[str]]) -> None:
    """In place: keep stage `stage`'s decoder layers (keys unchanged), the embedding on the first stage and the
    final norm and LM head on the last."""
    n = len(layers_per_stage)
    inner = text_model_of(model)
    keep = set(layers_per_stage[stage])
    for key in list(inner.layers.keys()):
        if key not in keep:
            del inner.layers[key]
    if stage != 0:
        inner.embed_tokens = None
        for name in ("vision_tower", "multi_modal_projector"):  # a VLM's images enter on the first stage
            if getattr(model, name, None) is not None:
                setattr(model, name, None)
    if stage != n - 1:
        inner.norm = None
        model.lm_head = None
        if getattr(inner, "mtp", None) is not None:
            inner.mtp = None  # MTP depths run on the last stage


def make_stage_module(full_model: nn.Module, stage: int, layers_per_stage: list[list[str]]) -> nn.Module:
    """A copy of `full_model` pruned to stage `stage`. A MIMO model keeps its encoders and projections on the
    first stage only."""
    lm = causal_lm_of(full_model)
    check_pipelinable(lm)
    first, last = stage == 0, stage == len(layers_per_stage) - 1
    model = copy.deepcopy(full_model)
    mtp = getattr(text_model_of(causal_lm_of(model)), "mtp", None)
    _prune_to_stage(causal_lm_of(model), stage, layers_per_stage)
    if lm is full_model:
        return StageModule(model, first, last, mtp_depths=mtp.num_depths if mtp is not None else 0)
    if mtp is not None:
        raise ValueError("pipeline stages for a MIMO model whose language model has MTP depths: not supported yet")
    if not first:  # encoders only where the embeddings are made
        model.encoders, model.projections = nn.ModuleDict(), nn.ModuleDict()
    return MimoStageModule(model, first, last)


def merge_stage_models(models: list[nn.Module]) -> nn.Module:
    """One module tree holding the submodules of every given stage model (pruned copies of one model) at their
    own paths, shared, not copied; the stage models are left as they are. Where two stages hold the same path
    (the text model, the ModuleDict of layers) their children merge; a parameter on two stages is refused."""
    view = models[0]
    for other in models[1:]:
        view = _merge_modules(view, other)
    return view


def _merge_modules(a: nn.Module, b: nn.Module, path: str = "") -> nn.Module:
    if a is b:
        return a
    out = copy.copy(a)  # shallow: shares a's submodules and tensors, with tables of its own to add b's to
    out._modules, out._parameters, out._buffers = dict(a._modules), dict(a._parameters), dict(a._buffers)
    out._non_persistent_buffers_set = a._non_persistent_buffers_set | b._non_persistent_buffers_set
    for name, p in b._parameters.items():
        if p is not None and out._parameters.get(name) is not None and out._parameters[name] is not p:
            raise ValueError(f"pipeline: parameter {path + name!r} is held by two stages")
        if p is not None:
            out._parameters[name] = p
    for name, t in b._buffers.items():  # a buffer on two stages (rotary tables) holds the same values on both
        if t is not None and out._buffers.get(name) is None:
            out._buffers[name] = t
    for name, child in b._modules.items():
        if child is not None:
            mine = out._modules.get(name)
            out._modules[name] = child if mine is None else _merge_modules(mine, child, f"{path}{name}.")
    return out


@dataclass
class PipelineRun:
    schedule: object
    modules: list[StageModule | MimoStageModule]
    stage_ids: list[int]
    num_stages: int
    microbatches: int = 1

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    def parameters(self):
        for m in self.modules:
            yield from m.parameters()

    def local_model(self) -> nn.Module:
        """This rank's stages as one model, each stage's modules at their paths in the full model: parameters,
        optimizer state and checkpoint keys are named as in a single-process run, whatever the layout."""
        return merge_stage_models([m.model for m in self.modules])

    def named_parameters(self):
        for m in self.modules:
            yield from m.model.named_parameters()

    def warm_up(self, input_ids: torch.Tensor, labels: torch.Tensor, loss_scale: dict, vision: dict | None = None,
                attention_mask: torch.Tensor | None = None) -> None:
        """torch's pipeline infers the stages' shapes with extra forwards on its first step. Run that first
        step here, on a batch of the training shape with the loss scaled to zero, then drop what it left:
        gradients and MoE expert counts. Shapes must stay fixed afterwards (pad batches to one length)."""
        loss_scale["value"] = 0.0
        try:
            self.step(input_ids, labels, vision, attention_mask=attention_mask)
        finally:
            loss_scale["value"] = 1.0
        for m in self.modules:
            m.zero_grad(set_to_none=True)
            for module in m.modules():
                counts = getattr(module, "tokens_per_expert", None)
                if counts is not None:
                    counts.zero_()

    def step(self, input_ids: torch.Tensor | None, labels: torch.Tensor | None,
             vision: dict | None = None, attention_mask: torch.Tensor | None = None,
             **first_stage_inputs: torch.Tensor) -> list[torch.Tensor]:
        """One forward + backward over all microbatches. Ranks holding stage 0 pass `input_ids` (and a VLM's
        `vision` inputs: pixel_values, images_per_row and per-image tensors; or a MIMO model's flat modality
        inputs, `mimo_stage_kwargs`; for a native model the padding mask, `attention_mask`, 1 on real tokens),
        ranks holding the last stage pass `labels`; returns the per-microbatch losses there (else [])."""
        losses: list[torch.Tensor] = []
        args = (input_ids,) if self.has_first else ()
        kwargs = first_stage_inputs if self.has_first else {}
        first = self.modules[self.stage_ids.index(0)] if self.has_first else None
        if attention_mask is not None and first is not None and not isinstance(first, StageModule):
            raise ValueError(f"attention_mask: this pipeline's first stage ({type(first).__name__}) takes none")
        if hasattr(first, "feed"):  # stages that take more than the ids (stock VLMs) say what stage 0 gets
            args = first.feed(input_ids, vision, self.microbatches)
        elif first is not None and vision is not None:
            raise ValueError(f"vision: this pipeline's first stage ({type(first).__name__}) takes token ids only")
        if isinstance(first, StageModule):  # native stages: the padding mask rides right after the ids
            args = (args[0], first.padding_mask(input_ids, attention_mask), *args[1:])
        self.schedule.step(*args, target=labels if self.has_last else None, losses=losses, **kwargs)
        return losses


def build_pipeline(full_model: nn.Module, *, rank: int, ranks: int, schedule: str, microbatches: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device,
                   layers_per_stage: list[int] | None = None, virtual_stages: int = 1, group=None,
                   make_stage: Callable[[nn.Module, int, list[list[str]]], nn.Module] = make_stage_module,
                   parts: StageParts | None = None, split: str = "even",
                   stage_modules: list[list[str]] | None = None) -> PipelineRun:
    """This rank's stages of `full_model` and the schedule that runs them. Every rank of the pipeline (`group`:
    its process group, None for the whole world; `rank` and `ranks` count within it) calls it with the same
    full model (same weights) and arguments. What cannot be pipelined is refused when the first stage is cut
    (`make_stage`), before any stage joins the schedule. `make_stage` and `parts` default to plait's native
    models; `hf_pipeline.build_hf_pipeline` passes those of stock transformers models."""
    from torch.distributed.pipelining import PipelineStage

    if microbatches < 1:
        raise ValueError(f"parallel.microbatches: expected a positive count, got {microbatches}")
    ids = stage_indices(schedule, rank, ranks, virtual_stages)
    num_stages = ranks * stages_per_rank(schedule, virtual_stages)
    if schedule not in SINGLE_STAGE_SCHEDULES and microbatches % ranks:
        raise ValueError(f"parallel.microbatches: {schedule} needs a multiple of the {ranks} pipeline ranks, got {microbatches}")
    parts = parts if parts is not None else native_stage_parts(full_model)
    layers = choose_split(parts, num_stages, split, layers_per_stage, stage_modules)
    modules = [make_stage(full_model, s, layers).to(device) for s in ids]
    stages = [PipelineStage(m, s, num_stages, device, group=group) for m, s in zip(modules, ids)]
    cls = _schedule_class(schedule)
    kwargs = dict(n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    sched = cls(stages[0], **kwargs) if schedule in SINGLE_STAGE_SCHEDULES else cls(stages, **kwargs)
    return PipelineRun(sched, modules, ids, num_stages, microbatches)
