"""Hadamard rotation + round-to-nearest (QuaRot-style), the data-agnostic baseline for DuQuant++.

Every quantized linear input is multiplied online by a fixed block-diagonal randomized Hadamard
matrix H diag(s) / sqrt(b) (s: random signs from the seed), the weights by the same transform along
their input dimension, then both are rounded to nearest. No calibration statistic decides the
rotation: this is what DuQuant++'s outlier-aware greedy rotation claims to beat. It reuses the DuQuant
engine (capture, rotation storage, fused experts) with `fit` replaced and smoothing off; one matrix
per layer, stored once (fp16) and counted by `quantkit inspect` like any rotation.
"""
from __future__ import annotations

import math

import torch

from quantkit.methods.base import register
from quantkit.methods.duquant import DEFAULTS, DuQuant

HADAMARD_DEFAULTS = {**DEFAULTS, "smooth": False, "block": 128, "steps": 0, "permute": False,
                     "weight_clip": "none", "rotate_router": False, "random_signs": True}


def hadamard_matrix(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix [n, n] of +-1 (n a power of two), float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def randomized_hadamard(n: int, seed: int, random_signs: bool = True) -> torch.Tensor:
    """Orthogonal diag(s) H / sqrt(n) (rows of H with random signs when random_signs)."""
    h = hadamard_matrix(n) / math.sqrt(n)
    if random_signs:
        g = torch.Generator().manual_seed(seed)
        s = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
        h = s.unsqueeze(1) * h
    return h


@register("hadamard")
class HadamardRTN(DuQuant):
    """Options: block (power of two; 32 = the MX group for MXFP4), random_signs, rotation_seed,
    weight_clip (none = plain round-to-nearest), gptq; the DuQuant engine's others are inert."""

    defaults = HADAMARD_DEFAULTS
    fits_on_data = False

    def fit(self, x: torch.Tensor) -> tuple | None:
        if not self.opt["rotate"]:
            return None
        b = self.rot_cfg.block_for(x.shape[-1])
        h = randomized_hadamard(b, int(self.opt["rotation_seed"]), bool(self.opt["random_signs"]))
        return h.half().double().unsqueeze(0), None, None  # one [1, b, b] matrix for every block
