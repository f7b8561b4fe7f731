"""Seconds per block of a recipe on a model: quantize in process, time each block step (propagate the
calibration calls + the method's work on the block), stop after --blocks blocks so a recipe that would take
hours on the whole model is timed on a few. Example:
    python bench/block_time.py zoo:shakespeare-moe eaquant-w4a4 eaquant-w4a4-fast --blocks 2"""
from __future__ import annotations

import argparse
import time


class _Stop(Exception):
    pass


def time_blocks(model: str, recipe: str, blocks: int, calib_prompts: str | None, calib_size: int | None = None,
                calib_seq_len: int | None = None) -> dict:
    """{"setup": seconds before the first block (load, calibration), "blocks": [seconds per block step]}."""
    from quantkit.config import Recipe
    from quantkit.methods import METHODS
    from quantkit.models import load_model
    from quantkit.pipeline import quantize_model

    rec = Recipe.load(recipe)
    if calib_size:  # to measure how a recipe's block time grows with its calibration set
        rec = rec.replace(calib_size=calib_size)
    if calib_seq_len:
        rec = rec.replace(method_options={**rec.method_options, "calib_seq_len": calib_seq_len})
    cls = METHODS[rec.method]
    orig = cls.quantize_block
    stamps: list[float] = []

    def timed(self, ctx):  # the time between block entries is one whole block step
        stamps.append(time.perf_counter())
        if len(stamps) > blocks:
            raise _Stop
        return orig(self, ctx)

    t0 = time.perf_counter()
    cls.quantize_block = timed
    try:
        quantize_model(load_model(model), rec, calib_prompts=calib_prompts)
        stamps.append(time.perf_counter())  # the model had no more than `blocks` blocks
    except _Stop:
        pass
    finally:
        cls.quantize_block = orig
    return {"setup": stamps[0] - t0, "blocks": [b - a for a, b in zip(stamps, stamps[1:])]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("recipes", nargs="+")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--calib-prompts", default=None)
    p.add_argument("--calib-size", type=int, default=None, help="override the recipes' calib_size")
    p.add_argument("--calib-seq-len", type=int, default=None, help="override the recipes' calib_seq_len (LMs)")
    a = p.parse_args()
    if a.calib_size or a.calib_seq_len:
        print(f"calibration overridden: calib_size {a.calib_size or 'as recipe'}, "
              f"calib_seq_len {a.calib_seq_len or 'as recipe'}")
    print("| recipe | blocks timed | seconds per block | setup s (load + calibration) |")
    print("|---|---|---|---|")
    for r in a.recipes:
        t = time_blocks(a.model, r, a.blocks, a.calib_prompts, a.calib_size, a.calib_seq_len)
        per = sum(t["blocks"]) / max(len(t["blocks"]), 1)
        print(f"| {r} | {len(t['blocks'])} | {per:.1f} ({', '.join(f'{s:.1f}' for s in t['blocks'])}) | {t['setup']:.1f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
