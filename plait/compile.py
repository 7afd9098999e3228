"""Regional compilation: each decoder layer compiled on its own, the model left as it is.

    compile_layers(model)      # every layer of every `layers` container (text trunk, vision tower, MTP)

Each layer of a `layers` container (`nn.ModuleDict` or `nn.ModuleList`, at any depth) gets `Module.compile`:
the layer object stays where it was, so parameter names, state dicts, checkpoints, FSDP and pipeline stages see
the same model (torchtitan compiles per block for the same reasons); layers of one structure share their compiled
code, their parameters being inputs of the graph. Inside a layer, TorchInductor fuses the element-wise work around the matmuls
(norms, RoPE, gates, residuals, routing), which eager PyTorch runs one pass over memory per operation.

What stays eager, on purpose:
- the MoE's grouped experts (`GroupedExperts.forward` is marked `torch.compiler.disable`): torch 2.13's
  grouped_mm cannot be traced in float32 (its fake-tensor kernel accepts bf16 only), and its data-dependent row
  counts would break the graph anyway; the experts' matmuls are one kernel each either way;
- whatever a layer does with values it reads back (a selection's sizes, the expert load counters): dynamo
  splits the layer's graph there and runs that piece eagerly;
- evaluation and generation: `eager()` around them (`torch.compiler.set_stance("force_eager")`), because
  decoding with a KV cache would recompile at every cache length.

Shapes: the first call compiles for its shapes; a second shape recompiles with dynamic sizes (torch's
default), so a run whose batches vary in length compiles about twice per layer type.

On a CPU, TorchInductor writes C++ and builds it with the system's C++ compiler: without one, `compile_layers`
refuses before touching the model.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import torch
from torch import nn


def cxx_compiler() -> str | None:
    """The C++ compiler TorchInductor will use on a CPU ($CXX, else c++, g++ or clang++ on PATH), or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def require_compiler(device: torch.device | str) -> None:
    """Raise ValueError when compiled code cannot be built for `device` (a CPU without a C++ compiler)."""
    if torch.device(device).type == "cpu" and cxx_compiler() is None:
        raise ValueError("compile on CPU: TorchInductor builds C++ and needs a C++ compiler ($CXX, c++, g++ or "
                         "clang++ on PATH); none was found. Install one, or train with train.compile=false")


def decoder_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) for each child of every `layers` ModuleDict / ModuleList in `model`; a pipeline stage's
    dropped layers (None) are skipped."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "layers" and isinstance(module, (nn.ModuleDict, nn.ModuleList)):
            items = module.items() if isinstance(module, nn.ModuleDict) else enumerate(module)
            for key, layer in items:
                if layer is not None:
                    yield f"{name}.{key}", layer


def compile_layers(model: nn.Module, device: torch.device | str | None = None) -> list[str]:
    """Compile each decoder layer of `model` in place (`Module.compile`); returns their names. `device` (default:
    the parameters') decides whether a C++ compiler is needed. Raises ValueError, before any change, when the
    model has no `layers` container or when a CPU has no C++ compiler."""
    names = [name for name, _ in decoder_layers(model)]
    if not names:
        raise ValueError(f"compile: expected a model with decoder layers in a `layers` ModuleDict or ModuleList, "
                         f"found none in {type(model).__name__}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
    require_compiler(device)
    for _, layer in decoder_layers(model):
        layer.compile()
    return names


def eager():
    """Run the compiled layers eagerly inside the block (evaluation, generation); the compiled code is kept."""
    return torch.compiler.set_stance("force_eager")
