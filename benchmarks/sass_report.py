"""What the compiled CUDA kernels are made of, read from the built library without a GPU: per kernel its registers,
stack and local memory (spills), shared memory, and the SASS instructions of its loops (tensor-core ops, 16-byte
global loads, ldmatrix, cp.async, shared loads, barriers), from `cuobjdump` (the CUDA toolkit's, or the copy that
comes with triton, a torch dependency).

Static counts are not timings; they are what a change to a kernel can be held to where no GPU is lent: the
instructions per tensor-core op of a main loop, and no spills. tests/test_cuda_sass.py checks the properties the
kernels are built for; `python benchmarks/sass_report.py` writes benchmarks/results/sass_<arch>.json and prints a
table.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# instruction classes counted per loop and kernel: name -> predicate on (opcode with its modifiers, operands)
CLASSES = {
    "mma": lambda op, _: op.startswith(("HMMA", "HGMMA", "IMMA", "IGMMA")),
    "wgmma": lambda op, _: op.startswith(("HGMMA", "IGMMA")),
    # wgmma.wait_group N: N groups may stay in flight (0: the tensor pipe drains)
    "wgmma_wait0": lambda op, args: op.startswith("WARPGROUP.DEPBAR") and args.endswith(" 0x0"),
    "wgmma_wait1": lambda op, args: op.startswith("WARPGROUP.DEPBAR") and args.endswith(" 0x1"),
    "ldg": lambda op, _: op.startswith("LDG") and not op.startswith("LDGSTS"),
    "ldg128": lambda op, _: op.startswith("LDG") and not op.startswith("LDGSTS") and ".128" in op,
    "ldgsts": lambda op, _: op.startswith("LDGSTS"),  # cp.async
    "ldsm": lambda op, _: op.startswith("LDSM"),  # ldmatrix
    "lds": lambda op, _: op.startswith("LDS") and not op.startswith("LDSM"),
    "sts": lambda op, _: op.startswith("STS"),
    "stg": lambda op, _: op.startswith("STG"),
    "shfl": lambda op, _: op.startswith("SHFL"),
    "bar": lambda op, _: op.startswith(("BAR", "SYNCS")),
    "local": lambda op, _: op.startswith(("LDL", "STL")),  # spills (or a local array)
}

_ARCH = re.compile(r"^\s*arch = (\S+)")
_FUNC = re.compile(r"^\s*Function : (\S+)")
_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def find_cuobjdump() -> str | None:
    """cuobjdump from PATH, $CUDA_HOME/bin, next to nvcc, or triton's bundled copy; None if there is none."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", nvcc and str(Path(os.path.realpath(nvcc)).parents[1])]
    for home in filter(None, homes):
        cand = Path(home) / "bin" / "cuobjdump"
        if cand.is_file():
            return str(cand)
    try:
        import triton  # noqa: F401  (torch's dependency carries the CUDA binary utilities)
        cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(cand) if cand.is_file() else None
    except ImportError:
        return None


def demangle(names: list[str]) -> dict[str, str]:
    """mangled -> demangled (c++filt where there is one; else the names as they are)."""
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def short_name(demangled: str) -> str:
    """The kernel's name and template arguments, without namespaces, the anonymous namespace and the signature."""
    name = re.sub(r"\(anonymous namespace\)::|weightshare::cuda::|weightshare::", "", demangled)
    name = re.sub(r"^void ", "", name)
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the parameter list: the first '(' outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            cut = i
            break
    return name[:cut].replace("__nv_bfloat16", "bf16").replace("__half", "half")


def parse_sass(text: str) -> dict[tuple[str, str], list[tuple[int, str, str]]]:
    """(architecture, mangled kernel name) -> its instructions as (address, opcode with modifiers, operands)."""
    kernels: dict[tuple[str, str], list] = {}
    current, arch = None, "?"
    for line in text.splitlines():
        m = _ARCH.match(line)
        if m:
            arch = m.group(1)
            continue
        m = _FUNC.match(line)
        if m:
            current = kernels.setdefault((arch, m.group(1)), [])
            continue
        m = _INSN.match(line)
        if m and current is not None:
            body = m.group(2)
            if body.startswith("@"):  # predicate guard
                body = body.split(None, 1)[1] if " " in body else ""
            op, _, operands = body.partition(" ")
            current.append((int(m.group(1), 16), op, operands.strip()))
    return kernels


