"""Builders of bad inputs for the catalogue (docs/bad-inputs.md): damaged model folders, recipes,
calibration files. Each writes under a test's tmp folder and returns the path."""
from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantkit.zoo import resolve

DIT_WEIGHTS = "diffusion_pytorch_model.safetensors"


def copy_zoo(name: str, dst: Path) -> Path:
    shutil.copytree(resolve(name), dst)
    return dst


def edit_weights(folder: Path, file: str, fn) -> Path:
    """Load every tensor of `file`, let `fn` edit the dict, write it back."""
    sd = load_file(str(folder / file))
    fn(sd)
    save_file(sd, str(folder / file), metadata={"format": "pt"})
    return folder


def first_linear(sd: dict, contains: str = "") -> str:
    return next(k for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2 and contains in k)


def dit_variant(tmp: Path, fn) -> Path:
    return edit_weights(copy_zoo("tiny-dit", tmp / "dit"), DIT_WEIGHTS, fn)


def mixtral_variant(tmp: Path, fn) -> Path:
    return edit_weights(copy_zoo("tiny-mixtral", tmp / "mixtral"), "model.safetensors", fn)


def drop_tensor(sd: dict) -> None:
    sd.pop(first_linear(sd, "attn"))


def drop_expert(sd: dict) -> None:
    sd.pop("model.layers.0.block_sparse_moe.experts.1.w1.weight")


def reshape_tensor(sd: dict) -> None:
    k = first_linear(sd, "attn")
    sd[k] = sd[k][: sd[k].shape[0] // 2].contiguous()


def add_tensor(sd: dict) -> None:
    sd["transformer_blocks.0.extra_adapter.weight"] = torch.zeros(4, 4)


def int_tensor(sd: dict) -> None:
    k = first_linear(sd, "attn")
    sd[k] = torch.zeros(sd[k].shape, dtype=torch.int32)


def nan_weight(sd: dict) -> None:
    k = first_linear(sd, "attn")
    sd[k] = sd[k].clone()
    sd[k][3, 5] = float("nan")


def inf_weight(sd: dict) -> None:
    k = first_linear(sd, "attn")
    sd[k] = sd[k].clone()
    sd[k][0, 0] = float("inf")


def huge_weight(sd: dict) -> None:
    """Finite but overflowing: activations after this layer become Inf during calibration."""
    k = first_linear(sd, "ff.net.0")
    sd[k] = torch.full_like(sd[k], 3e38)


def zero_layer(sd: dict) -> None:
    """A degenerate layer: all-zero weights (and so constant, zero output channels)."""
    k = first_linear(sd, "attn1.to_q")
    sd[k] = torch.zeros_like(sd[k])


def pipeline_unet_tensor_missing(tmp: Path) -> Path:
    d = copy_zoo("tiny-sd", tmp / "sd")
    return d if edit_weights(d / "unet", DIT_WEIGHTS, lambda sd: sd.pop("mid_block.resnets.1.conv2.weight")) else d


def truncated_source(tmp: Path, keep: int) -> Path:
    d = copy_zoo("tiny-dit", tmp / "dit")
    f = d / DIT_WEIGHTS
    f.write_bytes(f.read_bytes()[:keep] if keep >= 0 else f.read_bytes()[:keep])
    return d


def garbage_header(tmp: Path) -> Path:
    d = copy_zoo("tiny-dit", tmp / "dit")
    f = d / DIT_WEIGHTS
    data = bytearray(f.read_bytes())
    data[8:24] = b"\xff\xfe garbage \x00\x01!!"
    f.write_bytes(bytes(data))
    return d


def oversized_header(tmp: Path) -> Path:
    d = copy_zoo("tiny-dit", tmp / "dit")
    f = d / DIT_WEIGHTS
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 1 << 60) + data[8:])
    return d


class _Marker:
    """A pickle that would create a file if it were ever unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_only(tmp: Path) -> tuple[Path, Path]:
    d = copy_zoo("tiny-dit", tmp / "dit")
    (d / DIT_WEIGHTS).unlink()
    marker = tmp / "UNPICKLED"
    with open(d / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump(_Marker(str(marker)), f)
    return d, marker


def sharded_missing_shard(tmp: Path) -> Path:
    d = copy_zoo("tiny-mixtral", tmp / "mixtral")
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(d / fname), metadata={"format": "pt"})
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "model-00002-of-00002.safetensors").unlink()
    return d


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def calib_for_other_model(tmp: Path) -> Path:
    """A calibration file whose cross-attention width belongs to another UNet (64, not 128)."""
    from quantkit.calib.calib_file import save_calibration
    from quantkit.adapters.base import CallArgs

    items = [CallArgs((), {"sample": torch.randn(1, 4, 8, 8), "timestep": torch.tensor([10]),
                           "encoder_hidden_states": torch.randn(1, 8, 64)}) for _ in range(2)]
    return save_calibration(tmp / "other.calib.safetensors", items, {"model": "some-other-unet"})


def weight_file(ck: Path) -> Path:
    """The (single) safetensors file of a small quantkit checkpoint, wherever its format version puts it."""
    meta = json.loads((ck / "quantization.json").read_text())
    comp = meta["model"]["component"]
    (name,) = meta["weights"]["files"]
    return (ck / comp if comp else ck) / name
