"""Evaluation that scales (issue 13, part 4): the scoring half of an eval pass (retrieval recall@1/5/10 both
ways and zero-shot top-1/5) over N pairs spread across R ranks, before and after.

- before: every rank receives every embedding (`all_gather_object`) and scores all of retrieval on its CPU
  (mmscale.eval.metrics, the single-process reference);
- after: each rank scores only its own queries, candidates passed round the ring of ranks in chunks, counts
  reduced (mmscale.eval.shared).

    python tools/bench/eval_scaling.py                       # 20,000 pairs, 1 and 2 ranks (gloo, CPU)

The embeddings are generated (COCO-like: 5 captions per image, noisy), so only the scoring is timed, not
the towers. Each rank uses cores / ranks threads. Both methods must give the same metrics; the last line is
one JSON object {"pairs": .., "runs": [{"ranks": .., "method": .., "seconds": .., "peak_mib": ..}, ..]}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def embeddings(pairs: int, dim: int, classes: int):
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    pictures = torch.arange(pairs) // 5
    centres = torch.randn(int(pictures.max()) + 1, dim, generator=generator)
    images = centres[pictures]
    texts = centres[pictures] + 3.0 * torch.randn(pairs, dim, generator=generator)
    return {"images": images, "texts": texts, "image_groups": pictures, "caption_groups": torch.arange(pairs),
            "labels": pictures % classes, "classes": F.normalize(torch.stack([centres[c::classes].mean(0) for c in range(classes)]), dim=-1)}


def _before(local, classes, ranks: int) -> dict:
    """Every embedding to every rank, everything scored there."""
    import torch
    import torch.distributed as dist

    from mmscale.eval.embed import Embedded
    from mmscale.eval.metrics import retrieval_metrics, zeroshot_accuracy

    everyone = [None] * ranks
    dist.all_gather_object(everyone, local)
    whole = Embedded(*(torch.cat([getattr(part, name) for part in everyone])
                       for name in ("images", "texts", "labels", "caption_groups", "image_groups")))
    metrics = retrieval_metrics(whole.images, whole.texts, caption_groups=whole.caption_groups,
                                image_groups=whole.image_groups)
    return metrics | zeroshot_accuracy(whole.images, whole.labels, classes)


def _after(local, classes) -> dict:
    """Each rank its own queries."""
    from mmscale.eval.shared import shared_retrieval_metrics, shared_zeroshot_accuracy

    metrics = shared_retrieval_metrics(local.images, local.texts, caption_groups=local.caption_groups,
                                       image_groups=local.image_groups)
    return metrics | shared_zeroshot_accuracy(local.images, local.labels, classes)


def _rank(rank: int, ranks: int, port: int, method: str, pairs: int, dim: int, output: str) -> None:
    import torch
    import torch.distributed as dist

    from mmscale.eval.embed import Embedded
    from tools.bench.final_save import PeakRss

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    data = embeddings(pairs, dim, classes=100)
    share = slice(rank * pairs // ranks, (rank + 1) * pairs // ranks)
    local = Embedded(data["images"][share], data["texts"][share], data["labels"][share],
                     data["caption_groups"][share], data["image_groups"][share])
    with PeakRss() as memory:
        dist.barrier()
        started = time.perf_counter()
        metrics = _before(local, data["classes"], ranks) if method == "before" else _after(local, data["classes"])
        seconds = time.perf_counter() - started
    gathered = [None] * ranks
    dist.all_gather_object(gathered, (seconds, memory.added, metrics))
    if rank == 0:
        Path(output).write_text(json.dumps({"seconds": max(g[0] for g in gathered),
                                            "peak_mib": max(g[1] for g in gathered), "metrics": gathered[0][2]}))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    import torch.multiprocessing as mp

    from mmscale.train.engine import free_port

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=256, help="embedding width")
    parser.add_argument("--ranks", default="1,2", help="comma-separated world sizes")
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for ranks in (int(r) for r in args.ranks.split(",")):
            for method in ("before", "after"):
                output = os.path.join(scratch, f"{ranks}-{method}.json")
                mp.spawn(_rank, args=(ranks, free_port(), method, args.pairs, args.dim, output), nprocs=ranks,
                         join=True)
                runs.append({"ranks": ranks, "method": method} | json.loads(Path(output).read_text()))
    reference = runs[0]["metrics"]
    for run in runs:
        differing = {name for name, value in run["metrics"].items() if abs(value - reference[name]) > 1e-6}
        if differing:
            raise SystemExit(f"{run['ranks']} rank(s), {run['method']}: metrics {sorted(differing)} differ")
    print(f"{args.pairs:,} pairs, width {args.dim}: retrieval R@1/5/10 both ways + zero-shot; identical metrics "
          f"(i2t_r1 {reference['i2t_r1']:.4f}, t2i_r1 {reference['t2i_r1']:.4f}, top1 {reference['top1']:.4f})")
    print(f"{'ranks':>5s}  {'method':<7s} {'seconds':>8s} {'peak MiB added (max rank)':>26s}")
    for run in runs:
        print(f"{run['ranks']:5d}  {run['method']:<7s} {run['seconds']:8.2f} {run['peak_mib']:26.0f}")
    print(json.dumps({"pairs": args.pairs, "runs": [{k: v for k, v in run.items() if k != "metrics"} for run in runs]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
