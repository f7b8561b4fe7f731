"""Real images for FID: a folder of pictures, or a named built-in set."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from quantkit.errors import QuantkitError

BUILTIN = ("sklearn-digits",)
_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_real_images(source: str, n: int | None = None, size: int | None = None) -> torch.Tensor:
    """[N, 3, H, W] floats in [0, 1]."""
    if source == "sklearn-digits":
        from quantkit.zoo.digits_data import digits_splits

        _, (images, _) = digits_splits()  # the held-out split, never seen in training
        x = (images + 1) / 2
        if size and x.shape[-1] != size:  # compare at the generator's resolution
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise QuantkitError(f"real-image source {source!r} is neither a folder nor one of {', '.join(BUILTIN)}")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _SUFFIXES)
        if not files:
            raise QuantkitError(f"no images ({', '.join(_SUFFIXES)}) in {folder}")
        ims = []
        for p in files[:n] if n else files:
            im = Image.open(p).convert("RGB")
            if size:
                im = im.resize((size, size), Image.BICUBIC)
            ims.append(torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 255)
        x = torch.stack(ims)
    return x[:n] if n else x
