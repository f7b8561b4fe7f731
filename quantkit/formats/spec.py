"""FormatSpec: the description of one numeric format, shared by weights, activations and checkpoints."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from quantkit.errors import QuantkitError

FORMAT_KINDS = ("int", "mxfp4", "fp8", "log2")
GRANULARITIES = ("tensor", "channel", "group")
MXFP4_SCALE_MODES = ("ocp_floor", "ceil", "rceil", "duquantpp_log8")
MX_BLOCK = 32


def _check_types(spec: "FormatSpec") -> None:
    """Types before values: YAML's "4" is a string and "no" a (truthy) string, never an int or a bool."""
    for name, want, words in (("kind", str, "a string"), ("bits", int, "an integer"), ("symmetric", bool, "true or false"),
                              ("granularity", str, "a string"), ("scale_mode", str, "a string")):
        v = getattr(spec, name)
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise QuantkitError(f"format field {name} must be {words}, got {v!r} ({type(v).__name__})")
    gs = spec.group_size
    if gs is not None and (not isinstance(gs, int) or isinstance(gs, bool)):
        raise QuantkitError(f"format field group_size must be a positive integer, got {gs!r} ({type(gs).__name__})")


@dataclass(frozen=True)
class FormatSpec:
    """A numeric format.

    `granularity` says which elements share a scale. The reduction dimension K is always the last
    one: "channel" = one scale per row (per output channel of a weight, per token of an activation),
    "group" = one scale per `group_size` consecutive elements along K, "tensor" = one scale.
    """

    kind: str = "int"
    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int | None = None
    scale_mode: str = "ocp_floor"

    def __post_init__(self) -> None:
        _check_types(self)
        if self.kind not in FORMAT_KINDS:
            raise QuantkitError(f"unknown format {self.kind!r}; allowed: {', '.join(FORMAT_KINDS)}")
        if self.granularity not in GRANULARITIES:
            raise QuantkitError(
                f"unknown granularity {self.granularity!r}; allowed: {', '.join(GRANULARITIES)}"
            )
        if self.kind == "int" and not 2 <= self.bits <= 8:
            raise QuantkitError(f"int bits must be between 2 and 8, got {self.bits}")
        if self.kind == "log2" and not 2 <= self.bits <= 8:
            raise QuantkitError(f"log2 bits must be between 2 and 8, got {self.bits}")
        if self.kind == "mxfp4":
            if self.bits != 4:
                raise QuantkitError(f"mxfp4 has 4 bits, got {self.bits}")
            if self.granularity != "group" or self.group_size != MX_BLOCK:
                raise QuantkitError("mxfp4 uses one scale per 32 elements: granularity group, group_size 32")
            if self.scale_mode not in MXFP4_SCALE_MODES:
                raise QuantkitError(
                    f"unknown mxfp4 scale_mode {self.scale_mode!r}; allowed: {', '.join(MXFP4_SCALE_MODES)}"
                )
            if not self.symmetric:
                raise QuantkitError("mxfp4 is symmetric")
        if self.kind == "fp8":
            if self.bits != 8:
                raise QuantkitError(f"fp8 (E4M3) has 8 bits, got {self.bits}")
            if not self.symmetric:
                raise QuantkitError("fp8 is symmetric")
        if self.granularity == "group":
            if self.group_size is None or self.group_size < 1:
                raise QuantkitError("granularity 'group' needs a positive group_size")
        elif self.group_size is not None:
            raise QuantkitError(f"group_size is only allowed with granularity 'group', got {self.granularity!r}")

    @classmethod
    def mxfp4(cls, scale_mode: str = "ocp_floor") -> "FormatSpec":
        return cls(kind="mxfp4", bits=4, granularity="group", group_size=MX_BLOCK, scale_mode=scale_mode)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FormatSpec":
        return cls(**d)

    def check_k(self, k: int, what: str = "tensor") -> None:
        """Raise if the reduction size `k` cannot be split into this spec's groups."""
        if self.granularity == "group" and k % self.group_size != 0:
            raise QuantkitError(
                f"group size {self.group_size} does not divide the input dimension {k} of {what}; "
                f"use a divisor of {k} or granularity 'channel'"
            )

    @property
    def short(self) -> str:
        """A compact label such as int4-g128, int8-ch, mxfp4, fp8-ch."""
        if self.kind == "mxfp4":
            return "mxfp4" if self.scale_mode == "ocp_floor" else f"mxfp4-{self.scale_mode}"
        base = f"{self.kind}{self.bits}" if self.kind != "fp8" else "fp8"
        gran = {"tensor": "t", "channel": "ch"}.get(self.granularity, f"g{self.group_size}")
        sym = "" if self.symmetric or self.kind != "int" else "-asym"
        return f"{base}-{gran}{sym}"
