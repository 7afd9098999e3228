"""Self-speculative decoding with MTP depths: drafts from cached depths, exact greedy output."""

import pytest
import torch

from plait.generate import generate, left_pad
from plait.models.mimo_v2_flash import MiMoV2FlashForCausalLM
from plait.models.minimax_m3 import MiniMaxM3SparseForCausalLM, MiniMaxM3TextModel
from plait.nn.attention import KVCache
from plait.speculative import SpeculativeStats, generate_speculative
from tests.nn.reference import assert_close, m3_text_config, mimo_config, randomize_


def _mimo(depths: int, window: int = 3, scale: float = 0.1) -> MiMoV2FlashForCausalLM:
    torch.manual_seed(0)
    cfg = mimo_config(layer_types=["full_attention", "sliding_attention"], mlp_layer_types=["dense", "sparse"],
                      sliding_window=window)
    return MiMoV2FlashForCausalLM.from_config(cfg, num_mtp_layers=depths, mtp_loss_scaling_factor=scale)


def _m3(depths: int) -> MiniMaxM3SparseForCausalLM:
    torch.manual_seed(0)
    # one lightning-indexer layer (2-token blocks, top-2) whose cached index keys must crop with the rest
    cfg = m3_text_config(layer_types=["minimax_m3_sparse", "full_attention"],
                         mlp_layer_types=["dense", "sparse"], index_n_heads=2, index_head_dim=8,
                         index_block_size=2, index_topk_blocks=2, index_local_blocks=1)
    return MiniMaxM3SparseForCausalLM.from_config(cfg, num_mtp_layers=depths)


MODELS = {"mimo_v2_flash": _mimo, "minimax_m3": _m3}


@pytest.mark.parametrize("kind", list(MODELS))
def test_mtp_depths_decoded_in_chunks_equal_the_full_mtp_forward(kind):
    """Depth d at slot t reads x[t + d + 1]; run slot by slot chunks with a cache (and a crop of wrong
    tokens in between), every depth gives the states of the training-time forward."""
    model = randomize_(MODELS[kind](depths=2), std=0.2).eval()
    backbone = model.mtp_backbone
    B, S = 2, 12
    ids = torch.randint(3, 64, (B, S))
    with torch.no_grad():
        out = model(input_ids=ids)
        full = backbone.mtp_hidden_states(ids, _trunk(backbone, ids))
        positions = torch.arange(S).expand(B, S)
        h_prev = out.pre_norm_hidden_states
        for d in range(2):
            cache, usable = KVCache(spare=2), S - d - 1  # slots whose token x[t + d + 1] exists
            pieces = []
            for lo, hi in ((0, 4), (4, 5), (5, usable)):
                # up to `spare` slots of drafted tokens that get rejected
                rejected = min(hi, lo + 2)
                wrong = torch.randint(3, 64, (B, rejected - lo))
                backbone.mtp_decode(d, h_prev[:, lo:rejected], wrong, positions[:, lo:rejected], None, cache)
                cache.crop(lo)
                pieces.append(backbone.mtp_decode(d, h_prev[:, lo:hi], ids[:, lo + d + 1 : hi + d + 1],
                                                  positions[:, lo:hi], None, cache))
            chunked = torch.cat(pieces, dim=1)
            assert_close(chunked, full[d][:, :usable], tol=1e-5, name=f"depth {d}")
            h_prev = chunked


def _trunk(backbone, ids):
    """What the MTP depths read from the trunk (the M3 text model returns it on request)."""
    return backbone(ids, return_trunk=True) if isinstance(backbone, MiniMaxM3TextModel) else backbone(ids)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("draft", [1, 2])
def test_output_equals_plain_greedy_decoding_with_padding_and_eos(kind, draft):
    model = randomize_(MODELS[kind](depths=2), std=0.2).eval()
    torch.manual_seed(3)
    ids, mask = left_pad([torch.randint(3, 64, (n,)) for n in (5, 9, 2)], pad_id=0)
    plain = generate(model, ids, mask, max_new_tokens=16, eos_token_id=7, pad_token_id=0)
    for eos in (7, int(plain[1, 4])):  # an eos that never comes, and one that ends row 1 early
        plain = generate(model, ids, mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)
        fast = generate_speculative(model, ids, mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=0,
                                    num_draft_tokens=draft)
        assert torch.equal(fast, plain), (eos, fast, plain)


def _progressions(n: int, length: int, g: torch.Generator) -> torch.Tensor:
    """Arithmetic progressions mod 50 (ids 3..52): the first two tokens decide the rest."""
    start = torch.randint(0, 50, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    return 3 + (start + stride * torch.arange(length)) % 50


def test_a_trained_model_accepts_drafts_and_still_decodes_greedily():
    """MTP depths trained with the model draft well; rounds accept 0, 1 or 2 drafts, and the output is
    the plain greedy output token for token."""
    model = _mimo(depths=2, window=4, scale=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        x = _progressions(16, 20, g)
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    x = _progressions(4, 6, torch.Generator().manual_seed(5))
    ids, mask = left_pad([x[0, :4], x[1], x[2, :3], x[3, :5]], pad_id=0)
    plain = generate(model, ids, mask, max_new_tokens=30, eos_token_id=2, pad_token_id=0)
    stats = SpeculativeStats()
    fast = generate_speculative(model, ids, mask, max_new_tokens=30, eos_token_id=2, pad_token_id=0, stats=stats)
    assert torch.equal(fast, plain)
    rate = stats.acceptance_rate
    assert rate[0] > 0.5 and 0.0 < rate[1] <= rate[0]
    assert stats.tokens_per_forward == pytest.approx(1 + rate[0] + rate[1])
    assert stats.rounds < 29  # fewer forwards of the model than tokens


def test_clear_errors():
    ids = torch.ones(1, 3, dtype=torch.long)
    no_mtp = _mimo(depths=0).eval()
    with pytest.raises(ValueError, match="model.mtp.num_layers > 0"):
        generate_speculative(no_mtp, ids, max_new_tokens=4, eos_token_id=2, pad_token_id=0)
    model = _mimo(depths=2).eval()
    with pytest.raises(ValueError, match=r"num_draft_tokens: expected 1..2"):
        generate_speculative(model, ids, max_new_tokens=4, eos_token_id=2, pad_token_id=0, num_draft_tokens=3)
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        generate_speculative(model, ids, torch.ones(1, 4), max_new_tokens=4, eos_token_id=2, pad_token_id=0)
    cache = KVCache(spare=1)
    with pytest.raises(ValueError, match=r"KVCache.crop: expected a length in \[0, 0\]"):
        cache.crop(1)
    with pytest.raises(ValueError, match="spare"):
        KVCache(spare=-1)
