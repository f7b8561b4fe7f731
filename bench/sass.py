"""CPU-only proxy of kernel efficiency: compile every kernel x format x tile for sm_90a (H100/H200) and
report registers, spills, global-load widths and SASS instructions per weight in the main loop.

    python bench/sass.py                      # every set: packed (current), byte (pre-repack), aq, moe
    python bench/sass.py --set packed --json sass.json

Needs triton's bundled ptxas/cuobjdump, no GPU; run without TRITON_INTERPRET. Not a timing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default (and silences its warning)


def main(argv: list[str] | None = None) -> int:
    from quantkit.kernels.sass import analyze, toolchain_problem
    from quantkit.kernels.sass_cases import CASE_SETS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", default="packed,byte,aq,moe", help=f"comma-separated subset of {', '.join(CASE_SETS)}")
    p.add_argument("--match", default="", help="only cases whose name contains this")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    problem = toolchain_problem()
    if problem:
        print(f"bench/sass.py: {problem}", file=sys.stderr)
        return 2
    sets = [s for s in args.set.split(",") if s]
    unknown = sorted(set(sets) - set(CASE_SETS))
    if unknown:
        print(f"unknown case sets {', '.join(unknown)}; allowed: {', '.join(CASE_SETS)}", file=sys.stderr)
        return 2
    rows = []
    print(f"{'case':<58} {'regs':>4} {'spill':>5} {'loop':>5} {'w/thr':>5} {'ins/w':>6}  global loads in the loop")
    for name in sets:
        for case in CASE_SETS[name]():
            if args.match not in case.name:
                continue
            r = analyze(case.name, case.compile(), case.weights_per_thread)
            rows.append(r.as_dict())
            loads = " ".join(f"{o}x{n}" for o, n in r.weight_loads.items())
            print(f"{r.name:<58} {r.registers or '?':>4} {r.spill_bytes if r.spill_bytes is not None else '?':>5} "
                  f"{r.loop_instructions:>5} {r.weights_per_thread:>5} {r.per_weight:>6.2f}  {loads}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
