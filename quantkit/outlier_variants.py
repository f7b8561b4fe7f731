"""zoo:NAME-outliers: a zoo model with planted activation outliers (function-preserving), built on the
spot from zoo:NAME by its adapter and cached. See quantkit/adapters/outliers.py."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

OUTLIER_FACTOR = 40.0
OUTLIER_CHANNELS = 2
OUTLIER_SEED = 0
SUFFIX = "-outliers"
# zoo:NAME-down-outliers (MoE LMs): the norm-gain outliers plus channel outliers in every down-projection input.
DOWN_SUFFIX = "-down-outliers"
# zoo:NAME-massive (Mixtral-layout MoE LMs): the norm-gain outliers plus massive-token down-projection inputs
# in layer 1 on the byte "\n" (a delimiter, where real LLMs carry massive activations), 100x the usual.
MASSIVE_SUFFIX = "-massive"
MASSIVE = {"layer": 1, "trigger_ids": [10], "factor": 100.0}
# zoo:NAME-pixel-outliers (diffusion UNets): token-wise (pixel) outliers in the GEGLU down-projection inputs.
PIXEL_SUFFIX = "-pixel-outliers"


def _cache() -> Path:
    return Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit")) / "outliers"


def build_outlier_variant(source: str, out: Path, factor: float = OUTLIER_FACTOR,
                          channels: int = OUTLIER_CHANNELS, seed: int = OUTLIER_SEED, kind: str = "norm") -> dict:
    """Write `source` with planted outliers to `out` (same format as the source folder)."""
    from quantkit.models import load_model

    loaded = load_model(source)
    if kind == "norm":
        info = loaded.adapter.add_outliers(loaded.root, factor, channels, seed)
    elif kind == "massive":
        info = loaded.adapter.add_outliers(loaded.root, factor, channels, seed, kind=kind, massive=MASSIVE)
    else:
        info = loaded.adapter.add_outliers(loaded.root, factor, channels, seed, kind=kind)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(loaded.path, tmp)
    target = tmp / loaded.component if loaded.component else tmp
    for f in target.iterdir():  # the edited weights replace the originals
        if f.suffix == ".safetensors" or f.name.endswith(".index.json"):
            f.unlink()
    loaded.root.save_pretrained(target)
    info = {"source": source, **info}
    (tmp / "outliers.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info


def outlier_variant_path(base: str, suffix: str = SUFFIX) -> Path:
    """Folder of zoo:BASE-outliers (or -down-outliers, -massive), built into $QUANTKIT_CACHE/outliers on first use."""
    out = _cache() / f"{base}{suffix}"
    if not (out / "outliers.json").exists():
        log.info("building zoo:%s%s into %s", base, suffix, out)
        out.parent.mkdir(parents=True, exist_ok=True)
        kind = {DOWN_SUFFIX: "down", MASSIVE_SUFFIX: "massive", PIXEL_SUFFIX: "pixel"}.get(suffix, "norm")
        build_outlier_variant(f"zoo:{base}", out, kind=kind)
    return out
