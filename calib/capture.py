"""Capture calibration inputs of the module being quantized: every call the full-precision sampler
makes to the denoiser (x_t, t, conditioning), or token windows of the calibration text."""
from __future__ import annotations

import inspect
import logging
import random
from typing import Any

import torch

from quantkit.adapters.base import CallArgs
from quantkit.errors import QuantkitError
from quantkit.calib.data_files import read_prompts, read_text

log = logging.getLogger(__name__)


def _detach(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, dict):
        return {k: _detach(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_detach(x) for x in v)
    return v


def record_calls(module: torch.nn.Module) -> tuple[list[CallArgs], Any]:
    """Start recording calls of `module`; returns the list that fills up and the hook handle."""
    calls: list[CallArgs] = []

    def hook(_mod, args, kwargs):
        calls.append(CallArgs(_detach(tuple(args)), _detach(dict(kwargs))))

    return calls, module.register_forward_pre_hook(hook, with_kwargs=True)


def sample_pipeline(pipe: Any, n: int, seed: int, steps: int, prompts: list[str] | None = None,
                    batch_size: int = 8, output_type: str = "latent", progress: Any = None,
                    extra: dict[str, Any] | None = None) -> Any:
    """Run a diffusers pipeline on n prompts / class labels / unconditional samples, in batches."""
    params = inspect.signature(pipe.__call__).parameters
    g = torch.Generator().manual_seed(seed)
    outs = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        kwargs: dict[str, Any] = {"num_inference_steps": steps, "generator": g}
        if "output_type" in params:
            kwargs["output_type"] = output_type if output_type != "latent" or "prompt" in params else "np"
        if "prompt" in params:
            kwargs["prompt"] = (prompts or read_prompts())[start:start + b]
        elif "class_labels" in params:
            kwargs["class_labels"] = [(start + i) % _num_classes(pipe) for i in range(b)]
        else:
            kwargs["batch_size"] = b
        if "return_dict" in params:
            kwargs["return_dict"] = False
        kwargs.update(extra or {})  # the family's calibration sampling arguments (adapter.sampling_kwargs)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        outs.append(pipe(**kwargs))
        if progress is not None:
            progress(b)
    return outs


def _num_classes(pipe: Any) -> int:
    cfg = pipe.transformer.config
    return int(getattr(cfg, "num_embeds_ada_norm", None) or 1000)


def pipeline_calls(loaded: Any, n: int, seed: int, steps: int = 10, prompts_file: str | None = None,
                   progress: Any = None) -> list[CallArgs]:
    """Every denoiser call of the full-precision sampler on n prompts (or class labels)."""
    prompts = read_prompts(prompts_file)
    if len(prompts) < n:
        if prompts_file is not None:  # a visible fallback: repeated prompts differ only in their noise
            log.warning("calibration prompts file %s has %d prompts, fewer than calib_size %d: prompts are "
                        "repeated (each with its own noise)", prompts_file, len(prompts), n)
        prompts = (prompts * (n // len(prompts) + 1))[:n]
    calls, handle = record_calls(loaded.root)
    try:
        with torch.no_grad():
            sample_pipeline(loaded.obj, n, seed, steps, prompts, progress=progress,
                            extra=loaded.adapter.sampling_kwargs(loaded.obj))
    finally:
        handle.remove()
    return calls


def text_calls(tokenizer: Any, vocab_size: int, n: int, seed: int, seq_len: int = 128,
               text_file: str | None = None) -> list[CallArgs]:
    """n windows of seq_len tokens from the calibration text, at seeded random offsets."""
    text = read_text(text_file)
    if tokenizer is not None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        log.warning("model has no tokenizer: calibration uses UTF-8 byte values modulo the vocabulary size")
        ids = [b % vocab_size for b in text.encode("utf-8")]
    if len(ids) <= seq_len:
        if text_file is not None:  # repeating a few bytes would calibrate on a degenerate signal
            raise QuantkitError(f"calibration text file {text_file} has {len(ids)} tokens; one calibration window "
                                f"needs more than {seq_len}: give a longer text")
        ids = ids * (seq_len // max(len(ids), 1) + 2)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(0, len(ids) - seq_len)
        out.append(CallArgs((), {"input_ids": torch.tensor([ids[start:start + seq_len]]), "use_cache": False}))
    return out


def calibration_calls(loaded: Any, n: int, seed: int, steps: int = 10, prompts_file: str | None = None,
                      text_file: str | None = None, seq_len: int = 128, progress: Any = None) -> list[CallArgs]:
    """Calibration inputs for `loaded.root`, whatever the model kind."""
    if loaded.is_pipeline:
        return pipeline_calls(loaded, n, seed, steps, prompts_file, progress)
    if loaded.adapter.kind == "lm":
        return text_calls(loaded.tokenizer, loaded.root.config.vocab_size, n, seed, seq_len, text_file)
    log.warning("%s is a bare model with no sampler: calibrating on synthetic random inputs", loaded.source)
    return loaded.adapter.synthetic_inputs(loaded.root, n, seed)
