"""Scale benchmark: quantize random-weight models of real published configurations, saved as the hub
ships them (their dtype, their tensor names, sharded), with layer streaming; report wall time, peak
resident memory, GB of 16-bit weights per second, and time per block from the first to the last.

    python bench/scale.py                        # SD 1.5 UNet and OLMoE-1B-7B at 4 of its 16 layers
    python bench/scale.py --models sdxl-unet,qwen3-30b-a3b --layers 24 --big   # the large ones
    python bench/scale.py --json results.json

Checkpoints are written tensor by tensor (never the whole model in memory) under --work (default
./scratch-scale), then deleted unless --keep. Each quantization runs in a child process so its
peak RSS is its own (os.wait4).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Configurations as published on the Hugging Face hub (transcribed; weights are random).
CONFIGS: dict[str, dict] = {
    "sd15-unet": {  # runwayml/stable-diffusion-v1-5, unet/config.json (hub fp16 variant)
        "kind": "diffusers", "dtype": "float16", "shard_gb": 10.0,
        "config": {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
                   "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
                   "cross_attention_dim": 768,
                   "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                        "DownBlock2D"],
                   "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
                   "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
                   "out_channels": 4, "sample_size": 64,
                   "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]},
    },
    "sdxl-unet": {  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (hub fp16 variant)
        "kind": "diffusers", "dtype": "float16", "shard_gb": 10.0,
        "config": {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
                   "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
                   "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
                   "center_input_sample": False, "cross_attention_dim": 2048,
                   "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                   "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
                   "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
                   "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
                   "transformer_layers_per_block": [1, 2, 10],
                   "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                   "use_linear_projection": True},
    },
    "olmoe-1b-7b": {  # allenai/OLMoE-1B-7B-0924, config.json
        "kind": "transformers", "dtype": "bfloat16", "shard_gb": 5.0, "layers_key": "num_hidden_layers",
        "config": {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "attention_bias": False,
                   "clip_qkv": None, "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048,
                   "intermediate_size": 1024, "max_position_embeddings": 4096, "norm_topk_prob": False,
                   "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
                   "num_key_value_heads": 16, "pad_token_id": 1, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
                   "tie_word_embeddings": False, "vocab_size": 50304},
    },
    "qwen3-30b-a3b": {  # Qwen/Qwen3-30B-A3B, config.json
        "kind": "transformers", "dtype": "bfloat16", "shard_gb": 4.0, "layers_key": "num_hidden_layers",
        "config": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
                   "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
                   "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144,
                   "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
                   "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
                   "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4,
                   "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": False,
                   "use_sliding_window": False, "vocab_size": 151936},
    },
}
BIG = {"sdxl-unet", "qwen3-30b-a3b"}
STATIC_W8A8 = {"method": "rtn", "weight": {"kind": "int", "bits": 8, "granularity": "channel"},
               "activation": {"kind": "int", "bits": 8, "symmetric": False, "granularity": "tensor", "dynamic": False},
               "skip_roles": ["router", "lm_head", "embedding", "time_embedding", "conv_in", "conv_out", "norm"]}


# ---------------------------------------------------------------------------------------------
def _meta_model(spec: dict, layers: int | None):
    import torch
    from accelerate import init_empty_weights

    cfg = dict(spec["config"])
    if layers is not None and "layers_key" in spec:
        cfg[spec["layers_key"]] = layers
    dtype = getattr(torch, spec["dtype"])
    with init_empty_weights():
        if spec["kind"] == "diffusers":
            import diffusers

            cls = getattr(diffusers, cfg["_class_name"])
            return cls.from_config(cfg).to(dtype), cfg
        import transformers

        conf = transformers.AutoConfig.for_model(**cfg)
        cls = getattr(transformers, cfg["architectures"][0])
        return cls._from_config(conf, dtype=dtype), conf


def build_checkpoint(name: str, folder: Path, layers: int | None, seed: int = 0) -> int:
    """Write the model's random weights as the hub stores them; returns the bytes of weights written."""
    import torch
    from safetensors.torch import save_file

    spec = CONFIGS[name]
    model, cfg = _meta_model(spec, layers)
    folder.mkdir(parents=True, exist_ok=True)
    if spec["kind"] == "diffusers":
        model.save_config(folder)
        shapes = model.state_dict()
        base = "diffusion_pytorch_model"
    else:
        from transformers.core_model_loading import revert_weight_conversion

        cfg.save_pretrained(folder)
        shapes = revert_weight_conversion(model, model.state_dict())  # per-expert hub names
        base = "model"
    dtype = getattr(torch, spec["dtype"])
    g = torch.Generator().manual_seed(seed)
    limit = int(spec["shard_gb"] * 1e9)
    shards: list[list[str]] = [[]]
    size = 0
    for k, t in shapes.items():
        n = t.numel() * dtype.itemsize
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    names = ([f"{base}.safetensors"] if len(shards) == 1 else
             [f"{base}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total = 0
    weight_map = {}
    for fname, keys in zip(names, shards):
        part = {}
        for k in keys:
            shape = tuple(shapes[k].shape)
            if len(shape) == 1:  # norms' gains 1, biases 0: a random model that still runs sensibly
                part[k] = (torch.ones if k.endswith("weight") else torch.zeros)(shape, dtype=dtype)
            else:
                part[k] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
            total += part[k].numel() * part[k].element_size()
            weight_map[k] = fname
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        del part
    if len(names) > 1:
        (folder / f"{base}.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


# ---------------------------------------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    """One quantization, streamed; prints a JSON line with its timings."""
    from quantkit.config import Recipe
    from quantkit.spill import parse_bytes
    from quantkit.streaming import quantize_streaming

    rec = Recipe.load(args.recipe) if not args.recipe.startswith("{") else Recipe.from_dict(json.loads(args.recipe))
    rec = rec.replace(calib_size=args.calib_size)
    out = Path(args.out)
    t0 = time.perf_counter()
    _, result = quantize_streaming(args.src, rec, out, dtype=args.dtype, overwrite=True,
                                   work_dir=out.parent / f".{out.name}.progress",
                                   calib_memory=parse_bytes(args.calib_memory) if args.calib_memory else None)
    wall = time.perf_counter() - t0
    shutil.rmtree(out.parent / f".{out.name}.progress", ignore_errors=True)
    print("RESULT " + json.dumps({"wall": wall, "blocks": result.block_seconds,
                                  "out_bytes": sum(f.stat().st_size for f in out.rglob("*.safetensors"))}))


def run_one(src: Path, out: Path, recipe: str, calib_size: int, calib_memory: str | None, dtype: str = "auto") -> dict:
    cmd = [sys.executable, __file__, "--child", "--src", str(src), "--out", str(out), "--recipe", recipe,
           "--calib-size", str(calib_size), "--dtype", dtype]
    cmd += ["--calib-memory", calib_memory] if calib_memory else []
    import tempfile

    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, so its own peak RSS comes back
        wall = time.perf_counter() - t0
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read(), se.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed ({recipe} on {src}):\n{stderr[-3000:]}")
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[7:])
    res["process_wall"] = wall
    res["peak_rss"] = usage.ru_maxrss * 1024  # Linux: KiB
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--build", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--src")
    ap.add_argument("--out")
    ap.add_argument("--recipe", default="rtn-w4a16-g128")
    ap.add_argument("--calib-size", type=int, default=4)
    ap.add_argument("--calib-memory", default=None)
    ap.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)  # (the child's)
    ap.add_argument("--calibrated-dtype", default="auto",
                    help="dtype of the calibrated run (auto = the checkpoint's; float32 where torch's CPU kernels "
                         "for the checkpoint's fp16 are too slow to finish, e.g. the UNets' convolutions)")
    ap.add_argument("--models", default="sd15-unet,olmoe-1b-7b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the LMs (default: OLMoE 4, Qwen3 24)")
    ap.add_argument("--big", action="store_true", help="allow sdxl-unet and qwen3-30b-a3b (tens of GB of disk)")
    ap.add_argument("--calibrated", default="auto", help="calibrated recipe: auto (static RTN W8A8 for UNets, "
                                                         "eaquant-w4a4 for MoE LMs), static (static RTN W8A8 "
                                                         "for all), a recipe name, or none")
    ap.add_argument("--work", default="scratch-scale")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="reuse a source kept by an earlier --keep run (same model "
                                                         "and layers) instead of writing it again")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.build:  # in its own process: Linux keeps a process's peak RSS across fork+exec, so the parent
        # must stay small for the quantization children's figures to be their own
        print("BYTES", build_checkpoint(args.build, Path(args.out), args.layers))
        return
    work = Path(args.work)
    rows = []
    for name in args.models.split(","):
        if name not in CONFIGS:
            raise SystemExit(f"unknown model {name!r}; allowed: {', '.join(CONFIGS)}")
        if name in BIG and not args.big:
            raise SystemExit(f"{name} writes tens of GB: pass --big")
        layers = args.layers if args.layers is not None else {"olmoe-1b-7b": 4, "qwen3-30b-a3b": 24}.get(name)
        src = work / name
        marker = work / f"{name}.built.json"  # written last, so a half-written source is never reused
        kept = json.loads(marker.read_text()) if args.reuse and marker.exists() else None
        if kept is not None and kept["layers"] == layers:
            nbytes = kept["bytes"]
            print(f"{name}: reusing {nbytes / 1e9:.2f} GB of weights in {src}", flush=True)
        else:
            marker.unlink(missing_ok=True)
            shutil.rmtree(src, ignore_errors=True)
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, "--build", name, "--out", str(src)] + \
                (["--layers", str(layers)] if layers is not None else [])
            built = subprocess.run(cmd, capture_output=True, text=True)
            if built.returncode != 0:
                raise SystemExit(f"building {name} failed:\n{built.stderr[-3000:]}")
            nbytes = int(next(x for x in built.stdout.splitlines() if x.startswith("BYTES "))[6:])
            print(f"{name}: wrote {nbytes / 1e9:.2f} GB of {CONFIGS[name]['dtype']} weights in "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
            if args.keep:
                marker.write_text(json.dumps({"layers": layers, "bytes": nbytes}))
        is_unet = CONFIGS[name]["kind"] == "diffusers"
        calibrated = {"auto": json.dumps(STATIC_W8A8) if is_unet else "eaquant-w4a4",
                      "static": json.dumps(STATIC_W8A8)}.get(args.calibrated, args.calibrated)
        recipes = ["rtn-w4a16-g128"] + ([calibrated] if calibrated != "none" else [])
        for recipe in recipes:
            out = work / f"{name}-q"
            run_dtype = args.calibrated_dtype if recipe != "rtn-w4a16-g128" else "auto"
            res = run_one(src, out, recipe, args.calib_size, args.calib_memory, run_dtype)
            blocks = list(res["blocks"].values())
            row = {"model": name, "layers": layers, "recipe": "rtn-w8a8-static" if recipe.startswith("{") else recipe,
                   "dtype": run_dtype,
                   "weights_gb": nbytes / 1e9, "wall_s": res["wall"], "process_s": res["process_wall"],
                   "gb_per_s": nbytes / 1e9 / res["wall"], "peak_rss_gb": res["peak_rss"] / 1e9,
                   "blocks": len(blocks), "first_block_s": blocks[0] if blocks else None,
                   "last_block_s": blocks[-1] if blocks else None,
                   "median_block_s": sorted(blocks)[len(blocks) // 2] if blocks else None,
                   "block_s": res["blocks"], "out_gb": res["out_bytes"] / 1e9}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "block_s"}), flush=True)
            shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
            marker.unlink(missing_ok=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
