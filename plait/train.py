"""The training loop: data, model, AdamW with warm-up + cosine/WSD, gradient accumulation, eval, export.

The loss of an optimizer step is the sum of per-token cross-entropies over all its micro-batches divided
by the number of target tokens in the whole step, so accumulating 4 micro-batches of 16 gives the same
update as one batch of 64. Everything is seeded: on CPU two runs of one config log the same losses.
"""

from __future__ import annotations

import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch import nn
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from plait.checkpoint import (
    TRAINER_STATE_FILE,
    check_model_dir,
    check_training_checkpoint,
    commit_dir,
    make_temp_dir,
    latest_training_checkpoint,
    load_training_state,
    save_training_state,
    step_dirs,
    write_checksums,
)
from plait.compile import compile_layers, eager, require_compiler
from plait.config import RunConfig, TrainSettings
from plait.data.collate import collate_packed, collate_padded
from plait.data.dataset import BATCH_KEYS, CaptionDataset, MixedCaptionDataset
from plait.data.images import normalize
from plait.data.sources import load_audio_splits, load_splits
from plait.data.tokenizer import load_tokenizer, special_token_ids, train_tokenizer
from plait.evaluate import evaluate_dataset
from plait.host_memory import configure_host_allocator
from plait.metrics import MetricsLog, plot_loss_curve
from plait.models import is_native
from plait.models.build import MODALITY_PLACEHOLDERS, build_model
from plait.models.mimo import MimoForCausalLM
from plait.models.vlm import vlm_spec
from plait.nn.loss import count_targets, micro_batch_loss_sums
from plait.mtp import mtp_labels
from plait.nn.attention import AttentionMask
from plait.nn.moe import load_imbalance, pop_logged_aux_loss, route_aux_loss_through_backward, update_expert_bias
from plait.parallel.data_parallel import (
    DistContext,
    clip_grad_norm_over_stages,
    init_distributed,
    sum_gradients_over_replicas,
    wrap_data_parallel,
)
from plait.parallel.fsdp import apply_fsdp, fsdp_param_dtype, full_state_dict, to_number

RUN_CONFIG_FILE = "plait_run.yaml"


def lr_multiplier(step: int, settings: TrainSettings) -> float:
    """lr factor for optimizer step `step` (0-based): linear warm-up, then cosine, WSD or constant."""
    total = settings.steps
    warmup = min(settings.warmup_steps, max(total - 1, 0))  # clipped so any positive run length works
    if step < warmup:
        return (step + 1) / (warmup + 1)
    floor = settings.min_lr_ratio
    if settings.schedule == "constant":
        return 1.0
    if settings.schedule == "cosine":
        progress = (step - warmup) / max(total - warmup - 1, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    # WSD: warm-up, stable at the peak, then a linear decay over the last `decay_fraction` of the run.
    decay_steps = max(1, round(settings.decay_fraction * (total - warmup)))
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1.0 - floor) * (step - decay_start + 1) / decay_steps


class SampleOrder:
    """A fresh seeded permutation of the training set every epoch; `position` says where the run is."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            k = min(n - len(out), self.size - self.position)
            out += self._order[self.position : self.position + k]
            self.position += k
        return out


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: 'cuda' requested but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """The dtype `train.autocast` runs the step's matmuls in on `device` (None: no autocast)."""
    return torch.bfloat16 if mode == "bf16" or (mode == "auto" and device.type == "cuda") else None


