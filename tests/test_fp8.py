"""FP8 block-quantized checkpoints (the MiMo-V2-Flash / MiniMax release format): dequantized on load as
transformers dequantizes them, saved back as plain checkpoints, and written in that format on request."""

import json
import math
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers import MiMoV2FlashForCausalLM as MiMoReference
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3SparseForConditionalGeneration as M3Reference

import plait
from plait.fp8 import dequantize, dequantize_checkpoint, quantize_checkpoint
from plait.fp8 import quantize as fp8_quantize
from plait.models.vlm import _m3_inputs
from tests.models.test_minimax_m3 import _batch, randomize, vl_config
from tests.nn.reference import assert_close, mimo_config, randomize_

FP8_MAX = 448.0  # the largest float8_e4m3fn


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., rows, cols) -> float8_e4m3fn values and one float32 scale per block (edge blocks partial): each
    block scaled so its largest magnitude is the format's largest."""
    rows, cols = w.shape[-2:]
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    padded = w.new_zeros(*w.shape[:-2], grid[0] * block[0], grid[1] * block[1])
    padded[..., :rows, :cols] = w
    blocks = padded.unflatten(-1, (grid[1], block[1])).unflatten(-3, (grid[0], block[0]))
    scale = blocks.abs().amax(dim=(-3, -1)).clamp_min(1e-12) / FP8_MAX  # (..., grid rows, grid cols)
    per_element = scale.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    q = (padded / per_element).clamp(-FP8_MAX, FP8_MAX)[..., :rows, :cols].to(torch.float8_e4m3fn)
    return q, scale.float()


def write_fp8_copy(src, dst, block, quantized) -> list[str]:
    """dst: src's checkpoint with each 2-D weight that `quantized(name)` picks in float8 and its scales beside it,
    and the quantization_config the releases carry. Returns the quantized names."""
    state = load_file(src / "model.safetensors")
    out, names = {}, []
    for name, tensor in state.items():
        if tensor.ndim == 2 and quantized(name):
            out[name], out[name + "_scale_inv"] = quantize(tensor.float(), block)
            names.append(name)
        else:
            out[name] = tensor
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config))
    return names


