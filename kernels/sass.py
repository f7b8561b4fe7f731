"""Ahead-of-time compilation of the kernels for a GPU that is not here (sm_90a: H100/H200) and a
reading of their machine code: registers, spills, shared memory, load widths, and SASS instructions
per weight in the main loop. A CPU-only proxy for kernel efficiency, not a timing.

Uses the ptxas and cuobjdump shipped inside the triton wheel: no GPU, no CUDA toolkit. Must run with
TRITON_INTERPRET unset (the interpreter has no compiler). `python bench/sass.py` prints the table.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ARCH = 90
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_MEMORY_OPS = ("LDG", "LDGSTS", "UTMALDG", "LDS", "LDSM", "STS", "STG", "RED", "ATOM", "HMMA", "IMMA", "HGMMA",
               "IGMMA")


def tool(name: str) -> str | None:
    """Path of a CUDA binary shipped with triton, or None."""
    path = os.path.join(_BIN, name)
    return path if os.path.exists(path) else None


def toolchain_problem() -> str | None:
    """None if kernels can be compiled and disassembled here, else why not."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1: ahead-of-time compilation needs triton's real compiler"
    missing = [n for n in ("ptxas", "cuobjdump") if tool(n) is None]
    return f"triton's wheel has no {', '.join(missing)} in {_BIN}" if missing else None


def compile_kernel(jitfn, args: dict, num_warps: int, num_stages: int):
    """Compile `jitfn` for sm_90a. args: pointer -> '*fp16' etc., int -> runtime int, ('const', v) -> constexpr.

    Runtime ints that are multiples of 16 are marked divisible by 16 (as the JIT does for real calls).
    """
    fn = jitfn
    while not hasattr(fn, "arg_names"):
        fn = fn.fn
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = args[name]
        if isinstance(v, tuple) and v[0] == "const":
            sig[name], consts[(i,)] = "constexpr", v[1]
        elif isinstance(v, str):
            sig[name], attrs[(i,)] = v, [["tt.divisibility", 16]]
        elif isinstance(v, int):
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"argument {name}: {v!r}")
    src = ASTSource(fn, sig, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", ARCH, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def disassemble(kernel) -> list[tuple[int, str]]:
    """(address, instruction) of the kernel's SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = _run([tool("cuobjdump"), "-sass", f.name]).stdout
    finally:
        os.unlink(f.name)
    return [(int(m.group(1), 16), m.group(2).strip())
            for m in (re.search(r"/\*([0-9a-f]{4,5})\*/\s+(.*?);", line) for line in out.splitlines()) if m]


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def main_loop(ins: list[tuple[int, str]]) -> list[str]:
    """Instructions of the longest loop (the widest backward branch)."""
    best = None
    for addr, text in ins:
        m = re.search(r"BRA (?:`\()?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr and (best is None or addr - int(m.group(1), 16) > best[1] - best[0]):
            best = (int(m.group(1), 16), addr)
    return [] if best is None else [t for a, t in ins if best[0] <= a <= best[1]]


@dataclass
class SassReport:
    """What one compiled configuration does per main-loop iteration."""

    name: str
    registers: int | None
    spill_bytes: int | None
    shared_bytes: int
    loop_instructions: int
    weights_per_thread: int  # weights one thread handles per main-loop iteration
    loop_ops: dict[str, int] = field(default_factory=dict)

    @property
    def per_weight(self) -> float:
        return self.loop_instructions / self.weights_per_thread if self.weights_per_thread else float("nan")

    @property
    def weight_loads(self) -> dict[str, int]:
        """Global loads in the main loop by width (LDG.E.U8 = a byte, LDG.E.128 = 16 bytes; LDGSTS: cp.async)."""
        return {o: n for o, n in sorted(self.loop_ops.items()) if o.startswith(("LDG", "UTMALDG"))}

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(per_weight=round(self.per_weight, 2), weight_loads=self.weight_loads)
        return d


def analyze(name: str, kernel, weights_per_thread: int) -> SassReport:
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w", delete=False) as f:
        f.write(kernel.asm["ptx"])
    try:
        ptxas = tool("ptxas-blackwell") or tool("ptxas")  # the newer one reads every PTX version triton emits
        log = _run([ptxas, f"-arch=sm_{ARCH}a", "-v", f.name, "-o", os.devnull]).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    body = main_loop(disassemble(kernel))
    ops: dict[str, int] = {}
    for text in body:
        ops[opcode(text)] = ops.get(opcode(text), 0) + 1
    return SassReport(name, int(regs.group(1)) if regs else None,
                      int(spill.group(1)) + int(spill.group(2)) if spill else None,
                      kernel.metadata.shared, len(body), weights_per_thread, ops)
