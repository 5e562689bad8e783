"""What the benchmarks say about the machine they ran on (bench/README.md quotes it)."""

from __future__ import annotations

import compileall
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


def compile_bytecode(*packages: Path) -> None:
    """Write the bytecode of packages installed editable (`pip install -e`), as the
    first run of any command does on a user's machine and as pip does for every other
    package at install time. Without it a process that cannot write `__pycache__`
    (PYTHONDONTWRITEBYTECODE=1, set on this development machine) compiles every
    raiox module from source at each start, ~25-80 ms that no user pays, while the
    tools compared with it (rclip, pip-installed) start from bytecode."""
    for package in packages:
        compileall.compile_dir(str(package), quiet=1)
