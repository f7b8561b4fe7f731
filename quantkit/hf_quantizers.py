"""quantkit's quantizer for transformers' and diffusers' `from_pretrained` (`quant_method: "quantkit"`).

A quantkit checkpoint's quantized component carries `quantization_config` (the per-layer records of
quantization.json). Before the weights are loaded, the quantizer replaces every recorded layer by an
empty QuantLinear / QuantConv2d / QuantExperts / QuantRouter (rotations and DGQ quantizers included) and
installs recorded attention processors; the libraries then assign the checkpoint's tensors by name.
Registration is done by quantkit/registration.py when transformers / diffusers are imported.
"""
from __future__ import annotations

import logging
from enum import Enum
from typing import Any

from torch import nn

from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)


class QuantMethod(str, Enum):
    # diffusers reads `quant_method.value`; the member's name equals its value so that it hashes and
    # compares like the plain string "quantkit" in the libraries' mappings.
    quantkit = "quantkit"


_CLASSES: dict[str, type] = {}  # the registered transformers config / quantizer classes


def _prepare(model: nn.Module, cfg: Any) -> None:
    import re

    from quantkit.io import prepare_quantized_modules, sentinel_tensors

    prepare_quantized_modules(model, cfg.layers, cfg.attention or {}, f"{type(model).__name__}.from_pretrained")
    from quantkit.layers import QUANT_MODULES

    for m in model.modules():  # transformers must not run its weight init on them (e.g. a QuantRouter's
        if isinstance(m, QUANT_MODULES):  # inner router has no weight): every tensor comes from the checkpoint
            for sub in m.modules():
                sub._is_hf_initialized = True
    if hasattr(model, "_keys_to_ignore_on_load_unexpected"):  # transformers: the zero-byte sentinels
        names = {rf"^{re.escape(k)}$" for k in sentinel_tensors(model)}
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | names


def attach_transformers_quantizer(model: nn.Module, qconfig: dict[str, Any]) -> None:
    """Give a quantized transformers model (from quantkit.load / quantkit.quantize) quantkit's quantizer, as
    from_pretrained would, so that its save_pretrained writes a folder that reloads the same."""
    register_transformers()
    cfg = _CLASSES["config"](**qconfig)
    model.config.quantization_config = cfg
    model.hf_quantizer = _CLASSES["quantizer"](cfg, pre_quantized=True)


def _finish(model: nn.Module, cfg: Any) -> None:
    """Refuse a model some of whose quantized tensors the checkpoint did not fill (never random weights)."""
    from quantkit.layers import QUANT_MODULES
    from quantkit.quantizers.step_clock import install_step_clock

    left = [f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, QUANT_MODULES)
            for b, t in m.named_buffers(recurse=False) if t is not None and t.is_meta]
    if left:
        raise QuantkitError(f"quantized tensor {left[0]} was not in the checkpoint ({len(left)} missing)")
    install_step_clock(model)
    from quantkit.nn import fill_dense

    fill_dense(model)
    model.eval()


def _config_fields(self: Any, layers: dict | None, attention: dict | None, format_version: int | None,
                   quantkit_version: str | None) -> None:
    if not layers:
        raise QuantkitError("quantization_config with quant_method 'quantkit' lists no quantized layers")
    self.quant_method = "quantkit"
    self.layers = layers
    self.attention = attention or {}
    self.format_version = format_version
    self.quantkit_version = quantkit_version


def _config_dict(self: Any) -> dict[str, Any]:
    return {"quant_method": "quantkit", "format_version": self.format_version,
            "quantkit_version": self.quantkit_version, "layers": self.layers, "attention": self.attention}


