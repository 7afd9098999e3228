"""One schema for a run: model, data, parallel, train, eval, checkpoint.

A run is a YAML file plus `key.sub=value` overrides from the command line. Everything is checked
before any work starts: unknown keys, wrong types and impossible combinations raise `ConfigError`
(a `ValueError`) naming the key, what was expected and what came. Options whose feature has not
landed yet are rejected with "not supported yet", never silently ignored.
"""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


def _annotation_types(annotation: Any) -> set:
    """The plain types an annotation admits (`int | None` -> {int, NoneType}; Literal values are not types)."""
    args = typing.get_args(annotation)
    if not args:
        return {annotation} if isinstance(annotation, type) else set()
    return set().union(*(_annotation_types(a) for a in args))


# the words PyYAML's safe_load reads as booleans (any case)
YAML_BOOLEAN_WORDS = {False: ("off", "no", "false"), True: ("on", "yes", "true")}


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the key."""


class _Section(BaseModel):
    # extra="forbid": a misspelled key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            # YAML reads a bare off / on / no / yes as a boolean: `train.autocast=off` is the choice 'off'
            choices = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()
            spelt = [c for c in choices if str(c).lower() in YAML_BOOLEAN_WORDS[value]]
            if len(spelt) == 1:
                return spelt[0]
            # pydantic reads true as 1 for a number (`train.steps=true` would train one step); YAML's true/false
            # are never meant as numbers
            types = _annotation_types(annotation)
            if bool not in types and types & {int, float}:
                raise ValueError(f"expected a number, got {value!r}")
        return value


class MTPSettings(_Section):
    num_layers: int = Field(0, ge=0, description="multi-token prediction depths; 0 disables MTP")
    layer_pattern: str = Field("*", min_length=1, description="block symbols of one MTP depth")
    loss_scaling_factor: float = Field(0.1, ge=0.0)
    use_repeated_layer: bool = False
    train_only: bool = Field(False, description="train only the MTP depths; the rest of the model stays frozen")

    @model_validator(mode="after")
    def _depths_to_train(self) -> "MTPSettings":
        if self.train_only and self.num_layers == 0:
            raise ValueError("model.mtp.train_only=true trains the MTP depths alone: set model.mtp.num_layers >= 1")
        return self


class ModelSettings(_Section):
    preset: str | None = Field("tiny-mistral3", description="a built-in model config (see plait.models.presets)")
    pretrained: Path | None = Field(None, description="a local HF-format model dir to fine-tune")
    config: dict[str, Any] = Field(default_factory=dict, description="keys merged into the HF config")
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    implementation: Literal["native", "transformers"] = Field(
        "native", description="plait's own model where one exists, or the stock transformers classes (for comparison)")
    mtp: MTPSettings = Field(default_factory=MTPSettings)
    mimo: dict[str, Any] | None = Field(
        None, description="a MIMO composition (plait.models.mimo.MimoModelConfig): encoders per modality and a "
                          "language model; vocabulary and special token ids come from the run's tokenizer")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSettings":
        if self.mimo is not None:
            if self.preset is not None or self.pretrained is not None:
                raise ValueError(f"model.mimo: set model.preset and model.pretrained to null with it, got "
                                 f"preset={self.preset!r} and pretrained={self.pretrained!r}")
            if self.config or self.mtp.num_layers or self.implementation != "native":
                raise ValueError("model.mimo: model.config, model.mtp and model.implementation do not apply to a MIMO "
                                 "composition (its language_model and encoders carry their own configs)")
            return self
        if (self.preset is None) == (self.pretrained is None):
            raise ValueError(
                f"exactly one of model.preset and model.pretrained must be set, got preset={self.preset!r} "
                f"and pretrained={self.pretrained!r}"
            )
        if self.mtp.train_only and self.pretrained is None:
            raise ValueError("model.mtp.train_only=true trains new MTP depths on a trained model: set model.pretrained "
                             f"to its dir (got preset={self.preset!r})")
        return self


class AudioDataSettings(_Section):
    """The bundled tones-and-chords set (plait.data.audio), fed to a MIMO model's "audio" encoders."""

    num_train: int = Field(6000, ge=1)
    num_val: int = Field(200, ge=1)
    num_test: int = Field(200, ge=1)
    seed: int = 0
    n_mels: int = Field(32, ge=4, description="mel bands of the log-mel features")
    hop_length: int = Field(256, ge=16, description="samples between feature frames (8 kHz audio)")


