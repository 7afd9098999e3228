"""Self-speculative greedy decoding: a model's own MTP depths draft, one forward of the model verifies.

A round, with the model having consumed stream slots 0..n-1 and x[n] its latest greedy token:

1. Draft: MTP depth d (0-based) at slot t reads the previous depth's state there (the trunk's last-layer
   output for depth 0) and the token x[t + d + 1]. At slot n - 1 depth d yields draft x[n + d + 1]; the
   deeper depths read the drafts of the shallower ones.
2. Verify: one forward of the model over x[n] and the D drafts (slots n..n+D) gives the model's greedy
   choice after each of them. The longest prefix of drafts that equals those choices is accepted, and the
   model's choice after it comes free: 1..D+1 new tokens per forward.
3. Roll back: the model's KV cache forgets the rejected slots (`KVCache.crop`; it keeps D spare tokens
   beyond a sliding window, so the window stays full), and so does each depth's own cache.

Accepted tokens are always the model's own greedy choices, so the output is token for token that of plain
greedy decoding (`plait.generate.generate`); the drafts decide only how many tokens a forward yields.

Each MTP depth keeps a KV cache of the slots whose inputs are settled ("committed"): depth d at slot t is
settled once x[t + d + 1] is accepted, so after a round depth d holds slots < n - d. Slots past that read
drafts; they are recomputed in the next round, from the settled inputs kept in `carry`.

Rows of a batch advance together: a round accepts the fewest drafts any unfinished row agrees with (a row
that agrees with more gets its next draft as the free token, which is the same token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from plait.nn.attention import KVCache


@dataclass
class SpeculativeStats:
    """Counts over the verification rounds of one or more `generate_speculative` calls."""

    rounds: int = 0  # forwards of the model after the prompt's
    accepted: list[int] = field(default_factory=list)  # per depth d: rounds whose drafts 1..d were all accepted
    new_tokens: int = 0  # tokens produced by the rounds (the prompt forward's token not counted)

    @property
    def acceptance_rate(self) -> list[float]:
        """Per depth d: the fraction of rounds in which drafts 1..d were all accepted."""
        return [a / self.rounds if self.rounds else 0.0 for a in self.accepted]

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.rounds if self.rounds else 0.0


def _check_model(model: nn.Module, num_draft_tokens: int | None) -> int:
    mtp_config = getattr(model, "mtp_config", None)
    if getattr(model, "mtp_backbone", None) is None or mtp_config is None or not mtp_config.enabled:
        raise ValueError(f"speculative decoding drafts with MTP depths: expected a native plait model with "
                         f"model.mtp.num_layers > 0, got {type(model).__name__} with none")
    depths = mtp_config.num_layers
    if num_draft_tokens is None:
        return depths
    if not 1 <= num_draft_tokens <= depths:
        raise ValueError(f"num_draft_tokens: expected 1..{depths} (the model's MTP depths), got {num_draft_tokens}")
    return num_draft_tokens


@torch.no_grad()
def generate_speculative(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    num_draft_tokens: int | None = None,
    stats: SpeculativeStats | None = None,
    **model_inputs,
) -> torch.Tensor:
    """Greedy new tokens (B, T), T <= max_new_tokens, equal to `plait.generate.generate(..., temperature=0)`.

    Prompts are left-padded as there. `num_draft_tokens` (default: every MTP depth) drafts per round;
    `stats`, when given, accumulates acceptance counts. `model_inputs` (pixels) go to the prompt forward."""
    D = _check_model(model, num_draft_tokens)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected (B, S), got shape {list(input_ids.shape)}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens: expected a positive count, got {max_new_tokens}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {list(input_ids.shape)}, got {list(attention_mask.shape)}")
    if stats is not None and len(stats.accepted) < D:
        stats.accepted += [0] * (D - len(stats.accepted))
    backbone, lm_head = model.mtp_backbone, model.get_output_embeddings()
    B, device = input_ids.shape[0], input_ids.device

    mask = attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = KVCache(spare=D)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, **model_inputs)
    tokens = input_ids  # what the model has consumed, slots 0..n-1
    trunk_states = out.pre_norm_hidden_states  # the model's last-layer output at slots depth 0 has not settled
    nxt = out.logits[:, -1].argmax(-1)  # x[n]
    emitted, produced = [nxt[:, None]], 1
    finished = nxt == eos_token_id
    depth_caches = [KVCache(spare=D) for _ in range(D)]
    settled = [0] * D  # depth d's cache holds slots < settled[d]
    # carry[d]: depth d's settled states at slots [settled[d + 1], settled[d]), which depth d + 1 still reads
    carry = [trunk_states.new_zeros(B, 0, trunk_states.shape[-1]) for _ in range(D)]

    while produced < max_new_tokens and not bool(finished.all()):
        n = tokens.shape[1]
        stream = torch.cat([tokens, nxt[:, None]], dim=1)  # slot n holds x[n]
        drafts: list[torch.Tensor] = []
        h_in = trunk_states  # slots [settled[0], n)
        for d in range(D):
            start = settled[d]
            read = torch.cat([stream, *[x[:, None] for x in drafts]], dim=1)[:, start + d + 1 : n + d + 1]
            h = backbone.mtp_decode(d, h_in, read, positions[:, start:n], mask[:, :n], depth_caches[d])
            drafts.append(lm_head(h[:, -1]).argmax(-1))
            settled_now = n - d  # slot t reads x[t + d + 1], which is accepted for t < n - d
            depth_caches[d].crop(settled_now)
            if d + 1 < D:
                h_in = torch.cat([carry[d], h], dim=1)  # slots [settled[d + 1], n): what depth d + 1 reads
                carry[d] = h_in[:, settled_now - 1 - settled[d + 1] : settled_now - settled[d + 1]]
            settled[d] = settled_now
        proposal = torch.stack(drafts, dim=1)  # (B, D): x[n + 1 .. n + D]
        verify = torch.cat([nxt[:, None], proposal], dim=1)  # slots n..n + D
        verify_positions = positions[:, -1:] + 1 + torch.arange(D + 1, device=device)
        verify_mask = torch.cat([mask, mask.new_ones(B, D + 1)], dim=1)
        out = model(input_ids=verify, attention_mask=verify_mask, position_ids=verify_positions,
                    past_key_values=cache, use_cache=True)
        greedy = out.logits.argmax(-1)  # (B, D + 1): the model's choice after each verified slot
        agree = (greedy[:, :D] == proposal).long().cumprod(dim=1).sum(dim=1)
        k = int(agree[~finished].min())
        new = torch.cat([proposal[:, :k], greedy[:, k : k + 1]], dim=1)
        cache.crop(n + k + 1)
        tokens = torch.cat([tokens, verify[:, : k + 1]], dim=1)
        positions = torch.cat([positions, verify_positions[:, : k + 1]], dim=1)
        mask = verify_mask[:, : n + k + 1]
        trunk_states = out.pre_norm_hidden_states[:, : k + 1]
        nxt = greedy[:, k]
        emitted.append(new)
        produced += k + 1
        finished |= (new == eos_token_id).any(dim=1)
        if stats is not None:
            stats.rounds += 1
            stats.new_tokens += k + 1
            for d in range(k):
                stats.accepted[d] += 1
    return _as_greedy_output(torch.cat(emitted, dim=1)[:, :max_new_tokens], eos_token_id, pad_token_id)


def _as_greedy_output(seq: torch.Tensor, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """What plain greedy decoding returns for these tokens: `pad_token_id` after each row's first eos, and
    columns up to the step at which the last row ended."""
    is_eos = seq == eos_token_id
    ended = is_eos.any(dim=1)
    first = torch.where(ended, is_eos.int().argmax(dim=1), seq.shape[1])
    after = torch.arange(seq.shape[1], device=seq.device)[None] > first[:, None]
    seq = seq.masked_fill(after, pad_token_id)
    return seq[:, : int(first.max()) + 1] if bool(ended.all()) else seq
