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


def test_a_bare_off_is_the_choice_off_not_a_boolean(tmp_path):
    # YAML 1.1 reads off / on as booleans; `train.autocast: off` means the documented choice 'off'
    assert load_config("configs/default.yaml", ["train.autocast=off"]).train.autocast == "off"
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  autocast: off\n")
    assert load_config(path).train.autocast == "off"
    with pytest.raises(ConfigError, match="train.autocast: Input should be 'auto', 'bf16' or 'off', given True"):
        load_config("configs/default.yaml", ["train.autocast=on"])


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
        ("train.steps=true", r"train.steps: expected a number, got True"),  # pydantic alone reads it as 1
        ("train.lr=false", r"train.lr: expected a number, got False"),
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


def test_model_config_overrides_must_be_settings_of_the_config_they_land_in():
    # transformers keeps an unknown keyword as a plain attribute: a misspelt setting would be ignored silently
    from plait.models.hf import check_config_overrides
    from plait.models.presets import PRESETS, preset_dict

    for name, preset in PRESETS.items():  # every built-in preset is made of known settings
        check_config_overrides(preset, preset)
    for preset, override, message in [
        ("tiny-mimo-v2-flash", {"num_hiden_layers": 2}, r"num_hiden_layers: not a setting of MiMoV2FlashConfig "
                                                        r"\(transformers 5.23.0\); did you mean 'num_hidden_layers'"),
        ("tiny-minimax-m3", {"num_hidden_layers": 2}, "did you mean 'text_config.num_hidden_layers'"),
        ("tiny-minimax-m3", {"vision_config": {"hiden_size": 8}}, "model.config.vision_config.hiden_size: not a "
                                                                 "setting of MiniMaxM3VLVisionConfig"),
        ("tiny-mistral3", {"text_config": {"rope_thetta": 1.0}}, "text_config.rope_thetta: not a setting of "
                                                                "Ministral3Config"),
        # plait's own MoE settings belong to the text config
        ("tiny-minimax-m3", {"moe_aux_loss_coef": 0.1}, "did you mean 'text_config.moe_aux_loss_coef'"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_config_overrides(preset_dict(preset, override), override)
    for preset, override in [("tiny-minimax-m3", {"text_config": {"moe_aux_loss_coef": 0.1, "num_hidden_layers": 2}}),
                             ("tiny-mimo-v2-flash", {"router_bias_update_rate": 0.01, "tie_word_embeddings": True})]:
        check_config_overrides(preset_dict(preset, override), override)
