"""train_tokenizer: a WordPiece tokenizer trained on shard captions that AutoTokenizer loads offline."""

from __future__ import annotations

from transformers import AutoTokenizer

from mmscale.shards.synthetic import make_synthetic_shards
from mmscale.shards.tokenizer_train import SPECIAL_TOKENS, iter_captions, main, train_wordpiece


def test_trained_tokenizer_loads_with_auto_tokenizer(tmp_path, capsys):
    make_synthetic_shards(tmp_path / "shards", 40, samples_per_shard=16)
    assert main(["--data", str(tmp_path / "shards"), "--vocab-size", "120", "--output", str(tmp_path / "tok"),
                 "--max-samples", "30", "--no-progress"]) == 0
    assert "on 30 captions" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    encoded = tokenizer("A RED Circle on a blue background")
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens == ["[CLS]", "a", "red", "circle", "on", "a", "blue", "background", "[SEP]"]
    assert [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tokenizer.pad_token_id, tokenizer.mask_token_id) == (0, 4)
    batch = tokenizer(["a red", "a blue square"], padding="max_length", max_length=6, truncation=True)
    assert batch["input_ids"][0][-2:] == [0, 0]


def test_cased_training_and_errors(tmp_path, capsys):
    tokenizer = train_wordpiece(["Red Circle", "red circle"] * 20, vocab_size=60, lowercase=False)
    assert tokenizer.tokenize("Red red") == ["Red", "red"]
    make_synthetic_shards(tmp_path, 3, samples_per_shard=3)
    assert len(list(iter_captions(str(tmp_path), max_samples=2))) == 2
    assert main(["--data", str(tmp_path / "none.tar"), "--vocab-size", "100", "--output",
                 str(tmp_path / "t"), "--no-progress"]) == 2
    assert "none.tar: no such file" in capsys.readouterr().err
