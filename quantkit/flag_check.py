"""Flags a run would ignore are errors, checked after the model is loaded and before any work:
a silently ignored flag makes a user believe a result came from settings it did not use."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from quantkit.errors import QuantkitError


def check_flags(loaded: Any, recipe: Any, method: Any, tasks: list, *, calib_prompts: Path | None = None,
                calib_text: Path | None = None, calib_file: Path | None = None,
                calib_steps: int | None = None) -> None:
    """Raise a one-line QuantkitError for a calibration flag this model / method / recipe would not use."""
    todo = [t for t in tasks if not t.plan.skip]
    is_lm = loaded.adapter.kind == "lm"
    if calib_prompts is not None and is_lm:
        raise QuantkitError("--calib-prompts are text-to-image prompts; a language model calibrates on a text "
                            "corpus: give --calib-text instead")
    if calib_text is not None and not is_lm:
        raise QuantkitError("--calib-text is a corpus for language models; for a diffusion pipeline give "
                            "--calib-prompts instead")
    given = [f for f, v in (("--calib-prompts", calib_prompts), ("--calib-text", calib_text),
                            ("--calib-steps", calib_steps)) if v is not None]
    if not given:
        return
    if calib_file is not None:
        raise QuantkitError(f"--calib already holds the calibration inputs; {given[0]} would be ignored (drop it)")
    if not method.needs_calibration(todo):
        raise QuantkitError(f"method {recipe.method} with this recipe uses no calibration data (dynamic or no "
                            f"activation quantization); {given[0]} would be ignored: drop it or use static "
                            "activations")
    if not loaded.is_pipeline and not is_lm and (calib_prompts is not None or calib_steps is not None):
        raise QuantkitError(f"{loaded.source} is a bare model without a sampler (calibrated on synthetic inputs); "
                            f"{given[0]} would be ignored: give a pipeline folder or drop the flag")
    if is_lm and calib_steps is not None:
        raise QuantkitError("--calib-steps counts sampler steps of diffusion pipelines; a language model has none")
    if is_lm and calib_text is not None:  # too short a text is an error now, not minutes in
        from quantkit.calib.capture import text_calls

        text_calls(loaded.tokenizer, loaded.root.config.vocab_size, 1, recipe.seed, text_file=str(calib_text))


def check_rounding_flag(method_name: str) -> None:
    """--rounding is a reconstruction option; a method without one would silently ignore it."""
    from quantkit.methods.base import METHODS

    owners = sorted(n for n, c in METHODS.items() if "rounding" in (c.option_defaults() or {}))
    cls = METHODS.get(method_name)
    if cls is not None and method_name not in owners:
        raise QuantkitError(f"--rounding is an option of the reconstruction methods ({', '.join(owners)}), "
                            f"not of {method_name}; drop it or pick one of those methods")


@torch.no_grad()
def check_calls_fit(loaded: Any, calls: list, path: Path) -> None:
    """Run the model once on the first calibration call, so a file made for another model fails now,
    not minutes into the run with a shape error deep inside a block."""
    if not calls:
        raise QuantkitError(f"calibration file {path} holds no samples")
    c = calls[0]
    streamed = any(p.is_meta for p in loaded.root.parameters())
    if streamed:  # a layer-streamed model is on the meta device: a meta forward checks shapes without data
        c = c.to("meta")
    try:
        import torch

        with torch.no_grad():
            loaded.root(*c.args, **c.kwargs)
    except NotImplementedError:
        return  # an op without a meta kernel: the walk will find a mismatch in the first block
    except (RuntimeError, IndexError, TypeError, ValueError, KeyError) as e:
        if streamed and "meta" in str(e).lower():
            return
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise QuantkitError(f"calibration file {path} does not fit this model ({first}); it was probably made "
                            "for another model: make one with `quantkit calib select` for this model") from None


def group_fallback_note(recipe: Any, tasks: list) -> str:
    """' (N layers per channel: ...)' when group_fallback changed some layers' format, else ''."""
    changed = [t for t in tasks if not t.plan.skip and t.plan.weight is not None
               and recipe.plan(t.name, t.role).weight != t.plan.weight]
    if not changed:
        return ""
    return (f" ({len(changed)} of {sum(not t.plan.skip for t in tasks)} layers per channel: the group size does not "
            f"divide their input size, e.g. {changed[0].name})")
