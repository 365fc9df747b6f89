"""Helpers for tests that spawn real process groups."""

from __future__ import annotations

import torch
import torch.distributed as dist

from mmscale.train.engine import free_port

__all__ = ["free_port", "save_from_every_rank"]


def save_from_every_rank(value, path: str) -> None:
    """Gather every rank's `value` (any picklable object) and save the list, in rank order, from rank 0."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    if dist.get_rank() == 0:
        torch.save(gathered, path)
