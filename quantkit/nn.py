"""Quantized modules with plain registered buffers (no tensor subclasses).

QuantLinear and QuantConv2d replace nn.Linear / nn.Conv2d; QuantExperts replaces transformers'
fused 3-D expert modules (gate_up_proj [E, 2I, H], down_proj [E, H, I]) with per-expert scales.
Buffers: `qweight` (packed uint8 codes), `scale`, optional `zero`, optional `bias`, and the
activation quantizer's buffers under `act.`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quantkit import kernels
from quantkit.formats import integer
from quantkit.formats.packing import packed_len
from quantkit.formats.qweight import WEIGHT_SCALE_DTYPE, QuantizedWeight
from quantkit.formats.spec import FormatSpec
from quantkit.quantizers.activation import ActQuantizer


def _empty_qweight_buffers(module: nn.Module, shape: tuple[int, ...], spec: FormatSpec, prefix: str = "") -> None:
    """Register zero-filled buffers of the right shapes (filled later by load_state_dict)."""
    spec.check_k(shape[-1])
    module.register_buffer(prefix + "qweight", torch.zeros(*shape[:-1], packed_len(shape[-1], spec.bits), dtype=torch.uint8))
    sshape = integer.scale_shape(shape, spec)
    if spec.kind == "mxfp4":
        # duquantpp_log8 stores fp32 scale values (see formats/mxfp4.duquantpp_log8_scales), others E8M0 codes.
        sdtype = torch.float32 if spec.scale_mode == "duquantpp_log8" else torch.uint8
        module.register_buffer(prefix + "scale", torch.zeros(*shape[:-1], shape[-1] // 32, dtype=sdtype))
    else:
        module.register_buffer(prefix + "scale", torch.ones(sshape, dtype=WEIGHT_SCALE_DTYPE))
    zero = torch.zeros(sshape, dtype=torch.uint8) if spec.kind == "int" and not spec.symmetric else None
    module.register_buffer(prefix + "zero", zero)


def _rows_of(t: torch.Tensor, rows: Callable[[int], bool] | None) -> torch.Tensor:
    """A copy of `t` [E, ...], or of the rows `rows` accepts (the others left unwritten)."""
    if rows is None:
        return t.clone()
    out = torch.empty_like(t)
    for e in range(t.shape[0]):
        if rows(e):
            out[e] = t[e]
    return out


def _assign(module: nn.Module, qw: QuantizedWeight, prefix: str = "") -> None:
    module._buffers.pop(prefix + "dense", None)  # new codes: a dense copy filled at load is stale
    setattr(module, prefix + "qweight", qw.packed)
    setattr(module, prefix + "scale", qw.scale)
    if qw.zero is not None:
        setattr(module, prefix + "zero", qw.zero)


def _view(module: nn.Module, shape: tuple[int, ...], spec: FormatSpec, prefix: str = "") -> QuantizedWeight:
    cache = None
    if module.cache_dequantized:
        cache = module.__dict__.setdefault("_dequant_cache", {}).setdefault(prefix, {})
    kcache = module.__dict__.setdefault("_kernel_cache", {}).setdefault(prefix, {})
    return QuantizedWeight(getattr(module, prefix + "qweight"), getattr(module, prefix + "scale"),
                           getattr(module, prefix + "zero"), shape, spec, cache,
                           dense=module._buffers.get(prefix + "dense"), kernel_cache=kcache)


def fill_dense(root: nn.Module) -> int:
    """Store each CPU quantized module's dequantized weight (fp32) as a non-persistent buffer `dense` /
    `gate_up_dense` / `down_dense`, once, when a checkpoint is loaded: the reference path then reads it with
    no per-call cache check (torch.compile-friendly). Never saved; dropped when the codes are reassigned.
    Returns the number of modules filled."""
    n = 0
    for m in root.modules():
        if not isinstance(m, _QuantModule) or not m.cache_dequantized:
            continue
        prefixes = ("gate_up_", "down_") if isinstance(m, QuantExperts) else ("",)
        for prefix in prefixes:
            qw = getattr(m, prefix.rstrip("_") or "quantized_weight") if prefix else m.quantized_weight
            if qw.packed.device.type != "cpu":  # CUDA uses the Triton kernels: no dense copy
                continue
            m._buffers.pop(prefix + "dense", None)
            dense = QuantizedWeight(qw.packed, qw.scale, qw.zero, qw.shape, qw.spec).dequantize(torch.float32)
            m.register_buffer(prefix + "dense", dense, persistent=False)
            n += 1
    return n


def _reference_on_cpu(module: nn.Module, x: torch.Tensor) -> bool:
    # On CPU with the automatic backend, kernels' dispatch always picks the pure-torch reference; calling
    # it directly keeps dispatch's probes (triton availability, logging) out of a compiled graph.
    return module.kernel_backend == "auto" and not x.is_cuda


class WeightView:
    """What model code may read of a replaced layer's `.weight` (`dtype`, `device`, `shape`; e.g. Hunyuan's
    router checks `wg.weight.dtype`) without materializing it; `dequantize()` gives the dense weight."""

    def __init__(self, module: "_QuantModule", shape: tuple[int, ...]) -> None:
        self._module, self.shape = module, torch.Size(shape)

    @property
    def dtype(self) -> torch.dtype:
        return self._module.compute_dtype

    @property
    def device(self) -> torch.device:
        return self._module.qweight.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, d: int | None = None):
        return self.shape if d is None else self.shape[d]

    def numel(self) -> int:
        return self.shape.numel()

    def dequantize(self) -> torch.Tensor:
        return self._module.quantized_weight.dequantize(self.dtype).reshape(self.shape)

    def __repr__(self) -> str:
        return f"WeightView(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class _QuantModule(nn.Module):
    # The pure-torch CPU path keeps one dense copy of the dequantized weight per module instead of
    # unpacking codes on every call: faster, at the cost of that copy's memory. Set False to save it.
    # On CUDA there is no dense copy; the kernels keep a repacked copy of the codes (kernels/repack.py).
    cache_dequantized = True
    # The dtype the replaced layer's weight had (what `.weight.dtype` answers); follows .to(dtype) / .half().
    compute_dtype = torch.float32

    def _apply(self, fn, recurse=True):  # noqa: ANN001
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return super()._apply(fn, recurse)


class QuantLinear(_QuantModule):
    """y = quant_act(x) @ dequant(W)^T + b through quantkit.kernels.qlinear."""

    def __init__(self, in_features: int, out_features: int, bias: bool, wspec: FormatSpec,
                 act: ActQuantizer | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.wspec = wspec
        _empty_qweight_buffers(self, (out_features, in_features), wspec)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.act = act
        self.kernel_backend = "auto"
        self.rotation: nn.Module | None = None  # OnlineRotation (DuQuant / DuQuant++), set by the method
        self.compute_dtype = dtype

    @property
    def weight(self) -> WeightView:
        return WeightView(self, (self.out_features, self.in_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear, wspec: FormatSpec, act: ActQuantizer | None = None,
                    qweight: QuantizedWeight | None = None) -> "QuantLinear":
        """Quantize `linear` by round-to-nearest, or take an already quantized weight."""
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, wspec, act, linear.weight.dtype)
        qw = qweight if qweight is not None else QuantizedWeight.quantize(linear.weight.detach(), wspec)
        _assign(q, qw)
        if linear.bias is not None:
            q.bias = linear.bias.detach().clone()
        return q.to(linear.weight.device)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return _view(self, (self.out_features, self.in_features), self.wspec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rotation = None
        if self.rotation is not None:
            # A lone 32-block rotation goes to the kernels (fused before MXFP4 quantization).
            rotation = self.rotation.fused_rotation()
            if rotation is None:
                x = self.rotation(x)
        act = self.act
        if act is not None and not isinstance(act, ActQuantizer):
            # Group activation quantizers (DGQ) vary their scale along K: no integer GEMM can take them,
            # so the input is quantized here and the weight-only kernel does the matmul.
            x, act = act(x), None
        if _reference_on_cpu(self, x):
            return kernels.qlinear_reference(x, self.quantized_weight, self.bias, act, rotation)
        return kernels.qlinear(x, self.quantized_weight, self.bias, act, self.kernel_backend, rotation)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, w={self.wspec.short}"


class QuantConv2d(_QuantModule):
    """Conv2d with a weight quantized along (in_channels/groups * kh * kw)."""

    def __init__(self, conv_args: dict, bias: bool, wspec: FormatSpec, act: ActQuantizer | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.conv_args = dict(conv_args)
        o, i, kh, kw = self.weight_shape
        self.wspec = wspec
        _empty_qweight_buffers(self, (o, i * kh * kw), wspec)
        self.register_buffer("bias", torch.zeros(o, dtype=dtype) if bias else None)
        self.act = act
        self.kernel_backend = "auto"
        self.compute_dtype = dtype

    @property
    def weight(self) -> WeightView:
        return WeightView(self, self.weight_shape)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        a = self.conv_args
        kh, kw = a["kernel_size"]
        return a["out_channels"], a["in_channels"] // a["groups"], kh, kw

    @staticmethod
    def conv_args_of(conv: nn.Conv2d) -> dict:
        return {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
                "kernel_size": tuple(conv.kernel_size), "stride": tuple(conv.stride),
                "padding": conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
                "dilation": tuple(conv.dilation), "groups": conv.groups}

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, wspec: FormatSpec, act: ActQuantizer | None = None,
                  qweight: QuantizedWeight | None = None) -> "QuantConv2d":
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported; allowed: zeros")
        q = cls(cls.conv_args_of(conv), conv.bias is not None, wspec, act, conv.weight.dtype)
        w2d = conv.weight.detach().reshape(conv.out_channels, -1)
        _assign(q, qweight if qweight is not None else QuantizedWeight.quantize(w2d, wspec))
        if conv.bias is not None:
            q.bias = conv.bias.detach().clone()
        return q.to(conv.weight.device)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        o, i, kh, kw = self.weight_shape
        return _view(self, (o, i * kh * kw), self.wspec)

    def _is_pointwise(self) -> bool:
        a = self.conv_args
        return (a["kernel_size"] == (1, 1) and a["stride"] == (1, 1) and a["groups"] == 1
                and a["padding"] in ((0, 0), "valid") and a["dilation"] == (1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, C, H, W]
        if self._is_pointwise():
            # A 1x1 convolution is a GEMM over pixels: run it through the matmul kernels.
            act = self.act
            if act is not None and (not isinstance(act, ActQuantizer) or _reference_on_cpu(self, x)):
                # DGQ groups, or the CPU reference (the same values as the channels-last twin, without
                # building a module per call): quantize NCHW first
                x, act = act(x), None
            elif act is not None:
                act = act.along_last_dim()
            if _reference_on_cpu(self, x):
                y = kernels.qlinear_reference(x.movedim(1, -1), self.quantized_weight, self.bias, act)
            else:
                y = kernels.qlinear(x.movedim(1, -1), self.quantized_weight, self.bias, act, self.kernel_backend)
            return y.movedim(-1, 1)
        if self.act is not None:
            x = self.act(x)
        w = self.quantized_weight.dequantize(x.dtype).reshape(self.weight_shape)
        a = self.conv_args
        return F.conv2d(x, w, self.bias, a["stride"], a["padding"], a["dilation"], a["groups"])

    def extra_repr(self) -> str:
        return f"{self.conv_args}, w={self.wspec.short}"


class QuantExperts(_QuantModule):
    """Drop-in for transformers' fused expert modules (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ...).

    forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H], as the originals.
    Weights: gate_up [E, 2I, H] and down [E, H, I], quantized along their last dimension with
    per-expert scales (a 'tensor' granularity spec means one scale per expert).
    """

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, wspec: FormatSpec,
                 act_fn: nn.Module, act_in: ActQuantizer | None = None, act_mid: ActQuantizer | None = None,
                 has_bias: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.wspec = wspec
        _empty_qweight_buffers(self, self.gate_up_shape, self._expert_spec_check(wspec, hidden_dim), "gate_up_")
        _empty_qweight_buffers(self, self.down_shape, self._expert_spec_check(wspec, intermediate_dim), "down_")
        if wspec.granularity == "tensor":  # one scale per expert, not one for all experts
            self.gate_up_scale = torch.ones(num_experts, 1, 1, dtype=WEIGHT_SCALE_DTYPE)
            self.down_scale = torch.ones(num_experts, 1, 1, dtype=WEIGHT_SCALE_DTYPE)
            if self.gate_up_zero is not None:
                self.gate_up_zero = torch.zeros(num_experts, 1, 1, dtype=torch.uint8)
                self.down_zero = torch.zeros(num_experts, 1, 1, dtype=torch.uint8)
        self.register_buffer("gate_up_bias", torch.zeros(num_experts, 2 * intermediate_dim, dtype=dtype) if has_bias else None)
        self.register_buffer("down_bias", torch.zeros(num_experts, hidden_dim, dtype=dtype) if has_bias else None)
        self.act_fn = act_fn
        self.act_in = act_in
        self.act_mid = act_mid
        self.kernel_backend = "auto"
        # Per-expert OnlineRotations of the gate/up and down inputs (DuQuant / DuQuant++), set by the method.
        self.rot_in: nn.Module | None = None
        self.rot_mid: nn.Module | None = None

    @staticmethod
    def _expert_spec_check(spec: FormatSpec, k: int) -> FormatSpec:
        spec.check_k(k, "an expert weight")
        return spec

    @property
    def gate_up_shape(self) -> tuple[int, int, int]:
        return (self.num_experts, 2 * self.intermediate_dim, self.hidden_dim)

    @property
    def down_shape(self) -> tuple[int, int, int]:
        return (self.num_experts, self.hidden_dim, self.intermediate_dim)

    @staticmethod
    def quantize_3d(w: torch.Tensor, spec: FormatSpec) -> QuantizedWeight:
        """Quantize [E, N, K] with scales never shared across experts."""
        if spec.granularity != "tensor":
            return QuantizedWeight.quantize(w, spec)
        parts = [QuantizedWeight.quantize(w[e], spec) for e in range(w.shape[0])]
        return QuantizedWeight(torch.stack([p.packed for p in parts]),
                               torch.stack([p.scale for p in parts]),
                               None if parts[0].zero is None else torch.stack([p.zero for p in parts]),
                               tuple(w.shape), spec)

    @classmethod
    def from_experts(cls, experts: nn.Module, wspec: FormatSpec, act_in: ActQuantizer | None = None,
                     act_mid: ActQuantizer | None = None, gate_up: QuantizedWeight | None = None,
                     down: QuantizedWeight | None = None, rows: Callable[[int], bool] | None = None) -> "QuantExperts":
        """Quantize a transformers experts module with `gate_up_proj` and `down_proj` 3-D parameters.

        rows: the experts whose rows this process holds (a rank of the expert split, quantkit.expert_shard);
        of the biases only those rows are copied, the others left unwritten, as in `gate_up` and `down`."""
        gu, dn = experts.gate_up_proj.detach(), experts.down_proj.detach()
        e, two_i, h = gu.shape
        has_bias = getattr(experts, "gate_up_proj_bias", None) is not None
        with torch.device("meta"):  # every buffer is assigned below: no block-sized zeros on the way
            q = cls(e, h, two_i // 2, wspec, experts.act_fn, act_in, act_mid, has_bias, gu.dtype)
        _assign(q, gate_up if gate_up is not None else cls.quantize_3d(gu, wspec), "gate_up_")
        _assign(q, down if down is not None else cls.quantize_3d(dn, wspec), "down_")
        if has_bias:
            q.gate_up_bias = _rows_of(experts.gate_up_proj_bias.detach(), rows)
            q.down_bias = _rows_of(experts.down_proj_bias.detach(), rows)
        left = [n for n, b in q.named_buffers() if b.is_meta]
        if left:
            raise RuntimeError(f"quantized experts: buffer {left[0]} was not filled")  # (a bug, not bad input)
        return q.to(gu.device)

    @property
    def gate_up(self) -> QuantizedWeight:
        return _view(self, self.gate_up_shape, self.wspec, "gate_up_")

    @property
    def down(self) -> QuantizedWeight:
        return _view(self, self.down_shape, self.wspec, "down_")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and _reference_on_cpu(self, hidden_states):
            from quantkit.static_experts import static_experts_forward

            return static_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        if self.rot_in is not None or self.rot_mid is not None:
            from quantkit.quantizers.online_rotation import rotated_experts_forward

            return rotated_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        return kernels.qexperts(hidden_states, top_k_index, top_k_weights, self.gate_up, self.down,
                                self.act_fn, self.act_in, self.act_mid, self.gate_up_bias, self.down_bias,
                                self.kernel_backend)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, inter={self.intermediate_dim}, w={self.wspec.short}"
