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
from typing import Any, Callable, Iterator

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.models import LoadedModel, denoiser_component, folder_kind, load_tokenizer, resolve_path, resolve_dtype
from quantkit.source_weights import ModuleLoader, SourceWeights

log = logging.getLogger(__name__)


def load_model_meta(source: str, dtype: Any = "auto") -> tuple[LoadedModel, ModuleLoader]:
    """The model (or pipeline) with its quantized root on the meta device, and the root's loader."""
    from quantkit.adapters import adapter_for
    from quantkit.io import _empty_root

    from quantkit.source_check import check_source_folder

    path = resolve_path(source)
    kind = folder_kind(path)
    check_source_folder(path)  # names, shapes and dtypes against the config, from the headers alone
    component = denoiser_component(path) if kind == "pipeline" else None
    folder = path / component if component else path
    _refuse_prequantized(folder)
    dtype = resolve_dtype(dtype, folder)
    weights = SourceWeights(folder)
    root = _empty_root(folder, "diffusers-model" if kind == "pipeline" else kind, dtype)
    root.eval()
    obj, tokenizer = root, None
    if component:
        from quantkit.pipeline_load import load_pipeline_with

        # The other components (text encoder, VAE, scheduler) are small next to the denoiser: loaded whole.
        obj = load_pipeline_with(path, component, root, dtype=dtype)
    elif kind == "transformers-model":
        tokenizer = load_tokenizer(path)
    loaded = LoadedModel(obj, source, path, component, adapter_for(root), tokenizer)
    return loaded, ModuleLoader(root, weights, dtype)


def _refuse_prequantized(folder: Path) -> None:
    """Streaming reads source tensors as stored; a pre-quantized source (e.g. gpt-oss's MXFP4 experts) holds its
    quantizer's tensors, which only the library's own loader dequantizes."""
    cfg = folder / "config.json"
    qcfg = json.loads(cfg.read_text()).get("quantization_config") if cfg.is_file() else None
    if isinstance(qcfg, dict):
        raise QuantkitError(f"--stream cannot read the pre-quantized source {folder} (quant_method "
                            f"{qcfg.get('quant_method')!r}): its tensors are its quantizer's; run without --stream")


ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


class _Shard:
    """One safetensors file written as tensors arrive. The header must come first but is known only at the
    end: with `reserve` bytes kept for it, tensor bytes go straight into the file after that gap and the
    header is padded into it at close (safetensors allows trailing spaces in the header); without, or when
    the header outgrows the gap, the bytes go to a side file that is appended after the header at close."""

    def __init__(self, folder: Path, name: str, reserve: int = 0) -> None:
        self.path = folder / name
        self.reserve = reserve
        self.data_path = self.path if reserve else folder / (name + ".data")
        self.data = open(self.data_path, "wb")
        if reserve:
            self.data.seek(8 + reserve)
        self.header: dict[str, Any] = {}
        self.size = 0

    def add(self, key: str, t: torch.Tensor, rows: Callable[[int], bool] | None = None) -> tuple[str, int]:
        """Append `t`; returns the file its bytes go to and their offset there. With `rows`, only the rows of
        t [E, ...] it accepts are written and the others left as a hole, which other ranks fill
        (quantkit.expert_shard.ExpertShard.write_rows) before the shard is closed."""
        if t.dtype not in ST_DTYPES:
            raise QuantkitError(f"tensor {key} has dtype {t.dtype}, which safetensors cannot store")
        t = t.detach().contiguous().cpu()
        n = t.numel() * t.element_size()
        start = (8 + self.reserve if self.reserve else 0) + self.size
        if n and rows is None:
            self.data.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        elif n:
            row = n // t.shape[0]
            for e in range(t.shape[0]):
                if rows(e):
                    self.data.seek(start + e * row)
                    self.data.write(memoryview(t[e].reshape(-1).view(torch.uint8).numpy()))
            self.data.seek(start + n)
        self.header[key] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                            "data_offsets": [self.size, self.size + n]}
        self.size += n
        return str(self.data_path), start

    def close(self) -> None:
        head = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        head += b" " * ((-len(head)) % 8)
        if self.reserve and len(head) <= self.reserve:
            self.data.seek(0)
            self.data.write(self.reserve.to_bytes(8, "little"))
            self.data.write(head + b" " * (self.reserve - len(head)))
            self.data.close()
            return
        self.data.close()
        src = self.data_path
        if self.reserve:  # the header outgrew its gap: move the bytes behind a header of the right size
            src = self.path.with_name(self.path.name + ".data")
            os.replace(self.path, src)
        with open(self.path, "wb") as out, open(src, "rb") as data:
            out.write(len(head).to_bytes(8, "little"))
            out.write(head)
            data.seek(8 + self.reserve if self.reserve else 0)
            shutil.copyfileobj(data, out, 16 * 1024 * 1024)
        src.unlink()