def autocast_for(device: torch.device, mode: str):
    dtype = autocast_dtype(device, mode)
    return partial(torch.autocast, device_type=device.type, dtype=dtype) if dtype is not None else nullcontext


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms, biases and other vectors are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class Run:
    """Everything a run builds before its first step; shared by train, eval and inspect."""

    cfg: RunConfig
    tokenizer: object
    datasets: dict[str, CaptionDataset | MixedCaptionDataset]
    model: torch.nn.Module
    device: torch.device

    def vision_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return vlm_spec(self.model.config.model_type).vision_inputs(self.model.config, pixel_values)

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict:
        """The keyword inputs a collated batch's items become for this model (beside the token ids), on its device."""
        if isinstance(self.model, MimoForCausalLM):
            items = {key: _model_ready(key, batch[key]).to(self.device) for key in BATCH_KEYS.values() if key in batch}
            return {"modality_inputs": self.model.mimo.batch_inputs(items)}
        return {k: v.to(self.device) for k, v in self.vision_inputs(normalize(batch["images"])).items()}


def prepare_run(cfg: RunConfig, tokenizer=None) -> Run:
    """Load data, train (or load) the tokenizer, build the model; no file is written here."""
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    device = pick_device(cfg.train.device)
    splits = load_splits(cfg.data)
    audio = load_audio_splits(cfg.data.audio) if cfg.data.audio is not None else None
    if tokenizer is None:
        if cfg.model.pretrained is not None:
            check_model_dir(cfg.model.pretrained)  # the model dir first: a missing one is not a tokenizer problem
            tokenizer = load_tokenizer(cfg.model.pretrained)
        else:
            texts = splits["train"].captions + (audio["train"].captions if audio else [])
            texts += [cfg.data.prompt] if cfg.data.prompt else []
            tokenizer = train_tokenizer(texts, kind=cfg.data.tokenizer, vocab_size=cfg.data.vocab_size)
    ids = special_token_ids(tokenizer)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, len(tokenizer), ids, cfg.data.image_size)
    if isinstance(model, MimoForCausalLM):
        datasets = _mimo_datasets(model, {"images": splits, "audio": audio}, tokenizer, cfg.data.prompt)
    else:
        if audio is not None:
            raise ValueError(f"data.audio: audio clips are fed to MIMO models only, got a {model.config.model_type} model")
        image_tokens = vlm_spec(model.config.model_type).image_token_count(model.config, cfg.data.image_size)
        datasets = {name: CaptionDataset(split, tokenizer, image_tokens, cfg.data.prompt) for name, split in splits.items()}
    if cfg.data.packing and cfg.data.pack_length < datasets["train"].max_length():
        raise ValueError(
            f"data.pack_length: {cfg.data.pack_length} is shorter than the longest training sample "
            f"({datasets['train'].max_length()} tokens)"
        )
    return Run(cfg, tokenizer, datasets, model.to(device), device)


def _model_ready(key: str, items: torch.Tensor) -> torch.Tensor:
    """Images travel as uint8 and are normalised per batch; audio features are stored ready."""
    return normalize(items) if key == "images" else items


def _mimo_datasets(model: MimoForCausalLM, splits_per_modality: dict, tokenizer, prompt: str) -> dict:
    """Per split, one captioning set per modality of the MIMO model (its items become as many placeholder
    tokens as its encoders give rows for one item), served together."""
    mimo = model.mimo
    parts: dict[str, dict[str, CaptionDataset]] = {}
    for modality in mimo.encoders:
        splits = splits_per_modality.get(modality)
        if splits is None:
            raise ValueError(f"model.mimo.modalities: {modality!r} needs its data (data.audio for 'audio'), got none")
        tokens = mimo.tokens_per_item(modality, _model_ready(modality, splits["train"].items[0]))
        role = MODALITY_PLACEHOLDERS[modality]
        for name, split in splits.items():
            parts.setdefault(name, {})[modality] = CaptionDataset(split, tokenizer, tokens, prompt, placeholder=role)
    return {name: MixedCaptionDataset(p) for name, p in parts.items()}


