"""Caption tokenization and BERT-style MLM masking statistics."""

from __future__ import annotations

import pytest
import torch

from mmscale.data.text import IGNORE_INDEX, CaptionEncoder, load_tokenizer


def test_captions_are_padded_and_truncated_to_the_context_length(tokenizer):
    encoder = CaptionEncoder(tokenizer, context_length=8, mlm_probability=0.0)
    batch = encoder.encode(["red circle", "a large blue square on the left of a small red star " * 3])
    assert batch["input_ids"].shape == (2, 8)
    short, long = batch["input_ids"].tolist()
    assert short[0] == tokenizer.cls_token_id and tokenizer.sep_token_id in short
    assert short[-1] == tokenizer.pad_token_id and batch["attention_mask"][0, -1] == 0
    assert long[-1] == tokenizer.sep_token_id and batch["attention_mask"][1].all()


def test_mlm_masking_statistics(tokenizer):
    encoder = CaptionEncoder(tokenizer, context_length=24, mlm_probability=0.15)
    captions = ["a large blue square on the left", "red star", "small green circle at the top of a photo"] * 700
    batch = encoder.encode_and_mask(captions, seed=3)
    ids, masked, labels = batch["input_ids"], batch["mlm_input_ids"], batch["mlm_labels"]
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    chosen = labels != IGNORE_INDEX
    eligible = ~special
    assert not (chosen & special).any(), "special or padding tokens were chosen"
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    rate = chosen.sum().item() / eligible.sum().item()
    assert 0.14 < rate < 0.16, rate
    n = chosen.sum().item()
    to_mask = (masked[chosen] == tokenizer.mask_token_id).sum().item() / n
    kept = (masked[chosen] == ids[chosen]).sum().item() / n
    replaced = 1 - to_mask - kept
    assert 0.77 < to_mask < 0.83 and 0.08 < kept < 0.12 and 0.08 < replaced < 0.12, (to_mask, kept, replaced)
    random_tokens = masked[chosen & (masked != ids) & (masked != tokenizer.mask_token_id)]
    assert not torch.isin(random_tokens, torch.tensor(tokenizer.all_special_ids)).any()
    assert len(set(random_tokens.tolist())) > 50  # drawn across the vocabulary, not a few ids


def test_masking_is_deterministic_per_seed(tokenizer):
    encoder = CaptionEncoder(tokenizer, context_length=16, mlm_probability=0.15)
    captions = ["a large blue square on the left of a red star"] * 16
    first, again = encoder.encode_and_mask(captions, seed=1), encoder.encode_and_mask(captions, seed=1)
    other = encoder.encode_and_mask(captions, seed=2)
    assert torch.equal(first["mlm_input_ids"], again["mlm_input_ids"])
    assert not torch.equal(first["mlm_labels"], other["mlm_labels"])


def test_a_missing_tokenizer_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_tokenizer(tmp_path / "absent")


def test_captions_are_padded_to_the_longest_in_the_batch_unless_asked_for_the_context(tokenizer):
    captions = ["red circle", "a small blue star"]
    longest = CaptionEncoder(tokenizer, context_length=32, mlm_probability=0.0).encode(captions)
    fixed = CaptionEncoder(tokenizer, context_length=32, mlm_probability=0.0, pad_to_longest=False).encode(captions)
    assert longest["input_ids"].shape == (2, 8) and fixed["input_ids"].shape == (2, 32)
    assert torch.equal(fixed["input_ids"][:, :8], longest["input_ids"]) and not fixed["attention_mask"][:, 8:].any()


def test_masked_positions_are_flat_indices_padded_with_ignored_targets():
    from mmscale.data.text import masked_positions

    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[0, 1], labels[1, 3] = 7, 9
    positions, targets = masked_positions(labels, multiple=4)
    assert positions.tolist() == [1, 7, 0, 0] and targets.tolist() == [7, 9, IGNORE_INDEX, IGNORE_INDEX]
    nothing, ignored = masked_positions(torch.full((2, 4), IGNORE_INDEX), multiple=4)
    assert len(nothing) == 4 and (ignored == IGNORE_INDEX).all()  # never empty: every rank runs the head