def test_dequantize_is_each_block_times_its_scale():
    g = torch.Generator().manual_seed(0)
    for shape, block in (((20, 12), (8, 8)), ((3, 16, 24), (8, 16)), ((7, 5), (8, 8))):  # partial, stacked, one block
        w = torch.randn(shape, generator=g)
        q, scale = quantize(w, block)
        expected = torch.empty(shape)
        for idx in torch.cartesian_prod(*(torch.arange(n) for n in shape)).tolist():
            i, j = idx[-2:]
            expected[tuple(idx)] = float(q[tuple(idx)]) * float(scale[(*idx[:-2], i // block[0], j // block[1])])
        assert torch.equal(dequantize(q, scale, list(block), torch.float32), expected)
        assert (dequantize(q, scale, list(block), torch.float32) - w).abs().max() <= w.abs().max() / 8  # e4m3: 3 bits
    assert dequantize(q, scale, list(block), torch.bfloat16).dtype == torch.bfloat16
    # power-of-two scales stored as float8_e8m0fnu (DeepSeek-V3.1's ue8m0) read as the same numbers
    pow2 = torch.exp2(torch.randint(-8, 4, scale.shape, generator=g).float())
    assert torch.equal(dequantize(q, pow2.to(torch.float8_e8m0fnu), list(block), torch.float32),
                       dequantize(q, pow2, list(block), torch.float32))
    single = torch.tensor(0.5)
    assert torch.equal(dequantize(q, single, None, torch.float32), q.float() * 0.5)


def test_bad_fp8_checkpoints_are_clear_errors():
    q, scale = quantize(torch.randn(16, 16), (8, 8))
    good = {"a.weight": q, "a.weight_scale_inv": scale, "norm.weight": torch.ones(16)}
    config = {"quant_method": "fp8", "weight_block_size": [8, 8]}
    out = dequantize_checkpoint(dict(good), config, "dir")
    assert set(out) == {"a.weight", "norm.weight"} and out["a.weight"].dtype == torch.float32
    assert torch.equal(out["a.weight"], dequantize(q, scale, [8, 8], torch.float32))
    cases = [
        ({"a.weight": q, "norm.weight": torch.ones(16)}, config, r"float8 tensor 'a.weight' has no 'a.weight_scale_inv'"),
        ({**good, "b.weight_scale_inv": scale}, config, r"scale 'b.weight_scale_inv' has no weight 'b.weight'"),
        ({**good, "a.weight_scale_inv": scale[:1]}, config, r"'a.weight': expected a scale grid of \[2, 2\] for a "
                                                            r"weight of shape \[16, 16\] in blocks of \[8, 8\], got \[1, 2\]"),
        (good, {"quant_method": "awq"}, r"quant_method 'awq' is not supported"),
        (good, None, r"1 float8 tensors and 1 scales .* but config.json has no quantization_config"),
        (good, {"quant_method": "fp8", "weight_block_size": [8]}, r"weight_block_size: expected two positive ints"),
        (good, {"quant_method": "fp8"}, r"needs a 2-D \(or stacked\) weight and quantization_config.weight_block_size"),
    ]
    for state, quant, message in cases:
        with pytest.raises(ValueError, match=message):
            dequantize_checkpoint(dict(state), quant, "dir")


def _check_against_transformers(reference_class, unquantized, tmp_path, inputs):
    """plait's model from the FP8 copy against transformers' (which dequantizes it on a CPU): the same logits; a
    plain save of plait's that transformers loads with the same logits again; and the float8 round trip did change
    the weights (the unquantized model answers differently)."""
    ours = plait.from_pretrained(tmp_path / "fp8").eval()
    assert not hasattr(ours.config, "quantization_config")
    quantized = reference_class.from_pretrained(tmp_path / "fp8", dtype=torch.float32).eval()
    with torch.no_grad():
        mine = ours(**inputs).logits
        assert_close(mine, quantized(**inputs).logits, tol=1e-4, name="fp8 logits")
        assert (unquantized(**inputs).logits - mine).abs().max() > 1e-3
    ours.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "quantization_config" not in saved and "quantization_config" not in saved.get("text_config", {})
    assert not any(t.dtype == torch.float8_e4m3fn for t in load_file(tmp_path / "saved" / "model.safetensors").values())
    with torch.no_grad():
        again = reference_class.from_pretrained(tmp_path / "saved", dtype=torch.float32)(**inputs).logits
    assert_close(again, mine, tol=1e-5, name="saved logits")


def test_a_mimo_fp8_checkpoint_loads_as_transformers_dequantizes_it(tmp_path):
    torch.manual_seed(0)
    ref = randomize_(MiMoReference(mimo_config()), std=0.2).eval()
    ref.save_pretrained(tmp_path / "plain")
    names = write_fp8_copy(tmp_path / "plain", tmp_path / "fp8", (8, 8), lambda n: "proj" in n)
    assert any(".mlp.experts." in n for n in names) and any("self_attn" in n for n in names)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    _check_against_transformers(AutoModelForCausalLM, ref, tmp_path, {"input_ids": ids})


def test_an_m3_vl_fp8_checkpoint_loads_as_transformers_dequantizes_it(tmp_path):
    torch.manual_seed(0)
    ref = randomize(M3Reference(plait.models.to_hf_config(vl_config("full")))).eval()
    ref.save_pretrained(tmp_path / "plain")
    # the text model's and the vision tower's projections and experts; routers, norms, embeddings stay
    names = write_fp8_copy(tmp_path / "plain", tmp_path / "fp8", (8, 8),
                           lambda n: any(s in n for s in ("proj", ".w1.", ".w2.", ".w3.", "fc1", "fc2")))
    assert any(".experts." in n for n in names) and any("vision_tower" in n for n in names)
    ids, _, images = _batch()
    _check_against_transformers(M3Reference, ref, tmp_path, {"input_ids": ids, **_m3_inputs(ref.config, images)})


def test_quantize_is_transformers_fp8_quantizer():
    """plait's block quantizer gives transformers' own (the one its FP8 load of an unquantized model runs) bit for
    bit: the float8 values and the float32 scale_inv, an all-zero block (scale 1) and stacked experts included."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    theirs = Fp8Quantize(FineGrainedFP8HfQuantizer(FineGrainedFP8Config(weight_block_size=(8, 16))))
    g = torch.Generator().manual_seed(0)
    for shape in ((16, 32), (3, 24, 48)):
        w = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[-1])  # columns of very different sizes
        w[..., :8, :16] = 0.0
        q, scale = fp8_quantize(w, (8, 16))
        expected = theirs._quantize_one("x.weight", w)
        assert torch.equal(q.view(torch.uint8), expected["x.weight"].view(torch.uint8))
        assert torch.equal(scale, expected["x.weight_scale_inv"]) and bool((scale[..., 0, 0] == 1).all())
        assert torch.equal(dequantize(q, scale, [8, 16], torch.float32)[..., :8, :16], w[..., :8, :16])
    with pytest.raises(ValueError, match=r"blocks of \[8, 16\] tile, got shape \[12, 32\]"):
        fp8_quantize(torch.randn(12, 32), (8, 16))
    with pytest.raises(ValueError, match=r"got shape \[32\]"):
        fp8_quantize(torch.randn(32), (8, 16))


def _gpu_layout_load(cls, path):
    """transformers' load of an FP8 checkpoint as on a GPU (FP8Linear / FP8Experts modules holding float8 weights
    and their scales), on this CPU: its environment check, which turns the load into a dequantizing one without a
    GPU, is skipped. Only loading runs, no FP8 matmul."""
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    with mock.patch.object(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *args, **kwargs: None):
        return cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)


def _check_fp8_export(ours, reference_class, tmp_path, inputs, float_modules):
    """ours saved as FP8 (blocks of 8): transformers loads it both ways: dequantized, with the logits plait gives
    on loading it back, and in its GPU layout, where every linear layer but `float_modules(name)` is an FP8 one
    whose weights dequantize to the same numbers, with no key missing or left over. The model saving it is
    unchanged."""
    from transformers.integrations.finegrained_fp8 import FP8Experts, FP8Linear

    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.save_pretrained(tmp_path / "fp8", fp8_block_size=(8, 8))
    assert not hasattr(ours.config, "quantization_config") and not hasattr(ours.config.get_text_config(), "quantization_config")
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    quantization = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "fp8" and quantization["weight_block_size"] == [8, 8]
    on_disk = load_file(tmp_path / "fp8" / "model.safetensors")
    assert sum(t.dtype == torch.float8_e4m3fn for t in on_disk.values()) == sum(k.endswith("_scale_inv") for k in on_disk) > 0

    back = plait.from_pretrained(tmp_path / "fp8").eval()
    dequantized = reference_class.from_pretrained(tmp_path / "fp8", dtype=torch.float32).eval()
    with torch.no_grad():
        mine, original = back(**inputs).logits, ours(**inputs).logits
        assert_close(mine, dequantized(**inputs).logits, tol=1e-5, name="fp8 export logits")
        # e4m3 rounding (3 mantissa bits; an indexer pick it flips moves some logits more), not garbage, which is
        # as far off as the logits are large
        assert (mine - original).abs().max() > 1e-4 and (mine - original).norm() < 0.3 * original.norm()

    gpu, info = _gpu_layout_load(reference_class, tmp_path / "fp8")
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    weights = dict(dequantized.named_parameters())
    fp8_modules = 0
    for name, module in gpu.named_modules():
        if isinstance(module, (FP8Linear, FP8Experts)):
            assert not float_modules(name), name
            fp8_modules += 1
            params = dict(module.named_parameters())
            for p in [p for p in params if not p.endswith("_scale_inv") and p + "_scale_inv" in params]:
                assert params[p].dtype == torch.float8_e4m3fn
                assert torch.equal(dequantize(params[p], params[p + "_scale_inv"], [8, 8], torch.float32),
                                   weights[f"{name}.{p.removesuffix('_scale_inv')}"]), f"{name}.{p}"
        elif type(module) is torch.nn.Linear:
            assert float_modules(name), f"{name} was left unquantized but is not listed in ignored_layers"
            assert torch.equal(module.weight, weights[f"{name}.weight"])
    assert fp8_modules > 0


def test_mimo_fp8_export_loads_in_transformers_as_the_release_does(tmp_path):
    torch.manual_seed(0)
    ref = randomize_(MiMoReference(mimo_config()), std=0.2).eval()
    ref.save_pretrained(tmp_path / "plain")
    ours = plait.from_pretrained(tmp_path / "plain").eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    _check_fp8_export(ours, AutoModelForCausalLM, tmp_path, {"input_ids": ids}, lambda name: name == "lm_head")
    quantization = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert {"lm_head", "model.embed_tokens", "model.layers.1.mlp.gate"} <= set(quantization["ignored_layers"])


def test_m3_vl_fp8_export_keeps_the_vision_side_unquantized(tmp_path):
    torch.manual_seed(0)
    ref = randomize(M3Reference(plait.models.to_hf_config(vl_config("sparse")))).eval()  # indexer layers too
    ref.save_pretrained(tmp_path / "plain")
    ours = plait.from_pretrained(tmp_path / "plain").eval()
    ids, _, images = _batch()
    inputs = {"input_ids": ids, **_m3_inputs(ref.config, images)}
    _check_fp8_export(ours, M3Reference, tmp_path, inputs,
                      lambda name: name == "lm_head" or name.startswith(("model.vision_tower.", "model.multi_modal_projector.")))


def test_fp8_export_refuses_a_block_that_does_not_fit_before_writing(tmp_path):
    torch.manual_seed(0)
    ours = plait.from_config(MiMoReference(mimo_config()).config)
    for block, message in (((1000, 1000), r"no weight divides by the block \[1000, 1000\]"),
                           ((8, 16), r"the experts of 'model.layers.1.mlp.experts' are partly quantized"),
                           ((8, 0), r"fp8 block size: expected two positive ints, got \(8, 0\)")):
        with pytest.raises(ValueError, match=message):
            ours.save_pretrained(tmp_path / "out", fp8_block_size=block)
        assert not (tmp_path / "out").exists() and not hasattr(ours.config, "quantization_config")
    state = {"a.weight": torch.randn(16, 16), "b.weight": torch.randn(16, 12), "norm.weight": torch.ones(16)}
    out, config = quantize_checkpoint(dict(state), (8, 8))
    assert out["a.weight"].dtype == torch.float8_e4m3fn and "a.weight_scale_inv" in out
    assert torch.equal(out["b.weight"], state["b.weight"]) and config["ignored_layers"] == ["b"]
