"""Input corpora for the shard-writing tests: each input kind, and broken inputs on request."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from mmscale.data.tars import iter_raw_samples, spec_urls, tar_member
from mmscale.shards.synthetic import make_image_folder


def image_bytes(size: tuple[int, int] = (64, 48), *, seed: int = 0, image_format: str = "JPEG",
                mode: str = "RGB") -> bytes:
    """A small noisy image in any PIL format and mode."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, image_format)
    return buffer.getvalue()


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A PNG whose header claims a huge size but holds almost no data: decoding it would be a bomb."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def write_table(path: Path, rows: list[dict], kind: str) -> Path:
    """Rows as csv, tsv, jsonl or parquet (column order from the first row)."""
    columns = list(rows[0])
    if kind in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, columns, delimiter="\t" if kind == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_coco(path: Path, images: list[tuple[str, list[str]]]) -> Path:
    """A COCO-captions annotation file: (file name, captions) per image."""
    data = {"images": [], "annotations": []}
    for image_id, (file_name, captions) in enumerate(images, start=1):
        data["images"].append({"id": image_id, "file_name": file_name, "width": 64, "height": 64})
        for caption in captions:
            data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": image_id,
                                        "caption": caption})
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these members, in order."""
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            tar.addfile(*tar_member(name, payload))
    return path


def truncate_inside_last_image(path: Path) -> None:
    """Cut a tar in the middle of its last image's data."""
    with tarfile.open(path) as tar:
        last = [member for member in tar.getmembers() if member.name.endswith(".jpg")][-1]
    path.write_bytes(path.read_bytes()[: last.offset_data + last.size // 2])


def make_input(kind: str, root: Path, n: int = 12) -> tuple[list[str], list[str], set[str]]:
    """An input of the given kind made from n synthetic images.

    Returns (make_shards arguments naming it, the captions in input order, the expected labels).
    COCO gets two captions for each of the first n/2 images.
    """
    images = root / "images"
    samples = make_image_folder(images, n, size=48, seed=3, labels=True)
    captions = [sample.caption for sample in samples]
    rows = [{"image": os.path.basename(s.image_path), "caption": s.caption, "label": s.label} for s in samples]
    if kind == "folder":
        return ["--input", str(images)], captions, {str(s.label) for s in samples}
    if kind in ("csv", "tsv", "jsonl", "parquet"):
        table = write_table(root / f"table.{kind}", rows, kind)
        return (["--input", str(table), "--image-root", str(images), "--label-column", "label"], captions,
                {str(s.label) for s in samples})
    if kind == "coco":
        names = [os.path.basename(s.image_path) for s in samples[: n // 2]]
        coco = write_coco(root / "captions.json", [(name, [f"first {i}", f"second {i}"]) for i, name in
                                                     enumerate(names)])
        return (["--input", str(coco), "--image-root", str(images)],
                [f"{which} {i}" for i in range(len(names)) for which in ("first", "second")], set())
    raise ValueError(kind)


def read_samples(spec: str) -> list[dict]:
    """Every raw sample of a spec, in order."""
    return [sample for url in spec_urls(spec) for sample in iter_raw_samples(url)]


def file_states(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """(mtime_ns, size, bytes) of every file in a folder, to show a run changed nothing."""
    return {path.name: (path.stat().st_mtime_ns, path.stat().st_size, path.read_bytes())
            for path in sorted(folder.iterdir()) if path.is_file()}
