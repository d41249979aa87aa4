"""Facts about this machine's hardware, for training and for the generation engine alike: which dtype is
fast here, how much memory is free (on the GPU when there is one), how big a model's weights load, and
whether they fit. Torch is imported inside the functions: the worker imports this module without it."""

from __future__ import annotations

import os
import subprocess
from functools import cache
from pathlib import Path

from app.machine import HEADROOM, meminfo_bytes


def choose_dtype(requested: str):
    """bf16 where the hardware does it fast (CPUs with AVX-512 BF16 or AMX, recent GPUs), fp16 on older
    GPUs, fp32 otherwise."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32


def available_memory_bytes() -> int | None:
    """The machine's available memory (MemAvailable), or None where it cannot be read."""
    return meminfo_bytes("MemAvailable")


def free_memory(device: str) -> tuple[int | None, str]:
    """(free bytes, what to call them in a sentence) on `device` ("cuda" or "cpu")."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0], "GPU memory"
    return available_memory_bytes(), "memory"


def loaded_bytes(model_path: Path, dtype) -> int:
    """About how much the model's weights take once loaded in `dtype` (checkpoints are usually fp32 or
    bf16 on disk; the estimate scales their size to the loading dtype)."""
    import torch

    weights = sum(p.stat().st_size for p in model_path.glob("*.safetensors")) or sum(
        p.stat().st_size for p in model_path.glob("*.bin")
    )
    return int(weights * torch.finfo(dtype).bits / 32)


def shortfall(needed: int, device: str) -> str | None:
    """None if `needed` bytes fit in what is free on `device`, else a sentence saying how much is short."""
    free, where = free_memory(device)
    if free is None or needed * HEADROOM <= free:
        return None
    return f"it needs about {needed / 2**30:.1f} GiB and {free / 2**30:.1f} GiB of {where} is free"


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def peak_memory_mb() -> float:
    """The peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@cache  # a process's GPUs do not change: asked once, not at every poll of the worker loop
def visible_gpus() -> list[dict]:
    """The NVIDIA GPUs this process may use ({"name", "memory_mb"} each), read with `nvidia-smi` so that
    the worker need not load torch (CUDA_VISIBLE_DEVICES narrows them). Empty without a GPU or driver."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = {}
    for line in out.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) < 3:
            continue
        index, name, memory = parts[0], ", ".join(parts[1:-1]), parts[-1]
        if index.isdigit() and memory.isdigit():
            gpus[index] = {"name": name, "memory_mb": int(memory)}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(gpus.values())
    return [gpus[i] for i in (v.strip() for v in visible.split(",")) if i in gpus]


def machine_summary() -> dict:
    """What a worker announces of its machine: CPU cores, memory (total and free now) and GPUs."""
    mib = 2**20
    return {
        "cpus": usable_cores(),
        "memory_mb": (meminfo_bytes("MemTotal") or 0) // mib,
        "free_memory_mb": (available_memory_bytes() or 0) // mib,
        "gpus": list(visible_gpus()),
    }
