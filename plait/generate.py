"""Greedy and sampled decoding with a KV cache, for any model with the transformers calling convention.

Prompts may differ in length: they are left-padded, and `position_ids` count only real tokens, so
each row decodes as if it were alone. The first forward sees the whole prompt and the extra inputs
(pixels); every later step feeds one token per row and reuses the cache.
"""

from __future__ import annotations

import torch


def left_pad(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompts:
        raise ValueError("prompts: expected at least one prompt, got none")
    for i, p in enumerate(prompts):
        if p.ndim != 1 or p.numel() == 0:
            raise ValueError(f"prompts[{i}]: expected a non-empty 1-D tensor of token ids, got shape {list(p.shape)}")
    length = max(p.numel() for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, length - p.numel() :] = p
        attention_mask[row, length - p.numel() :] = 1
    return input_ids, attention_mask


def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p (the first token always stays)
        drop = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    **model_inputs,
) -> torch.Tensor:
    """Return the new tokens (B, T), T <= max_new_tokens; rows that ended are filled with `pad_token_id`.

    `temperature=0` is greedy. `model_inputs` (e.g. pixel_values) go to the first forward only.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected (B, S), got shape {list(input_ids.shape)}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens: expected a positive count, got {max_new_tokens}")
    if not 0 <= temperature < float("inf"):  # nan too
        raise ValueError(f"temperature: expected a finite value >= 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k: expected a positive count, got {top_k}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                **model_inputs)
    cache = out.past_key_values
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    next_pos = position_ids[:, -1:] + 1
    new_tokens = []
    logits = out.logits[:, -1]
    for _ in range(max_new_tokens):
        token = _next_token(logits, temperature, top_k, top_p, generator)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        new_tokens.append(token)
        finished |= token == eos_token_id
        if finished.all():
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_pos,
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        next_pos = next_pos + 1
        logits = out.logits[:, -1]
    return torch.stack(new_tokens, dim=1)
