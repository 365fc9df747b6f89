"""Caption tokenization and masked-LM masking, both done per batch.

Tokenization goes through the `tokenizers` backend of a local Hugging Face tokenizer
folder (no hub access), batched, padded and truncated to the context length. Masking
follows BERT (Devlin et al. 2019, section 3.1): 15% of real tokens are chosen, of which
80% become [MASK], 10% a random token and 10% stay; special and padding tokens are never
chosen. Randomness comes from a generator seeded per batch so a resumed loader repeats it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100


def special_token_ids(tokenizer) -> dict[str, int]:
    """The tokenizer's padding, [CLS] and [SEP] ids (0 for any it lacks), for model configs that name them."""
    return {name: getattr(tokenizer, f"{name}_token_id", None) or 0 for name in ("pad", "cls", "sep")}


def load_tokenizer(path: str | os.PathLike):
    """A transformers tokenizer from a local folder; a clear error when the folder is wrong."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"tokenizer {path}: no such folder (give a local Hugging Face tokenizer folder, "
            "for example one made by tools/train_tokenizer.py)"
        )
    try:
        # No folder's own tokenizer code (`auto_map` in tokenizer_config.json) is ever run.
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"tokenizer {path}: not a readable Hugging Face tokenizer folder ({error})") from None


@dataclass(frozen=True)
class MaskingSpec:
    """What masking needs to know about a vocabulary."""

    mask_token_id: int
    pad_token_id: int
    vocab_size: int
    special_ids: tuple[int, ...]


class CaptionEncoder:
    """Tokenizes a list of captions into fixed-length id tensors (and masks them for MLM).

    Picklable, so dataloader workers get their own copy.
    """

    def __init__(self, tokenizer, *, context_length: int, mlm_probability: float, pad_to_longest: bool = True):
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no padding token; add one (e.g. [PAD]) before training")
        if mlm_probability > 0 and tokenizer.mask_token_id is None:
            raise ValueError("data.mlm_probability > 0 needs a tokenizer with a mask token ([MASK])")
        self.context_length = context_length
        self.mlm_probability = mlm_probability
        self.backend = tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.enable_truncation(max_length=context_length)
        # Padding to the batch's longest caption (rounded up to a multiple of 8, so shapes stay few):
        # captions are mostly far shorter than the context, and padding costs the text tower as much
        # as tokens do. Masked attention makes the embeddings the same either way.
        self.backend.enable_padding(length=None if pad_to_longest else context_length, pad_id=tokenizer.pad_token_id,
                                    pad_token=tokenizer.pad_token, pad_to_multiple_of=8 if pad_to_longest else None)
        self.masking = MaskingSpec(
            mask_token_id=tokenizer.mask_token_id if tokenizer.mask_token_id is not None else -1,
            pad_token_id=tokenizer.pad_token_id,
            vocab_size=len(tokenizer),
            special_ids=tuple(sorted(set(tokenizer.all_special_ids))),
        )

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask`, int64 [batch, length]: length is context_length, or with
        `pad_to_longest` the longest caption's rounded up to a multiple of 8 (at most context_length)."""
        encodings = self.backend.encode_batch(captions)
        return {
            "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
        }

    def encode_and_mask(self, captions: list[str], *, seed: int) -> dict[str, torch.Tensor]:
        """`encode` plus, when MLM is on, `mlm_input_ids` and `mlm_labels` drawn with `seed`."""
        batch = self.encode(captions)
        if self.mlm_probability > 0:
            generator = torch.Generator().manual_seed(seed)
            masked, labels = mask_tokens(batch["input_ids"], spec=self.masking,
                                         probability=self.mlm_probability, generator=generator)
            batch["mlm_input_ids"], batch["mlm_labels"] = masked, labels
            batch["mlm_positions"], batch["mlm_targets"] = masked_positions(labels)
        return batch


def masked_positions(mlm_labels: torch.Tensor, *, multiple: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked positions of [B, L] `mlm_labels` as flat indices into B x L, and their target ids,
    padded (position 0, target IGNORE_INDEX) to a multiple of `multiple`, at least one multiple.

    Computed where the masks are made, on the CPU, so the model picks the masked rows with
    `index_select` instead of a boolean mask, which would make the device wait for the host to
    learn how many rows there are. Padding to a multiple keeps the shapes few (one compiled graph
    covers many batches) and never empty (every rank runs the MLM head)."""
    flat = mlm_labels.reshape(-1)
    positions = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    length = max(1, -(-len(positions) // multiple)) * multiple
    padding = length - len(positions)
    return (torch.cat([positions, positions.new_zeros(padding)]),
            torch.cat([flat[positions], flat.new_full((padding,), IGNORE_INDEX)]))


def mask_tokens(
    input_ids: torch.Tensor, *, spec: MaskingSpec, probability: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: returns (masked ids, labels with IGNORE_INDEX where nothing is predicted)."""
    special = torch.isin(input_ids, torch.tensor(spec.special_ids + (spec.pad_token_id,)))
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    action = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[chosen & (action < 0.8)] = spec.mask_token_id
    use_random = chosen & (action >= 0.8) & (action < 0.9)
    random_ids = _random_regular_tokens(int(use_random.sum()), spec=spec, generator=generator)
    masked[use_random] = random_ids
    return masked, labels


def _random_regular_tokens(count: int, *, spec: MaskingSpec, generator: torch.Generator) -> torch.Tensor:
    """`count` token ids drawn uniformly from the vocabulary minus special tokens."""
    if count == 0:
        return torch.empty(0, dtype=torch.long)
    excluded = torch.tensor(sorted(set(spec.special_ids) | {spec.pad_token_id}))
    excluded = excluded[excluded < spec.vocab_size]
    draws = torch.randint(0, spec.vocab_size - len(excluded), (count,), generator=generator)
    # Shift each draw past the excluded ids below it: a uniform draw over the allowed ids.
    for token in excluded.tolist():
        draws = draws + (draws >= token).long()
    return draws
