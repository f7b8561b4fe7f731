"""Rotation payload in bits per weight at real model shapes: the bytes the stored OnlineRotation buffers
of DuQuant / EAQuant / DuQuant++ take (built empty with each recipe's geometry, dtypes as stored),
divided by the layer's weight count. Usage: python bench/rotation_payload.py"""
from __future__ import annotations

from quantkit.quantizers.online_rotation import OnlineRotation

# (name, [(layer, N, K, reads-the-same-input-as-previous)]) per decoder layer; experts counted per expert.
SHAPES = {
    "Llama-2-7B layer (hidden 4096)": [("q", 4096, 4096, False), ("k", 4096, 4096, True), ("v", 4096, 4096, True),
                                       ("o", 4096, 4096, False), ("gate", 11008, 4096, False),
                                       ("up", 11008, 4096, True), ("down", 4096, 11008, False)],
    "Mixtral-8x7B layer (hidden 4096, 8 experts)": [("q", 4096, 4096, False), ("k", 1024, 4096, True),
                                                    ("v", 1024, 4096, True), ("o", 4096, 4096, False),
                                                    ("router", 8, 4096, False)]
    + [(f"e{e}.gate_up", 2 * 14336, 4096, False) for e in range(8)]
    + [(f"e{e}.down", 4096, 14336, False) for e in range(8)],
}
RECIPES = ["duquant-w4a4", "eaquant-w4a4", "duquantpp-mxfp4", "hadamard-w4a4"]


def geometries() -> dict[str, tuple[int, bool, bool]]:
    """label -> (block, permute, shared), read from the shipped recipes (method defaults + their options),
    plus the per-block variant of the first one as the flag's cost."""
    from quantkit.config import Recipe
    from quantkit.methods import METHODS

    out = {}
    for name in RECIPES:
        rec = Recipe.load(name)
        opts = {**METHODS[rec.method].option_defaults(), **rec.method_options}
        geo = (int(opts["block"]), bool(opts["permute"]), bool(opts["shared_rotation"]))
        out[f"{name} (block {geo[0]}{', permutation' if geo[1] else ''}, {'shared' if geo[2] else 'per-block'})"] = geo
    block, permute, shared = next(iter(out.values()))
    out[f"{RECIPES[0]} with shared_rotation: {str(not shared).lower()}"] = (block, permute, not shared)
    return out


def main() -> None:
    print("| model layer | recipe | weights | rotation bytes | rotation bits/weight |")
    print("|---|---|---|---|---|")
    for shape_name, layers in SHAPES.items():
        for cfg_name, (block, permute, shared) in geometries().items():
            weights = rot_bytes = 0
            for _name, n, k, same_input in layers:
                weights += n * k
                if not same_input:  # layers reading the same input store one copy (the others are tied)
                    rot_bytes += OnlineRotation(k, block, permute, shared=shared).payload_bytes()
            print(f"| {shape_name} | {cfg_name} | {weights:,} | {rot_bytes:,} | {8 * rot_bytes / weights:.4f} |")


if __name__ == "__main__":
    main()
