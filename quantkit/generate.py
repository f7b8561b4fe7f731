"""Sampling from a (quantized or full-precision) model: image grids for pipelines, text for LMs."""
from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from PIL import Image

from quantkit.errors import QuantkitError


def generate_images(pipe: Any, prompts: list[str] | None, n: int, steps: int, seed: int,
                    guidance_scale: float | None = None, labels: list[int] | None = None) -> list[Image.Image]:
    """n images from a diffusers pipeline: text prompts, class labels or unconditional."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed)}
    if "prompt" in params:
        if not prompts:
            raise QuantkitError("this pipeline is text-to-image: give --prompt")
        kwargs["prompt"] = [prompts[i % len(prompts)] for i in range(n)]
    elif "class_labels" in params:
        kwargs["class_labels"] = [(labels or list(range(10)))[i % len(labels or range(10))] for i in range(n)]
    else:
        kwargs["batch_size"] = n
    if guidance_scale is not None and "guidance_scale" in params:
        kwargs["guidance_scale"] = guidance_scale
    if "output_type" in params:
        kwargs["output_type"] = "np"
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(**kwargs)
    images = out.images if hasattr(out, "images") else out[0]
    arr = np.asarray(images)
    return [Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8).squeeze()) for a in arr]


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images row-major into one picture."""
    if not images:
        raise QuantkitError("no images to put in a grid")
    cols = cols or int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    w, h = images[0].size
    grid = Image.new(images[0].mode, (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def generate_text(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, seed: int,
                  temperature: float = 0.0) -> str:
    """Continue `prompt` (greedy at temperature 0); byte ids when the model has no tokenizer."""
    torch.manual_seed(seed)
    if tokenizer is not None:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    else:
        ids = torch.tensor([[b % model.config.vocab_size for b in prompt.encode("utf-8")]])
    gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        gen_kwargs["temperature"] = temperature
    with torch.no_grad():
        out = model.generate(ids, **gen_kwargs)
    new = out[0, ids.shape[1]:]
    if tokenizer is not None:
        return prompt + tokenizer.decode(new, skip_special_tokens=True)
    return prompt + bytes(int(t) % 256 for t in new).decode("utf-8", errors="replace")
