"""What the benchmarks say about the machine they ran on (bench/README.md quotes it)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """`lscpu`'s model name, from /proc/cpuinfo; the platform's guess elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
