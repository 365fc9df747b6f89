"""The `data` config section: everything the streaming loader needs, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mmscale.data.tars import ALLOW_PIPE_VARIABLE


@dataclass
class DataConfig:
    """Where the shards are and how they are read, augmented, tokenized and masked."""

    REMOVED_KEYS = {  # read by config.load_config; not a field
        "allow_pipe": "a config file may come from anyone, so pipe: shard URLs (shell commands) are allowed only "
                      f"from the command line (--allow-pipe) or the environment ({ALLOW_PIPE_VARIABLE}=1)"}

    train: str = ""
    """Training shard spec: braces, directories, `a::b` sources with optional `@weight` suffixes."""
    val: str = ""
    """Validation shard spec (read once, in order, without augmentation); empty for none."""
    sampling: Literal["epoch", "resampled"] = "epoch"
    """`epoch`: every sample once per epoch, epochs repeat; `resampled`: shards drawn with
    replacement by source weight."""
    workers: int = 4
    """Dataloader worker processes per rank (0 reads in the training process)."""
    shuffle_buffer: int = 1000
    """Samples held per worker for shuffling (0 keeps shard order); shard order is shuffled per epoch too."""
    image_size: int = 0
    """Side of the square images in a batch, in pixels; 0: the side the model's image tower takes."""
    crop_scale: tuple[float, float] = (0.9, 1.0)
    """RandomResizedCrop area range for training, as fractions of the image (open_clip uses 0.9-1.0)."""
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    """RandomResizedCrop aspect-ratio range for training."""
    hflip_probability: float = 0.5
    """Probability of a horizontal flip in training; set 0 when captions mention left and right."""
    context_length: int = 64
    """Text tokens per caption, [CLS] and [SEP] included; longer captions are truncated."""
    pad_to_longest: bool = True
    """Pad each batch's captions to its longest caption (rounded up to a multiple of 8) instead of to
    context_length: short captions then cost the text tower a fraction of the work. false: every batch
    is context_length wide (fixed shapes)."""
    mlm_probability: float = 0.15
    """Fraction of caption tokens chosen for masked-LM (80% [MASK], 10% random, 10% kept); 0 turns MLM off."""
    max_pixels: int = 89_478_485
    """Images with more pixels are skipped as decompression bombs (PIL's own limit)."""
    max_member_bytes: int = 64 * 2**20
    """Tar members larger than this are not read; their samples are skipped as `member_too_large`."""
    seed: int = 0
    """Seed for shard order, shuffling, augmentation and masking (same seed, same batches)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    max_bad_shard_fraction: float = 0.05
    """Unreadable shards (missing, empty, permission denied, not a tar, remote open failing after retries)
    are skipped and counted as `skipped_shard_<reason>`; the run stops once more than this fraction of an
    epoch's shards were unreadable (all ranks' readers together, at log steps; in `resampled` sampling: of
    one reader's last 20 draws)."""

    def __post_init__(self):
        checks = [
            (self.workers >= 0, "data.workers must be >= 0", self.workers),
            (self.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0", self.shuffle_buffer),
            (self.image_size >= 0, "data.image_size must be >= 1 (or 0: the model's)", self.image_size),
            (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
             "data.crop_scale must satisfy 0 < low <= high <= 1", list(self.crop_scale)),
            (0 < self.crop_ratio[0] <= self.crop_ratio[1], "data.crop_ratio must satisfy 0 < low <= high",
             list(self.crop_ratio)),
            (0.0 <= self.hflip_probability <= 1.0, "data.hflip_probability must be in [0, 1]",
             self.hflip_probability),
            (self.context_length >= 3, "data.context_length must be >= 3 ([CLS], a token, [SEP])",
             self.context_length),
            (0.0 <= self.mlm_probability < 1.0, "data.mlm_probability must be in [0, 1)", self.mlm_probability),
            (self.max_pixels >= 1, "data.max_pixels must be >= 1", self.max_pixels),
            (self.max_member_bytes >= 1, "data.max_member_bytes must be >= 1", self.max_member_bytes),
            (self.prefetch_factor >= 1, "data.prefetch_factor must be >= 1", self.prefetch_factor),
            (0.0 <= self.max_bad_shard_fraction <= 1.0, "data.max_bad_shard_fraction must be in [0, 1]",
             self.max_bad_shard_fraction),
        ]
        for holds, rule, value in checks:
            if not holds:
                raise ValueError(f"{rule}, got {value}")
