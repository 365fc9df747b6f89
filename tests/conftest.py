"""Shared fixtures: a real WordPiece tokenizer trained on caption-like text, once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/shardkit.py
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("red green blue yellow purple orange small large circle square triangle star on the left right "
         "top bottom of a an image photo picture showing background caption shard with").split()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from mmscale.data.tokenizer_train import train_wordpiece

    captions = [f"{a} {b} {c} caption {i} {j} of shard" for i, (a, b, c) in
                enumerate(zip(WORDS, WORDS[3:] + WORDS[:3], WORDS[7:] + WORDS[:7])) for j in range(30)]
    folder = tmp_path_factory.mktemp("tokenizer")
    train_wordpiece(captions, vocab_size=400, output_dir=folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from mmscale.data.text import load_tokenizer

    return load_tokenizer(tokenizer_dir)
