from pathlib import Path

import pytest

from plait.config import ConfigError, RunConfig, apply_overrides, load_config, parse_override


def test_default_config_loads():
    cfg = load_config("configs/default.yaml")
    assert isinstance(cfg, RunConfig)
    assert cfg.output_dir == Path("runs/default")
    assert cfg.model.preset == "tiny-minimax-m3"
    assert cfg.data.dataset == "shapes"


def test_overrides_are_typed_and_nested():
    cfg = load_config("configs/default.yaml", ["train.steps=7", "train.lr=1e-3", "model.mtp.loss_scaling_factor=0.3",
                                               "train.grad_clip=null", "data.prompt=\"describe:\""])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model.mtp.loss_scaling_factor == pytest.approx(0.3)
    assert cfg.train.grad_clip is None
    assert cfg.data.prompt == "describe:"


def test_parse_override():
    assert parse_override("a.b.c=[1, 2]") == (["a", "b", "c"], [1, 2])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_override("train.steps")
    with pytest.raises(ConfigError, match="empty key segment"):
        parse_override("train..steps=3")


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="train.steps is a value"):
        apply_overrides({"train": {"steps": 3}}, ["train.steps.x=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=5", r"train.stepz: unknown key"),
        ("bogus=1", r"bogus: unknown key"),
        ("train.steps=ten", r"train.steps: .*integer.*given 'ten'"),
        ("train.steps=0", r"train.steps: .*greater than 0.*given 0"),
        ("data.dataset=mnist", r"data.dataset: .*'shapes'.*given 'mnist'"),
        ("train.batch_size=30", r"batch_size \(30\) must be divisible by train.grad_accum x parallel.dp \(4 x 1\)"),
        # each of the 2 replicas' pipelines gets 32 of the 64 rows
        ("parallel.pp=2 parallel.dp=2 parallel.microbatches=64",
         r"64 / \(1 x 2\) = 32 rows per pipeline must split into parallel.microbatches=64"),
        ("parallel.pp=2 parallel.split=balanced parallel.stage_modules=[[layers.0],[layers.1]]",
         r"parallel.split='balanced' with parallel.stage_modules=.*set one of them"),
        ("parallel.stage_modules=[[layers.0]]",
         r"parallel.stage_modules=\[\['layers.0'\]\]: only used with parallel.pp > 1"),
        ("parallel.pp=2 parallel.microbatches=3", r"must split into parallel.microbatches=3"),
        ("parallel.microbatches=4", r"only used with parallel.pp > 1"),
        ("train.betas=[0.9,1.5]", r"train.betas.1: Input should be less than 1, given 1.5"),
        ("train.resume=sometimes", r"train.resume: .*'never', 'auto' or 'overwrite'.*given 'sometimes'"),
        ("model.mtp.train_only=true model.mtp.num_layers=0",
         r"model.mtp.train_only=true trains the MTP depths alone: set model.mtp.num_layers"),
        ("model.mtp.train_only=true model.mtp.num_layers=2", r"set model.pretrained to its dir"),
        ("model.pretrained=/some/dir", r"exactly one of model.preset and model.pretrained"),
        ("data.dataset=local", r"data.path: required"),
        ("data.packing=true", r"data.pack_length: required"),
        ("data.val_fraction=0.6", r"val_fraction \+ data.test_fraction must be < 1"),
    ],
)
def test_bad_config_names_the_key(override, message):
    extra = ["train.grad_accum=4"] if "batch_size" in override else []
    extra += ["data.test_fraction=0.5"] if "val_fraction" in override else []
    with pytest.raises(ConfigError, match=message):
        load_config("configs/default.yaml", [*override.split(" "), *extra])


def test_config_errors_are_value_errors():
    assert issubclass(ConfigError, ValueError)


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 3\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listing)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_round_trip(tmp_path):
    cfg = load_config("configs/default.yaml", ["train.steps=9"])
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
