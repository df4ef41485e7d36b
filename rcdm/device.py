"""Device choice and mixed precision: CUDA with bf16 autocast when a GPU exists, CPU fp32 otherwise."""
from __future__ import annotations

import contextlib
import os

import torch

from rcdm.errors import UserError


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


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no GradScaler needed); a no-op on CPU, where fp32 is the fast path."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
