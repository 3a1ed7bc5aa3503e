"""Facts about the machine a test needs, so that it skips with the reason instead of failing (or being
killed) where the machine lacks them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest

__all__ = ["available_memory", "require_memory"]


def _read_int(path: str) -> Optional[int]:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> Optional[int]:
    """Bytes this process can still allocate without swapping: MemAvailable, capped by the cgroup's
    memory limit (v2 memory.max or v1 limit_in_bytes, less what it uses); None where unknown."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            room = max(limit - usage, 0)
            avail = room if avail is None else min(avail, room)
    return avail


def require_memory(nbytes: int, what: str) -> None:
    """Skip the test unless `nbytes` (and a quarter more for the rest of the process) can be allocated."""
    avail = available_memory()
    if avail is not None and avail < nbytes * 5 // 4:
        pytest.skip(f"{what} needs about {nbytes / 2**30:.1f} GiB; this machine has {avail / 2**30:.1f} GiB available")
