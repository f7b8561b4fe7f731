"""A model family quantkit does not know, when its repeated blocks can be found.

The blocks are the largest ModuleList of identical layers (same class, same parameter shapes). What is
assumed, and said in a warning: those are the blocks, in execution order; an Embedding is an embedding;
a linear outside the blocks that maps to the config's vocabulary is the LM head; MoE experts and routers
are found from their structure as for the known families; every other linear is a plain linear. No
calibration can be driven without knowing the forward, so only round-to-nearest with weight-only or
dynamic-activation recipes runs; calibrated methods refuse in one line.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from quantkit.adapters.base import CallArgs, ModelAdapter
from quantkit.adapters.experts import moe_roles
from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)


def _signature(module: nn.Module) -> tuple:
    return (type(module).__name__, tuple((n, tuple(p.shape)) for n, p in module.named_parameters()))


def _unhandled(m: nn.Module) -> bool:
    from quantkit.adapters.experts import classify_experts

    w = m._parameters.get("weight")
    return (isinstance(w, nn.Parameter) and w.dim() >= 2 and classify_experts(m) is None
            and not isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)))


def repeated_blocks(root: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(name, list) of the ModuleList of >= 2 identical layers holding the most parameters, or None."""
    best, best_size = None, 0
    for name, m in root.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2:
            continue
        sigs = {_signature(c) for c in m}
        size = sum(p.numel() for p in m.parameters())
        if len(sigs) == 1 and size > best_size:
            best, best_size = (name, m), size
    return best


class GenericAdapter(ModelAdapter):
    name = "generic"
    kind = "generic"

    def __init__(self) -> None:
        self._prefix = ""
        self._roles: dict[int, str] = {}

    @classmethod
    def matches(cls, root: nn.Module) -> bool:
        return repeated_blocks(root) is not None

    def prepare(self, root: nn.Module) -> None:
        found = repeated_blocks(root)
        if found is None:
            raise QuantkitError(f"no repeated blocks (a ModuleList of identical layers) in {type(root).__name__}")
        self._prefix, layers = found
        self._roles = moe_roles(root)
        vocab = getattr(getattr(root, "config", None), "vocab_size", None)
        for n, m in root.named_modules():
            if isinstance(m, nn.Linear) and vocab and m.out_features == vocab and not self._inside(n):
                self._roles[id(m)] = "lm_head"
        family = getattr(getattr(root, "config", None), "model_type", None) or type(root).__name__
        heads = sum(1 for r in self._roles.values() if r == "lm_head")
        outside = [n for n, m in root.named_modules()
                   if isinstance(m, nn.Linear) and not self._inside(n) and self._roles.get(id(m)) != "lm_head"]
        log.warning(
            "unknown model family %s (%s): assumed its blocks are the %d identical %s layers of %r, %d linear(s) to "
            "the vocabulary are the LM head, %d other linear(s) outside the blocks%s are plain linears; only rtn "
            "with weight-only or dynamic activations can run on it", family, type(root).__name__, len(layers),
            type(layers[0]).__name__, self._prefix, heads, len(outside),
            f" ({', '.join(outside[:3])}{', ...' if len(outside) > 3 else ''})" if outside else "")

        # Weight-holding layers quantkit has no quantized form for (e.g. GPT-2's transformers Conv1D) stay in full
        # precision: say so rather than leave them silently.
        left = sorted({type(m).__name__ for n, m in root.named_modules() if self._inside(n) and _unhandled(m)})
        if left:
            log.warning("unknown model family %s: layers of type %s inside its blocks have no quantized form in "
                        "quantkit and stay in full precision", family, ", ".join(left))

    def _inside(self, name: str) -> bool:
        return name.startswith(self._prefix + ".") if self._prefix else True

    def blocks(self, root: nn.Module) -> list[tuple[str, nn.Module]]:
        layers = root.get_submodule(self._prefix)
        return [(f"{self._prefix}.{i}", b) for i, b in enumerate(layers)]

    def role(self, name: str, module: nn.Module) -> str:
        if isinstance(module, nn.Embedding):
            return "embedding"
        return self._roles.get(id(module), "linear")

    def check_recipe(self, recipe) -> None:  # noqa: ANN001
        static = [a for a in [recipe.activation] + [r.activation for r in recipe.rules] if a is not None and not a.dynamic]
        if recipe.method != "rtn" or static:
            raise QuantkitError(
                f"method {recipe.method!r}{' with static activations' if static else ''} needs calibration, which "
                "quantkit cannot drive for an unknown model family; allowed: rtn with weight-only or dynamic activations")

    def synthetic_inputs(self, root: nn.Module, n: int, seed: int) -> list[CallArgs]:
        vocab = getattr(getattr(root, "config", None), "vocab_size", None)
        if not vocab:
            raise QuantkitError(f"cannot make inputs for unknown family {type(root).__name__} (no vocab_size)")
        g = torch.Generator().manual_seed(seed)
        return [CallArgs((), {"input_ids": torch.randint(0, vocab, (1, 16), generator=g)}) for _ in range(n)]
