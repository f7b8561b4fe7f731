"""quantkit checkpoints: save and load (safetensors and JSON only; never pickle).

Layout (see docs/checkpoint-format.md):
  OUT/                      the source folder's own config / tokenizer / scheduler files
  OUT/quantization.json     format version, quantkit version, recipe, per-layer specs, calibration
  OUT/[component/]model.safetensors (transformers) or diffusion_pytorch_model.safetensors (diffusers),
                            or the library's usual shards + index
  OUT/[component/]config.json carries `quantization_config: {"quant_method": "quantkit", ...}`, so a
                            plain from_pretrained either loads through quantkit's registered quantizer
                            (after `import quantkit`) or refuses the unknown quant_method; never random weights.
Format version 1 (quantized*.safetensors, no quantization_config) still loads with quantkit.load.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from quantkit.config import ActivationConfig, Recipe
from quantkit.errors import QuantkitError
from quantkit.formats.spec import FormatSpec
from quantkit.layers import empty_quantized, set_submodule
from quantkit.models import LoadedModel, folder_kind
from quantkit.quantizers.step_clock import install_step_clock

log = logging.getLogger(__name__)

FORMAT_NAME = "quantkit-checkpoint"
FORMAT_VERSION = 2
QUANT_JSON = "quantization.json"
QUANT_METHOD = "quantkit"  # quantization_config.quant_method, registered with transformers and diffusers
# Weight file stems the libraries' own from_pretrained looks for (format version 2 on).
WEIGHT_STEMS = {"transformers-model": "model", "diffusers-model": "diffusion_pytorch_model",
                "pipeline": "diffusion_pytorch_model"}
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


def _is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")


def check_output_dir(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Fail early (before any work) if writing `out` would fail or destroy something (output_guard.py)."""
    from quantkit.output_guard import check_output_path

    check_output_path(Path(out), overwrite, source)


def _copy_source(src: Path, dst: Path, weights_dir: str | None) -> None:
    """Copy config/tokenizer/scheduler files; drop the weights of the quantized module."""

    def ignore(folder: str, names: list[str]) -> list[str]:
        rel = os.path.relpath(folder, src)
        rel = "" if rel == "." else rel
        return [n for n in names if _is_weight_file(n) and rel == (weights_dir or "")]

    shutil.copytree(src, dst, ignore=ignore)


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors sharing storage (tied weights): `tied` maps alias -> first name. Both are stored (the alias
    as a copy): transformers / diffusers from_pretrained must find every tensor it expects."""
    seen: dict[tuple, str] = {}
    out, tied = {}, {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if v.numel() and key in seen:
            tied[k] = seen[key]
            out[k] = v.detach().clone().cpu()
            continue
        seen[key] = k
        out[k] = v.detach().contiguous().cpu()
    return out, tied


def _write_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int, stem: str) -> list[str]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
        return [f"{stem}.safetensors"]
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return names


def save_checkpoint(loaded: LoadedModel, recipe: Recipe, result: Any, out: str | Path, *,
                    overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    source: Path | None = None) -> Path:
    """Write the quantized model atomically: a temp folder renamed into place when complete."""
    out = Path(out)
    check_output_dir(out, overwrite, source if source is not None else loaded.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if loaded.path is not None:
            _copy_source(loaded.path, tmp, loaded.component)
        else:
            tmp.mkdir(parents=True)
        wdir = tmp / loaded.component if loaded.component else tmp
        wdir.mkdir(parents=True, exist_ok=True)
        kind = folder_kind(loaded.path) if loaded.path else "model"
        state, tied = _dedupe(loaded.root.state_dict())
        if kind == "transformers-model":
            state.update(sentinel_tensors(loaded.root))
        files = _write_shards(state, wdir, max_shard_bytes, WEIGHT_STEMS.get(kind, "model"))
        write_quantization_config(wdir, quantization_config(result.layers, result.extras.get("attention", {})))
        meta = checkpoint_meta(loaded, recipe, result, files, tied)
        from quantkit.output_guard import written_files

        meta["files"] = sorted([*written_files(tmp), QUANT_JSON])  # what a later --overwrite may replace
        (tmp / QUANT_JSON).write_text(json.dumps(meta, indent=1))
        _replace_dir(tmp, out)
    except OSError as e:  # full disk, vanished folder, permissions changed mid-run
        shutil.rmtree(tmp, ignore_errors=True)
        raise QuantkitError(f"cannot write checkpoint {out}: {e.strerror or e}; nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def library_versions() -> dict[str, str]:
    """torch / transformers / diffusers / safetensors versions, recorded for reproducibility."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "diffusers", "safetensors", "quantkit"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def quantization_config(layers: dict[str, Any], attention: dict[str, Any]) -> dict[str, Any]:
    """The `quantization_config` of the quantized component's config.json: what quantkit's transformers /
    diffusers quantizers need to build the empty quantized modules before the weights are loaded."""
    import quantkit

    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "quantkit_version": quantkit.__version__,
            "layers": layers, "attention": attention}