class ShardWriter:
    """Appends tensors to output shards as they come (nothing is held in memory); a new shard starts when
    the next tensor would overflow the current one."""

    def __init__(self, folder: Path, max_shard_bytes: int, stem: str = "model", reserve_header: int = 0) -> None:
        self.folder, self.max, self.stem, self.reserve = folder, max_shard_bytes, stem, reserve_header
        self.shards: list[_Shard] = []
        self.tied: dict[str, str] = {}
        self.total = 0
        self.pending_bytes = 0  # kept for accounting; tensors go to disk at once

    def add(self, state: dict[str, torch.Tensor], rows: dict[str, Callable[[int], bool]] | None = None
            ) -> dict[str, tuple[str, int]]:
        """Append `state`; `rows`: key -> the rows of that tensor this process writes (see _Shard.add). Returns
        where those tensors lie: key -> (file, byte offset)."""
        from quantkit.io import _dedupe

        state, tied = _dedupe(state)
        self.tied.update(tied)
        rows = rows or {}
        where = {}
        for k, v in state.items():
            nbytes = v.numel() * v.element_size()
            if not self.shards or (self.shards[-1].header and self.shards[-1].size + nbytes > self.max):
                if self.shards:
                    self.shards[-1].close()
                self.shards.append(_Shard(self.folder, f"part-{len(self.shards):05d}.safetensors", self.reserve))
            at = self.shards[-1].add(k, v, rows.get(k))
            if k in rows:
                where[k] = at
            self.total += nbytes
        return where

    def finish(self) -> list[str]:
        """Final names (STEM.safetensors, or STEM-0000i-of-0000n + STEM.safetensors.index.json, as the
        libraries name them); returns the files."""
        if not self.shards:
            self.shards.append(_Shard(self.folder, "part-00000.safetensors"))
        self.shards[-1].close()
        if len(self.shards) == 1:
            os.replace(self.shards[0].path, self.folder / f"{self.stem}.safetensors")
            return [f"{self.stem}.safetensors"]
        n = len(self.shards)
        names, weight_map = [], {}
        for i, sh in enumerate(self.shards):
            name = f"{self.stem}-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(sh.path, self.folder / name)
            names.append(name)
            weight_map.update({k: name for k in sh.header})
        (self.folder / f"{self.stem}.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": self.total},
                                                          "weight_map": weight_map}, indent=1))
        return names


_HEADER_RESERVE = 1 << 20
_RESERVE_FROM_BYTES = 256 * 1024**2


