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


def cpu_isa() -> str:
    """The widest x86 vector ISA the CPU reports ("AVX-512", "AVX2", or "" when neither or not Linux), and for AMD
    its Zen generation from the family/model (two VMs both named "AMD EPYC" were a Zen 4 with AVX-512 and an
    AVX2-only Zen 3)."""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        return ""
    fields = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    if fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25":
        # family 19h: models 00h-0Fh and 20h-5Fh are Zen 3, 10h-1Fh, 60h-7Fh and A0h-AFh Zen 4
        model = int(fields.get("model", "-1"))
        zen = ("Zen 3" if 0x00 <= model <= 0x0F or 0x20 <= model <= 0x5F else
               "Zen 4" if 0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF else "family 19h")
        isa = f"{zen}, {isa}" if isa else zen
    return isa
