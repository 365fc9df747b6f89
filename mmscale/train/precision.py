"""`train.precision=auto`: the fastest precision that trains correctly on this machine, and why.

bf16 autocast on a CPU without native bf16 instructions (AMX or AVX512-BF16) is emulated in
software: on a 2-core AVX2 EPYC a tiny step took 7.2 s in bf16 against about 2 s in fp32
(issue 11). So CPUs get fp32 unless they have native bf16; GPUs get bf16 where they have it natively
(compute capability 8.0 and newer) and fp16 with dynamic loss scaling otherwise. On GPUs fp32 matmuls
run in TF32 (`allow_tf32`), as PyTorch's own default is full fp32 there.
"""

from __future__ import annotations

from pathlib import Path

import torch

NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The instruction-set flags of this CPU (Linux /proc/cpuinfo; empty where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return set()


def resolve_precision(requested: str, *, cuda: bool | None = None, cpuinfo: str | None = None) -> tuple[str, str]:
    """(precision, reason): `requested` itself unless it is `auto`."""
    if requested != "auto":
        return requested, "set by train.precision"
    if torch.cuda.is_available() if cuda is None else cuda:
        # Not torch.cuda.is_bf16_supported(): it counts emulation, so a V100 or T4 would train in slow emulated bf16.
        major, minor = torch.cuda.get_device_capability()
        name = f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"
        if major >= 8:
            return "bf16", f"auto: {name} has native bf16"
        return "fp16", f"auto: {name} has no native bf16 (Ampere and newer); fp16 with dynamic loss scaling"
    native = sorted(NATIVE_BF16_FLAGS & cpu_flags(cpuinfo))
    if native:
        return "bf16", f"auto: this CPU has native bf16 ({', '.join(native)})"
    return "fp32", "auto: this CPU has no native bf16 (no AMX or AVX512-BF16), where bf16 is emulated and slower"


def allow_tf32(*, cuda: bool | None = None) -> bool:
    """On GPUs, let fp32 matmuls and convolutions use TF32 tensor cores (Ampere and newer; 10-bit mantissa
    products, fp32 accumulation), what an fp32 run (LoRA fine-tuning's default once) would otherwise leave
    idle. True where it was set."""
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True
