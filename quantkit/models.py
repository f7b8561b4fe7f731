"""Load what a user names as MODEL: a diffusers pipeline folder, a diffusers model folder, a
transformers folder, or zoo:NAME. Returns the object and the module that gets quantized."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from quantkit.adapters import ModelAdapter, adapter_for
from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)

# Pipeline components that are the denoiser, in the order they are looked for.
DENOISER_COMPONENTS = ("unet", "transformer")


@dataclass
class LoadedModel:
    """`obj` is what the user gets back (a pipeline or a model); `root` is the module quantized."""

    obj: Any
    source: str
    path: Path | None
    component: str | None  # pipeline attribute holding the root, None when obj is the root
    adapter: ModelAdapter
    tokenizer: Any = None

    @property
    def root(self) -> nn.Module:
        return getattr(self.obj, self.component) if self.component else self.obj

    def set_root(self, module: nn.Module) -> None:
        if self.component:
            setattr(self.obj, self.component, module)
        else:
            self.obj = module

    @property
    def is_pipeline(self) -> bool:
        return self.component is not None


def resolve_path(source: str) -> Path:
    """Local folder of `source` (zoo:NAME or a path), or a clear error."""
    if source.startswith("zoo:"):
        from quantkit.zoo import resolve

        return resolve(source[4:])
    p = Path(source)
    if not p.exists():
        raise QuantkitError(f"model path {source} does not exist; give a local model folder or zoo:NAME")
    if not p.is_dir():
        raise QuantkitError(f"model path {source} is not a folder; give a diffusers/transformers model folder or zoo:NAME")
    return p


def folder_kind(path: Path) -> str:
    """'pipeline', 'diffusers-model' or 'transformers-model'."""
    if (path / "model_index.json").is_file():
        return "pipeline"
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise QuantkitError(f"{cfg_file} is not valid JSON: {e}") from None
        except OSError as e:
            raise QuantkitError(f"cannot read {cfg_file}: {e.strerror or e}") from None
        if "_class_name" in cfg:
            return "diffusers-model"
        if "model_type" in cfg or "architectures" in cfg:
            return "transformers-model"
    raise QuantkitError(
        f"unknown model type in {path}: expected a diffusers pipeline (model_index.json), a diffusers model "
        "(config.json with _class_name) or a transformers model (config.json with model_type)"
    )


def _diffusers_class(name: str) -> type:
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise QuantkitError(f"diffusers has no class {name!r} (diffusers {diffusers.__version__})")
    return cls


DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}


def resolve_dtype(spec: Any, folder: Path) -> Any:
    """A torch dtype from 'auto' (the checkpoint's own floating dtype), a name, or a torch dtype."""
    import torch

    if isinstance(spec, torch.dtype):
        return spec
    if spec is None or spec == "auto":
        from quantkit.source_weights import SourceWeights, weight_files

        try:
            weight_files(folder)
        except QuantkitError:
            return torch.float32  # no safetensors here (e.g. a pipeline root): full precision
        return SourceWeights(folder).dtype()
    if spec not in DTYPES:
        raise QuantkitError(f"unknown dtype {spec!r}; allowed: auto, bfloat16, float16, float32")
    return getattr(torch, DTYPES[spec])


def denoiser_component(path: Path) -> str:
    """The pipeline component that is the denoiser, from model_index.json."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except json.JSONDecodeError as e:
        raise QuantkitError(f"{path / 'model_index.json'} is not valid JSON: {e}") from None
    comp = next((c for c in DENOISER_COMPONENTS if isinstance(index.get(c), list) and index[c][0]), None)
    if comp is None:
        raise QuantkitError(f"pipeline {path} has no denoiser component ({', '.join(DENOISER_COMPONENTS)})")
    return comp


def load_model(source: str, device: str = "cpu", dtype: Any = "auto") -> LoadedModel:
    """Load a full-precision model or pipeline from a local folder or the zoo, in `dtype` ('auto': the
    checkpoint's own, e.g. bf16 stays bf16; the weights are never upcast to a whole-model fp32 copy).

    The folder's safetensors headers are checked against its config first (source_check.py): a
    missing, unexpected or wrongly shaped tensor is an error here, not a randomly initialized layer.
    """
    from quantkit.source_check import check_finite, check_source_folder

    path = resolve_path(source)
    kind = folder_kind(path)
    check_source_folder(path)
    dtype = resolve_dtype(dtype, path / denoiser_component(path) if kind == "pipeline" else path)
    tokenizer = None
    component = None
    try:
        if kind == "pipeline":
            from diffusers import DiffusionPipeline

            obj = DiffusionPipeline.from_pretrained(path, local_files_only=True, dtype=dtype)
            component = next((c for c in DENOISER_COMPONENTS if getattr(obj, c, None) is not None), None)
            if component is None:
                raise QuantkitError(f"pipeline {path} has no denoiser component ({', '.join(DENOISER_COMPONENTS)})")
            obj.to(device)
        elif kind == "diffusers-model":
            cfg = json.loads((path / "config.json").read_text())
            obj, info = _diffusers_class(cfg["_class_name"]).from_pretrained(path, local_files_only=True,
                                                                             output_loading_info=True, dtype=dtype)
            _check_loading_info(path, info)
            obj = obj.to(device)
        else:
            qcfg = json.loads((path / "config.json").read_text()).get("quantization_config")
            obj, info = transformers_class(path).from_pretrained(path, local_files_only=True, output_loading_info=True,
                                                                 dtype=dtype, **_dequantizing_config(qcfg))
            _check_loading_info(path, info)
            obj = obj.to(device)
            tokenizer = load_tokenizer(path)
            if isinstance(qcfg, dict):  # e.g. gpt-oss as the hub ships it (MXFP4 experts)
                log.warning("%s is pre-quantized (%s): transformers dequantized it on load and quantkit requantizes "
                            "from those weights (their rounding error comes on top)", path, qcfg.get("quant_method"))
    except QuantkitError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise QuantkitError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from None
    except RuntimeError as e:  # transformers' conversion / size-mismatch errors point at a report we do not show
        raise QuantkitError(f"cannot load model from {path}: the weights do not fit the config "
                            f"({str(e).splitlines()[0][:200]}); run with -v for the library's load report") from None
    loaded = LoadedModel(obj, source, path, component, None, tokenizer)  # type: ignore[arg-type]
    own_tensors(loaded.root)
    for name, module in _modules_of(loaded):
        check_finite(module.state_dict().items(), f"{path}{'/' + name if name else ''}")
    loaded.adapter = adapter_for(loaded.root)
    loaded.root.eval()
    for name in _other_denoisers(loaded):  # e.g. Wan 2.2's transformer_2 (the low-noise steps' expert)
        log.warning("pipeline %s has a second denoiser, %r, next to %r: quantkit quantizes only %r, and %r stays "
                    "in full precision in the output (quantize %s/%s as a model of its own to cover it)",
                    path, name, component, component, name, path, name)
    return loaded


def _other_denoisers(loaded: "LoadedModel") -> list[str]:
    """Pipeline components other than the chosen denoiser that a diffusion adapter would quantize."""
    from quantkit.adapters import ADAPTERS

    if not loaded.is_pipeline:
        return []
    return [n for n, m in _modules_of(loaded) if n != loaded.component
            and any(cls.kind == "diffusion" and cls.matches(m) for cls in ADAPTERS)]


def _check_loading_info(path: Path, info: dict[str, Any]) -> None:
    """The library's own load report: anything missing, mismatched or unexpected is an error."""
    for key, what in (("missing_keys", "missing from the weights"), ("mismatched_keys", "of the wrong shape"),
                      ("unexpected_keys", "not a parameter of the model")):
        bad = sorted(info.get(key) or [])
        if bad:
            first = bad[0][0] if isinstance(bad[0], tuple) else bad[0]
            raise QuantkitError(f"cannot load model from {path}: tensor {first} is {what} "
                                f"({len(bad)} such tensors in the library's load report)")


def _dequantizing_config(qcfg: Any) -> dict[str, Any]:
    """from_pretrained kwargs that make transformers dequantize a pre-quantized MXFP4 source (gpt-oss as the hub
    ships it) on load: quantkit requantizes from those weights. Without it, transformers (>= 5.25, with the
    `kernels` package installed) would fetch its MXFP4 kernels from the hub, which a run never reaches."""
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "mxfp4":
        return {}
    from transformers import Mxfp4Config

    return {"quantization_config": Mxfp4Config(dequantize=True)}


def _modules_of(loaded: "LoadedModel") -> list[tuple[str, nn.Module]]:
    if not loaded.is_pipeline:
        return [("", loaded.obj)]
    comps = getattr(loaded.obj, "components", {}) or {}
    return [(n, m) for n, m in comps.items() if isinstance(m, nn.Module)]


def transformers_class(path: Path) -> Any:
    """The class named by config.json's `architectures` (e.g. CLIPModel), else AutoModelForCausalLM."""
    import transformers

    cfg = json.loads((path / "config.json").read_text())
    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    return cls if cls is not None and hasattr(cls, "from_pretrained") else transformers.AutoModelForCausalLM


def own_tensors(module: nn.Module) -> None:
    """Give every parameter and buffer its own aligned allocation.

    from_pretrained may leave tensors as views into a memory-mapped file at arbitrary offsets;
    CPU BLAS results can differ by an ulp with alignment, so a saved and reloaded model would not
    reproduce the in-memory one bit for bit.
    """
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.data = p.data.clone()
        for m in module.modules():
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = b.clone()


def load_tokenizer(path: Path) -> Any:
    """The folder's tokenizer, or None when it has none (byte ids are used then)."""
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        log.warning("tokenizer in %s could not be loaded (%s); using byte ids", path, str(e).splitlines()[0])
        return None