def write_model_dir(tmp: Path, model, tokenizer, run_config_yaml: str | None, state_dict: dict | None = None,
                    fp8_block_size: tuple[int, int] | None = None) -> None:
    """The HF files of a plait model dir: config + safetensors, tokenizer.json, and the run config.
    `state_dict`: the full state of a sharded (FSDP) model, gathered on this rank. `fp8_block_size`: a native
    model's linear weights block-quantized to float8 (plait.fp8)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-shard bar for a one-file save is noise in the run's log
    options = {} if state_dict is None else {"state_dict": state_dict}
    if fp8_block_size is not None:
        options["fp8_block_size"] = fp8_block_size
    model.save_pretrained(tmp, **options)
    tokenizer.save_pretrained(tmp)
    if run_config_yaml is not None:
        (tmp / RUN_CONFIG_FILE).write_text(run_config_yaml)


def export_model(run: Run, target: Path, training_state: Callable[[Path], None] | None = None,
                 ctx: DistContext = DistContext()) -> Path:
    """The model in HF layout + tokenizer.json + the run config (+ the training state), written atomically.

    Every rank takes part in the training-state save (a DCP collective) into the temp dir rank 0 made (and,
    under FSDP, in gathering the full weights); rank 0 alone writes the HF files and renames the dir once all
    ranks are done. In a single process
    the broadcast and barriers are no-ops.
    """
    tmp = ctx.broadcast(make_temp_dir(target) if ctx.is_main else None)
    try:
        if training_state is not None:
            training_state(tmp)
        full_state = full_state_dict(run.model) if ctx.sharded else None  # a collective: every rank takes part
        if ctx.is_main:
            write_model_dir(tmp, run.model, run.tokenizer, run.cfg.to_yaml(), full_state)
        ctx.barrier()
        if ctx.is_main:  # every rank's shards are written now: record them all (a native model's weights are
            write_checksums(tmp, keep_recorded=True)  # already, from its save), then publish the dir
            commit_dir(tmp, target)
    except BaseException:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    ctx.barrier()
    return Path(target)


def _prune_checkpoints(ckpt_root: Path, keep_last: int | None) -> None:
    """Keep the newest `keep_last` checkpoints, and drop what crashed saves left behind (`.tmp-*`, `.old-*`):
    called right after a save completed, when no other save is under way."""
    for leftover in list(ckpt_root.glob(".tmp-*")) + list(ckpt_root.glob(".old-*")):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last is None:
        return
    for _, path in step_dirs(ckpt_root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def _restore_trainer_state(path: Path, state: dict, scheduler, order) -> None:
    """The learning-rate schedule, the data order and the RNG from a checkpoint's trainer state; a key that is
    missing or will not restore is a `ValueError` naming it (nothing is written before the first step)."""
    restores = (("scheduler", scheduler.load_state_dict), ("data", order.load_state_dict),
                ("rng", lambda value: torch.set_rng_state(torch.tensor(value, dtype=torch.uint8))))
    for key, restore in restores:
        try:
            restore(state[key])
        except (KeyError, TypeError, AttributeError, RuntimeError, ValueError, OverflowError) as e:
            raise ValueError(f"training checkpoint {str(path)!r}: {TRAINER_STATE_FILE} entry {key!r} does not "
                             f"restore ({type(e).__name__}: {str(e)[:200]})") from None


def _resume_point(cfg: RunConfig, ckpt_root: Path) -> tuple[Path | None, dict | None]:
    """The checkpoint `train.resume=auto` continues from, checked before anything is written.

    It must hold a run of the same resolved config: continuing a different run would silently mix two
    experiments in one output_dir. `train.resume` and the `parallel` section do not count: the layout
    (processes, pipeline stages, schedule, microbatches) changes where the step's sums are computed, not the
    step (same global batch, same normalisation), and the training state is saved by full-model names, so it
    loads into any layout. `never` refuses an output_dir that holds checkpoints (a new run there would leave
    the earlier run's later steps beside its own, and `auto` would then continue the wrong one).
    """
    if cfg.train.resume == "never":
        earlier = step_dirs(ckpt_root)
        if earlier:
            raise ValueError(
                f"train.resume=never: {ckpt_root} holds checkpoints of an earlier run (steps "
                f"{', '.join(str(s) for s, _ in earlier[-5:])}); pass train.resume=auto to continue it, "
                "train.resume=overwrite to start over (its checkpoints are deleted), or another output_dir")
    if cfg.train.resume != "auto":
        return None, None
    latest = latest_training_checkpoint(ckpt_root)
    if latest is None:
        return None, None
    state = check_training_checkpoint(latest)
    saved = None
    if (latest / RUN_CONFIG_FILE).is_file():
        try:
            saved = yaml.safe_load((latest / RUN_CONFIG_FILE).read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"training checkpoint {str(latest)!r}: {RUN_CONFIG_FILE} is not a run config "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        if not isinstance(saved, dict):
            raise ValueError(f"training checkpoint {str(latest)!r}: {RUN_CONFIG_FILE}: expected a mapping, got "
                             f"{type(saved).__name__}")
    ours = cfg.model_dump(mode="json")
    for config in (saved, ours):
        if config is not None:
            config.get("train", {}).pop("resume", None)
            config.pop("parallel", None)
    if saved != ours:
        diffs = _config_diff(saved or {}, ours)
        raise ValueError(
            f"train.resume=auto: {ckpt_root} holds a run of a different config ({'; '.join(diffs[:5])}); "
            "use another output_dir, or the same config to resume it"
        )
    return latest, state


def _config_diff(saved: dict, ours: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(ours)):
        a, b = saved.get(key), ours.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: saved {a!r}, now {b!r}")
    return out


@dataclass
class TrainResult:
    output_dir: Path
    checkpoint_dir: Path
    final_metrics: dict[str, float]
    loss_curve: Path


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=not enabled,
    )


def _pipeline_vision(run: Run, batch: dict) -> dict | None:
    """Stage 0's image inputs for a pipelined step: the model's pixel inputs and one image per row (a
    captioning sample holds one image); None for text-only models."""
    inputs = run.vision_inputs(normalize(batch["images"]))
    if not inputs:
        return None
    return {**inputs, "images_per_row": torch.ones(batch["input_ids"].shape[0], dtype=torch.long)}


def _pipeline_mask(model: nn.Module, batch: dict) -> dict:
    """Native stages carry the padding mask with the hidden states (their feed-forward layers skip padding);
    stock transformers stages take none."""
    return {"attention_mask": batch["attention_mask"]} if is_native(model) and "attention_mask" in batch else {}


def _build_pipeline(cfg: RunConfig, run: Run, ctx: DistContext, step_total: dict, example: dict):
    """This rank's pipeline stages (plait's own stages for native models, patched transformers stages for
    stock ones), warmed up on a batch of the training shape. The loss on the last stage is normalised over
    the whole step's targets (each MTP depth's over its own), and its parts are recorded in
    step_total["record"] for the log."""
    from plait.parallel.hf_pipeline import build_hf_pipeline
    from plait.parallel.pipeline import build_pipeline, lm_and_mtp_loss

    model, device = run.model, run.device
    build = build_pipeline if is_native(model) else build_hf_pipeline

    scale = {"value": 1.0}
    mtp_cfg = getattr(model, "mtp_config", None)
    depths = mtp_cfg.num_layers if mtp_cfg is not None else 0
    mtp_scale = mtp_cfg.loss_scaling_factor / depths if depths else 0.0

    def loss_fn(output, labels: torch.Tensor) -> torch.Tensor:
        loss = lm_and_mtp_loss(output, labels, step_total["targets"], step_total.get("depth_targets", [1.0] * depths),
                               mtp_scale, step_total["record"])
        return loss * scale["value"]

    p = cfg.parallel
    pipe = build(model, rank=ctx.pp_rank, ranks=p.pp, group=ctx.pp_group, schedule=p.schedule,
                 microbatches=p.microbatches, loss_fn=loss_fn, device=device, layers_per_stage=p.layers_per_stage,
                 virtual_stages=p.virtual_stages, split=p.split, stage_modules=p.stage_modules)
    pipe.warm_up(example["input_ids"].to(device), example["labels"].to(device), scale, _pipeline_vision(run, example),
                 **_pipeline_mask(model, example))
    return pipe


def _gather_stages(pipe, model: nn.Module, ctx: DistContext) -> None:
    """Copy every stage's current weights into rank 0's whole model (for evaluation and the HF export); the
    first replica's pipeline sends them (the others hold the same weights)."""
    import torch.distributed as dist

    mine = ({name: t.detach().cpu() for m in pipe.modules for name, t in m.model.state_dict().items()}
            if ctx.dp_rank == 0 else {})
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    if ctx.is_main:
        merged = {k: v for part in everyone for k, v in part.items()}
        model.load_state_dict(merged, strict=True)


