"""Fidelity table: quantize a model with several recipes, evaluate each with `quantkit eval`, print a
markdown table. Example: python bench/fidelity.py zoo:shakespeare-moe --n 100 --out out/bench"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "RTN W8A8": ["--recipe", "rtn-w8a8"],
    "RTN W4A16 g128": ["--recipe", "rtn-w4a16-g128"],
    "RTN W4A8": ["--recipe", "rtn-w4a8"],
    "RTN W4A4 int": ["--recipe", "rtn-w4a8", "--abits", "4"],
    "RTN MXFP4 W4A4": ["--recipe", "mxfp4-w4a4"],
    "DuQuant W4A4": ["--recipe", "duquant-w4a4"],
    "EAQuant W4A4": ["--recipe", "eaquant-w4a4"],
    "EAQuant W3A4": ["--recipe", "eaquant-w3a4"],
    "DuQuant++ MXFP4": ["--recipe", "duquantpp-mxfp4"],
    "EAQuant+DuQuant++ MXFP4": ["--recipe", "eaquant-duquantpp-mxfp4"],
}


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stderr)  # keep stdout for the table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--out", type=Path, default=Path("out/bench"))
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--eval-args", default="", help="extra arguments for quantkit eval")
    p.add_argument("--no-fp", action="store_true", help="skip the full-precision row")
    args = p.parse_args()
    name = args.model.replace("zoo:", "").replace("/", "_")
    args.out.mkdir(parents=True, exist_ok=True)
    extra = args.eval_args.split()
    rows = []
    t = time.time()
    js = args.out / f"{name}-fp.json"
    if not args.no_fp:
        run(["quantkit", "eval", args.model, "--n", str(args.n), "--seed", str(args.seed), "--json", str(js), *extra])
        rows.append(("FP", json.loads(js.read_text()), time.time() - t))
    for label in args.settings.split(","):
        ck = args.out / f"{name}-{label.replace(' ', '_')}"
        t = time.time()
        run(["quantkit", "quantize", args.model, "--out", str(ck), "--overwrite", "--seed", str(args.seed),
             *SETTINGS[label]])
        qt = time.time() - t
        js = ck.with_suffix(".json")
        run(["quantkit", "eval", str(ck), "--n", str(args.n), "--seed", str(args.seed), "--json", str(js), *extra])
        rows.append((label, json.loads(js.read_text()), qt))
    metrics = sorted({k for _, r, _ in rows for k in r["metrics"]})
    print(f"| setting | bits/weight | {' | '.join(metrics)} | seconds |")
    print("|---|---|" + "---|" * len(metrics) + "---|")
    for label, r, secs in rows:
        vals = " | ".join(f"{r['metrics'][m]:.4f}" if m in r["metrics"] else "-" for m in metrics)
        print(f"| {label} | {r['bits_per_weight']:.3f} | {vals} | {secs:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
