"""Small synthetic image–caption corpora for tests, the quickstart and benchmarks.

Each image is one coloured shape of random size and position on a neutral background, and
its caption says so ("a red circle on a gray background"). The label (`.cls`) is the shape's
colour, an index into OBJECT_COLOURS: an attribute a tiny model learns from captions alone
within minutes on a CPU (telling the shapes apart takes a ViT trained from scratch much
longer), so zero-shot classification of the colour has a right answer well above chance.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

# Shape colours at least 150 apart in RGB (orange and purple, 80-110 from their neighbours, took a tiny
# model several times longer to tell apart, and the quickstart's result swung with the data order).
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 230), "yellow": (235, 225, 30),
           "cyan": (30, 210, 220), "magenta": (210, 40, 210), "white": (245, 245, 245), "gray": (128, 128, 128),
           "black": (15, 15, 15)}
OBJECT_COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta")
BACKGROUNDS = ("white", "gray", "black")
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class SyntheticSample:
    """One generated image file, its caption and its label (index into OBJECT_COLOURS)."""

    image_path: str
    caption: str
    label: int


DOMAINS = {"plain": BACKGROUNDS, "colourful": OBJECT_COLOURS, "dim": BACKGROUNDS}
"""Background colours by domain. `colourful` puts the shape on another strong colour; `dim` is the
plain domain at 40% brightness (a night-time shift: same captions, darker colours), the shifted
domain that fine-tuning demos adapt to."""
BRIGHTNESS = {"dim": 0.4}


def draw_sample(rng: random.Random, size: int = 64, domain: str = "plain") -> tuple[Image.Image, str, int]:
    """A random shape image with its caption and label (the shape's colour)."""
    label = rng.randrange(len(OBJECT_COLOURS))
    colour, shape = OBJECT_COLOURS[label], rng.choice(SHAPES)
    background = rng.choice([name for name in DOMAINS[domain] if name != colour])
    paint = {name: tuple(round(channel * BRIGHTNESS.get(domain, 1.0)) for channel in rgb) for name, rgb in COLOURS.items()}
    image = Image.new("RGB", (size, size), paint[background])
    draw = ImageDraw.Draw(image)
    extent = rng.uniform(0.35, 0.7) * size
    left, top = rng.uniform(0, size - extent), rng.uniform(0, size - extent)
    box = (left, top, left + extent, top + extent)
    if shape == "circle":
        draw.ellipse(box, fill=paint[colour])
    elif shape == "square":
        draw.rectangle(box, fill=paint[colour])
    else:
        draw.polygon([(left + extent / 2, top), (left, top + extent), (left + extent, top + extent)],
                     fill=paint[colour])
    caption = f"{_article(colour)} {colour} {shape} on {_article(background)} {background} background"
    return image, caption, label


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_image_folder(path: str | os.PathLike, n: int, *, size: int = 64, seed: int = 0,
                      image_format: str = "jpg", labels: bool = False, domain: str = "plain") -> list[SyntheticSample]:
    """Write n images (`000000.jpg`) with same-stem captions (`000000.txt`) and, if asked, labels (`.cls`).

    `image_format` is a file extension PIL can write (jpg, png, webp); the same seed gives
    the same files.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    samples = []
    for index in range(n):
        image, caption, label = draw_sample(rng, size, domain)
        image_path = folder / f"{index:06d}.{image_format}"
        image.save(image_path, quality=90) if image_format in ("jpg", "jpeg") else image.save(image_path)
        (folder / f"{index:06d}.txt").write_text(caption + "\n", encoding="utf-8")
        if labels:
            (folder / f"{index:06d}.cls").write_text(f"{label}\n", encoding="ascii")
        samples.append(SyntheticSample(str(image_path), caption, label))
    return samples


def make_synthetic_shards(output_dir: str | os.PathLike, n: int, *, samples_per_shard: int = 16,
                          size: int = 64, seed: int = 0, labels: bool = True, domain: str = "plain") -> list[str]:
    """Write n synthetic samples as shards with the real make_shards pipeline; returns the shard paths."""
    from mmscale.data.sharding import ShardingOptions, make_shards
    from mmscale.data.sources import InputOptions

    with tempfile.TemporaryDirectory(prefix="mmscale-synthetic-") as folder:
        make_image_folder(folder, n, size=size, seed=seed, labels=labels, domain=domain)
        summary = make_shards(ShardingOptions(input=InputOptions(path=folder, kind="folder"),
                                              output_dir=str(output_dir), samples_per_shard=samples_per_shard,
                                              workers=1, progress=False))
    return [os.path.join(str(output_dir), name) for name in summary.sizes]
