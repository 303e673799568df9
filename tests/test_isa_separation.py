"""The native library's plain AVX2 code must not hold instructions an AVX2-only CPU lacks.

The CPU kernels pick their instruction set at run time (cpu_features.h): AVX-512, AVX2 with AVX-VNNI, plain AVX2,
scalar. A stray AVX-VNNI or AVX-512 instruction in a plain AVX2 function would fault (SIGILL) on an AVX2-only CPU,
and no test run on this project's machines (which have AVX-512 and AVX-VNNI) would ever execute it there. So the
check is on the machine code: the AVX2 int8 kernels are compiled twice from one source (int8_rows_avx2.inc,
int8_tile_avx2.inc), and only the avx2_vnni:: copies may hold VEX-encoded vpdpbusd ("{vex}" in objdump's syntax);
the avx2_plain:: copies hold no AVX-VNNI and no AVX-512 (zmm or mask registers) instruction at all.
"""
import functools
import platform
import re
import shutil
import subprocess

import pytest

import weightshare as ws

from conftest import requires_native

pytestmark = [
    requires_native,
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 kernels only"),
    pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)"),
]


@functools.lru_cache(maxsize=1)
def _functions() -> dict[str, list[str]]:
    """Mangled function name -> its instructions, from the disassembly of weightshare._C (once per session)."""
    from weightshare import _C

    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True,
                         check=True).stdout
    funcs: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if head:
            current = funcs.setdefault(head.group(1), [])
        elif current is not None and "\t" in line:
            current.append(line.split("\t", 1)[1])
    return funcs


def test_avx_vnni_only_in_the_vnni_copies():
    funcs = _functions()
    vnni_users = {name for name, body in funcs.items() if any(i.startswith("{vex} vpdpbus") for i in body)}
    # the AVX-VNNI copies are built (the row kernel and the blocked kernel's tile)
    assert any("avx2_vnni" in n and "int8_rows_avx2" in n for n in vnni_users)
    assert any("avx2_vnni" in n and "tile" in n for n in vnni_users)
    assert all("avx2_vnni" in n for n in vnni_users), sorted(n for n in vnni_users if "avx2_vnni" not in n)[:5]


def test_plain_avx2_copies_hold_no_avx512_or_vnni():
    funcs = _functions()
    plain = {name: body for name, body in funcs.items() if "avx2_plain" in name}
    assert any("int8_rows_avx2" in n for n in plain) and any("tile" in n for n in plain)
    evex = re.compile(r"%zmm|%k[1-7]\b|\{evex\}|vpdpbus")
    bad = {n: next(i for i in body if evex.search(i)) for n, body in plain.items() if any(evex.search(i) for i in body)}
    assert not bad, list(bad.items())[:3]
