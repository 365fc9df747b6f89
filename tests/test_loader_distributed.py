"""The loader under two real gloo ranks (spawned processes, no mocks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distkit import save_from_every_rank
from shardkit import write_shards

from mmscale.data.config import DataConfig
from mmscale.data.loader import build_loader
from mmscale.data.text import load_tokenizer


def _rank_main(rank: int, world_size: int, port: int, spec: str, tokenizer_dir: str, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        config = DataConfig(image_size=32, context_length=16, shuffle_buffer=8, workers=2)
        loader = build_loader(config, spec=spec, tokenizer=load_tokenizer(tokenizer_dir), batch_size=4,
                              train=True, epochs=1)
        save_from_every_rank([key for batch in loader for key in batch["keys"]], results)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_split_an_epoch_without_overlap(tmp_path, tokenizer_dir, unused_port):
    write_shards(tmp_path / "shards", shards=8, per_shard=8)  # 8 samples per shard: no dropped tails
    results = tmp_path / "keys.pt"
    mp.spawn(_rank_main, args=(2, unused_port, str(tmp_path / "shards"), str(tokenizer_dir), str(results)),
             nprocs=2, join=True)
    per_rank = torch.load(results)
    assert all(len(keys) == 32 for keys in per_rank)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0]) | set(per_rank[1])) == 64


def test_rank_defaults_to_one_process_without_a_group(tmp_path, tokenizer):
    write_shards(Path(tmp_path), shards=2, per_shard=4)
    loader = build_loader(DataConfig(image_size=32, context_length=16, workers=0), spec=str(tmp_path),
                          tokenizer=tokenizer, batch_size=4, train=False)
    assert loader.stream.settings.rank == 0 and loader.stream.settings.world_size == 1
    assert len([key for batch in loader for key in batch["keys"]]) == 8
