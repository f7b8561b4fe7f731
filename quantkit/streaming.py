"""Layer streaming: quantize a model block by block straight from its safetensors, never holding
more than one block's weights (plus the parts outside blocks: embeddings, norms, heads).

The model is built on the meta device; `StreamSession` is the walk's BlockStream: `enter` reads a
block's tensors from the source files, `leave` (once every calibration call has passed the block)
appends the block's final tensors to the output shards and turns them back into meta tensors. The
output folder is written under a temporary name and renamed into place when complete.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.models import LoadedModel, denoiser_component, folder_kind, load_tokenizer, resolve_path, resolve_dtype
from quantkit.source_weights import ModuleLoader, SourceWeights

log = logging.getLogger(__name__)


def load_model_meta(source: str, dtype: Any = "auto") -> tuple[LoadedModel, ModuleLoader]:
    """The model (or pipeline) with its quantized root on the meta device, and the root's loader."""
    from quantkit.adapters import adapter_for
    from quantkit.io import _empty_root

    path = resolve_path(source)
    kind = folder_kind(path)
    component = denoiser_component(path) if kind == "pipeline" else None
    folder = path / component if component else path
    dtype = resolve_dtype(dtype, folder)
    weights = SourceWeights(folder)
    root = _empty_root(folder, "diffusers-model" if kind == "pipeline" else kind, dtype)
    root.eval()
    obj, tokenizer = root, None
    if component:
        from diffusers import DiffusionPipeline

        # The other components (text encoder, VAE, scheduler) are small next to the denoiser: loaded whole.
        obj = DiffusionPipeline.from_pretrained(path, local_files_only=True, dtype=dtype, **{component: root})
    elif kind == "transformers-model":
        tokenizer = load_tokenizer(path)
    loaded = LoadedModel(obj, source, path, component, adapter_for(root), tokenizer)
    return loaded, ModuleLoader(root, weights, dtype)


class ShardWriter:
    """Appends tensors to output shards; a shard is written when the next tensors would overflow it."""

    def __init__(self, folder: Path, max_shard_bytes: int) -> None:
        self.folder, self.max = folder, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[tuple[str, list[str]]] = []  # (temporary file name, keys)
        self.tied: dict[str, str] = {}
        self.total = 0

    def add(self, state: dict[str, torch.Tensor]) -> None:
        from quantkit.io import _dedupe

        state, tied = _dedupe(state)
        self.tied.update(tied)
        for k, v in state.items():
            nbytes = v.numel() * v.element_size()
            if self.pending and self.pending_bytes + nbytes > self.max:
                self._flush()
            self.pending[k] = v
            self.pending_bytes += nbytes
            self.total += nbytes

    def _flush(self) -> None:
        name = f"part-{len(self.parts):05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.parts.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Final names (quantized.safetensors, or quantized-0000i-of-0000n + index); returns the files."""
        from quantkit.io import INDEX_NAME, WEIGHTS_NAME

        if self.pending or not self.parts:
            self._flush()
        if len(self.parts) == 1:
            os.replace(self.folder / self.parts[0][0], self.folder / WEIGHTS_NAME)
            return [WEIGHTS_NAME]
        n = len(self.parts)
        names, weight_map = [], {}
        for i, (tmp, keys) in enumerate(self.parts):
            name = f"quantized-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        (self.folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": self.total},
                                                          "weight_map": weight_map}, indent=1))
        return names


class StreamSession:
    """The walk's BlockStream for a meta-device model (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, loader: ModuleLoader, out: str | Path, *, overwrite: bool = False,
                 max_shard_bytes: int = 2 * 1024**3) -> None:
        from quantkit.io import _copy_source, check_output_dir

        self.loaded, self.loader = loaded, loader
        self.out = Path(out)
        check_output_dir(self.out, overwrite)
        self.overwrite = overwrite
        self.block_names = [n for n, _ in loaded.adapter.blocks(loaded.root)]
        self.tmp = self.out.parent / f".{self.out.name}.tmp-stream"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _copy_source(loaded.path, self.tmp, loaded.component)
        self.wdir = self.tmp / loaded.component if loaded.component else self.tmp
        self.wdir.mkdir(parents=True, exist_ok=True)
        self.writer = ShardWriter(self.wdir, max_shard_bytes)
        self.loader.materialize([""], exclude=self.block_names)  # embeddings, norms, heads: small, needed throughout
        self.peak_block_bytes = 0

    def enter(self, name: str, module: nn.Module) -> None:
        self.loader.materialize([name])
        nbytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        self.peak_block_bytes = max(self.peak_block_bytes, nbytes)

    def leave(self, name: str, module: nn.Module) -> None:
        self.writer.add(module.state_dict(prefix=f"{name}."))
        self.loader.release(name)

    @contextlib.contextmanager
    def whole_model(self) -> Iterator[None]:
        """Every block materialized (a pipeline's calibration sampling runs the whole denoiser)."""
        log.warning("calibration sampling runs the whole denoiser: all its blocks are loaded for it "
                    "(give --calib FILE to keep memory at one block)")
        self.loader.materialize(self.block_names)
        try:
            yield
        finally:
            for n in self.block_names:
                self.loader.release(n)

    def finish(self, recipe: Any, result: Any) -> Path:
        """Write the parts outside blocks and quantization.json; rename the folder into place."""
        from quantkit.io import QUANT_JSON, _replace_dir, checkpoint_meta

        root = self.loaded.root
        rest = {k: v for k, v in root.state_dict().items()
                if not any(k.startswith(b + ".") for b in self.block_names)}
        metas = [k for k, v in rest.items() if v.is_meta]
        if metas:
            raise QuantkitError(f"tensor {metas[0]} was never materialized (streaming walk incomplete)")
        self.writer.add(rest)
        files = self.writer.finish()
        meta = checkpoint_meta(self.loaded, recipe, result, files, self.writer.tied)
        (self.tmp / QUANT_JSON).write_text(json.dumps(meta, indent=1))
        _replace_dir(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def quantize_streaming(source: str, recipe: Any, out: str | Path, *, dtype: Any = "auto", overwrite: bool = False,
                       max_shard_bytes: int = 2 * 1024**3, work_dir: str | Path | None = None,
                       **kwargs: Any) -> tuple[LoadedModel, Any]:
    """Quantize `source` block by block from its safetensors into the checkpoint folder `out`.

    kwargs go to pipeline.quantize_model (calib_prompts, calib_text, calib_steps, calls, progress).
    Returns the (meta-device) loaded model and the QuantizationResult."""
    from quantkit.pipeline import check_plan, quantize_model

    loaded, loader = load_model_meta(source, dtype)
    check_plan(loaded, recipe)
    session = StreamSession(loaded, loader, out, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
    try:
        result = quantize_model(loaded, recipe, stream=session, work_dir=work_dir, **kwargs)
        session.finish(recipe, result)
    except BaseException:
        session.abort()
        raise
    return loaded, result
