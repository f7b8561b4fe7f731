"""Resume a killed quantization at block granularity, for every method.

After each block the walk keeps the block's quantized modules in WORK_DIR/walk/: NNNNN.safetensors
(their tensors) then NNNNN.json (their layer records and the method's records so far), each
written to a temporary name and renamed, so a kill leaves either a whole block or none. A rerun
with the same recipe, model and calibration rebuilds finished blocks from there (no method work)
and carries the calibration calls through them exactly as the first run did, so the checkpoint is
the same bit for bit. A different run (fingerprint) starts the folder afresh.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from quantkit.adapters.base import CallArgs
from quantkit.config import ActivationConfig, Recipe
from quantkit.errors import QuantkitError
from quantkit.formats.spec import FormatSpec

log = logging.getLogger(__name__)


class BlockStream(Protocol):
    """Where a block's weights come from and go to (see quantkit.streaming)."""

    def enter(self, name: str, module: nn.Module) -> None:
        """Materialize `module`'s weights before calibration calls reach it."""

    def leave(self, name: str, module: nn.Module) -> None:
        """Write `module`'s (now final) tensors and release them."""

    def outside(self) -> None:
        """Materialize the parts outside blocks (embeddings, norms, heads) before anything reads them."""


def _hash(h: Any, v: Any) -> None:
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(v, dict):
        for k in sorted(v, key=str):
            h.update(str(k).encode())
            _hash(h, v[k])
    elif isinstance(v, (list, tuple)):
        for x in v:
            _hash(h, x)
    else:
        h.update(repr(v).encode())


