"""Run metrics: `metrics.jsonl` (one JSON object per record) and TensorBoard, from rank 0."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch


def memory_gib() -> dict[str, float]:
    """Peak device memory on a GPU, peak resident memory of this process on CPU, in GiB."""
    if torch.cuda.is_available():
        return {"gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"cpu_rss_gib": _peak_rss_bytes() / 2**30}


def _peak_rss_bytes() -> int:
    """This process image's peak RSS. On Linux VmHWM, not ru_maxrss: exec keeps the ru_maxrss of the
    process that started us (a launcher, a test runner), so it can report another program's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak if sys.platform == "darwin" else peak * 1024


class MetricsWriter:
    """Appends records to `metrics.jsonl` (flushed each time, so a crash loses nothing written) and
    mirrors numbers to TensorBoard. Ranks other than 0 write nothing."""

    def __init__(self, output_dir: Path, *, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.board = None
        if not enabled:
            return
        self.file = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115  # open for the run
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        """One record; `step` is the x axis, other numbers become TensorBoard scalars under `kind/`."""
        if not self.enabled:
            return
        # NaN/inf become null: strict JSON readers (jq, browsers) refuse the bare NaN Python would write.
        clean = {name: None if isinstance(value, float) and not math.isfinite(value) else value
                 for name, value in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.board is not None:
            prefix = record.get("kind", "train")
            for name, value in clean.items():
                if isinstance(value, (int, float)) and name != "step":
                    self.board.add_scalar(f"{prefix}/{name}", value, record["step"])
            self.board.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.board is not None:
                self.board.close()
