"""Per-block progress on disk, so a killed reconstruction resumes at the first unfinished block.

WORK_DIR/<block>.safetensors holds the block's quantized modules (state dicts, prefixed by layer
name); WORK_DIR/<block>.json, written after it, marks the block done and stores a fingerprint of
what produced it (recipe, the FP block's weights, the FP block's calibration inputs). A block whose
fingerprint differs is recomputed: a stale folder never leaks into a different run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quantkit.adapters.base import CallArgs
from quantkit.layers import LayerTask, build_quantized

log = logging.getLogger(__name__)


def _hash_value(h: "hashlib._Hash", v: Any) -> None:
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(v, dict):
        for k in sorted(v):
            h.update(str(k).encode())
            _hash_value(h, v[k])
    elif isinstance(v, (list, tuple)):
        for x in v:
            _hash_value(h, x)
    else:
        h.update(repr(v).encode())


def fingerprint(recipe: dict[str, Any], block_name: str, block: nn.Module, fp_calls: list[CallArgs]) -> str:
    """What determines a block's result: the recipe, the FP block, its FP calibration inputs."""
    h = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode())
    h.update(block_name.encode())
    _hash_value(h, dict(block.state_dict()))
    for c in fp_calls:
        _hash_value(h, c.args)
        _hash_value(h, c.kwargs)
    return h.hexdigest()


class BlockStore:
    """The progress folder of one quantization run."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _file(self, block_name: str, ext: str) -> Path:
        # Plain concatenation, never Path.with_suffix: "mid_block.resnets.0" and ".1" would share a file.
        return self.folder / ((re.sub(r"[^A-Za-z0-9_.-]", "_", block_name) or "_root") + ext)

    def load(self, block_name: str, fp: str, tasks: list[LayerTask]) -> tuple[dict[str, nn.Module], dict] | None:
        """The block's modules if it was finished by a run with the same fingerprint, else None."""
        meta_file, tensors = self._file(block_name, ".json"), self._file(block_name, ".safetensors")
        if not meta_file.is_file() or not tensors.is_file():
            return None
        try:
            meta = json.loads(meta_file.read_text())
            state = load_file(str(tensors))
        except (OSError, ValueError, json.JSONDecodeError) as e:
            log.warning("ignoring unreadable progress of block %s: %s", block_name, e)
            return None
        if meta.get("fingerprint") != fp or meta.get("block") != block_name:
            log.info("progress of block %s is from a different run; recomputing", block_name)
            return None
        modules = {}
        for t in tasks:
            q = build_quantized(t)
            prefix = t.name + "."
            q.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
            modules[t.name] = q
        return modules, meta.get("stats", {})

    def save(self, block_name: str, fp: str, modules: dict[str, nn.Module], stats: dict[str, Any]) -> None:
        """Atomically record a finished block (tensors first, then the JSON that marks it done)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {f"{name}.{k}": v.detach().cpu().contiguous() for name, m in modules.items()
                 for k, v in m.state_dict().items()}
        tmp = self._file(block_name, ".safetensors.tmp")
        save_file(state, str(tmp))
        os.replace(tmp, self._file(block_name, ".safetensors"))
        tmp_json = self._file(block_name, ".json.tmp")
        tmp_json.write_text(json.dumps({"block": block_name, "fingerprint": fp, "stats": stats}, indent=1))
        os.replace(tmp_json, self._file(block_name, ".json"))
