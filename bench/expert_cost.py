"""Seconds per expert of a calibrated MoE method, at a real model's expert shape, on this machine.

What a run's per-expert work costs (rotation search, clipping search, GPTQ), measured through the method's
own quantize_experts on random weights and Gaussian tokens, so that a multi-rank run can be sized before it
starts (docs/distributed.md). Dense parts (attention, shared experts, router) are not included.

    python bench/expert_cost.py                                   # DeepSeek-V3 shape: hidden 7168, expert width 2048
    python bench/expert_cost.py --hidden 2048 --inter 768 --tokens 512 --recipes eaquant-w4a4
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent


def recipe_path(name: str) -> str:
    local = HERE / "recipes" / f"{name}.yaml"
    return str(local) if local.is_file() else name


def seconds_per_expert(recipe_name: str, hidden: int, inter: int, experts: int, tokens: int, top_k: int,
                       token_target: int) -> dict:
    from transformers.activations import ACT2FN

    from quantkit.config import Recipe
    from quantkit.layers import LayerTask
    from quantkit.methods import get_method

    class Experts(torch.nn.Module):  # the fused 3-D layout of transformers' MoE families (e.g. DeepseekV3Experts)
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(experts, 2 * inter, hidden) * hidden ** -0.5)
            self.down_proj = torch.nn.Parameter(torch.randn(experts, hidden, inter) * inter ** -0.5)
            self.act_fn = ACT2FN["silu"]

    recipe = Recipe.load(recipe_path(recipe_name))
    method = get_method(recipe.method, recipe)
    name = "model.layers.0.mlp.experts"
    task = LayerTask(name, Experts(), "experts", recipe.plan(name, "experts"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen)
    # every expert routed `tokens * top_k / experts` tokens: top_k distinct experts per token, in turn
    idx = torch.stack([(torch.arange(tokens) * top_k + j) % experts for j in range(top_k)], -1)
    method.opt["expert_token_target"] = token_target  # (methods that cap an expert's tokens, e.g. EAQuant)
    t0 = time.perf_counter()
    q = method.quantize_experts(task, x, idx, None)
    wall = time.perf_counter() - t0
    used = q.calibration_info["expert_tokens_used"]
    return {"recipe": recipe_name, "hidden": hidden, "inter": inter, "experts_timed": experts,
            "tokens_per_expert": int(sum(used) / len(used)), "seconds_per_expert": wall / experts,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2048, help="one expert's width (moe_intermediate_size)")
    ap.add_argument("--experts", type=int, default=2, help="experts timed (the figure is per expert)")
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=1024, help="calibration tokens entering the layer")
    ap.add_argument("--token-target", type=int, default=256,
                    help="EAQuant's per-expert token target T, which caps the tokens an expert is calibrated on; "
                         "DeepSeek-V3 at the paper's 4096-token samples: 8/256 x 4096 x 2 = 256")
    ap.add_argument("--recipes", default="eaquant-w4a4,gptq-w4a16-g128")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for r in a.recipes.split(","):
        with torch.no_grad():
            row = seconds_per_expert(r, a.hidden, a.inter, a.experts, a.tokens, a.top_k, a.token_target)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