class DataSettings(_Section):
    dataset: Literal["shapes", "shapes-pair", "local"] = "shapes"
    path: Path | None = Field(None, description="dataset.local: a jsonl/parquet file, a dir of split files, or an image folder")
    image_column: str = "image"
    caption_column: str = "caption"
    image_size: int = Field(48, ge=8, description="images are resized to image_size x image_size")
    num_train: int = Field(30000, ge=1)
    num_val: int = Field(500, ge=1)
    num_test: int = Field(500, ge=1)
    val_fraction: float = Field(0.05, gt=0.0, lt=1.0, description="local data without a val split")
    test_fraction: float = Field(0.05, gt=0.0, lt=1.0, description="local data without a test split")
    seed: int = 0
    cache_dir: Path = Path("data/cache")
    prompt: str = Field("", description="text placed between the image and the caption")
    tokenizer: Literal["wordlevel", "bpe"] = "wordlevel"
    vocab_size: int = Field(1000, ge=16, description="bpe only")
    packing: bool = False
    pack_length: int | None = Field(None, ge=8, description="tokens per packed row (packing only)")
    audio: AudioDataSettings | None = Field(None, description="audio clips beside the images (MIMO runs only)")

    @model_validator(mode="after")
    def _check(self) -> "DataSettings":
        if self.dataset == "local" and self.path is None:
            raise ValueError("data.path: required when data.dataset is 'local', got None")
        if self.dataset != "local" and self.path is not None:
            raise ValueError(f"data.path: only used with data.dataset=local, got dataset={self.dataset!r}")
        if self.packing and self.pack_length is None:
            raise ValueError("data.pack_length: required when data.packing is true, got None")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"data.val_fraction + data.test_fraction must be < 1, got {self.val_fraction} + {self.test_fraction}"
            )
        return self


Beta = Annotated[float, Field(ge=0.0, lt=1.0)]  # an AdamW moment decay


class TrainSettings(_Section):
    steps: int = Field(600, gt=0)
    batch_size: int = Field(64, gt=0, description="samples per optimizer step (the global batch)")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(2e-3, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final lr as a fraction of lr")
    warmup_steps: int = Field(100, ge=0, description="clipped to the run's length")
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0, description="wsd: share of steps spent decaying")
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    seed: int = 0
    resume: Literal["never", "auto", "overwrite"] = Field(
        "never", description="never: start a run, refused when output_dir holds training checkpoints; auto: continue "
        "from the newest training checkpoint in output_dir, if any; overwrite: start over, deleting output_dir's "
        "checkpoints")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    autocast: Literal["auto", "bf16", "off"] = Field("auto", description="auto: bf16 autocast on CUDA, float32 on CPU")
    num_threads: int | None = Field(None, gt=0, description="torch intra-op threads; None keeps torch's default")
    host_allocator: Literal["keep_freed", "default"] = Field(
        "keep_freed", description="keep_freed: glibc keeps freed blocks for the next step instead of faulting them in "
        "again (plait.host_memory); default: leave the C library's settings")
    compile: bool = Field(False, description="compile each decoder layer with torch.compile (plait.compile); "
                          "evaluation stays eager; on CPU needs a C++ compiler")
    log_every: int = Field(20, gt=0)
    eval_every: int = Field(200, ge=0, description="0: evaluate at the end only; clipped to the run's length")
    eval_samples: int = Field(200, gt=0, description="validation samples per periodic eval")
    progress: bool = True


class EvalSettings(_Section):
    split: Literal["val", "test"] = "test"
    num_samples: int | None = Field(None, gt=0, description="None: the whole split")
    batch_size: int = Field(128, gt=0)
    max_new_tokens: int = Field(48, gt=0)


class CheckpointSettings(_Section):
    every_steps: int = Field(0, ge=0, description="export the model every N steps; 0: only at the end")
    keep_last: int | None = Field(None, gt=0, description="keep the newest K step dirs; None keeps all")


