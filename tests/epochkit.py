"""Streams of keys for the elastic-resume tests: tar shards of caption-only samples and a decoder that keeps
only each sample's key, so a loader's epochs run in milliseconds (tests/test_epochs.py, test_checkpoint_ranks.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from corpus import write_tar

from mmscale.data.loader import BatchLoader, ShardStream, StreamSettings
from mmscale.data.tars import parse_spec


@dataclass
class _Kept:
    key: str
    seed: int


class KeyDecoder:
    """Decodes a raw sample to its key; a batch is its keys."""

    def decode(self, raw: dict, *, seed: int) -> _Kept:
        return _Kept(raw["__key__"], seed)

    def collate(self, samples: list, *, seed: int) -> dict:
        return {"keys": [sample.key for sample in samples], "size": len(samples)}


def write_text_shards(folder: Path, sizes: list[int], *, listed: bool) -> list[str]:
    """Tars of `sizes` caption-only samples (keys s<shard>k<index>), with a sizes.json when `listed`."""
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for shard, size in enumerate(sizes):
        path = folder / f"shard-{shard:06d}.tar"
        write_tar(path, [(f"s{shard}k{i:04d}.txt", b"x") for i in range(size)])
        urls.append(str(path))
    if listed:
        (folder / "sizes.json").write_text(json.dumps({Path(url).name: size for url, size in zip(urls, sizes)}))
    return urls


def key_loader(spec: str, *, rank: int, world: int, workers: int, batch: int, buffer: int,
               epochs: int | None) -> BatchLoader:
    """A real BatchLoader (StatefulDataLoader, `workers` worker processes) over key streams, in epoch sampling."""
    settings = StreamSettings(sources=tuple(parse_spec(spec)), sampling="epoch", rank=rank, world_size=world, seed=3,
                              shuffle_buffer=buffer, batch_size=batch, epochs=epochs)
    return BatchLoader(ShardStream(settings, KeyDecoder()), workers=workers)
