"""Small real tar shards for loader tests: generated JPEGs with captions, bad samples on request."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from corpus import write_tar
from PIL import Image


def jpeg_bytes(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A small JPEG whose colour depends on `seed`."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    pixels = np.clip(base + rng.normal(scale=20, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def write_shards(folder: Path, *, shards: int, per_shard: int, prefix: str = "shard",
                 labels: bool = False, image_size: tuple[int, int] = (48, 40)) -> list[str]:
    """`shards` tars of `per_shard` good samples with globally unique keys, plus sizes.json."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for shard in range(shards):
        members = []
        for i in range(per_shard):
            key = f"{prefix}{shard:03d}x{i:05d}"
            members.append((f"{key}.jpg", jpeg_bytes(shard * 100_000 + i, image_size)))
            members.append((f"{key}.txt", f"caption {shard} {i} of {prefix}".encode()))
            if labels:
                members.append((f"{key}.cls", str(i % 3).encode()))
            members.append((f"{key}.json", json.dumps({"source": key}).encode()))
        name = f"{prefix}-{shard:06d}.tar"
        write_tar(folder / name, members)
        sizes[name] = per_shard
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return [str(folder / f"{prefix}-{shard:06d}.tar") for shard in range(shards)]