def register_transformers() -> None:
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              register_quantization_config, register_quantizer)
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if "quantkit" in AUTO_QUANTIZER_MAPPING:
        if "quantizer" not in _CLASSES:
            _CLASSES.update(config=AUTO_QUANTIZATION_CONFIG_MAPPING["quantkit"], quantizer=AUTO_QUANTIZER_MAPPING["quantkit"])
        return

    class QuantkitConfig(QuantizationConfigMixin):
        """transformers' view of a quantkit checkpoint's quantization_config."""

        def __init__(self, layers: dict | None = None, attention: dict | None = None, format_version: int | None = None,
                     quantkit_version: str | None = None, quant_method: str = "quantkit", **kwargs: Any) -> None:
            _config_fields(self, layers, attention, format_version, quantkit_version)

        def to_dict(self) -> dict[str, Any]:
            return _config_dict(self)

        def to_diff_dict(self) -> dict[str, Any]:
            return _config_dict(self)

    class QuantkitHfQuantizer(HfQuantizer):
        """Loads quantkit checkpoints (pre-quantized only: quantkit quantizes through its own pipeline)."""

        requires_calibration = True

        def _process_model_before_weight_loading(self, model, **kwargs):
            _prepare(model, self.quantization_config)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            _finish(model, self.quantization_config)
            return model

        def is_serializable(self) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

        def get_state_dict_and_metadata(self, model):
            from quantkit.io import _dedupe, sentinel_tensors

            state, _ = _dedupe(model.state_dict())  # tensors shared in memory (q/k/v rotations) saved as copies
            state.update(sentinel_tensors(model))
            return state, {}

    _CLASSES.update(config=QuantkitConfig, quantizer=QuantkitHfQuantizer)
    if "quantkit" not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config("quantkit")(QuantkitConfig)
    register_quantizer("quantkit")(QuantkitHfQuantizer)


def register_diffusers() -> None:
    # diffusers (0.42) has no public registration call: its two mappings are the registry.
    from diffusers.quantizers import auto
    from diffusers.quantizers.base import DiffusersQuantizer
    from diffusers.quantizers.quantization_config import QuantizationConfigMixin

    if "quantkit" in auto.AUTO_QUANTIZER_MAPPING:
        return

    class QuantkitDiffusersConfig(QuantizationConfigMixin):
        def __init__(self, layers: dict | None = None, attention: dict | None = None, format_version: int | None = None,
                     quantkit_version: str | None = None, quant_method: str = "quantkit", **kwargs: Any) -> None:
            _config_fields(self, layers, attention, format_version, quantkit_version)
            self.quant_method = QuantMethod.quantkit

        def to_dict(self) -> dict[str, Any]:
            return _config_dict(self)

        def to_diff_dict(self) -> dict[str, Any]:
            return _config_dict(self)

    class QuantkitDiffusersQuantizer(DiffusersQuantizer):
        requires_calibration = True

        def check_if_quantized_param(self, model, param, param_name: str, *args: Any, **kwargs: Any) -> bool:
            # quantkit's tensors are plain buffers that diffusers assigns as they are, except those whose
            # shape was fixed by calibration (DGQ / log2-attention quantizers start empty): those are
            # taken over here with the checkpoint's shape.
            owner, _, name = param_name.rpartition(".")
            buf = model.get_submodule(owner)._buffers.get(name) if owner else None
            return buf is not None and tuple(buf.shape) != tuple(param.shape)

        def check_quantized_param_shape(self, *args: Any, **kwargs: Any) -> bool:
            return True

        def create_quantized_param(self, model, param, param_name: str, param_device, *args: Any, **kwargs: Any):
            owner, _, name = param_name.rpartition(".")
            device = param_device if isinstance(param_device, (str, int)) or param_device is None else param_device
            model.get_submodule(owner)._buffers[name] = param.to("cpu" if device is None else device)

        def _process_model_before_weight_loading(self, model, **kwargs):
            _prepare(model, self.quantization_config)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            _finish(model, self.quantization_config)
            return model

        @property
        def is_serializable(self) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    auto.AUTO_QUANTIZATION_CONFIG_MAPPING["quantkit"] = QuantkitDiffusersConfig
    auto.AUTO_QUANTIZER_MAPPING["quantkit"] = QuantkitDiffusersQuantizer
