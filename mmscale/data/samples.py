"""From a raw tar sample to a training sample, and from samples to a batch."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from mmscale.data.tars import SampleRejected, check_raw_sample, sample_caption, sample_image_bytes
from mmscale.data.text import CaptionEncoder
from mmscale.data.transforms import decode_and_crop
from mmscale.data.vqa import AnswerTargets, parse_vqa_json

NO_LABEL = -1


@dataclass
class Sample:
    """One decoded sample, before batching."""

    key: str
    image: torch.Tensor
    caption: str
    label: int
    seed: int
    answers: tuple[str, ...] = ()
    """VQA samples: the human answers (the caption is the question)."""
    question_type: str = ""


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
    """Validates, decodes and augments raw samples; collates, tokenizes and masks batches.

    With `vqa` (the answer list's targets) samples are VQA samples (mmscale.data.vqa): the question takes the
    caption's place, and batches carry `answer_targets` [B, K] (soft scores over the answer list), `answers` and
    `question_types`; `vqa_need_answers=False` reads questions without answers (answering only)."""

    def __init__(self, augment: AugmentSettings, captions: CaptionEncoder, *, vqa: AnswerTargets | None = None,
                 vqa_need_answers: bool = True):
        self.augment = augment
        self.captions = captions
        self.vqa = vqa
        self.vqa_need_answers = vqa_need_answers

    def decode(self, raw: dict, *, seed: int) -> Sample:
        """A Sample, or SampleRejected naming why this raw sample is skipped."""
        check_raw_sample(raw)
        found = sample_image_bytes(raw)
        if found is None:
            raise SampleRejected("missing_image")
        extension, data = found
        if raw.get("txt") == b"":
            raise SampleRejected("empty_member")
        answers, question_type = (), ""
        if self.vqa is not None:
            fields = parse_vqa_json(raw.get("json"), need_answers=self.vqa_need_answers)
            caption, answers, question_type = fields.question, fields.answers, fields.question_type
        else:
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
        return Sample(key=raw["__key__"], image=image, caption=caption, label=_label(raw), seed=seed, answers=answers,
                      question_type=question_type)

    def collate(self, samples: list[Sample], *, seed: int) -> dict:
        """Stack images (uint8), tokenize and mask captions, gather labels and keys."""
        batch = {"images": torch.stack([sample.image for sample in samples])}
        batch.update(self.captions.encode_and_mask([sample.caption for sample in samples], seed=seed))
        batch["labels"] = torch.tensor([sample.label for sample in samples], dtype=torch.long)
        batch["keys"] = [sample.key for sample in samples]
        if self.vqa is not None:
            batch["answer_targets"] = self.vqa.targets([sample.answers for sample in samples])
            batch["answers"] = [sample.answers for sample in samples]
            batch["question_types"] = [sample.question_type for sample in samples]
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
