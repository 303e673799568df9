"""Where a result was measured: the CPU's model name (for checkpoints and benchmark records)."""
import platform
from pathlib import Path


def cpu_name() -> str:
    """/proc/cpuinfo's "model name" on Linux, else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
