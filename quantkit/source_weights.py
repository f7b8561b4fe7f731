"""Read a source model's tensors straight from its safetensors files, one module at a time.

A folder holds one safetensors file or shards with an index (transformers `model.safetensors
.index.json`, diffusers `diffusion_pytorch_model.safetensors.index.json`). For transformers models
the checkpoint's names are mapped to the model's by transformers' own conversion machinery (the
same renamings and weight converters from_pretrained applies, e.g. per-expert hub tensors
`experts.3.gate_proj.weight` fused into 3-D `experts.gate_up_proj`), so no family knowledge lives
here. Only safetensors and JSON are read.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.mapped_pages import release_pages

log = logging.getLogger(__name__)

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (from its index when it has one)."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    indexes = [p for p in indexes if not p.name.startswith("quantized")] or indexes
    if indexes:
        try:
            wmap = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise QuantkitError(f"{indexes[0]} is not a valid safetensors index ({e})") from None
        files = sorted({folder / f for f in wmap.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
        plain = [f for f in files if f.name.count(".") == 1]  # drop variants such as x.fp16.safetensors
        files = plain or files
    if not files:
        raise QuantkitError(f"{folder} has no safetensors weights; layer streaming reads safetensors only")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise QuantkitError(f"weight file {missing[0]} named by the index is missing")
    return files


class SourceWeights:
    """Key -> file map of a model folder, with lazily opened readers."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.where: dict[str, Path] = {}
        self.dtypes: dict[str, torch.dtype | None] = {}
        for f in weight_files(folder):
            with self._open(f) as h:
                for k in h.keys():
                    self.where[k] = f
                    self.dtypes[k] = _DTYPES.get(h.get_slice(k).get_dtype())

    @staticmethod
    def _open(f: Path) -> Any:
        try:
            return safe_open(str(f), framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise QuantkitError(f"cannot read {f}: {str(e).splitlines()[0]}") from None

    def read(self, keys: list[str], own: bool = True) -> dict[str, torch.Tensor]:
        """The tensors `keys`; with `own`, each in its own fresh allocation, else views of the file's memory
        map (for a conversion that copies them anyway). Files are opened for this call only, so their maps
        (and the pages they pulled in) go away with the last tensor that uses them."""
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        out = {}
        for f, ks in by_file.items():
            try:
                with self._open(f) as h:
                    for k in ks:
                        t = h.get_tensor(k)
                        if own:  # clone: aligned, owned, not a view of the map; then the map's pages go
                            out[k] = t.clone()
                            release_pages(t)
                        else:
                            out[k] = t
            except (SafetensorError, OSError, RuntimeError) as e:
                raise QuantkitError(f"cannot read tensors of {f}: {str(e).splitlines()[0]}") from None
        return out

    def dtype(self) -> torch.dtype:
        """The checkpoint's floating dtype (the most common one among its tensors)."""
        counts = Counter(d for d in self.dtypes.values() if d is not None)
        if not counts:
            raise QuantkitError(f"{self.folder} holds no floating-point tensors")
        return counts.most_common(1)[0][0]


def _owner(key: str, prefixes: list[str]) -> str | None:
    for p in prefixes:
        if p == "" or key == p or key.startswith(p + "."):
            return p
    return None


class ModuleLoader:
    """Materializes the parameters of named submodules of a meta-device root from the source files."""

    def __init__(self, root: nn.Module, source: SourceWeights, dtype: torch.dtype) -> None:
        self.root, self.source, self.dtype = root, source, dtype
        # A rank of the expert split that holds only its own experts (quantkit.expert_shard) sets this:
        # per-expert source tensors of other experts are then not read into fused experts tensors.
        self.keep_expert: Callable[[int], bool] | None = None
        self._partial: set[str] = set()  # keys of fused experts tensors holding only the kept experts
        self.transformers = _is_transformers(root)
        self.targets: dict[str, list[str]] = {}  # model key -> checkpoint keys it is made from
        if self.transformers:
            self._map_transformers_keys()
        else:
            own = set(root.state_dict().keys())
            unexpected = [k for k in source.where if k not in own]
            if unexpected:
                raise QuantkitError(f"source tensor {unexpected[0]} is not a tensor of {type(root).__name__}")
            self.targets = {k: [k] for k in source.where}
        self._check_complete()

    def _check_complete(self) -> None:
        """Every parameter of the model has a source tensor (tied parameters: one of their names), checked
        before any block is read, so a broken checkpoint stops the run before it writes anything."""
        groups: dict[int, list[str]] = {}
        for name, p in self.root.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        for names in groups.values():
            if not any(n in self.targets for n in names):
                raise QuantkitError(f"tensor {names[0]} of {type(self.root).__name__} is missing from the source "
                                    f"checkpoint {self.source.folder}")

    def _map_transformers_keys(self) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.mapping = get_model_conversion_mapping(self.root)
        renamings = [m for m in self.mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        meta_sd = self.root.state_dict()
        for k in self.source.where:
            target, _ = rename_source_key(k, renamings, converters, self.root.base_model_prefix, meta_sd)
            if target not in meta_sd and k in meta_sd:
                target = k
            if target not in meta_sd:
                raise QuantkitError(f"source tensor {k} is not a tensor of {type(self.root).__name__}")
            self.targets.setdefault(target, []).append(k)

    def materialize(self, prefixes: list[str], exclude: list[str] | None = None) -> None:
        """Load every tensor under `prefixes` (but not under `exclude`) into the root, replacing meta tensors."""
        keys = [t for t in self.targets if _owner(t, prefixes) is not None
                and not (exclude and _owner(t, exclude) is not None)]
        if self.transformers:
            self._load_transformers(keys)
        else:
            for k, v in self.source.read(keys).items():
                self._set(k, v.to(self.dtype) if self.source.dtypes[k] else v)
        if self.transformers and getattr(self.root.config, "tie_word_embeddings", False):
            self.root.tie_weights()  # the hub stores a tied LM head once
        with torch.no_grad():
            for p in prefixes:
                mod = self.root.get_submodule(p) if p else self.root
                for name, t in list(mod.named_parameters(prefix=p)) + list(mod.named_buffers(prefix=p)):
                    if exclude and _owner(name, exclude) is not None:
                        continue
                    if t.is_meta:
                        raise QuantkitError(f"tensor {name} of {type(self.root).__name__} is missing from the "
                                            f"source checkpoint {self.source.folder}")

    def _set(self, key: str, value: torch.Tensor) -> None:
        path, _, leaf = key.rpartition(".")
        mod = self.root.get_submodule(path) if path else self.root
        ref = getattr(mod, leaf)
        if tuple(ref.shape) != tuple(value.shape):
            raise QuantkitError(f"source tensor {key} has shape {tuple(value.shape)}; the model expects {tuple(ref.shape)}")
        if leaf in mod._buffers:
            mod._buffers[leaf] = value
        else:
            mod._parameters[leaf] = nn.Parameter(value, requires_grad=ref.requires_grad)

    def _load_transformers(self, keys: list[str]) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        # Views of the files' maps: stacking per-expert tensors into fused experts copies them anyway;
        # whatever arrives unconverted is given its own memory below (_own_mapped).
        state = self.source.read([src for k in keys for src in self.targets[k]], own=False)
        if not state:
            return
        from transformers.utils import logging as hf_logging

        from quantkit.expert_merge import single_copy_mapping

        partial: list[int] = []  # data pointers of the fused tensors that hold only the kept experts
        cfg = LoadStateDictConfig(dtype=self.dtype, device_map={"": "cpu"},
                                  weight_mapping=single_copy_mapping(self.mapping, self.keep_expert, partial))
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one "Loading weights" bar per block would drown the CLI's own
        try:
            info, _ = convert_and_load_state_dict_in_model(self.root, state, cfg)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        if info.mismatched_keys:
            name, got, want = sorted(info.mismatched_keys)[0]
            raise QuantkitError(f"source tensor {name} has shape {tuple(got)}; the model expects {tuple(want)}")
        if info.conversion_errors:
            name = sorted(info.conversion_errors)[0]
            raise QuantkitError(f"source tensors of {name} could not be converted: {info.conversion_errors[name]}")
        del state
        if partial:
            for k in keys:
                path, _, leaf = k.rpartition(".")
                t = getattr(self.root.get_submodule(path) if path else self.root, leaf, None)
                if isinstance(t, torch.Tensor) and not t.is_meta and t.data_ptr() in partial:
                    self._partial.add(k)
        self._own_mapped(keys)

    def _own_mapped(self, keys: list[str]) -> None:
        """Parameters still backed by a file's memory map get their own aligned copy (a map's pages are
        not ours to keep, and CPU kernels can differ by an ulp with alignment)."""
        with torch.no_grad():
            for k in keys:
                path, _, leaf = k.rpartition(".")
                mod = self.root.get_submodule(path) if path else self.root
                t = getattr(mod, leaf, None)
                if isinstance(t, torch.Tensor) and not t.is_meta and not t.untyped_storage().resizable():
                    mapped = t.data
                    t.data = mapped.clone()
                    release_pages(mapped)

    def held(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors as this loader filled them: of a fused experts tensor holding only kept experts, the kept
        experts' slices (the others were never written and must not be read)."""
        for name, t in named_tensors:
            if name in self._partial and not t.is_meta:
                for e in range(t.shape[0]):
                    if self.keep_expert(e):
                        yield f"{name}[{e}]", t[e]
            else:
                yield name, t

    def release(self, prefix: str) -> None:
        """Hand a module's memory back: its tensors become meta tensors again."""
        mod = self.root.get_submodule(prefix) if prefix else self.root
        self._partial = {k for k in self._partial if _owner(k, [prefix]) is None}
        mod.to("meta")

    def release_outside(self, blocks: list[str]) -> None:
        """Hand back the tensors read from the source that lie outside `blocks` (embeddings, head, norms):
        they become meta tensors again and a later materialize reads them anew (and ties a tied head
        again). Tensors the model computes itself (e.g. rotary frequencies) are not in the source and stay."""
        released: set[int] = set()
        for key in self.targets:
            if _owner(key, blocks) is None:
                released.add(self._to_meta(key))
        # a tied LM head is the embedding's tensor under a second name the source does not store
        for key, t in list(self.root.named_parameters(remove_duplicate=False)):
            if _owner(key, blocks) is None and not t.is_meta and t.data_ptr() in released:
                self._to_meta(key)

    def _to_meta(self, key: str) -> int:
        """Replace one parameter or buffer by a meta tensor of its shape; returns the data pointer it had."""
        path, _, leaf = key.rpartition(".")
        mod = self.root.get_submodule(path) if path else self.root
        if mod._parameters.get(leaf) is not None:
            old = mod._parameters[leaf]
            mod._parameters[leaf] = nn.Parameter(torch.empty_like(old, device="meta"), old.requires_grad)
        elif mod._buffers.get(leaf) is not None:
            old = mod._buffers[leaf]
            mod._buffers[leaf] = torch.empty_like(old, device="meta")
        else:
            return 0
        return old.data_ptr()


def _is_transformers(root: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(root, PreTrainedModel)