def freeze_all_but(model: nn.Module, trained: nn.Module) -> None:
    """requires_grad only on `trained`'s parameters (shared ones, like a tied head, stay frozen elsewhere)."""
    keep = {id(p) for p in trained.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def _trained_part(cfg: RunConfig, model: nn.Module, local: nn.Module) -> nn.Module:
    """What the optimizer and the MoE bias updates touch: this process's model (or pipeline stages), or with
    model.mtp.train_only its copy of the MTP depths alone (a pipeline stage without them trains nothing)."""
    if not cfg.model.mtp.train_only:
        return local
    name = next(n for n, m in model.named_modules() if m is model.mtp_backbone.mtp)
    try:
        return local.get_submodule(name)
    except AttributeError:
        return nn.ModuleList()


def set_train_mode(model: nn.Module, trained: nn.Module) -> None:
    """Training mode for the part being trained only: a frozen trunk stays in eval mode, so its MoE layers
    neither count expert loads nor move their balancing biases."""
    if trained is model:
        model.train()
    else:
        model.eval()
        trained.train()


def _depth_labels(batch: dict, depths: int) -> list[torch.Tensor]:
    """Labels of MTP depths 1..depths; packed batches keep each document's targets inside it."""
    if not depths:
        return []
    documents = None
    if "position_ids" in batch:
        B, S = batch["input_ids"].shape
        documents = AttentionMask.build(B, S, "cpu", position_ids=batch["position_ids"]).documents
    return [mtp_labels(batch["labels"], d, documents) for d in range(1, depths + 1)]


def train(cfg: RunConfig, console: Console | None = None) -> TrainResult:
    console = console or Console(soft_wrap=True)
    configure_host_allocator(cfg.train.host_allocator)  # process-wide: the trainer owns its process
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    resume_from, resume_state = _resume_point(cfg, ckpt_root)
    device = pick_device(cfg.train.device)
    if cfg.train.compile:
        require_compiler(device)  # before the data and the model are built
    param_dtype = fsdp_param_dtype(cfg.parallel.fsdp_param_dtype, autocast_dtype(device, cfg.train.autocast))
    ctx = init_distributed(cfg.parallel, device)
    if not ctx.is_main:
        console = Console(quiet=True)  # one rank speaks, and writes logs and the HF export
    run = prepare_run(cfg)
    model, device, tcfg = run.model, run.device, cfg.train
    train_set = run.datasets["train"]
    if cfg.model.mtp.train_only:  # before DDP and the pipeline take stock of what needs gradients
        freeze_all_but(model, model.mtp_backbone.mtp)
    # an MoE aux loss is the mean over the step's forwards (micro-batches, pipeline microbatches, on every
    # replica: their gradients are summed), its gradient added by each MoE layer itself: no stage needs another
    # stage's aux loss
    forwards = tcfg.grad_accum * (cfg.parallel.microbatches if cfg.parallel.pp > 1 else 1) * cfg.parallel.data_parallel
    route_aux_loss_through_backward(model, 1.0 / forwards)
    # the pipeline's loss function reads the current step's target counts and records the loss parts
    step_total = {"targets": 1.0, "record": {}}
    pipe = None
    pad_to = None
    if cfg.parallel.pp > 1:  # pipeline stages exchange fixed shapes: every batch is padded to one length
        pad_to = train_set.max_length()
        rows = tcfg.batch_size // (tcfg.grad_accum * ctx.replicas)  # one replica's share of a micro-batch
        example = collate_padded([train_set[i] for i in range(rows)], train_set.pad_id, pad_to)
        pipe = _build_pipeline(cfg, run, ctx, step_total, example)
    # what this process trains: the whole model, or its pipeline stages (named as in the whole model)
    local = pipe.local_model() if pipe is not None else model
    if tcfg.compile:  # per layer, in place: the wrappers below and the checkpoints see the same modules
        compile_layers(model, device)
    if ctx.sharded:  # FSDP2 shards the model in place: before the optimizer is built over its parameters
        replica = apply_fsdp(model, ctx.fsdp_mesh, param_dtype)
    else:
        replica = wrap_data_parallel(model, ctx, device) if pipe is None else None
    pad_id = train_set.pad_id
    micro = tcfg.batch_size // tcfg.grad_accum
    collate = (partial(collate_packed, pad_id=pad_id, pack_length=cfg.data.pack_length) if cfg.data.packing
               else partial(collate_padded, pad_id=pad_id, pad_to=pad_to))
    autocast = autocast_for(device, tcfg.autocast)
    optimizer = torch.optim.AdamW(param_groups(local, tcfg.weight_decay), lr=tcfg.lr, betas=tcfg.betas, eps=tcfg.eps,
                                  fused=device.type in ("cuda", "cpu"))  # one kernel per step, not ~10 per tensor
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_multiplier, settings=tcfg))
    order = SampleOrder(len(train_set), tcfg.seed)
    mtp_cfg = getattr(model, "mtp_config", None)
    mtp_depths = mtp_cfg.num_layers if mtp_cfg is not None else 0
    mtp_scale = mtp_cfg.loss_scaling_factor / mtp_depths if mtp_depths else 0.0
    trained = _trained_part(cfg, model, local)
    loss_from_hidden = is_native(model)
    eval_every = min(tcfg.eval_every, tcfg.steps) if tcfg.eval_every else 0
    start = 0
    if resume_from is not None:
        load_training_state(resume_from, local, optimizer, checked_state=resume_state)  # checked by _resume_point
        _restore_trainer_state(resume_from, resume_state, scheduler, order)
        start = resume_state["step"]
        console.print(f"resumed from step {start} ({resume_from})")
    log = None
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)  # first write of the run: everything above only reads
        if tcfg.resume == "overwrite" and ckpt_root.exists():
            shutil.rmtree(ckpt_root)
        (out_dir / RUN_CONFIG_FILE).write_text(cfg.to_yaml())
        log = MetricsLog(out_dir, resume_step=start if resume_from is not None else None)

    def training_state(step: int) -> Callable[[Path], None]:
        trainer = {"step": step, "scheduler": scheduler.state_dict(), "data": order.state_dict(),
                   "rng": torch.get_rng_state().tolist(), "world_size": ctx.world_size}
        return lambda tmp: save_training_state(tmp, local, optimizer, trainer, write_trainer_state=ctx.is_main)

    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"model {model.config.model_type}: {n_params:,} parameters on {device}; "
                  f"{len(train_set):,} training samples; {tcfg.steps} steps of {tcfg.batch_size}")

    def run_eval(step: int, split: str, num_samples: int | None) -> dict[str, float]:
        """On rank 0 (the others wait): held-out figures do not need every replica. A sharded model's forward
        needs every rank, so there all ranks evaluate the same samples and rank 0 logs."""
        metrics = {}
        if pipe is not None:
            _gather_stages(pipe, model, ctx)
        if ctx.is_main or ctx.sharded:
            with eager() if tcfg.compile else nullcontext():  # decoding would recompile at every cache length
                metrics = evaluate_dataset(model, run.datasets[split], run.model_inputs, run.tokenizer,
                                            num_samples=num_samples, batch_size=cfg.eval.batch_size,
                                            max_new_tokens=cfg.eval.max_new_tokens, device=device, autocast=autocast)
            set_train_mode(local, trained)
        if ctx.is_main:
            log.log({"step": step, "split": split, **{f"eval_{k}": v for k, v in metrics.items()}})
        ctx.barrier()
        return metrics

    set_train_mode(local, trained)
    pop_logged_aux_loss(trained)  # what the pipeline's shape-inference forwards left
    with _progress(console, tcfg.progress) as progress:
        task = progress.add_task("train", total=tcfg.steps, completed=start, loss=float("nan"), tps=0.0)
        for step in range(start + 1, tcfg.steps + 1):
            t0 = time.perf_counter()
            # every rank draws the same global micro-batches and keeps its replica's slice of each
            batches = [collate([train_set[i] for i in ctx.shard(order.take(micro))]) for _ in range(tcfg.grad_accum)]
            step_targets = ctx.sum(sum(count_targets(b["labels"]) for b in batches))
            # MTP depth d: labels rolled left by d inside each document, normalised over the step like the main loss
            depth_labels = [_depth_labels(b, mtp_depths) for b in batches]
            depth_targets = [max(ctx.sum(sum(count_targets(dl[d]) for dl in depth_labels)), 1.0) for d in range(mtp_depths)]
            lm_sum, depth_sums, pooled_aux = 0.0, [0.0] * mtp_depths, 0.0
            tokens = sum(int((b["input_ids"] != pad_id).sum()) for b in batches)
            if pipe is not None:
                step_total.update(targets=step_targets, depth_targets=depth_targets, record={})
                for b in batches:
                    # stage 0 feeds the ids, the last stage scores the labels; the loss lives on the last stage's rank
                    with autocast():
                        pipe.step(b["input_ids"].to(device), b["labels"].to(device), _pipeline_vision(run, b),
                                  **_pipeline_mask(model, b))
                sum_gradients_over_replicas(list(local.parameters()), ctx)
                record = step_total["record"]  # filled on the last stage's rank
                lm_sum = ctx.sum_over_stages(record.get("lm", 0.0))
                depth_sums = [ctx.sum_over_stages(x) for x in record.get("depths", [0.0] * mtp_depths)]
            else:
                for b, labels_per_depth in zip(batches, depth_labels):
                    inputs = {k: b[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in b}
                    with autocast():
                        lm, depths, router_aux = micro_batch_loss_sums(
                            replica, loss_from_hidden, inputs, run.model_inputs(b), b["labels"].to(device),
                            [x.to(device) for x in labels_per_depth])
                        lm = lm / step_targets
                        loss = lm
                        if router_aux is not None:  # output_router_logits: a mean over the step's forwards
                            loss = loss + router_aux / forwards
                            pooled_aux += float(router_aux.detach()) / forwards
                        for d, depth in enumerate(depths):
                            depth = depth / depth_targets[d]
                            loss = loss + mtp_scale * depth
                            depth_sums[d] += float(depth.detach())
                    loss.backward()  # DDP sums the replicas' gradients
                    lm_sum += float(lm.detach())
            lm_sum, tokens = ctx.sum(lm_sum), int(ctx.sum(tokens))
            depth_sums = [ctx.sum(x) for x in depth_sums]
            # each rank logged its own layers' share of the mean over all forwards of the step
            aux = ctx.sum(ctx.sum_over_stages(pop_logged_aux_loss(trained))) + ctx.sum(pooled_aux)
            loss_sum = lm_sum + mtp_scale * sum(depth_sums) + aux
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip or float("inf"))
                         if pipe is None else clip_grad_norm_over_stages(local.parameters(), tcfg.grad_clip, ctx))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # MoE: this step's expert loads, summed over ranks, move the correction biases toward balance
            expert_loads = update_expert_bias(trained, all_reduce=ctx.all_reduce_)
            # the worst layer of the model: each pipeline rank holds its own stages' layers (0: none here)
            imbalance = ctx.max_over_stages(load_imbalance(expert_loads) if expert_loads else 0.0)
            tps = tokens / (time.perf_counter() - t0)
            if log is not None:
                row = {"step": step, "loss": loss_sum, "lm_loss": lm_sum, "lr": lr, "grad_norm": to_number(grad_norm),
                       "tokens": tokens, "tokens_per_s": tps, "epoch": order.epoch, "world_size": ctx.world_size}
                row.update({f"mtp_loss_{d + 1}": x for d, x in enumerate(depth_sums)})
                if imbalance:
                    row["moe_load_imbalance"] = imbalance
                if aux:
                    row["moe_aux_loss"] = aux
                log.log(row)
            progress.update(task, advance=1, loss=loss_sum, tps=tps)
            if step % tcfg.log_every == 0 and not console.is_terminal:
                console.print(f"step {step}/{tcfg.steps} loss {loss_sum:.4f} lr {lr:.2e} {tps:,.0f} tok/s")
            if eval_every and step % eval_every == 0 and step != tcfg.steps:
                m = run_eval(step, "val", tcfg.eval_samples)
                if ctx.is_main:
                    console.print(f"step {step}: val loss {m['loss']:.4f}, val exact match {m['exact_match']:.4f}")
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step != tcfg.steps:
                if pipe is not None:
                    _gather_stages(pipe, model, ctx)
                export_model(run, ckpt_root / f"step_{step}", training_state(step), ctx)
                if ctx.is_main:
                    _prune_checkpoints(ckpt_root, cfg.checkpoint.keep_last)

    final = run_eval(tcfg.steps, cfg.eval.split, cfg.eval.num_samples)  # gathers the stages into the model
    ckpt = export_model(run, ckpt_root / f"step_{tcfg.steps}", training_state(tcfg.steps), ctx)
    curve = out_dir / "loss_curve.png"
    if ctx.is_main:
        _prune_checkpoints(ckpt_root, cfg.checkpoint.keep_last)
        log.close()
        plot_loss_curve(log.path, curve)
        report_eval(console, final, cfg.eval.split)
    if ctx.enabled:
        torch.distributed.destroy_process_group()
    console.print(f"model saved to {ckpt}")
    console.print(f"loss curve: {curve}")
    return TrainResult(out_dir, ckpt, final, curve)


