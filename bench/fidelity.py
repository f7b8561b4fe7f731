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
    "DuQuant W4A4": ["--recipe", "duquant-w4a4-fast"],
    "EAQuant W4A4": ["--recipe", "eaquant-w4a4-fast"],
    "EAQuant W3A4": ["--recipe", "eaquant-w3a4-fast"],
    "DuQuant++ MXFP4": ["--recipe", "duquantpp-mxfp4-fast"],
    "EAQuant+DuQuant++ MXFP4": ["--recipe", "eaquant-duquantpp-mxfp4-fast"],
}
# Issue 5 rows: static per-tensor int8 activations everywhere so only calibration and rounding differ.
RECIPES = Path(__file__).parent / "recipes"
for b in (8, 4):
    SETTINGS |= {
        f"RTN W{b}A8 static": ["--recipe", str(RECIPES / f"rtn-static-w{b}a8.yaml")],
        f"Q-Diffusion W{b}A8": ["--recipe", str(RECIPES / f"qdiff-w{b}a8.yaml")],
        f"EDA-DM W{b}A8": ["--recipe", f"eda-dm-w{b}a8-fast"],
        f"EDA-DM+FlexRound W{b}A8": ["--recipe", f"eda-dm-w{b}a8-fast", "--rounding", "flexround"],
    }
SETTINGS["FlexRound W4A8"] = ["--recipe", "flexround-w4a8"]
SETTINGS["TDAC+BRECQ W4A8"] = ["--recipe", str(RECIPES / "tdac-brecq-w4a8.yaml")]  # EDA-DM without FBR
SETTINGS["uniform+FBR W4A8"] = ["--recipe", str(RECIPES / "uniform-fbr-w4a8.yaml")]  # EDA-DM without TDAC
# Issue 7 rows beyond the shipped recipes.
SETTINGS |= {
    "SmoothQuant+RTN W4A4": ["--recipe", str(RECIPES / "smoothquant-rtn-w4a4.yaml")],
    "DuQuant W3A4": ["--recipe", "duquant-w4a4-fast", "--wbits", "3"],
    "DuQuant++ +GPTQ MXFP4": ["--recipe", str(RECIPES / "duquantpp-gptq-mxfp4.yaml")],
}
# Issue 16: the data-agnostic rotation baseline (QuaRot-style randomized Hadamard + RTN).
SETTINGS |= {"Hadamard W4A4": ["--recipe", "hadamard-w4a4"], "Hadamard MXFP4": ["--recipe", "hadamard-mxfp4"],
             "EAQuant W4A4 forced balance": ["--recipe", str(RECIPES / "eaquant-w4a4-force.yaml")]}
# Issue 11 item 6: rotations searched on every calibration token (before) vs the mean sample (the code's, now).
SETTINGS |= {"DuQuant W4A4 all-tokens rotation": ["--recipe", str(RECIPES / "duquant-w4a4-alltokens.yaml")],
             "EAQuant W4A4 all-tokens rotation": ["--recipe", str(RECIPES / "eaquant-w4a4-alltokens.yaml")],
             "DuQuant W4A4 float32 search": ["--recipe", str(RECIPES / "duquant-w4a4-f32search.yaml")],
             "EAQuant W4A4 float32 search": ["--recipe", str(RECIPES / "eaquant-w4a4-f32search.yaml")]}
# Issue 6 rows: DGQ ablations at each width (full DGQ = the shipped dgq recipes).
for w, a in ((8, 8), (8, 6), (4, 6), (8, 4)):
    bits = ["--wbits", str(w), "--abits", str(a)]
    SETTINGS |= {
        f"per-tensor W{w}A{a}": ["--recipe", str(RECIPES / "dgq-pertensor.yaml"), *bits],
        f"DGQ groups W{w}A{a}": ["--recipe", str(RECIPES / "dgq-groups.yaml"), *bits],
        f"DGQ groups+log W{w}A{a}": ["--recipe", str(RECIPES / "dgq-groups-log.yaml"), *bits],
        f"DGQ full W{w}A{a}": ["--recipe", "dgq-w8a6", *bits],
    }
SETTINGS["DGQ full W4A6 +weight-recon"] = ["--recipe", "dgq-w4a6", "--weight-recon"]


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stderr)  # keep stdout for the table


def under_target(ckpt: Path) -> tuple[int, int] | None:
    """(experts whose routed calibration tokens were under the target, experts) from quantization.json,
    for methods that balance expert calibration (EAQuant, DuQuant); None if not recorded."""
    qj = ckpt / "quantization.json"
    if not qj.is_file():
        return None
    meta = json.loads(qj.read_text())
    if meta.get("recipe", {}).get("method") == "hadamard":  # a fixed rotation: no expert is fitted on tokens
        return None
    cals = [r["calibration"] for r in meta["layers"].values()
            if "expert_tokens" in (r.get("calibration") or {})]
    if not cals:
        return None
    return sum(len(c["under_target"]) for c in cals), sum(len(c["expert_tokens"]) for c in cals)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--out", type=Path, default=Path("out/bench"))
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--eval-args", default="", help="extra arguments for quantkit eval")
    p.add_argument("--quantize-args", default="", help="extra arguments for quantkit quantize (e.g. --calib-prompts F)")
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
             *SETTINGS[label], *args.quantize_args.split()])
        qt = time.time() - t
        js = ck.with_suffix(".json")
        run(["quantkit", "eval", str(ck), "--n", str(args.n), "--seed", str(args.seed), "--json", str(js), *extra])
        rows.append((label, json.loads(js.read_text()), qt))
    metrics = sorted({k for _, r, _ in rows for k in r["metrics"]})
    moe = any(under_target(args.out / f"{name}-{label.replace(' ', '_')}") for label, _, _ in rows[1:])
    extra_col = " experts under target |" if moe else ""
    print(f"| setting | bits/weight | {' | '.join(metrics)} |{extra_col} seconds |")
    print("|---|---|" + "---|" * len(metrics) + ("---|" if moe else "") + "---|")
    for label, r, secs in rows:
        vals = " | ".join(f"{r['metrics'][m]:.4f}" if m in r["metrics"] else "-" for m in metrics)
        extra = ""
        if moe:
            u = under_target(args.out / f"{name}-{label.replace(' ', '_')}") if label != "FP" else None
            extra = f" {u[0]} of {u[1]} |" if u else " - |"
        print(f"| {label} | {r['bits_per_weight']:.3f} | {vals} |{extra} {secs:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