def sentinel_tensors(root: nn.Module) -> dict[str, torch.Tensor]:
    """Zero-byte stand-ins under each quantized layer's original weight names, shaped like that weight with
    its last dimension 0. transformers skips a quant_method it does not know (a warning) and would load the
    folder with random weights; these names make it fail on a size mismatch instead. quantkit's quantizer
    ignores them, and transformers' own hub-name conversion can split / merge them like real weights."""
    from quantkit.layers import QUANT_MODULES
    from quantkit.nn import QuantConv2d, QuantExperts

    out = {}
    for name, m in root.named_modules():
        if not isinstance(m, QUANT_MODULES):
            continue
        if isinstance(m, QuantExperts):
            out[f"{name}.gate_up_proj"] = torch.zeros(*m.gate_up_shape[:-1], 0)
            out[f"{name}.down_proj"] = torch.zeros(*m.down_shape[:-1], 0)
        elif isinstance(m, QuantConv2d):
            out[f"{name}.weight"] = torch.zeros(*m.weight_shape[:-1], 0)
        else:
            out[f"{name}.weight"] = torch.zeros(m.out_features, 0)
    return out


def write_quantization_config(folder: Path, qconfig: dict[str, Any]) -> None:
    p = folder / "config.json"
    if not p.is_file():
        raise QuantkitError(f"{folder} has no config.json to carry the quantization_config")
    cfg = json.loads(p.read_text())
    cfg["quantization_config"] = qconfig
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def checkpoint_meta(loaded: LoadedModel, recipe: Recipe, result: Any, files: list[str],
                    tied: dict[str, str]) -> dict[str, Any]:
    """quantization.json's content."""
    import quantkit

    meta = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "quantkit_version": quantkit.__version__,
        "model": {"source": loaded.source, "kind": folder_kind(loaded.path) if loaded.path else "model",
                  "class": type(loaded.root).__name__, "component": loaded.component,
                  "adapter": loaded.adapter.name},
        "recipe": recipe.to_dict(), "layers": result.layers, "skipped": result.skipped,
        "calibration": result.calibration, "weights": {"files": files, "tied": tied},
        "seconds": round(result.seconds, 3), "versions": library_versions(),
    }
    clash = set(result.extras) & set(meta)
    if clash:
        raise QuantkitError(f"method records {sorted(clash)} clash with quantization.json's own keys")
    meta.update(result.extras)
    return meta


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        backup = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(backup)
        tmp.rename(out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        tmp.rename(out)


# ---------------------------------------------------------------------------------------------
def read_quant_json(ckpt: Path) -> dict[str, Any]:
    p = ckpt / QUANT_JSON
    if not p.is_file():
        raise QuantkitError(f"{ckpt} is not a quantkit checkpoint: {QUANT_JSON} is missing")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise QuantkitError(f"{p} is corrupted (not valid JSON: {e})") from None
    if meta.get("format") != FORMAT_NAME:
        raise QuantkitError(f"{p} is not a quantkit checkpoint description (format {meta.get('format')!r})")
    fv = meta.get("format_version")
    if not isinstance(fv, int) or isinstance(fv, bool) or fv < 1:
        raise QuantkitError(f"{p} has an unknown format_version {fv!r}; this quantkit reads 1 to {FORMAT_VERSION}")
    if fv > FORMAT_VERSION:
        raise QuantkitError(f"{ckpt} has format version {meta['format_version']}; this quantkit reads up to {FORMAT_VERSION}")
    for key, typ in (("model", dict), ("layers", dict), ("weights", dict)):
        if not isinstance(meta.get(key), typ):
            raise QuantkitError(f"{p} is incomplete: field {key!r} is missing or not a {typ.__name__}")
    if not isinstance(meta["weights"].get("files"), list) or "component" not in meta["model"] or "kind" not in meta["model"]:
        raise QuantkitError(f"{p} is incomplete: it needs weights.files, model.component and model.kind")
    return meta


def read_state(folder: Path, files: list[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of the checkpoint's safetensors files; a truncated or corrupted file is a clear error."""
    state: dict[str, torch.Tensor] = {}
    for name in files:
        p = folder / name
        if not p.is_file():
            raise QuantkitError(f"checkpoint file {p} is missing")
        try:
            with safe_open(str(p), framework="pt", device=device) as f:
                for k in f.keys():
                    # clone: a fresh, aligned allocation (mmap views can change BLAS results by an ulp)
                    state[k] = f.get_tensor(k).clone()
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise QuantkitError(f"checkpoint file {p} is truncated or corrupted ({str(e).splitlines()[0]})") from None
    return state


def _empty_root(folder: Path, kind: str, dtype: torch.dtype | None = None) -> nn.Module:
    """The model's architecture with parameters on the meta device (no memory, no init cost), in `dtype`
    (None: as the class builds it)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if kind in ("pipeline", "diffusers-model"):
            import diffusers

            cfg = json.loads((folder / "config.json").read_text())
            cls = getattr(diffusers, cfg["_class_name"])
            root = cls.from_config(cls.load_config(folder))
            return root.to(dtype) if dtype is not None else root
        from transformers import AutoConfig

        from quantkit.models import transformers_class

        cls = transformers_class(folder)
        cfg = AutoConfig.from_pretrained(folder)
        kw = {"dtype": dtype} if dtype is not None else {}
        root = cls.from_config(cfg, **kw) if hasattr(cls, "from_config") else cls._from_config(cfg, **kw)
    if getattr(root.config, "tie_word_embeddings", False):
        root.tie_weights()  # (outside init_empty_weights, where it has no effect): the hub stores a tied head once
    return root


def prepare_quantized_modules(root: nn.Module, layers: dict[str, Any], attention: dict[str, Any], where: Any) -> None:
    """Replace each recorded layer by an empty quantized module of the same geometry and install the
    recorded attention processors (before the checkpoint's tensors are assigned)."""
    for name, rec in layers.items():
        try:
            orig = root.get_submodule(name)
        except AttributeError:
            raise QuantkitError(f"{where}: quantized layer {name} is not in the model") from None
        act = ActivationConfig.from_dict(rec["activation"])
        set_submodule(root, name, empty_quantized(orig, rec["kind"], FormatSpec.from_dict(rec["weight"]), act, rec))
    for name, rec in attention.items():
        from quantkit.adapters.diffusers_attention import install_processor

        try:
            install_processor(root.get_submodule(name), rec)
        except AttributeError:
            raise QuantkitError(f"{where}: attention {name} is not in the model") from None


def load_quantized_root(ckpt: Path, meta: dict[str, Any], device: str = "cpu") -> nn.Module:
    comp = meta["model"]["component"]
    folder = ckpt / comp if comp else ckpt
    root = _empty_root(folder, meta["model"]["kind"])
    prepare_quantized_modules(root, meta["layers"], meta.get("attention", {}), ckpt)
    state = read_state(folder, meta["weights"]["files"], device)
    for alias, src in meta["weights"].get("tied", {}).items():
        state[alias] = state[src]
    for k in sentinel_tensors(root):
        if k in state and state[k].numel() == 0:
            del state[k]
    try:
        result = root.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # torch lists every size mismatch; name the first one
        import re

        m = re.search(r"size mismatch for ([^:]+): copying a param with shape (\S+ ?\S*) from checkpoint, the shape "
                      r"in current model is (\S+ ?\S*)\.", str(e))
        detail = (f"tensor {m.group(1)} has shape {m.group(2)} in the checkpoint, the model needs {m.group(3)}"
                  if m else str(e).splitlines()[0][:200])
        raise QuantkitError(f"{ckpt} does not match its quantization.json: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        bad = (result.missing_keys or result.unexpected_keys)[0]
        raise QuantkitError(f"{ckpt} does not match its quantization.json: tensor {bad} is "
                            f"{'missing' if result.missing_keys else 'unexpected'}")
    meta_left = [n for n, p in list(root.named_parameters()) + list(root.named_buffers()) if p.is_meta]
    if meta_left:
        raise QuantkitError(f"{ckpt}: tensor {meta_left[0]} was not filled by the checkpoint")
    root = root.to(device).eval()
    if torch.device(device).type == "cuda":  # repack for the kernels once; warn about every fallback
        from quantkit.kernels.prepare import prepare_for_cuda

        prepare_for_cuda(root)
    install_step_clock(root)
    from quantkit.nn import fill_dense

    fill_dense(root)
    # The library's own save_pretrained must write a folder that reloads the same (format 1 folders too:
    # this is their migration path to format 2).
    from quantkit.api import mark_quantized_config

    mark_quantized_config(root, meta["layers"], meta.get("attention", {}))
    return root


_BIASES = ("bias", "gate_up_bias", "down_bias")


def cast_full_precision(root: nn.Module, dtype: torch.dtype) -> None:
    """Cast what runs in the model's dtype (layers kept in full precision, norms, embeddings, the biases of
    quantized layers); codes, scales and activation quantizer state stay as stored."""
    from quantkit.layers import QUANT_MODULES

    quant = [n for n, m in root.named_modules() if isinstance(m, QUANT_MODULES)]
    with torch.no_grad():
        for name, m in root.named_modules():
            inside = any(name == q or name.startswith(q + ".") for q in quant)
            if inside and name not in quant:
                continue
            for pn, prm in m._parameters.items():
                if prm is not None and prm.is_floating_point() and not inside:
                    prm.data = prm.data.to(dtype)
            for bn, b in m._buffers.items():
                if b is not None and b.is_floating_point() and (not inside or bn in _BIASES):
                    m._buffers[bn] = b.to(dtype)


def load(path: str | Path, device: str = "cpu", dtype: Any = "auto") -> Any:
    """Load a quantkit checkpoint (or a plain model folder) as the class it was saved from.

    dtype: 'auto' keeps the stored dtype (the one the model was quantized in); bfloat16/float16/float32 (or
    a torch dtype) casts the full-precision parts, the way the model then runs."""
    from quantkit.models import resolve_dtype

    p = Path(path)
    if not p.exists():
        raise QuantkitError(f"checkpoint path {p} does not exist")
    if not (p / QUANT_JSON).exists():
        from quantkit.models import load_model

        return load_model(str(p), device, dtype).obj
    meta = read_quant_json(p)
    root = load_quantized_root(p, meta, device)
    if dtype != "auto":
        cast_full_precision(root, resolve_dtype(dtype, p))
    comp = meta["model"]["component"]
    if not comp:
        return root
    from quantkit.pipeline_load import load_pipeline_with

    kw = {"dtype": resolve_dtype(dtype, p)} if dtype != "auto" else {}
    return load_pipeline_with(p, comp, root, **kw).to(device)