def parse_resources(text: str) -> dict[tuple[str, str], dict]:
    """(architecture, mangled kernel name) -> {regs, stack, shared, local} from `cuobjdump -res-usage`."""
    out, current, arch = {}, None, "?"
    for line in text.splitlines():
        m = _ARCH.match(line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"^\s*Function (\S+):", line)
        if m:
            current = (arch, m.group(1))
            continue
        m = _RES.search(line)
        if m and current:
            out[current] = dict(zip(("regs", "stack", "shared", "local"), map(int, m.groups())))
            current = None
    return out


def counts(insns) -> dict[str, int]:
    c = Counter({cls: 0 for cls in CLASSES})
    for _, op, args in insns:
        for cls, pred in CLASSES.items():
            c[cls] += pred(op, args)
    c["total"] = len(insns)
    return dict(c)


def loops(insns) -> list[dict]:
    """Each backward branch's span (target .. branch) with its counts: the loops of the kernel, innermost first
    within each nest (spans sorted by size). The branch's target is read from its operand (an address or a label
    whose address cuobjdump prints in the operand's comment)."""
    addr_index = {a: i for i, (a, _, _) in enumerate(insns)}
    found = []
    for i, (addr, op, operands) in enumerate(insns):
        if not op.startswith("BRA"):
            continue
        m = re.search(r"0x([0-9a-f]+)", operands)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target <= addr and target in addr_index:
            body = insns[addr_index[target]: i + 1]
            found.append({"start": target, "end": addr, **counts(body)})
    return sorted(found, key=lambda d: d["total"])


def main_loop(kernel_loops: list[dict]) -> dict | None:
    """The loop a kernel spends its time in, statically: the smallest loop holding the most tensor-core ops, or in a
    kernel without them the smallest holding the most global loads."""
    if not kernel_loops:
        return None
    key = "mma" if any(lp["mma"] for lp in kernel_loops) else "ldg"
    best = max(lp[key] for lp in kernel_loops)
    return next(lp for lp in kernel_loops if lp[key] == best)


def report(library: str, cuobjdump: str | None = None) -> list[dict]:
    """One record per kernel of the library's SASS (every architecture it holds)."""
    tool = cuobjdump or find_cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit or triton's copy)")
    sass = subprocess.run([tool, "-sass", library], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([tool, "-res-usage", library], capture_output=True, text=True, check=True).stdout
    kernels, resources = parse_sass(sass), parse_resources(res)
    names = demangle(sorted({mangled for _, mangled in kernels}))
    records = []
    for (arch, mangled), insns in sorted(kernels.items(), key=lambda kv: (kv[0][0], names[kv[0][1]])):
        kl = loops(insns)
        records.append({"arch": arch, "kernel": short_name(names[mangled]), **resources.get((arch, mangled), {}),
                        "counts": counts(insns), "main_loop": main_loop(kl), "loops": len(kl)})
    return records


def write_json(records: list[dict], path: Path) -> None:
    """One kernel a line (diffs of a baseline stay readable), written atomically."""
    tmp = path.with_suffix(".tmp")
    def compact(r: dict) -> dict:  # counts of zero left out (readers use .get(name, 0))
        return {k: ({c: n for c, n in v.items() if n} if k in ("counts", "main_loop") and v else v)
                for k, v in r.items()}
    tmp.write_text("[\n" + ",\n".join(json.dumps(compact(r)) for r in records) + "\n]\n")
    os.replace(tmp, path)


def library_path() -> str:
    import weightshare._C as native
    return native.__file__


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--library", default=None, help="the built library (default: weightshare._C)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/sass_sm90a.json)")
    args = ap.parse_args()
    records = report(args.library or library_path())
    if not records:
        print("no CUDA kernels in the library (built with WS_CUDA=0?)", file=sys.stderr)
        return 1
    out = Path(args.out or Path(__file__).parent / "results" / "sass_sm90a.json")
    write_json(records, out)
    print(f"{'kernel':<72} {'regs':>4} {'spill':>5} {'insns':>6}  main loop: insns / mma / ldg128 / ldsm / lds")
    for r in records:
        lp = r["main_loop"] or {}
        print(f"{r['kernel'][:72]:<72} {r.get('regs', '?'):>4} {r.get('local', 0) + r.get('stack', 0):>5} "
              f"{r['counts']['total']:>6}  {lp.get('total', '-')} / {lp.get('mma', '-')} / {lp.get('ldg128', '-')}"
              f" / {lp.get('ldsm', '-')} / {lp.get('lds', '-')}")
    print(f"{len(records)} kernels -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
