"""The body of `quantkit quantize` once its flags are checked and the output is locked: load (whole or
streamed), check the plan and flags, quantize block by block, write the checkpoint, report."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from quantkit.cli import _progress
from quantkit.cli_choices import emit_json
from quantkit.cli_output import print_table
from quantkit.errors import QuantkitError


def load_and_plan(model: str, rec, method, stream: bool, device: str, dtype: str, calib: Optional[Path],
                  calib_prompts: Optional[Path], calib_text: Optional[Path], calib_steps: Optional[int]):
    """The model (on the meta device with its block loader when streamed, else whole; loader None), its layer
    plan, and the flags checked against both: (loaded, loader, tasks)."""
    from quantkit.flag_check import check_flags
    from quantkit.models import load_model
    from quantkit.pipeline import check_plan

    loader = None
    if stream:
        from quantkit.streaming import load_model_meta

        loaded, loader = load_model_meta(model, dtype)
    else:
        loaded = load_model(model, device, dtype)
    tasks = check_plan(loaded, rec)
    check_flags(loaded, rec, method, tasks, calib_prompts=calib_prompts, calib_text=calib_text, calib_file=calib,
                calib_steps=calib_steps)
    return loaded, loader, tasks


def quantize_locked(model: str, out: Path, rec, calib: Optional[Path], calib_prompts: Optional[Path],
                     calib_text: Optional[Path], calib_steps: Optional[int], resume: bool, device: str,
                     overwrite: bool, max_shard_mb: int, say: Console, json_path: Optional[str], dtype: str = "auto",
                     stream: Optional[bool] = None, calib_memory: Optional[str] = None, ranks=None) -> None:
    """The quantize command once its flags are checked and the output is locked (with `ranks`, rank 0 of a
    torchrun job whose other ranks walk beside it: see quantkit.cli_ranks)."""
    import shutil

    from quantkit.flag_check import check_calls_fit, group_fallback_note
    from quantkit.io import save_checkpoint
    from quantkit.methods import get_method
    from quantkit.models import DTYPES
    from quantkit.pipeline import quantize_model
    from quantkit.spill import parse_bytes

    if dtype != "auto" and dtype not in DTYPES:  # a bad --dtype fails before any loading
        raise QuantkitError(f"unknown --dtype {dtype!r}; allowed: auto, bfloat16, float16, float32")
    calib_bytes = parse_bytes(calib_memory) if calib_memory is not None else None
    method = get_method(rec.method, rec)
    if stream is None:  # opt-in for now: the whole-model path carries every check of the bad-input catalogue
        stream = False
    if stream and device != "cpu":
        raise QuantkitError("--stream materializes blocks on the CPU; use --no-stream with --device cuda")
    if stream and not method.supports_streaming:
        raise QuantkitError(f"method {rec.method} cannot run on a streamed model; add --no-stream")
    calls, calib_prov = None, None
    if calib is not None:
        from quantkit.calib.calib_file import batch_items, load_calibration

        items, calib_prov = load_calibration(calib)
        calls = [c.to(device) for c in batch_items(items, 8)]
    work_dir = out.parent / f".{out.name}.progress"  # per-block state of a killed run (see docs)
    if not resume:
        shutil.rmtree(work_dir, ignore_errors=True)
    from quantkit.calib import read_prompts, read_text

    if calib_prompts is not None:
        read_prompts(calib_prompts)
    if calib_text is not None:
        read_text(calib_text)
    from quantkit.streaming import StreamSession

    loaded, loader, tasks = load_and_plan(model, rec, method, stream, device, dtype, calib, calib_prompts,
                                          calib_text, calib_steps)
    if calls is not None:
        check_calls_fit(loaded, calls, calib)
    session = (StreamSession(loaded, loader, out, overwrite=overwrite, max_shard_bytes=max_shard_mb * 1024**2)
               if stream else None)
    say.print(f"quantizing [bold]{model}[/] ({type(loaded.root).__name__}, adapter {loaded.adapter.name}, "
              f"{'streamed block by block' if stream else 'loaded whole'}) "
              f"with [bold]{rec.method}[/] w={rec.weight.short}{group_fallback_note(rec, tasks)} "
              f"a={'fp' if rec.activation is None else rec.activation.format.short}", highlight=False)
    try:
        with _progress() as bar:
            task = bar.add_task("blocks", total=None)

            def progress(what: str, done: int, total: int) -> None:
                bar.update(task, description=f"block {what}", completed=done, total=total)

            result = quantize_model(loaded, rec, calib_prompts=str(calib_prompts) if calib_prompts else None,
                                    calib_text=str(calib_text) if calib_text else None, calib_steps=calib_steps,
                                    progress=progress, calls=calls, work_dir=work_dir, stream=session,
                                    calib_memory=calib_bytes, ranks=ranks)
        if calib_prov is not None:
            result.calibration.update(file=str(calib), selection=calib_prov)
        if session is not None:
            session.finish(rec, result)
    except BaseException:
        if session is not None:
            session.abort()
        raise
    if session is None:
        save_checkpoint(loaded, rec, result, out, overwrite=overwrite, max_shard_bytes=max_shard_mb * 1024**2,
                        source=loaded.path)
    shutil.rmtree(work_dir, ignore_errors=True)
    resumed = len(result.resumed_blocks)
    say.print(f"[green]wrote[/] {out}: {len(result.layers)} layers quantized, {len(result.skipped)} kept in "
              f"full precision, {result.seconds:.1f}s" + (f" ({resumed} blocks reused from a killed run)"
                                                          if resumed else ""))
    print_expert_tokens(result.layers, say)
    emit_json(json_path, {"out": str(out), "model": model, "class": type(loaded.root).__name__,
                          "method": rec.method, "weight": rec.weight.short,
                          "activation": None if rec.activation is None else rec.activation.format.short,
                          "streamed": bool(stream), "layers_quantized": len(result.layers),
                          "kept_full_precision": len(result.skipped), "resumed_blocks": resumed or 0,
                          "seconds": round(result.seconds, 3)})


def print_expert_tokens(layers: dict, say: Console) -> None:
    """Per-expert calibration token counts of MoE layers (methods that record them, e.g. eaquant)."""
    rows = [(n, r["calibration"]) for n, r in layers.items() if "expert_tokens" in (r.get("calibration") or {})]
    if not rows:
        return
    table = Table(title="calibration tokens per expert (routed -> used)")
    for col in ("layer", "target", "tokens per expert", "under target", "calibrated on layer input"):
        table.add_column(col)
    for name, c in rows:
        used = [f"{a}" if a == b else f"{a}->{b}" for a, b in zip(c["expert_tokens"], c["expert_tokens_used"])]
        table.add_row(name, str(c["token_target"]), " ".join(used), str(c["under_target"] or "-"),
                      str(c["layer_input_fallback"] or "-"))
    print_table(table, say)