def run_fingerprint(recipe: Recipe, loaded: Any, calls: list[CallArgs] | None) -> str:
    """What makes two runs the same: recipe, model (class, dtype, source files' sizes and times), calibration."""
    h = hashlib.sha256()
    h.update(json.dumps(recipe.to_dict(), sort_keys=True, default=str).encode())
    h.update(f"{loaded.source}|{type(loaded.root).__name__}".encode())
    for p in loaded.root.parameters():
        h.update(str(p.dtype).encode())
        break
    if loaded.path is not None:
        for f in sorted(Path(loaded.path).rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(loaded.path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    for c in calls or []:
        _hash(h, c.args)
        _hash(h, c.kwargs)
    return h.hexdigest()


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Method records of earlier blocks (a) and later ones (b); per-block dicts are joined."""
    out = dict(a)
    for k, v in b.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # unique: ranks under torchrun write it together
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class WalkStore:
    """Finished blocks of this run (see the module docstring)."""

    def __init__(self, work_dir: str | Path, recipe: Recipe, loaded: Any, calls: list[CallArgs] | None,
                 fingerprint: str | None = None) -> None:
        self.dir = Path(work_dir) / "walk"
        self.root = loaded.root
        self.earlier: dict[str, Any] = {}  # method records of the blocks resumed so far
        fp = fingerprint or run_fingerprint(recipe, loaded, calls)
        run_file = self.dir / "run.json"
        if run_file.is_file():
            try:
                same = json.loads(run_file.read_text()).get("fingerprint") == fp
            except json.JSONDecodeError:
                same = False
            if not same:
                log.warning("%s holds blocks of a different run (recipe, model or calibration changed); "
                            "starting afresh", self.dir)
                shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(run_file, {"fingerprint": fp})

    def _paths(self, unit: int) -> tuple[Path, Path]:
        return self.dir / f"{unit:05d}.safetensors", self.dir / f"{unit:05d}.json"

    def _rows_path(self, unit: int, rank: int) -> Path:
        return self.dir / f"{unit:05d}.rows-{rank}.safetensors"

    def save_rows(self, unit: int, rank: int, split: dict[str, int], block: nn.Module, owns: Any) -> None:
        """A rank's own experts' rows of the block's split tensors (quantkit.expert_shard: no rank holds the
        others'), kept before the main rank's save of the rest makes the block count as finished."""
        state = block.state_dict()
        path = self._rows_path(unit, rank)
        tmp = path.with_name(path.name + ".tmp")
        _save_own_rows(tmp, {k: state[k] for k in split}, owns)
        os.replace(tmp, path)

    def save(self, unit: int, bname: str, block: nn.Module, modules: dict[str, nn.Module], tasks: list[Any],
             extras: dict[str, Any], split: dict[str, int] | None = None, ranks: int = 1) -> None:
        """Keep the quantized block: its whole state (quantized layers, norms, any quantizer a method
        installed) and the records to rebuild its quantized modules. `split`: tensors whose rows each of the
        `ranks` ranks kept itself (save_rows), left out here."""
        from quantkit.layers import layer_record

        by_name = {t.name: t for t in tasks}
        split = split or {}
        state = {k: v.detach().contiguous().cpu() for k, v in block.state_dict().items() if k not in split}
        records = {n: layer_record(by_name[n], m) for n, m in modules.items()}
        tens, meta = self._paths(unit)
        tmp = tens.with_name(tens.name + ".tmp")
        save_file(_unshare(state), str(tmp))
        os.replace(tmp, tens)
        from quantkit.io import _dedupe

        tied = _dedupe(block.state_dict())[1]  # tensors shared in memory (e.g. q/k/v's one rotation), re-tied on load
        _atomic_write_json(meta, {"block": bname, "layers": records, "extras": _merge(self.earlier, extras),
                                  "tied": tied, "rows": {"keys": sorted(split), "ranks": ranks} if split else None})

    def has(self, unit: int, bname: str, rank: int | None = None, ranks: int = 1) -> bool:
        """Whether an earlier run finished this block (both files, the right block; with split rows, kept by as
        many ranks as now, this `rank`'s rows file too)."""
        return self._meta(unit, bname, rank, ranks) is not None

    def _meta(self, unit: int, bname: str, rank: int | None, ranks: int) -> dict[str, Any] | None:
        tens, meta_file = self._paths(unit)
        if not meta_file.is_file() or not tens.is_file():
            return None
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError:
            return None
        if meta.get("block") != bname:
            return None
        rows = meta.get("rows")
        if rows and (rows["ranks"] != ranks or rank is None or not self._rows_path(unit, rank).is_file()):
            return None
        return meta

    def load(self, unit: int, bname: str, block: nn.Module, rank: int | None = None, ranks: int = 1,
             owns: Any = None) -> dict[str, nn.Module] | None:
        """The block's quantized modules from a finished earlier run, or None. With split rows: this rank's
        rows filled (`owns`), the others' left as they are."""
        from quantkit.layers import empty_quantized

        tens, _ = self._paths(unit)
        meta = self._meta(unit, bname, rank, ranks)
        if meta is None:
            return None
        from quantkit.layers import set_submodule

        state = {k: v.clone() for k, v in load_file(str(tens)).items()}
        split = meta["rows"]["keys"] if meta.get("rows") else []
        out: dict[str, nn.Module] = {}
        for name, rec in meta["layers"].items():
            orig = self.root.get_submodule(name)
            act = ActivationConfig.from_dict(rec["activation"])
            rel = name[len(bname) + 1:] + "."  # (the split keys are the block's state-dict keys)
            out[name] = empty_quantized(orig, rec["kind"], FormatSpec.from_dict(rec["weight"]), act, rec,
                                        on_meta=any(k.startswith(rel) for k in split)).eval()
            if rec.get("calibration"):  # what layers.layer_record reads back (e.g. EAQuant's token counts)
                out[name].calibration_info = rec["calibration"]
            set_submodule(self.root, name, out[name])
        for name, rec in meta.get("extras", {}).get("attention", {}).items():
            if name == bname or name.startswith(bname + "."):  # attention quantizers a method installed (DGQ)
                from quantkit.adapters.diffusers_attention import install_processor

                install_processor(self.root.get_submodule(name), rec)
        if split:
            fresh = block.state_dict()  # (the rebuilt experts' tensors, on meta: their shapes and dtypes)
            with safe_open(str(self._rows_path(unit, rank)), framework="pt") as kept:
                for k in split:
                    # this rank's rows read one by one into place, the others' left unwritten (never resident),
                    # as in the run that saved them
                    full, mine, i = torch.empty(fresh[k].shape, dtype=fresh[k].dtype), kept.get_slice(k), 0
                    for e in range(full.shape[0]):
                        if owns(e):
                            full[e], i = mine[i], i + 1
                    state[k] = full
        block.load_state_dict(state, strict=True, assign=True)
        left = [f"{name}.{n}" for name, m in out.items() for n, t in list(m.named_parameters()) + list(m.named_buffers())
                if t.is_meta]
        if left:
            raise RuntimeError(f"block {bname}: {left[0]} was not filled from {tens}")  # (a bug, not bad input)
        for alias, src in meta.get("tied", {}).items():
            _tie(block, alias, src)
        # merged, not replaced: under torchrun neighbouring units come from different ranks (quantkit.distributed)
        self.earlier = _merge(self.earlier, meta.get("extras", {}))
        return out

    def merged_extras(self, extras: dict[str, Any]) -> dict[str, Any]:
        return _merge(self.earlier, extras)


def _tie(block: nn.Module, alias: str, src: str) -> None:
    """Make tensor `alias` of the block the very tensor `src` again, as it was in the run that saved it."""
    a_mod, _, a_leaf = alias.rpartition(".")
    s_mod, _, s_leaf = src.rpartition(".")
    owner = block.get_submodule(a_mod) if a_mod else block
    tensor = getattr(block.get_submodule(s_mod) if s_mod else block, s_leaf)
    if a_leaf in owner._parameters:
        owner._parameters[a_leaf] = tensor
    else:
        owner._buffers[a_leaf] = tensor


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory; resume files store each one separately."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone() if key in seen and v.numel() else v
        seen.add(key)
    return out


def _save_own_rows(path: Path, tensors: dict[str, torch.Tensor], owns: Any) -> None:
    """A safetensors file of each tensor's rows this rank owns ([n_own, ...]), written row by row from the
    tensor itself: no stacked copy of a rank's quantized experts on the way."""
    from quantkit.streaming import ST_DTYPES

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for k, t in tensors.items():
        if t.dtype not in ST_DTYPES:
            raise QuantkitError(f"tensor {k} has dtype {t.dtype}, which safetensors cannot store")
        n_own = sum(1 for e in range(t.shape[0]) if owns(e))
        nbytes = n_own * t[0].numel() * t.element_size()
        header[k] = {"dtype": ST_DTYPES[t.dtype], "shape": [n_own, *t.shape[1:]], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * ((-len(head)) % 8)  # (tensor bytes 8-aligned, as safetensors writes them)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for t in tensors.values():  # (the same order as the header's offsets)
            for e in range(t.shape[0]):
                if owns(e):
                    f.write(memoryview(t[e].detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
