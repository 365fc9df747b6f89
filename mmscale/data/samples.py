"""From a raw tar sample to a training sample, and from samples to a batch."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from mmscale.data.tars import SampleRejected, check_raw_sample, sample_caption, sample_image_bytes
from mmscale.data.text import CaptionEncoder
from mmscale.data.transforms import decode_and_crop

NO_LABEL = -1


@dataclass
class Sample:
    """One decoded sample, before batching."""

    key: str
    image: torch.Tensor
    caption: str
    label: int
    seed: int


@dataclass(frozen=True)
class AugmentSettings:
    """Image handling for one loader: size, and the training augmentation (None for eval)."""

    image_size: int
    max_pixels: int
    train: bool
    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    hflip_probability: float = 0.0


class SampleDecoder:
    """Validates, decodes and augments raw samples; collates, tokenizes and masks batches."""

    def __init__(self, augment: AugmentSettings, captions: CaptionEncoder):
        self.augment = augment
        self.captions = captions

    def decode(self, raw: dict, *, seed: int) -> Sample:
        """A Sample, or SampleRejected naming why this raw sample is skipped."""
        check_raw_sample(raw)
        found = sample_image_bytes(raw)
        if found is None:
            raise SampleRejected("missing_image")
        extension, data = found
        if raw.get("txt") == b"":
            raise SampleRejected("empty_member")
        caption = sample_caption(raw)
        if caption is None:
            raise SampleRejected("missing_caption")
        a = self.augment
        rng = random.Random(seed) if a.train else None
        try:
            image = decode_and_crop(data, extension, size=a.image_size, max_pixels=a.max_pixels, rng=rng,
                                    scale=a.crop_scale, ratio=a.crop_ratio, hflip_probability=a.hflip_probability)
        except SampleRejected as bad:
            raise SampleRejected(bad.reason) from None
        return Sample(key=raw["__key__"], image=image, caption=caption, label=_label(raw), seed=seed)

    def collate(self, samples: list[Sample], *, seed: int) -> dict:
        """Stack images (uint8), tokenize and mask captions, gather labels and keys."""
        batch = {"images": torch.stack([sample.image for sample in samples])}
        batch.update(self.captions.encode_and_mask([sample.caption for sample in samples], seed=seed))
        batch["labels"] = torch.tensor([sample.label for sample in samples], dtype=torch.long)
        batch["keys"] = [sample.key for sample in samples]
        batch["size"] = len(samples)
        return batch


def _label(raw: dict) -> int:
    """The integer in a `.cls` member; NO_LABEL when absent or not an integer."""
    payload = raw.get("cls")
    if not payload:
        return NO_LABEL
    try:
        return int(payload.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return NO_LABEL