def report_eval(console: Console, metrics: dict[str, float], split: str) -> None:
    """Print the held-out figures; exactly one line reads `held-out accuracy: <fraction>` (exact match)."""
    console.print(f"held-out split: {split} ({int(metrics['samples'])} samples)", highlight=False)
    console.print(f"held-out loss: {metrics['loss']:.4f}", highlight=False)
    depths = sorted(int(k.rsplit("_", 1)[1]) for k in metrics if k.startswith("mtp_loss_"))
    if depths:  # a native model's MTP depths: how well each predicts its token further ahead
        console.print("held-out MTP loss: " + ", ".join(f"depth {d} {metrics[f'mtp_loss_{d}']:.4f}" for d in depths),
                      highlight=False)
    attrs = [k for k in ("shape", "colour", "size", "position") if k in metrics]
    if attrs:
        console.print("held-out attribute accuracy: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in attrs), highlight=False)
    for modality in BATCH_KEYS.values():  # a MIMO run: each modality's own figures
        figures = {k.removeprefix(f"{modality}_"): v for k, v in metrics.items() if k.startswith(f"{modality}_")}
        if figures:
            rest = ", ".join(f"{k} {v:.4f}" for k, v in figures.items() if k not in ("samples", "loss", "exact_match"))
            console.print(f"held-out {modality} ({int(figures['samples'])} samples): loss {figures['loss']:.4f}, "
                          f"exact match {figures['exact_match']:.4f}" + (f"; {rest}" if rest else ""), highlight=False)
    console.print(f"held-out accuracy: {metrics['exact_match']:.4f}", highlight=False)
