"""Device choice and mixed precision: bf16 autocast on CUDA, and for training on CPUs that compute bf16 natively
(AVX512-BF16 or AMX); fp32 elsewhere. On a CPU without them bf16 is emulated: a training step of the demo's tiny
UNet took 20x longer than fp32 on a 2-core AMD EPYC (Zen 3), while on one with AVX512-BF16 (Zen 4) bf16 autocast
ran 1.65x faster than fp32 (benchmarks/results/precision.json)."""
from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

from rcdm.errors import UserError

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp32", "bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs that compute bf16 natively


@functools.lru_cache(maxsize=1)
def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (Linux: its /proc/cpuinfo flags); False where it cannot be told."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split(":", 1)[1].split() for flag in NATIVE_BF16_FLAGS)
    except OSError:
        pass
    return False


def training_precision(requested: str, device: torch.device) -> str:
    """The precision training runs in: ``auto`` is bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere;
    ``bf16`` asked on a CPU without native bf16 falls back to fp32 with one log line (emulated, it is many times
    slower)."""
    if requested not in PRECISIONS:
        raise UserError(f"train.precision={requested} is not one of {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return "fp32"
    if device.type == "cuda" or cpu_native_bf16():
        return "bf16"
    if requested == "bf16":
        _say_no_bf16()
    return "fp32"


@functools.lru_cache(maxsize=1)
def _say_no_bf16() -> None:  # once per process
    log.warning("train.precision=bf16: this CPU has no native bf16 (%s); training in fp32, its fast path",
                " or ".join(NATIVE_BF16_FLAGS))


def pick_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda:0 if available else cpu; anything else is taken as a torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} asked for CUDA but no GPU is visible; use device=auto or device=cpu")
    return device


def describe(device: torch.device, ranks: int = 1) -> str:
    """The hardware a job ran on, for records: "cuda: NVIDIA H100 80GB HBM3 x 8 ranks", "cpu: AMD EPYC, 2 torch
    threads of 2 cores x 1 rank" (machines of the same core count differ twofold in speed: the model says which)."""
    from rcdm.provenance import cpu_model

    per_rank = "s" if ranks != 1 else ""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)} x {ranks} rank{per_rank}"
    threads = torch.get_num_threads()
    return (f"{device.type}: {cpu_model()}, {threads} torch thread{'s' if threads != 1 else ''} of {os.cpu_count()} "
            f"cores x {ranks} rank{per_rank}")


def autocast(device: torch.device, precision: str | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no GradScaler needed). On CPU: bf16 only where ``precision`` (training's, from
    ``training_precision``) says so; sampling, encoders and analyses stay fp32 there, as the released numerics."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
