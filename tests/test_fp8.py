"""FP8 block-quantized checkpoints (the MiMo-V2-Flash / MiniMax release format): dequantized on load as
transformers dequantizes them, saved back as plain checkpoints."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers import MiMoV2FlashForCausalLM as MiMoReference
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3SparseForConditionalGeneration as M3Reference

import plait
from plait.fp8 import dequantize, dequantize_checkpoint
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
