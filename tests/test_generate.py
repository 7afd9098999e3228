import pytest
import torch

import plait
from plait.generate import generate, left_pad


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return plait.from_config({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                              "max_position_embeddings": 128, "pad_token_id": 0, "eos_token_id": 1}).eval()


def greedy_without_cache(model, prompt: torch.Tensor, steps: int) -> list[int]:
    ids = prompt[None]
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
            out.append(int(token))
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return out


def test_cached_greedy_equals_full_recompute(llama):
    prompt = torch.tensor([5, 9, 23, 7, 3])
    # eos_token_id=-1 never fires, so both run the full length
    new = generate(llama, prompt[None], max_new_tokens=12, eos_token_id=-1, pad_token_id=0)
    assert new[0].tolist() == greedy_without_cache(llama, prompt, 12)


def test_left_padded_rows_decode_as_if_alone(llama):
    prompts = [torch.tensor([5, 9, 23, 7, 3]), torch.tensor([11, 4])]
    ids, mask = left_pad(prompts, pad_id=0)
    assert mask.tolist() == [[1] * 5, [0, 0, 0, 1, 1]]
    batched = generate(llama, ids, mask, max_new_tokens=8, eos_token_id=-1, pad_token_id=0)
    for row, p in enumerate(prompts):
        alone = generate(llama, p[None], max_new_tokens=8, eos_token_id=-1, pad_token_id=0)
        assert batched[row].tolist() == alone[0].tolist()


def test_rows_stop_at_eos_and_pad_after(llama):
    prompt = torch.tensor([[5, 9, 23]])
    first = generate(llama, prompt, max_new_tokens=1, eos_token_id=-1, pad_token_id=0)[0, 0].item()
    new = generate(llama, prompt, max_new_tokens=6, eos_token_id=first, pad_token_id=0)
    assert new.tolist() == [[first]]  # every row finished after one token, so decoding stopped


def test_sampling_is_seeded_and_top_k_one_is_greedy(llama):
    prompt = torch.tensor([[5, 9, 23]])
    a = generate(llama, prompt, max_new_tokens=6, eos_token_id=-1, pad_token_id=0, temperature=1.0,
                 generator=torch.Generator().manual_seed(3))
    b = generate(llama, prompt, max_new_tokens=6, eos_token_id=-1, pad_token_id=0, temperature=1.0,
                 generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    k1 = generate(llama, prompt, max_new_tokens=6, eos_token_id=-1, pad_token_id=0, temperature=0.7, top_k=1)
    greedy = generate(llama, prompt, max_new_tokens=6, eos_token_id=-1, pad_token_id=0)
    assert torch.equal(k1, greedy)
    tiny_p = generate(llama, prompt, max_new_tokens=6, eos_token_id=-1, pad_token_id=0, temperature=0.7, top_p=1e-6)
    assert torch.equal(tiny_p, greedy)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens: expected a positive count"),
    ({"temperature": -1.0}, "temperature: expected a finite value >= 0"),
    ({"temperature": float("nan")}, "temperature: expected a finite value >= 0, got nan"),
    ({"top_p": 1.5}, r"top_p: expected a value in \(0, 1\]"),
    ({"top_k": 0}, "top_k: expected a positive count"),
])
def test_bad_arguments(llama, kwargs, message):
    args = {"max_new_tokens": 4, "eos_token_id": 1, "pad_token_id": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(llama, torch.tensor([[5, 9]]), **args)
    with pytest.raises(ValueError, match=r"input_ids: expected \(B, S\)"):
        generate(llama, torch.tensor([5, 9]), max_new_tokens=2, eos_token_id=1, pad_token_id=0)
