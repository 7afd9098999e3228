"""What a model is made of: parameters per module, total vs active for mixture-of-experts, layer types."""

from __future__ import annotations

from torch import nn

_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "top_k_experts")  # the second is Gemma4's


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def module_rows(model: nn.Module, max_depth: int = 3) -> list[tuple[str, int, str]]:
    """(dotted name, parameters, note) per module down to `max_depth`; layer stacks collapse to one row."""
    rows: list[tuple[str, int, str]] = []

    def visit(module: nn.Module, prefix: str, depth: int) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            n = _count(child)
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                kinds = sorted({type(c).__name__ for c in child.children()})
                rows.append((path, n, f"{len(child)} x {', '.join(kinds)}"))
            else:
                rows.append((path, n, type(child).__name__))
                if depth < max_depth:
                    visit(child, path, depth + 1)

    visit(model, "", 1)
    return rows


def _sub_configs(config) -> list:
    return [config] + [getattr(config, k) for k in ("text_config", "vision_config") if getattr(config, k, None) is not None]


def routed_expert_share(config) -> float | None:
    """top_k / num_experts of the first (sub-)config that routes tokens to experts; None for a dense model."""
    for cfg in _sub_configs(config):
        top_k = next((getattr(cfg, k) for k in _TOP_K_KEYS if getattr(cfg, k, None)), None)
        n_experts = next((getattr(cfg, k) for k in _EXPERT_COUNT_KEYS if getattr(cfg, k, None)), None)
        if top_k and n_experts:
            return top_k / n_experts
    return None


def idle_parameters(module: nn.Module, share: float | None) -> float:
    """Parameters of `module` a token does not pass through: of the routed experts (parameters under an
    `experts` module; shared experts always run), all but `share` (top_k / num_experts)."""
    if share is None:
        return 0.0
    routed = sum(p.numel() for name, p in module.named_parameters()
                 if ".experts." in f".{name}." and "shared" not in name)
    return routed * (1 - share)


def active_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, active per token): routed experts count with top_k / num_experts of their weight."""
    total = _count(model)
    return total, total - round(idle_parameters(model, routed_expert_share(model.config)))


def layer_types(model: nn.Module) -> list[str]:
    for cfg in _sub_configs(model.config):
        types = getattr(cfg, "layer_types", None)
        if types:
            return list(types)
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, (nn.ModuleList, nn.ModuleDict)) and len(layers):
            return [type(layer).__name__ for layer in (layers.values() if isinstance(layers, nn.ModuleDict) else layers)]
    return []


def mlp_layer_types(model: nn.Module) -> list[str]:
    for cfg in _sub_configs(model.config):
        types = getattr(cfg, "mlp_layer_types", None)
        if types:
            return list(types)
    return []


def summarize(model: nn.Module) -> dict:
    total, active = active_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "model_type": model.config.model_type,
        "class": type(model).__name__,
        "total_parameters": total,
        "active_parameters": active,
        "trainable_parameters": trainable,
        "layer_types": layer_types(model),
        "mlp_layer_types": mlp_layer_types(model),
        "modules": module_rows(model),
    }
