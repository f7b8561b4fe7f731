"""Calibration activations above a memory budget go to disk (`--calib-memory`).

The walk's paused calibration calls (quantkit.propagate) hold their activations in their own
frames: the next block's inputs and, in a UNet, the skip tensors waiting for the up path. When the
resident total passes the budget, a paused call's tensors are written to WORK_DIR/spill/ and their
storage is shrunk to nothing in place (the frames keep the tensor objects, which hold no memory).
The bytes are put back into the same storage just before the call resumes, and methods read a
spilled call's block inputs as fresh copies from the file, so nothing ever sees an empty tensor.
"""
from __future__ import annotations

import logging
import re
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from quantkit.adapters.base import CallArgs
from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)

MIN_SPILL_BYTES = 64 * 1024  # smaller tensors stay: a file each would cost more than it saves
_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def parse_bytes(text: str) -> int:
    """'4GB', '512MiB', '1e9' -> bytes; a clear error otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise QuantkitError(f"cannot read memory size {text!r}; write e.g. 4GB, 512MB or 2GiB")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise QuantkitError(f"memory size {text!r} must be positive")
    return n


def iter_tensors(v: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested calls, dicts, lists, tuples and model outputs."""
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, dict):
        for x in v.values():
            yield from iter_tensors(x)
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from iter_tensors(x)
    elif hasattr(v, "__dataclass_fields__") or hasattr(v, "to_tuple"):  # model outputs
        for x in (v.values() if hasattr(v, "values") else vars(v).values()):
            yield from iter_tensors(x)


def _bytes_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(storage)


class SpillManager:
    """Budgeted residency of the paused calls' activations (see the module docstring)."""

    def __init__(self, budget: int, folder: str | Path | None, pinned: list[CallArgs]) -> None:
        self.budget = budget
        self._tmp = None
        if folder is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="quantkit-spill-")
            folder = self._tmp.name
        self.dir = Path(folder) / "spill"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        # The calibration calls' own tensors are read by the walk at any time (e.g. timesteps): never spilled.
        self.pinned = {t.untyped_storage()._cdata for c in pinned for t in iter_tensors((c.args, c.kwargs))}
        self.tracked: dict[int, list[weakref.ref]] = {}  # call -> tensors it holds
        self.spilled: dict[int, list[tuple[torch.UntypedStorage, Path, int]]] = {}
        self.resident = 0
        self.peak_resident = 0
        self.bytes_spilled = 0
        self._n = 0

    def track(self, k: int, obj: Any) -> None:
        """Tensors call k holds from now on (block inputs and outputs it carries)."""
        refs = self.tracked.setdefault(k, [])
        for t in iter_tensors(obj):
            refs.append(weakref.ref(t))

    def _storages(self, k: int) -> list[torch.UntypedStorage]:
        seen, out = set(), []
        alive = []
        for r in self.tracked.get(k, []):
            t = r()
            if t is None:
                continue
            alive.append(r)
            s = t.untyped_storage()
            key = s._cdata  # the storage itself (its data pointer is 0 while spilled)
            if key in seen or key in self.pinned or s.nbytes() < MIN_SPILL_BYTES or not s.resizable():
                continue
            seen.add(key)
            out.append(s)
        self.tracked[k] = alive
        return out

    def paused(self, k: int) -> None:
        """Call k has just paused: count its activations and spill them if the budget is passed."""
        storages = self._storages(k)
        nbytes = sum(s.nbytes() for s in storages)
        if self.resident + nbytes <= self.budget:
            self.resident += nbytes
            self.peak_resident = max(self.peak_resident, self.resident)
            return
        files = []
        for s in storages:
            path = self.dir / f"{k}-{self._n}.bin"
            self._n += 1
            n = s.nbytes()
            # Through a shared memory map, not numpy: a numpy view would pin the storage's size for good.
            with open(path, "wb") as f:
                f.truncate(n)
            dst = torch.from_file(str(path), shared=True, size=n, dtype=torch.uint8)
            dst.copy_(_bytes_view(s))
            del dst
            s.resize_(0)
            files.append((s, path, n))
            self.bytes_spilled += n
        self.spilled[k] = files

    def resuming(self, k: int) -> None:
        """Call k is about to run: its bytes go back into its own storages."""
        files = self.spilled.pop(k, None)
        if files is None:
            self.resident -= sum(s.nbytes() for s in self._storages(k))
            self.resident = max(self.resident, 0)
            return
        for s, path, n in files:
            s.resize_(n)
            _bytes_view(s).copy_(torch.from_file(str(path), shared=False, size=n, dtype=torch.uint8))
            path.unlink()

    def is_spilled(self, k: int) -> bool:
        return k in self.spilled

    def copy_of(self, k: int, call: CallArgs) -> CallArgs:
        """A fresh copy of a spilled call's block inputs, read from its files."""
        back = {s._cdata: (path, n) for s, path, n in self.spilled[k]}
        loaded: dict[int, torch.UntypedStorage] = {}

        def cp(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                src = back.get(v.untyped_storage()._cdata)
                if src is None:
                    return v
                key = id(src)
                if key not in loaded:
                    loaded[key] = torch.from_file(str(src[0]), shared=False, size=src[1],
                                                  dtype=torch.uint8).untyped_storage()
                return torch.empty(0, dtype=v.dtype).set_(loaded[key], v.storage_offset(), v.shape, v.stride())
            if isinstance(v, dict):
                return {a: cp(x) for a, x in v.items()}
            if isinstance(v, (list, tuple)):
                return type(v)(cp(x) for x in v)
            return v

        return CallArgs(cp(call.args), cp(call.kwargs))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._tmp is not None:
            self._tmp.cleanup()


class SpilledInputs(Sequence):
    """A block's inputs where spilled calls are read back from disk on each access."""

    def __init__(self, args: list[CallArgs], calls: list[int], spill: SpillManager) -> None:
        self.args, self.calls, self.spill = args, calls, spill

    def __len__(self) -> int:
        return len(self.args)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        k = self.calls[i]
        return self.spill.copy_of(k, self.args[i]) if self.spill.is_spilled(k) else self.args[i]
