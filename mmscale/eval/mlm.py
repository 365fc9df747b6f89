"""`mmscale eval mlm`: how well a model fills in masked words of captions, with the image and without it.

Listed words (`--words`) are masked wherever they stand as a whole word of a caption, every word piece of
each occurrence, so the score says whether the model can name what the image shows (a colour, a shape)
rather than how it guesses common tokens. The same masked captions are then scored again against a blank
mid-gray image: the gap between the two accuracies is what the image contributed (a dual encoder's text
tower never sees the image, so its two accuracies are equal).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mmscale.data.config import DataConfig
from mmscale.data.loader import build_loader
from mmscale.data.stream import mix_seed
from mmscale.data.text import IGNORE_INDEX, CaptionEncoder, MaskingSpec, load_tokenizer, mask_tokens
from mmscale.eval.metrics import read_lines
from mmscale.models import load_model
from mmscale.models.checkpoint import MMSCALE_FILE

GRAY = 128
"""The blank image's uint8 value in every channel."""
MLM_PROBABILITY = 0.15
MASKING_SEED = 0
"""Random masking draws from a generator seeded with this and the caption (mask_each_caption)."""


def read_words(path: str, tokenizer) -> frozenset[str]:
    """The words of a file (one a line), case-folded; a line the tokenizer would split into several words is an
    error naming it."""
    words = read_lines(path, "words")
    pre_tokenizer = tokenizer.backend_tokenizer.pre_tokenizer
    for number, word in enumerate(words, start=1):
        pieces = ([piece for piece, _ in pre_tokenizer.pre_tokenize_str(word)] if pre_tokenizer is not None
                  else word.split())
        if len(pieces) != 1:
            raise ValueError(f"words file {path} line {number}: {word!r} is {len(pieces)} words to the tokenizer "
                             f"({', '.join(map(repr, pieces))}); list single words, one a line")
    return frozenset(word.casefold() for word in words)


def word_labels(encoding, caption: str, words: frozenset[str]) -> list[bool]:
    """Per token of a `tokenizers` Encoding of `caption`: part of a whole word of the caption that is in `words`
    (case-insensitive)? A word cut short by truncation is never matched (its start may spell another word)."""
    cut = {word for overflow in encoding.overflowing for word in overflow.word_ids if word is not None}
    spans: dict[int, list[int]] = {}
    for position, word in enumerate(encoding.word_ids):
        if word is not None and word not in cut:
            spans.setdefault(word, []).append(position)
    chosen = [False] * len(encoding.ids)
    for positions in spans.values():
        start, end = encoding.offsets[positions[0]][0], encoding.offsets[positions[-1]][1]
        if caption[start:end].casefold() in words:
            for position in positions:
                chosen[position] = True
    return chosen


