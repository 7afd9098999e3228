import pytest
import torch

from plait.data.collate import IGNORE_INDEX, collate_packed, collate_padded


def sample(n_prefix: int, n_answer: int, start_id: int = 10) -> dict:
    ids = torch.arange(start_id, start_id + n_prefix + n_answer)
    return {"input_ids": ids, "answer_start": n_prefix, "image": torch.zeros(4, 4, 3, dtype=torch.uint8)}


def test_padded_masks_cover_answers_only():
    batch = collate_padded([sample(3, 2), sample(2, 4, start_id=50)], pad_id=0)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX] * 3 + [13, 14] + [IGNORE_INDEX],
        [IGNORE_INDEX] * 2 + [52, 53, 54, 55],
    ]
    assert batch["input_ids"][0, 5] == 0
    assert batch["images"].shape == (2, 4, 4, 3)


def test_packed_rows_restart_positions_and_never_overflow():
    samples = [sample(3, 2), sample(2, 2, 30), sample(4, 3, 60)]
    batch = collate_packed(samples, pad_id=0, pack_length=10)
    # 5 + 4 fit in row 0 (one pad), 7 goes to row 1 (three pads)
    assert batch["input_ids"].shape == (2, 10)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]]
    assert batch["cu_seqlens"].tolist() == [0, 5, 9, 10, 17, 20]
    labels = batch["labels"]
    assert labels[0].tolist() == [IGNORE_INDEX] * 3 + [13, 14] + [IGNORE_INDEX] * 2 + [32, 33] + [IGNORE_INDEX]
    assert labels[1].tolist() == [IGNORE_INDEX] * 4 + [64, 65, 66] + [IGNORE_INDEX] * 3
    assert "attention_mask" not in batch
    assert batch["images"].shape[0] == 3


def test_packing_rejects_a_sample_longer_than_the_row():
    with pytest.raises(ValueError, match="sample 1 has 12 tokens, more than pack_length=10"):
        collate_packed([sample(2, 2), sample(6, 6)], pad_id=0, pack_length=10)


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="empty batch"):
        collate_padded([], pad_id=0)
    with pytest.raises(ValueError, match="empty batch"):
        collate_packed([], pad_id=0, pack_length=8)


def test_mixed_batches_stack_each_kind_of_item_in_sample_order():
    clip = lambda v: torch.full((3, 2), float(v))
    samples = [sample(3, 2), {"input_ids": torch.arange(4), "answer_start": 2, "audio": clip(1)},
               sample(2, 2, 30), {"input_ids": torch.arange(5), "answer_start": 3, "audio": clip(2)}]
    for batch in (collate_padded(samples, pad_id=0), collate_packed(samples, pad_id=0, pack_length=10)):
        assert batch["images"].shape == (2, 4, 4, 3)
        assert batch["audio"][:, 0, 0].tolist() == [1.0, 2.0]
    assert "audio" not in collate_padded([sample(3, 2)], pad_id=0)