class ParallelSettings(_Section):
    dp: int = Field(1, gt=0, description="data-parallel replicas")
    dp_shard: int = Field(1, gt=0, description="FSDP2: ranks that shard parameters, gradients and optimizer state "
                                              "(each a data-parallel rank; with parallel.dp > 1, HSDP)")
    fsdp_param_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="parallel.dp_shard: the dtype each FSDP2 group gathers its parameters in for the forward "
        "and backward; auto: bfloat16 when the step runs under bf16 autocast (half the all-gather bytes and unsharded "
        "memory), else float32. Gradients are reduced in float32 and AdamW updates float32 master shards either way")
    pp: int = Field(1, gt=0, description="pipeline stages' ranks (native models; with "
                                         "model.implementation=transformers, text LMs and Mistral3)")
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zb", "zbv", "dualpipev"] = "1f1b"
    microbatches: int = Field(1, gt=0, description="pipeline microbatches per (accumulation) batch")
    layers_per_stage: list[int] | None = Field(None, description="decoder layers of each stage; else by `split`")
    split: Literal["even", "balanced"] = Field(
        "even", description="without layers_per_stage: equal layer counts, or balanced by estimated compute per layer "
                            "(active parameters; vision tower to the first stage, head and MTP depths to the last)")
    virtual_stages: int = Field(1, gt=0, description="stages per rank for the looped interleaved schedules")
    stage_modules: list[list[str]] | None = Field(
        None, description="the modules of each stage by name, e.g. [[embed_tokens, layers.0], [layers.1, norm, "
                          "lm_head]]: every decoder layer once and in order, the embedding (and vision tower) on "
                          "the first stage, the final norm, head (and mtp) on the last")

    @model_validator(mode="after")
    def _check(self) -> "ParallelSettings":
        pipeline_only = [f"parallel.{key}={value!r}" for key, value in (
            ("microbatches", self.microbatches), ("layers_per_stage", self.layers_per_stage),
            ("virtual_stages", self.virtual_stages), ("split", self.split), ("stage_modules", self.stage_modules))
            if value != type(self).model_fields[key].default]
        if self.pp == 1 and pipeline_only:
            raise ValueError(f"{', '.join(pipeline_only)}: only used with parallel.pp > 1")
        if self.dp_shard == 1 and self.fsdp_param_dtype != "auto":
            raise ValueError(f"parallel.fsdp_param_dtype={self.fsdp_param_dtype!r}: only used with parallel.dp_shard > 1")
        if self.dp_shard > 1 and self.pp > 1:
            raise ValueError(f"parallel.dp_shard={self.dp_shard} with parallel.pp={self.pp}: sharded pipeline stages "
                             "are not supported yet; use parallel.dp for replicas of a pipeline")
        split_choices = [c for c in pipeline_only if c.split("=")[0] in
                         ("parallel.layers_per_stage", "parallel.split", "parallel.stage_modules")]
        if len(split_choices) > 1:
            raise ValueError(f"{' with '.join(split_choices)}: each of them chooses the layer split; set one of them")
        return self

    @property
    def data_parallel(self) -> int:
        """Ranks that each run their own slice of every batch: replicas x shards."""
        return self.dp * self.dp_shard


class RunConfig(_Section):
    output_dir: Path = Path("runs/default")
    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    parallel: ParallelSettings = Field(default_factory=ParallelSettings)

    @model_validator(mode="after")
    def _batch_splits(self) -> "RunConfig":
        if self.parallel.pp > 1:
            rows = self.train.batch_size // (self.train.grad_accum * self.parallel.dp)
            if rows % self.parallel.microbatches:
                raise ValueError(f"train.batch_size / (train.grad_accum x parallel.dp) = {self.train.batch_size} / "
                                 f"({self.train.grad_accum} x {self.parallel.dp}) = {rows} rows per pipeline must "
                                 f"split into parallel.microbatches={self.parallel.microbatches} equal microbatches")
            if self.data.packing:
                raise ValueError("data.packing with parallel.pp > 1: not supported yet (stages pass hidden states "
                                 "only, not the packed position ids)")
        if self.data.audio is not None and self.model.preset is not None:
            raise ValueError(f"data.audio: audio clips are fed to MIMO models only (model.mimo, or a saved MIMO "
                             f"model as model.pretrained), got model.preset={self.model.preset!r}")
        if self.model.mimo is not None and (self.parallel.pp > 1 or self.data.packing):
            raise ValueError(f"model.mimo with parallel.pp={self.parallel.pp}, data.packing={self.data.packing}: "
                             "pipelined and packed MIMO training are not supported by the trainer yet")
        if self.model.mimo is not None and self.parallel.dp_shard > 1:
            raise ValueError(f"model.mimo with parallel.dp_shard={self.parallel.dp_shard}: sharded MIMO training is "
                             "not supported yet; use parallel.dp")
        if self.parallel.fsdp_param_dtype == "bfloat16" and self.train.autocast == "off":
            raise ValueError("parallel.fsdp_param_dtype='bfloat16' with train.autocast='off': bfloat16 parameters "
                             "need the step under bf16 autocast (train.autocast=bf16, or auto on a GPU)")
        per_step = self.train.grad_accum * self.parallel.data_parallel
        if self.train.batch_size % per_step:
            ranks = (f"parallel.dp x parallel.dp_shard ({self.train.grad_accum} x {self.parallel.dp} x "
                     f"{self.parallel.dp_shard})" if self.parallel.dp_shard > 1
                     else f"parallel.dp ({self.train.grad_accum} x {self.parallel.dp})")
            raise ValueError(f"train.batch_size ({self.train.batch_size}) must be divisible by train.grad_accum x {ranks}")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        given = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (given {given!r})")
        elif e["type"] == "value_error":
            lines.append(f"{key or 'config'}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{key}: {e['msg']}, given {given!r}")
    return "invalid run config:\n  " + "\n  ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.steps=50` -> (['train', 'steps'], 50); the value is read as YAML so types come out right."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override {text!r}: {where} is a value ({child!r}), not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run from YAML (or the defaults when `path` is None) and apply `key.sub=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r}: not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r}: malformed YAML: {e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(path)!r}: expected UTF-8 YAML text, got binary data") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top, got {type(loaded).__name__}")
        data = loaded
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None
