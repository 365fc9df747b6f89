"""Train a BERT-style WordPiece tokenizer on shard captions (`tools/train_tokenizer.py`).

The result is a Hugging Face tokenizer folder: `transformers.AutoTokenizer.from_pretrained`
loads it offline, and it adds [CLS] ... [SEP] around each caption like BERT.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from mmscale.data.tars import (
    SampleRejected,
    ShardError,
    ShardTruncated,
    check_raw_sample,
    iter_raw_samples,
    sample_caption,
    spec_urls,
)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_wordpiece(captions: Iterable[str], *, vocab_size: int, output_dir: str | os.PathLike | None = None,
                    lowercase: bool = True, show_progress: bool = False) -> PreTrainedTokenizerFast:
    """Train WordPiece on captions; saves to `output_dir` (if given) with `save_pretrained`.

    Special tokens get ids 0-4 in the order of SPECIAL_TOKENS ([PAD] is 0).
    """
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        show_progress=show_progress)
    tokenizer.train_from_iterator(captions, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    if output_dir is not None:
        fast.save_pretrained(str(output_dir))
    return fast


def iter_captions(spec: str, *, max_samples: int | None = None) -> Iterator[str]:
    """Captions of a shard spec in order; samples without a readable caption are passed over.

    A truncated shard contributes its complete samples (with a warning); a missing or
    unreadable shard raises ShardError.
    """
    yielded = 0
    for url in spec_urls(spec):
        try:
            for sample in iter_raw_samples(url, extensions=("txt", "json")):
                if max_samples is not None and yielded >= max_samples:
                    return
                try:
                    check_raw_sample(sample)
                    caption = sample_caption(sample)
                except SampleRejected:
                    continue
                if caption:
                    yielded += 1
                    yield caption
        except ShardTruncated as error:
            print(f"train_tokenizer: warning: {error}; using its complete samples", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Train and save a tokenizer; exit 2 for a bad spec or shards without captions."""
    parser = argparse.ArgumentParser(prog="train_tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="shard spec with the captions (folder, file or braces)")
    parser.add_argument("--vocab-size", type=int, required=True, help="WordPiece vocabulary size, e.g. 30522")
    parser.add_argument("--output", required=True, help="folder for the Hugging Face tokenizer files")
    parser.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=True,
                        help="lower-case and strip accents (BERT uncased)")
    parser.add_argument("--max-samples", type=int, help="train on at most this many captions")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.vocab_size < len(SPECIAL_TOKENS) + 1:
        parser.error(f"--vocab-size {args.vocab_size}: too small; use at least a few hundred")
    counted = {"captions": 0}

    def captions() -> Iterator[str]:
        for caption in tqdm(iter_captions(args.data, max_samples=args.max_samples), desc="reading captions",
                            unit="caption", disable=args.no_progress):
            counted["captions"] += 1
            yield caption

    try:
        tokenizer = train_wordpiece(captions(), vocab_size=args.vocab_size, output_dir=None,
                                    lowercase=args.lowercase, show_progress=not args.no_progress)
    except (ShardError, ValueError) as error:
        print(f"train_tokenizer: error: {error}", file=sys.stderr)
        return 2
    if counted["captions"] == 0:
        print(f"train_tokenizer: error: no captions found in {args.data}; check --data", file=sys.stderr)
        return 2
    tokenizer.save_pretrained(args.output)
    print(f"trained a WordPiece vocabulary of {len(tokenizer):,} tokens on {counted['captions']:,} captions; "
          f"saved to {args.output}")
    return 0
