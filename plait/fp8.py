"""Block-quantized FP8 checkpoints: dequantized as they load, and written on request.

MiMo-V2-Flash is released the way DeepSeek-V3 and MiniMax-M2 are: each large linear weight `X.weight` is
float8 (e4m3), with `X.weight_scale_inv` beside it, one float scale per block of `weight_block_size` (128 x 128)
elements, and `config.json` says so in `quantization_config` (`quant_method: fp8`). A weight is then

    w[i, j] = float(q[i, j]) * scale_inv[i // block_rows, j // block_cols]

(the name is DeepSeek's: the scale the quantizer divided by, so dequantizing multiplies). Edge blocks may be
partial. Norms, embeddings, routers and anything listed in `ignored_layers` (or `modules_to_not_convert`) stay unquantized.

plait trains in bf16 / float32, so it dequantizes every such weight on load, into the checkpoint's own precision
(the dtype most of its unquantized tensors have: bf16 for the releases), and drops `quantization_config` from the
loaded config: the model holds plain weights, and what it saves is a plain checkpoint that transformers loads as
one. transformers does the same on a machine without a recent GPU (`dequantize=True`).

`quantize_checkpoint` writes the format back (`save_pretrained(dir, fp8_block_size=(128, 128))`, `plait convert
--fp8`): a fine-tuned model served the way its release is, at about half the size of bf16. As transformers'
own FP8 quantizer does, each block is scaled so its largest magnitude is e4m3's largest (448), an all-zero block
keeps scale 1, and only weights whose two dims are multiples of the block are quantized. Left in the model's
precision: embeddings, the LM head, MoE routers (`.gate`), whatever the model names as unquantized (MiniMax-M3-VL:
its vision tower and projector) and the weights the block does not tile. Every such 2-D weight is listed, by its
module's name on disk, in `quantization_config.ignored_layers` (the releases' key; transformers reads it as its
`modules_to_not_convert`), so that a loader which swaps linear layers for FP8 ones (transformers, vLLM, SGLang)
leaves exactly those alone; an MoE layer's experts are listed as one module (`...experts`), as loaders fuse them.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
# modules no FP8 export quantizes: the token embeddings, the LM head, and the MoE routers (a module named `gate`)
ALWAYS_UNQUANTIZED = (re.compile(r"(^|\.)embed_tokens$"), re.compile(r"(^|\.)lm_head$"), re.compile(r"\.gate$"))
_EXPERT = re.compile(r"^(.*\.experts)\.\d+\.")
FLOAT8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                      if hasattr(torch, name))


def take_quantization_config(config) -> dict | None:
    """The config's `quantization_config` as a dict, removed from the config (and from its text config): the
    loaded model holds dequantized weights. None when the checkpoint is not quantized."""
    found = None
    for cfg in (config, getattr(config, "text_config", None)):
        q = getattr(cfg, "quantization_config", None) if cfg is not None else None
        if q is not None:
            found = found or (q if isinstance(q, dict) else q.to_dict())
            delattr(cfg, "quantization_config")
    return found


def dequantize_checkpoint(state: dict[str, torch.Tensor], quantization: dict | None, where: str) -> dict[str, torch.Tensor]:
    """`state` (names as on disk) with each float8 `X.weight` and its `X.weight_scale_inv` replaced by `X.weight`
    dequantized; every other tensor as it was. A quantized `state` is consumed (each tensor leaves it as its
    replacement is made, so a large checkpoint is not held twice). A ValueError, naming the tensor, for a float8
    weight without its scale, a scale without its weight, a scale grid that does not fit the weight, or a
    quantization this does not read."""
    scales = [k for k in state if k.endswith(SCALE_SUFFIX)]
    float8 = [k for k, t in state.items() if t.dtype in FLOAT8_DTYPES]
    if quantization is None:
        if scales or float8:
            raise ValueError(f"{where}: {len(float8)} float8 tensors and {len(scales)} scales (e.g. "
                             f"{(float8 or scales)[0]!r}), but config.json has no quantization_config")
        return state
    method = quantization.get("quant_method")
    if method != "fp8":
        raise ValueError(f"{where}: quantization_config.quant_method {method!r} is not supported; plait reads "
                         f"block-quantized fp8 checkpoints (dequantized on load) and unquantized ones")
    block = quantization.get("weight_block_size")
    if block is not None:
        check_block_size(block, f"{where}: quantization_config.weight_block_size")
    for name in float8:
        if name + SCALE_SUFFIX not in state:
            raise ValueError(f"{where}: float8 tensor {name!r} has no {name + SCALE_SUFFIX!r} beside it")
    for name in scales:
        if name[: -len(SCALE_SUFFIX)] not in state:
            raise ValueError(f"{where}: scale {name!r} has no weight {name[: -len(SCALE_SUFFIX)]!r} beside it")
    out_dtype = _unquantized_dtype(state, scales)
    out = {}
    for name in [k for k in state if not k.endswith(SCALE_SUFFIX)]:
        tensor, scale = state.pop(name), state.pop(name + SCALE_SUFFIX, None)  # freed as it goes: a large model
        out[name] = tensor if scale is None else dequantize(tensor, scale, block, out_dtype, f"{where}: {name!r}")
    return out


def check_block_size(block, what: str) -> None:
    """A block size is two positive ints (rows, cols): as config.json's `weight_block_size` and as an export's."""
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in block)):
        raise ValueError(f"{what}: expected two positive ints, got {block!r}")


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: list[int] | None, dtype: torch.dtype,
               what: str = "weight") -> torch.Tensor:
    """q (..., rows, cols) times its per-block scale (..., ceil(rows / br), ceil(cols / bc)), in `dtype`. `block`
    None: a single scale for the whole tensor."""
    scale = scale_inv.to(torch.float32)
    values = q.to(torch.float32)
    if scale.numel() == 1:
        return (values * scale.reshape(())).to(dtype)
    if q.ndim < 2 or block is None:
        raise ValueError(f"{what}: a grid of {list(scale.shape)} scales needs a 2-D (or stacked) weight and "
                         f"quantization_config.weight_block_size; got a weight of shape {list(q.shape)} and block "
                         f"{block!r}")
    rows, cols = q.shape[-2:]
    grid = (*q.shape[:-2], -(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale.shape) != grid:
        raise ValueError(f"{what}: expected a scale grid of {list(grid)} for a weight of shape {list(q.shape)} in "
                         f"blocks of {list(block)}, got {list(scale.shape)}")
    per_element = scale.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)
    return (values * per_element[..., :cols]).to(dtype)


def _unquantized_dtype(state: dict[str, torch.Tensor], scales: list[str]) -> torch.dtype:
    """The dtype most of the checkpoint's other floating tensors have (bf16 in the releases), float32 if none."""
    skip = set(scales)
    counts = Counter(t.dtype for k, t in state.items()
                     if k not in skip and t.is_floating_point() and t.dtype not in FLOAT8_DTYPES)
    return counts.most_common(1)[0][0] if counts else torch.float32


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., rows, cols), both multiples of `block` -> (float8 e4m3 values, float32 scale_inv per block), such
    that `dequantize` gives w back to e4m3's precision. The same arithmetic as transformers' FP8 quantizer."""
    if w.ndim < 2 or w.shape[-2] % block[0] or w.shape[-1] % block[1]:
        raise ValueError(f"quantize: expected a (..., rows, cols) weight that blocks of {list(block)} tile, got "
                         f"shape {list(w.shape)}")
    rows, cols = w.shape[-2:]
    tiles = w.to(torch.float32).reshape(*w.shape[:-2], rows // block[0], block[0], cols // block[1], block[1])
    amax = tiles.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, FP8_MAX / amax.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(amax))
    q = (tiles * scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(w.shape), (1.0 / scale).to(torch.float32)


def quantize_checkpoint(state: dict[str, torch.Tensor], block: tuple[int, int], unquantized: tuple[str, ...] = ()
                        ) -> tuple[dict[str, torch.Tensor], dict]:
    """`state` (names as on disk, consumed) with each weight the module doc names quantized to float8 and its
    `weight_scale_inv` beside it, and the `quantization_config` that says so. `unquantized`: prefixes of on-disk
    names that stay as they are (a model's vision side)."""
    check_block_size(block, "fp8 block size")
    out, kept = {}, set()
    for name in list(state):
        tensor = state.pop(name)  # freed as it goes: a large model is not held twice
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is None or tensor.ndim != 2 or not tensor.is_floating_point():
            out[name] = tensor
            continue
        rows, cols = tensor.shape
        if (any(p.search(module) for p in ALWAYS_UNQUANTIZED) or name.startswith(unquantized)
                or rows % block[0] or cols % block[1]):
            out[name] = tensor
            expert = _EXPERT.match(name)
            kept.add(expert.group(1) if expert else module)
            continue
        out[name], out[name + SCALE_SUFFIX] = quantize(tensor, block)
    quantized = [k for k in out if k.endswith(SCALE_SUFFIX)]
    experts = {m.group(1) for k in quantized if (m := _EXPERT.match(k))}
    if mixed := sorted(experts & kept):  # a loader fuses a layer's experts into one module: all or none
        raise ValueError(f"fp8 export: the experts of {mixed[0]!r} are partly quantized; their weights must all "
                         f"divide by the block {list(block)}")
    if not quantized:
        raise ValueError(f"fp8 export: no weight divides by the block {list(block)}; nothing would be quantized")
    config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block),
              "ignored_layers": sorted(kept)}
    return out, config
