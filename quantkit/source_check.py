"""Loud loading: check a source model folder's safetensors against the model its config builds,
before any work, reading only the files' JSON headers.

A tensor deleted from a checkpoint would otherwise be randomly initialized by from_pretrained with
only a (muted) warning, and quantized into a model that looks fine. Everything here raises a
one-line QuantkitError naming the first bad file or tensor.

Reusable API (the streaming loader shares it):
  read_header(path)                       -> {name: TensorInfo(shape, dtype)} of one safetensors file
  source_weight_files(folder, stem)       -> the shard files of a model folder (index checked)
  check_tensors(files, expected, ...)     -> missing / unexpected / wrongly shaped tensors
  check_finite(named_tensors, where)      -> NaN / Inf weights
  expected_tensors(module, library)       -> {name: TensorInfo} a module loads (hub names for transformers)
  check_source_folder(path)               -> all of the above for a model or pipeline folder
"""
from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from quantkit.errors import QuantkitError

MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit: a larger header is corrupt, not big
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 0.5,
                "F6_E2M3": 0.75, "F6_E3M2": 0.75, "C64": 8}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name ("F32", "BF16", ...) or a torch dtype name for expected tensors

    @property
    def is_float(self) -> bool:
        return self.dtype in _FLOAT_DTYPES or self.dtype.startswith(("torch.float", "torch.bfloat"))


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, from its header only; a damaged file is a clear error."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise QuantkitError(f"{p} is truncated or corrupted: {size} bytes, too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise QuantkitError(f"{p} is truncated or corrupted: its header claims {n} bytes, the file has {size}")
            raw = f.read(n)
    except OSError as e:
        raise QuantkitError(f"cannot read {p}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise QuantkitError(f"{p} is truncated or corrupted: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise QuantkitError(f"{p} is truncated or corrupted: its header is not a JSON object")
    data_size = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise QuantkitError(f"{p} is truncated or corrupted: bad header entry for tensor {name}") from None
        numel = 1
        for s in shape:
            numel *= s
        if dtype not in _DTYPE_BYTES or end - start != int(numel * _DTYPE_BYTES[dtype]) or start < 0:
            raise QuantkitError(f"{p} is truncated or corrupted: tensor {name} has an inconsistent header entry")
        if end > data_size:
            raise QuantkitError(f"{p} is truncated or corrupted: tensor {name} ends past the end of the file")
        out[name] = TensorInfo(shape, dtype)
    return out


def source_weight_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of a model folder whose weights are `stem`.safetensors (or sharded).

    Pickle-only folders are refused without being opened: loading pickle runs arbitrary code.
    """
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise QuantkitError(f"{index} is corrupted (not a safetensors index with a weight_map)") from None
        files = [folder / s for s in shards]
        for f in files:
            if not f.is_file():
                raise QuantkitError(f"{index} names shard {f.name}, which is missing from {folder}")
        return files
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(_PICKLE_SUFFIXES)) if folder.is_dir() else []
    if pickles:
        raise QuantkitError(f"{folder} has only pickle weights ({pickles[0]}); quantkit reads safetensors only "
                            "(pickle can run code): convert the weights to safetensors first")
    raise QuantkitError(f"{folder} has no weights: expected {single.name} or {index.name}")


def check_tensors(files: Iterable[str | Path], expected: Mapping[str, TensorInfo], *,
                  optional: Iterable[str] = (), ignore_missing: Iterable[str] = (),
                  ignore_unexpected: Iterable[str] = ()) -> dict[str, TensorInfo]:
    """Compare the files' tensors with `expected`; raise naming the first missing, unexpected or
    wrongly shaped/typed tensor. `optional` names may be absent (tied weights); `ignore_*` are the
    model class's own regexes. Returns the files' tensors."""
    found: dict[str, TensorInfo] = {}
    where: dict[str, Path] = {}
    for f in files:
        for name, info in read_header(f).items():
            found[name] = info
            where[name] = Path(f)
    miss_re = [re.compile(p) for p in ignore_missing]
    unexp_re = [re.compile(p) for p in ignore_unexpected]
    opt = set(optional)
    for name, want in expected.items():
        if name not in found:
            if name in opt or any(r.search(name) for r in miss_re):
                continue
            raise QuantkitError(f"source checkpoint does not match its config: tensor {name} {list(want.shape)} is "
                                "missing from the weights (it would be randomly initialized)")
        got = found[name]
        if got.shape != want.shape:
            raise QuantkitError(f"source checkpoint does not match its config: tensor {name} has shape "
                                f"{list(got.shape)} in {where[name].name}, the config needs {list(want.shape)}")
        if got.is_float != want.is_float:
            raise QuantkitError(f"source checkpoint does not match its config: tensor {name} has dtype {got.dtype} "
                                f"in {where[name].name}, the config needs {want.dtype}")
    for name in found:
        if name not in expected and not any(r.search(name) for r in unexp_re):
            raise QuantkitError(f"source checkpoint does not match its config: tensor {name} in {where[name].name} "
                                "is not a parameter of the model (unexpected)")
    return found


@torch.no_grad()
def check_finite(named_tensors: Iterable[tuple[str, torch.Tensor]], where: str = "") -> None:
    """Raise naming the first floating tensor holding NaN or Inf (quantizing it would write NaN scales)."""
    for name, t in named_tensors:
        if t.is_floating_point() and not t.is_meta and t.numel():
            # A sum is one fast vectorized pass (an elementwise isfinite on bf16 is ~40x slower) and is
            # finite whenever every element is, since NaN and Inf propagate; only a non-finite sum (or an
            # overflow of the sum in its own dtype, e.g. fp16 past 65504) pays for the exact scan below.
            if torch.isfinite(t.detach().sum()):
                continue
            flat = t.detach().reshape(-1)
            for i in range(0, flat.numel(), 1 << 24):  # bounded temporary memory on large tensors
                chunk = flat[i:i + (1 << 24)]
                if not torch.isfinite(chunk).all():
                    what = "NaN" if torch.isnan(chunk).any() else "Inf"
                    raise QuantkitError(f"{where + ': ' if where else ''}weight {name} contains {what} values; "
                                        "fix or re-export the source checkpoint")


def _info(t: torch.Tensor) -> TensorInfo:
    return TensorInfo(tuple(t.shape), str(t.dtype))


def expected_tensors(module: nn.Module, library: str) -> tuple[dict[str, TensorInfo], dict[str, TensorInfo]]:
    """(names a checkpoint of `module` holds, the module's own state-dict names). For transformers the
    first are hub names: v5 fuses per-expert tensors into 3-D experts on load and splits them on save,
    and revert_weight_conversion gives the saved (hub) form."""
    state = module.state_dict()
    own = {k: _info(v) for k, v in state.items()}
    if library != "transformers":
        return own, own
    try:
        from transformers.core_model_loading import revert_weight_conversion

        hub = {k: _info(v) for k, v in revert_weight_conversion(module, dict(state)).items()}
    except (ImportError, RuntimeError, ValueError, KeyError, TypeError):
        hub = own
    return hub, own


def _ignore_lists(module: nn.Module) -> tuple[list[str], list[str], set[str]]:
    miss = list(getattr(module, "_keys_to_ignore_on_load_missing", None) or [])
    unexp = list(getattr(module, "_keys_to_ignore_on_load_unexpected", None) or [])
    tied: set[str] = set()
    for attr in ("all_tied_weights_keys", "_tied_weights_keys"):
        keys = getattr(module, attr, None)
        if isinstance(keys, dict):
            tied |= set(keys)
        elif isinstance(keys, (list, tuple, set)):
            tied |= set(keys)
    if isinstance(getattr(module, "_tied_weights_keys", None), dict):  # v5: target -> source, both names
        tied |= set(module._tied_weights_keys)
    return miss, unexp, tied


def check_module_files(module: nn.Module, library: str, files: list[Path]) -> None:
    """Check `files` against the meta-device `module` they should load into."""
    hub, own = expected_tensors(module, library)
    miss, unexp, tied = _ignore_lists(module)
    names: set[str] = set()
    for f in files:
        names |= set(read_header(f))
    # A checkpoint may be stored in either form (hub names or already fused); compare with the closer one.
    expected = own if len(names & set(own)) > len(names & set(hub)) else hub
    check_tensors(files, expected, optional=tied, ignore_missing=miss, ignore_unexpected=unexp)


def _meta_module(folder: Path, library: str, class_name: str | None) -> nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if library == "diffusers":
            import diffusers

            cls = getattr(diffusers, class_name or "", None)
            if cls is None:
                raise QuantkitError(f"diffusers has no class {class_name!r} (named by {folder}/config.json)")
            return cls.from_config(cls.load_config(folder))
        import transformers
        from transformers import AutoConfig

        from quantkit.models import transformers_class

        cls = getattr(transformers, class_name, None) if class_name else transformers_class(folder)
        if cls is None:
            raise QuantkitError(f"transformers has no class {class_name!r} (named by {folder})")
        cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
        return cls.from_config(cfg) if hasattr(cls, "from_config") else cls._from_config(cfg)


def check_model_folder(folder: Path, library: str, class_name: str | None = None) -> None:
    """Headers of one model folder (diffusers or transformers) against the model its config builds."""
    stem = "diffusion_pytorch_model" if library == "diffusers" else "model"
    files = source_weight_files(folder, stem)
    for f in files:
        read_header(f)  # a damaged file is named before any model is built
    try:
        module = _meta_module(folder, library, class_name)
    except QuantkitError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QuantkitError(f"cannot build the model of {folder} from its config: {str(e).splitlines()[0]}") from None
    check_module_files(module, library, files)


def check_source_folder(path: Path) -> None:
    """Check a model or pipeline folder's weights against its config(s) before anything is loaded."""
    from quantkit.models import folder_kind

    kind = folder_kind(path)
    if kind == "diffusers-model":
        cfg = json.loads((path / "config.json").read_text())
        check_model_folder(path, "diffusers", cfg.get("_class_name"))
    elif kind == "transformers-model":
        qcfg = json.loads((path / "config.json").read_text()).get("quantization_config")
        if isinstance(qcfg, dict):  # pre-quantized (e.g. gpt-oss in MXFP4): tensor names are its quantizer's;
            logging.getLogger(__name__).info("%s is pre-quantized (%s): its tensors are checked by "
                                             "transformers' load report", path, qcfg.get("quant_method"))
        else:
            check_model_folder(path, "transformers")
    else:
        try:
            index: dict[str, Any] = json.loads((path / "model_index.json").read_text())
        except json.JSONDecodeError as e:
            raise QuantkitError(f"{path / 'model_index.json'} is not valid JSON: {e}") from None
        for comp, spec in index.items():
            if comp.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] not in (
                    "diffusers", "transformers"):
                continue
            sub = path / comp
            if (sub / "config.json").is_file():
                check_model_folder(sub, spec[0], spec[1])