class EvalMasking(CaptionEncoder):
    """A caption encoder whose masks are an evaluation's: every piece of the listed `words` becomes [MASK] (but
    [UNK], which training never asks the head to predict), or,
    without words, BERT's 15% masking of each caption seeded by its text (mask_each_caption), so the masks do not
    depend on how the captions are batched. Used as the loader's caption encoder (build_loader's `captions`)."""

    def __init__(self, tokenizer, *, context_length: int, words: frozenset[str] | None):
        if tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token ([MASK]); masked-word accuracy needs one")
        super().__init__(tokenizer, context_length=context_length, mlm_probability=MLM_PROBABILITY)
        self.words = words

    def encode_and_mask(self, captions: list[str], *, seed: int) -> dict[str, torch.Tensor]:
        """`input_ids`, `attention_mask`, `mlm_input_ids` and `mlm_labels` (IGNORE_INDEX where nothing is
        predicted). `seed` (the loader's, which depends on the batch) is not used."""
        encodings = self.backend.encode_batch(captions)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        attention_mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        if self.words is None:
            masked, labels = mask_each_caption(ids, attention_mask, seeds=captions, spec=self.masking)
        else:
            chosen = torch.tensor([word_labels(e, caption, self.words) for e, caption in zip(encodings, captions)],
                                  dtype=torch.bool).view_as(ids)
            chosen &= ~torch.isin(ids, torch.tensor(self.masking.special_ids))  # [UNK]: never an MLM target
            masked = ids.masked_fill(chosen, self.masking.mask_token_id)
            labels = ids.masked_fill(~chosen, IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": attention_mask, "mlm_input_ids": masked, "mlm_labels": labels}

def mask_each_caption(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, seeds: list,
                      spec: MaskingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's 15% masking (mmscale.data.text.mask_tokens) of each caption on its own, from a generator seeded
    with MASKING_SEED and the caption's entry of `seeds` (its text, its digest): a caption is masked the same
    way in any batch, on any rank, with any padding. Returns (masked ids, labels)."""
    masked, labels = input_ids.clone(), torch.full_like(input_ids, IGNORE_INDEX)
    for row, seed in enumerate(seeds):
        length = int(attention_mask[row].sum())
        generator = torch.Generator().manual_seed(mix_seed(MASKING_SEED, seed))
        row_masked, row_labels = mask_tokens(input_ids[row:row + 1, :length], spec=spec, probability=MLM_PROBABILITY,
                                             generator=generator)
        masked[row, :length], labels[row, :length] = row_masked[0], row_labels[0]
    return masked, labels


def masked_token_counts(model, batch: dict, *, images: torch.Tensor, device: torch.device) -> tuple[int, int]:
    """(masked tokens, correctly predicted ones) of a batch with `mlm_input_ids`/`mlm_labels`, the captions
    attending to `images` (uint8, on `device`) where the model has cross-attention."""
    logits, targets = model.mlm_logits(batch["mlm_input_ids"].to(device), batch["attention_mask"].to(device),
                                       batch["mlm_labels"].to(device), images=images)
    return len(targets), int((logits.argmax(dim=-1) == targets).sum())


@dataclass
class MaskedWordCounts:
    """Counts of one pass of masked-word prediction."""

    masked: int = 0
    """Masked tokens, all captions together."""
    correct: int = 0
    """Masked tokens predicted right with the caption's own image."""
    correct_without_image: int = 0
    """Masked tokens predicted right with a blank gray image."""
    captions: int = 0
    """Captions with at least one masked token (the others are not counted)."""
    samples: int = 0
    """Pairs read."""


@torch.no_grad()
def count_masked_words(model, batches, *, device: torch.device) -> MaskedWordCounts:
    """Masked-token predictions of `batches` (EvalMasking's), with each caption's image and with a gray one;
    only the captions with something masked are run."""
    counts = MaskedWordCounts()
    for batch in batches:
        counts.samples += len(batch["input_ids"])
        rows = (batch["mlm_labels"] != IGNORE_INDEX).any(dim=1)
        if not rows.any():
            continue
        batch = {name: batch[name][rows] for name in ("images", "attention_mask", "mlm_input_ids", "mlm_labels")}
        images = batch["images"].to(device)
        masked, correct = masked_token_counts(model, batch, images=images, device=device)
        _, correct_without = masked_token_counts(model, batch, images=torch.full_like(images, GRAY), device=device)
        counts.masked += masked
        counts.correct += correct
        counts.correct_without_image += correct_without
        counts.captions += int(rows.sum())
    return counts


def load_model_with_mlm_head(checkpoint: str):
    """The model of `checkpoint` with its trained MLM head, or an error saying it has none."""
    model = load_model(checkpoint, mlm_head=True)
    meta = Path(checkpoint) / MMSCALE_FILE
    if model.mlm_head is None or not meta.is_file() or not json.loads(meta.read_text()).get("mlm_head"):
        raise ValueError(f"checkpoint {checkpoint} has no trained MLM head (its {MMSCALE_FILE} does not list one); "
                         "masked-word accuracy needs a model trained with model.mlm_head=true and loss.mlm_weight > 0")
    return model


def mlm_command(args) -> int:
    """`mmscale eval mlm`: print accuracy, accuracy_without_image and masked, then one JSON object."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model_with_mlm_head(args.checkpoint).to(device).eval()
    tokenizer = load_tokenizer(args.tokenizer or args.checkpoint)
    words = read_words(args.words, tokenizer) if args.words else None
    masking = EvalMasking(tokenizer, context_length=args.context_length, words=words)
    data = DataConfig(val=args.data, image_size=model.image_size, **model.caption_settings(args.context_length),
                      workers=args.workers, mlm_probability=0.0)
    loader = build_loader(data, spec=args.data, tokenizer=tokenizer, batch_size=args.batch_size, train=False,
                          rank=0, world_size=1, captions=masking)
    counts = count_masked_words(model, loader, device=device)
    if not counts.masked:
        what = f"any of the {len(words)} words of --words {args.words}" if words else "a token to mask"
        raise ValueError(f"nothing was masked: no caption of the {counts.samples} in --data {args.data} has {what}")
    result = {"accuracy": counts.correct / counts.masked,
              "accuracy_without_image": counts.correct_without_image / counts.masked,
              "masked": counts.masked, "captions": counts.captions, "samples": counts.samples}
    for name, value in result.items():
        print(f"{name:>22}: {value:.4f}" if isinstance(value, float) else f"{name:>22}: {value}")
    if loader.skipped:
        print(f"{'skipped':>22}: {dict(loader.skipped)}")
    print(json.dumps(result))
    return 0