def release_freed_memory() -> None:
    """Ask glibc to hand freed heap pages back to the system (blocks come and go; without this the
    process keeps their high-water mark). A no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class StreamSession:
    """The walk's BlockStream for a meta-device model (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, loader: ModuleLoader, out: str | Path, *, overwrite: bool = False,
                 max_shard_bytes: int = 2 * 1024**3) -> None:
        from quantkit.io import _copy_source, check_output_dir

        self.loaded, self.loader = loaded, loader
        self.out = Path(out)
        check_output_dir(self.out, overwrite, loaded.path)
        self.overwrite = overwrite
        self.block_names = [n for n, _ in loaded.adapter.blocks(loaded.root)]
        self.tmp = self.out.parent / f".{self.out.name}.tmp-stream"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _copy_source(loaded.path, self.tmp, loaded.component)
        self.wdir = self.tmp / loaded.component if loaded.component else self.tmp
        self.wdir.mkdir(parents=True, exist_ok=True)
        from quantkit.io import WEIGHT_STEMS

        self.kind = folder_kind(loaded.path) if loaded.path else "model"
        # Real-size sources: keep 1 MiB for each shard's header so tensor bytes are written once, in place
        # (a few hundred bytes a tensor); small ones are not worth the padding.
        big = sum(f.stat().st_size for f in set(loader.source.where.values())) >= _RESERVE_FROM_BYTES
        self.writer = ShardWriter(self.wdir, max_shard_bytes, WEIGHT_STEMS.get(self.kind, "model"),
                                  reserve_header=_HEADER_RESERVE if big else 0)
        self.peak_block_bytes = 0
        self._outside_loaded = False
        self.expert_shard = None  # a rank of the expert split that keeps only its experts' rows (pipeline sets it)

    def outside(self) -> None:
        """Embeddings, norms, heads: read only when first needed (the first calibration forward, the layers
        outside blocks, the final write), not held beside every block (a large vocabulary's embedding and
        head can outweigh a block)."""
        if self._outside_loaded:
            return
        from quantkit.source_check import check_finite

        self.loader.materialize([""], exclude=self.block_names)
        check_finite(self.loaded.root.state_dict().items(), str(self.loaded.path))  # (blocks: as they come)
        self._outside_loaded = True

    def release_outside(self) -> None:
        """Give the parts outside blocks back (read again when next needed, e.g. by the final write)."""
        if self._outside_loaded:
            self.loader.release_outside(self.block_names)
            self._outside_loaded = False
            release_freed_memory()

    def enter(self, name: str, module: nn.Module) -> None:
        from quantkit.source_check import check_finite

        self.loader.materialize([name])
        check_finite(self.loader.held(module.state_dict(prefix=f"{name}.").items()), str(self.loaded.path))
        release_freed_memory()  # the conversion's temporaries
        nbytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        self.peak_block_bytes = max(self.peak_block_bytes, nbytes)

    def leave(self, name: str, module: nn.Module) -> None:
        state = module.state_dict(prefix=f"{name}.")
        shard = self.expert_shard
        split = shard.split_keys(module, f"{name}.") if shard is not None else {}
        where = self.writer.add(state, {k: shard.owns for k in split})
        if split:  # the other ranks' rows of the split experts go into the same file (quantkit.expert_shard)
            shard.write_rows(where, state)
        del state
        self.loader.release(name)
        for m in module.modules():  # dense dequantized copies quantized layers keep for the CPU path (nn.py)
            m.__dict__.pop("_dequant_cache", None)
        release_freed_memory()

    @contextlib.contextmanager
    def whole_model(self) -> Iterator[None]:
        """Every block materialized (a pipeline's calibration sampling runs the whole denoiser)."""
        log.warning("calibration sampling runs the whole denoiser: all its blocks are loaded for it "
                    "(give --calib FILE to keep memory at one block)")
        self.outside()
        self.loader.materialize(self.block_names)
        try:
            yield
        finally:
            for n in self.block_names:
                self.loader.release(n)

    def finish(self, recipe: Any, result: Any) -> Path:
        """Write the parts outside blocks and quantization.json; rename the folder into place."""
        from quantkit.io import (QUANT_JSON, _replace_dir, checkpoint_meta, quantization_config, sentinel_tensors,
                                 write_quantization_config)
        from quantkit.output_guard import written_files

        self.outside()
        root = self.loaded.root
        rest = {k: v for k, v in root.state_dict().items()
                if not any(k.startswith(b + ".") for b in self.block_names)}
        metas = [k for k, v in rest.items() if v.is_meta]
        if metas:
            raise QuantkitError(f"tensor {metas[0]} was never materialized (streaming walk incomplete)")
        if self.kind == "transformers-model":  # zero-byte stand-ins: a plain load without quantkit fails loudly
            rest.update(sentinel_tensors(root))
        self.writer.add(rest)
        files = self.writer.finish()
        write_quantization_config(self.wdir, quantization_config(result.layers, result.extras.get("attention", {})))
        meta = checkpoint_meta(self.loaded, recipe, result, files, self.writer.tied)
        meta["files"] = sorted([*written_files(self.tmp), QUANT_JSON])  # what a later --overwrite may replace
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
