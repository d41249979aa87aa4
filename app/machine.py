"""What this machine has, read without torch: the web server checks a launch against it, the worker the
run it is about to train (worker.hardware adds what needs torch)."""

from __future__ import annotations

HEADROOM = 1.2  # a load or a run that needs more than the memory / HEADROOM is refused


def meminfo_bytes(field: str) -> int | None:
    """A /proc/meminfo figure (MemTotal, MemAvailable) in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
