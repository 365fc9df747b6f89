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


def _gather_grad_rank(rank: int, world: int, port: int, device_type: str, failures) -> None:
    """One rank of `gather-grad`: the gradient of a loss over gathered features, for this rank's rows,
    against the same loss computed by one process over the whole batch."""
    import os

    from mmscale.losses import _GatherWithGrad, clip_loss
    from mmscale.train.engine import process_group_backend

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = device_type == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(4 * world, 16, generator=generator, dtype=torch.float64), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(4 * world, 16, generator=generator, dtype=torch.float64), dim=-1)
    whole_images, whole_texts = images.clone().requires_grad_(), texts.clone().requires_grad_()
    clip_loss(whole_images, whole_texts, torch.tensor(10.0, dtype=torch.float64)).backward()  # before the group
    dist.init_process_group(process_group_backend(cuda), rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    mine = slice(4 * rank, 4 * rank + 4)
    local_images = images[mine].clone().to(device).requires_grad_()
    local_texts = texts[mine].clone().to(device).requires_grad_()
    # Straight through the autograd function, so one rank runs its NCCL (reduce_scatter) branch too.
    all_images, all_texts = _GatherWithGrad.apply(local_images, None), _GatherWithGrad.apply(local_texts, None)
    labels = torch.arange(4, device=device) + 4 * rank
    scale = torch.tensor(10.0, dtype=torch.float64, device=device)
    loss = (torch.nn.functional.cross_entropy(scale * local_images @ all_texts.T, labels)
            + torch.nn.functional.cross_entropy(scale * local_texts @ all_images.T, labels)) / 2
    (loss / world).backward()  # data-parallel averaging, as DeepSpeed does
    for name, local, whole in (("images", local_images, whole_images), ("texts", local_texts, whole_texts)):
        if not torch.allclose(local.grad.cpu(), whole.grad[mine], rtol=1e-9, atol=1e-12):
            failures.append(f"rank {rank} {name}: {local.grad.cpu()} != {whole.grad[mine]}")
    dist.barrier()
    dist.destroy_process_group()


def gather_grad_check(ranks: int, device_type: str) -> list[str]:
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        failures = manager.list()
        mp.spawn(_gather_grad_rank, args=(ranks, free_port(), device_type, failures), nprocs=ranks, join=True)
        return list(failures)


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="process-group checks run by the tests")
    parser.add_argument("check", choices=["gather-grad"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    problems = gather_grad_check(args.ranks, args.device)
    print("\n".join(problems) or "gather-grad ok")
    sys.exit(1 if problems else 0)

