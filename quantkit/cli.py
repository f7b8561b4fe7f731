"""The quantkit command line: thin Typer commands that parse, call the library and render with rich."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.markup import escape
from rich.table import Table

from quantkit.cli_choices import (DEVICES, JSON_HELP, METHOD_NAMES, ROUNDING_NAMES, WEIGHT_FORMATS, emit_json, one_of,
                                  recipe_names)
from quantkit.cli_output import console, err_console, print_table, progress_bars
from quantkit.errors import QuantkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-training quantization of diffusion models and Mixture-of-Experts LMs.")
zoo_app = typer.Typer(no_args_is_help=True, help="Built-in reference models (zoo:NAME).")
app.add_typer(zoo_app, name="zoo")
bench_app = typer.Typer(no_args_is_help=True, help="Speed benchmarks (need a CUDA GPU).")
app.add_typer(bench_app, name="bench")
from quantkit.cli_calib import calib_app  # noqa: E402  (a sub-app; importing it loads no model code)
app.add_typer(calib_app, name="calib")

DEFAULT_MODEL = "zoo:digits-t2i"


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn library errors into one red line and a non-zero exit, never a traceback."""
    try:
        yield
    except QuantkitError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]: nothing half-written was left behind")
        raise typer.Exit(130) from None
    except Exception as e:  # a bug, not bad input: still one line unless asked for the traceback
        if os.environ.get("QUANTKIT_DEBUG"):
            raise
        # (escaped: a message may hold brackets, e.g. a gloo error's "[/path/pair.cc:553]", not markup)
        first = escape(str(e).splitlines()[0]) if str(e) else ""
        err_console.print(f"[bold red]internal error:[/] {type(e).__name__}: {first} "
                          "(set QUANTKIT_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # transformers' / diffusers' warnings stay on (a load report or a fallback can change the result);
    # only their progress bars go, they would interleave with ours.
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        tlog.set_verbosity_info() if verbose else tlog.set_verbosity_warning()
        tlog.disable_progress_bar()
        dlog.set_verbosity_info() if verbose else dlog.set_verbosity_warning()
        dlog.disable_progress_bar()
    except ImportError:
        pass
    for handler in logging.getLogger("transformers").handlers + logging.getLogger().handlers:
        if not any(isinstance(f, _HarmlessNotices) for f in handler.filters):
            handler.addFilter(_HarmlessNotices())


class _HarmlessNotices(logging.Filter):
    """Drops notices known not to change any result (image-processor backend choice when a pipeline
    folder is read); everything else from the libraries is shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


_progress = progress_bars  # the name cli_quantize / cli_calib import


@app.command()
def quantize(
    model: str = typer.Argument(DEFAULT_MODEL, help="Local diffusers/transformers folder or zoo:NAME."),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint folder."),
    recipe: Optional[str] = typer.Option(None, help="Recipe YAML/JSON file or built-in name. Built in: "
                                         + ", ".join(recipe_names()) + "."),
    method: Optional[str] = typer.Option(None, help="Method (overrides the recipe). " + one_of(METHOD_NAMES)),
    wbits: Optional[int] = typer.Option(None, help="Weight bits (2-8 for int)."),
    abits: Optional[int] = typer.Option(None, help="Activation bits; 16 = weight-only."),
    group_size: Optional[str] = typer.Option(None, help="Weight group size along the input dim (a positive integer "
                                             "dividing it, e.g. 128), or 'channel' for one scale per output channel."),
    format: Optional[str] = typer.Option(None, "--format", help="Weight format. " + one_of(WEIGHT_FORMATS)),
    calib_size: Optional[int] = typer.Option(None, help="Calibration prompts / sequences."),
    calib_prompts: Optional[Path] = typer.Option(None, help="Text file, one calibration prompt a line."),
    calib_text: Optional[Path] = typer.Option(None, help="Plain-text calibration corpus for language models."),
    calib_steps: Optional[int] = typer.Option(None, help="Sampler steps recorded per calibration prompt "
                                              "(default: the method's; 10, dgq 25)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration file from `quantkit calib select`."),
    rounding: Optional[str] = typer.Option(None, help="Rounding of reconstruction methods. " + one_of(ROUNDING_NAMES)),
    weight_recon: Optional[bool] = typer.Option(None, "--weight-recon/--no-weight-recon",
                                                help="DGQ: BRECQ/AdaRound weight reconstruction before activation statistics."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Reuse finished blocks of a killed run (.OUT.progress)."),
    seed: Optional[int] = typer.Option(None, help="Seed for calibration sampling."),
    device: str = typer.Option("cpu", help=one_of(DEVICES)),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output folder."),
    max_shard_mb: int = typer.Option(2048, help="Largest safetensors shard, in MiB."),
    dtype: str = typer.Option("auto", help="Model dtype: auto (the checkpoint's), bfloat16, float16 or float32."),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream",
                                          help="Load one block at a time from the safetensors shards (for models "
                                               "larger than memory; CPU only)."),
    calib_memory: Optional[str] = typer.Option(None, help="Memory for calibration activations, e.g. 4GB; the rest "
                                               "waits on disk next to --out (default: no limit)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    json_path: Optional[str] = typer.Option(None, "--json", metavar="PATH|-", help="Write a summary as JSON to PATH; "
                                            "'-' writes it to stdout (the messages go to stderr)."),
) -> None:
    """Quantize MODEL by a recipe and write a packed safetensors checkpoint."""
    say = err_console if json_path == "-" else console
    _setup_logging(verbose)
    with user_errors():
        from quantkit.config import Recipe, recipe_with_overrides
        from quantkit.io import check_output_dir

        if device not in ("cpu", "cuda"):
            raise QuantkitError(f"unknown --device {device!r}; allowed: cpu, cuda")
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise QuantkitError("--device cuda was asked for but no CUDA device is available; use --device cpu")
        from quantkit.models import resolve_path
        from quantkit.output_guard import output_lock

        if max_shard_mb < 1:
            raise QuantkitError(f"--max-shard-mb must be at least 1 (MiB), got {max_shard_mb}")
        check_output_dir(out, overwrite, resolve_path(model))
        rec = Recipe.load(recipe) if recipe else Recipe()
        rec = recipe_with_overrides(rec, method=method, wbits=wbits, abits=abits, group_size=group_size, fmt=format,
                                    calib_size=calib_size, seed=seed)
        if rounding is not None:
            from quantkit.flag_check import check_rounding_flag

            check_rounding_flag(rec.method)
            rec = rec.replace(method_options={**rec.method_options, "rounding": rounding})
        if weight_recon is not None:
            if rec.method != "dgq":
                raise QuantkitError(f"--weight-recon is an option of method dgq, not {rec.method!r}")
            rec = rec.replace(method_options={**rec.method_options, "weight_recon": weight_recon})
        from quantkit import distributed

        env = distributed.detect()  # under torchrun (RANK / WORLD_SIZE set)
        if env is not None:
            from quantkit.cli_ranks import quantize_ranks

            distributed.init(env, device)
            try:
                quantize_ranks(env, model, out, rec, calib, calib_prompts, calib_text, calib_steps, resume, device,
                               overwrite, max_shard_mb, say, json_path, dtype, stream, calib_memory)
            finally:
                distributed.finish()
            return
        with output_lock(out):
            from quantkit.cli_quantize import quantize_locked

            quantize_locked(model, out, rec, calib, calib_prompts, calib_text, calib_steps, resume, device,
                            overwrite, max_shard_mb, say, json_path, dtype, stream, calib_memory)


@app.command()
def inspect(
    ckpt: Path = typer.Argument(..., help="A quantkit checkpoint folder."),
    as_json: Optional[str] = typer.Option(None, "--json", metavar="PATH|-", help=JSON_HELP),
    all_layers: bool = typer.Option(False, "--all", help="Also list layers kept in full precision."),
) -> None:
    """Per-layer table (name, kind, format, bits, params, bytes) and totals of a checkpoint."""
    _setup_logging(False)
    with user_errors():
        from quantkit.inspect_ckpt import inspect_checkpoint

        report = inspect_checkpoint(ckpt)
        if emit_json(as_json, report):
            return
        table = Table(title=f"{ckpt} ({report['model']['class']})")
        for col in ("name", "kind", "role", "format", "bits", "params", "bytes", "bits/weight"):
            table.add_column(col, justify="right" if col in ("bits", "params", "bytes", "bits/weight") else "left")
        for layer in report["layers"]:
            if layer["quantized"] or all_layers:
                table.add_row(layer["name"], layer["kind"], layer["role"], layer["format"], str(layer["bits"]),
                              f"{layer['params']:,}", f"{layer['bytes']:,}", f"{layer['bits_per_weight']:.3f}")
        print_table(table)
        t = report["totals"]
        console.print(f"params quantized {t['params_quantized']:,} / {t['params_total']:,} "
                      f"({100 * t['fraction_quantized']:.1f}%), {t['bits_per_weight_quantized']:.3f} bits per "
                      f"quantized weight, {t['bytes']:,} bytes, {t['compression_vs_fp16']:.2f}x smaller than fp16")
        parts = t["bits_per_weight_by_part"]
        console.print(f"bits per quantized weight by part: codes+scales {parts['weight']:.4f}, rotations/permutations "
                      f"{parts['rotation']:.4f}, other (bias, activation parameters) {parts['other']:.4f}")


@app.command()
def generate(
    model: str = typer.Argument(DEFAULT_MODEL, help="A quantkit checkpoint, a model folder or zoo:NAME."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt (repeatable)."),
    label: list[int] = typer.Option([], "--label", help="Class label for class-conditional pipelines (repeatable)."),
    n: int = typer.Option(4, help="Images to sample."),
    steps: int = typer.Option(20, help="Sampler steps."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale."),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("samples.png"), help="PNG grid to write (diffusion)."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate (language models)."),
) -> None:
    """Images (a PNG grid) from a diffusion model, or text from a language model."""
    _setup_logging(False)
    with user_errors():
        from quantkit.generate import generate_images, generate_text, image_grid
        from quantkit.models import load_tokenizer, resolve_path

        if steps < 1:
            raise QuantkitError(f"--steps must be at least 1, got {steps}")
        if n < 1:
            raise QuantkitError(f"--n must be at least 1, got {n}")
        path = resolve_path(model)
        import quantkit

        obj = quantkit.load(path)
        if hasattr(obj, "generate") and hasattr(obj, "config") and not hasattr(obj, "unet"):
            text = generate_text(obj, load_tokenizer(path), " ".join(prompt) or "\n", max_new_tokens, seed)
            console.print(text, markup=False, highlight=False)
            return
        if not hasattr(obj, "scheduler"):
            raise QuantkitError(f"{model} is a bare {type(obj).__name__}; generate needs a pipeline folder "
                                "(with scheduler and VAE) or a language model")
        if n < 1:
            raise QuantkitError(f"--n must be at least 1, got {n}")
        with _progress() as bar:
            task = bar.add_task("sampling", total=1)
            images = generate_images(obj, prompt or None, n, steps, seed, guidance, label or None)
            bar.update(task, completed=1)
        out.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images).save(out)
        console.print(f"[green]wrote[/] {out} ({len(images)} images)")


@app.command()
def activations(
    model: str = typer.Argument(DEFAULT_MODEL, help="A model folder or zoo:NAME."),
    calib_size: int = typer.Option(4, help="Calibration prompts / sequences."),
    calib_steps: int = typer.Option(5, help="Sampler steps per prompt (diffusion)."),
    seed: int = typer.Option(0),
    as_json: Optional[str] = typer.Option(None, "--json", metavar="PATH|-", help=JSON_HELP),
    top: int = typer.Option(15, help="Rows to show, most outlier-heavy first."),
) -> None:
    """Per-layer input statistics (max/median channel magnitude, kurtosis) on calibration data."""
    _setup_logging(False)
    with user_errors():
        from quantkit.activation_stats import activation_stats
        from quantkit.calib import calibration_calls
        from quantkit.models import load_model

        loaded = load_model(model)
        calls = calibration_calls(loaded, calib_size, seed, calib_steps)
        with _progress() as bar:
            task = bar.add_task("layer inputs", total=len(calls))
            rows = activation_stats(loaded, calls, lambda done, total: bar.update(task, completed=done))
        if emit_json(as_json, rows):
            return
        table = Table(title=f"layer inputs of {model}")
        for col in ("layer", "role", "max", "max/median ch", "kurtosis"):
            table.add_column(col, justify="left" if col in ("layer", "role") else "right")
        for r in sorted(rows, key=lambda r: -r["max_over_median"])[:top]:
            table.add_row(r["layer"], r["role"], f"{r['max']:.3g}", f"{r['max_over_median']:.1f}", f"{r['kurtosis']:.1f}")
        print_table(table)
        med = sorted(r["max_over_median"] for r in rows)[len(rows) // 2]
        console.print(f"{len(rows)} layers; median of max/median-channel ratios {med:.1f}, "
                      f"largest {max(r['max_over_median'] for r in rows):.1f}, "
                      f"largest kurtosis {max(r['kurtosis'] for r in rows):.1f}")


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="A quantkit checkpoint, a model folder or zoo:NAME."),
    metrics: Optional[str] = typer.Option(None, help="Comma-separated metrics (default: all that apply)."),
    n: int = typer.Option(100, help="Images to sample (diffusion) or text windows (language models)."),
    seed: int = typer.Option(0),
    json_path: Optional[str] = typer.Option(None, "--json", metavar="PATH|-", help=JSON_HELP),
    out: Optional[Path] = typer.Option(None, help="Folder for sample grids and plots."),
    compare: list[str] = typer.Option([], "--compare", help="More checkpoints to put in the same table (repeatable)."),
    reference: Optional[str] = typer.Option(None, help="Full-precision model to compare with (default: the source)."),
    clip_model: Optional[str] = typer.Option(None, help="Local CLIP folder (or zoo:NAME) for FID features, IS, CLIP score."),
    real_images: Optional[str] = typer.Option(None, help="Folder of real images for FID (or sklearn-digits)."),
    inception_weights: Optional[Path] = typer.Option(None, help="FID Inception weights file (uses torch-fidelity)."),
    prompts: Optional[Path] = typer.Option(None, help="Prompts file for text-to-image sampling."),
    text: Optional[Path] = typer.Option(None, help="Held-out text file for perplexity."),
    steps: Optional[int] = typer.Option(None, help="Sampler steps."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale."),
    seq_len: int = typer.Option(256, help="Tokens per perplexity window."),
) -> None:
    """FID / IS / CLIP score for diffusion models; perplexity and router fidelity for MoE LMs."""
    _setup_logging(False)
    with user_errors():
        from quantkit.eval.run import EvalOptions, check_metrics, evaluate, model_kind, write_report

        if n < 1:
            raise QuantkitError(f"--n must be at least 1, got {n}")
        if compare and out is not None:
            from quantkit.eval.plots import require_matplotlib

            require_matplotlib()
        for m in [model, *compare]:
            check_metrics(model_kind(m), [x.strip() for x in metrics.split(",")] if metrics else None)
        opts = EvalOptions(metrics=[m.strip() for m in metrics.split(",")] if metrics else None, n=n, seed=seed,
                           reference=reference, clip_model=clip_model, real_images=real_images,
                           inception_weights=inception_weights, prompts_file=prompts, text_file=text, steps=steps,
                           guidance=guidance, seq_len=seq_len)
        rows = []
        with _progress() as bar:
            task = bar.add_task("eval", total=None)

            def progress(what: str, done: int, total: int) -> None:
                bar.update(task, description=what, completed=done, total=total)

            for i, m in enumerate([model, *compare]):
                report = evaluate(m, opts, progress)
                rows.append(write_report(report, None, out / f"model{i}" if out and not compare else
                                         (out / Path(m).name if out else None)))
        if not emit_json(json_path, rows[0] if not compare else {"rows": rows}):
            _render_eval(rows)
        if compare and out is not None:
            from quantkit.eval.plots import metric_vs_bits_plot

            for metric in sorted({k for r in rows for k in r["metrics"]}):
                metric_vs_bits_plot(rows, metric, out / f"{metric}_vs_bits.png")


def _render_eval(rows: list[dict]) -> None:
    names = sorted({k for r in rows for k in r["metrics"]})
    table = Table(title="quantkit eval")
    for col in ["model", "bits/weight", *names]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(r["model"], f"{r['bits_per_weight']:.3f}",
                      *[f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "-" for k in names])
    print_table(table)
    for r in rows:
        starved = r.get("details", {}).get("experts_without_tokens")
        if starved:
            console.print(f"[yellow]experts that got no tokens[/] in {r['model']}: {starved}")


@zoo_app.command("list")
def zoo_list() -> None:
    """Show the built-in models."""
    from quantkit.zoo import zoo_names

    table = Table(title="quantkit zoo")
    table.add_column("name")
    table.add_column("description")
    for name, desc in zoo_names().items():
        table.add_row(f"zoo:{name}", desc)
    print_table(table)


@zoo_app.command("train")
def zoo_train(
    name: str = typer.Argument(..., help="Zoo model to train."),
    out: Optional[Path] = typer.Option(None, help="Folder to write (default: the package's zoo folder)."),
    seed: int = typer.Option(0),
    verbose: bool = typer.Option(True, "--verbose/--quiet"),
) -> None:
    """Train a reference model of the zoo from scratch (seeded, CPU)."""
    _setup_logging(verbose)
    with user_errors():
        try:
            from quantkit.zoo.registry import train_model
        except ImportError:
            raise QuantkitError("no trainable zoo models in this install") from None
        metrics = train_model(name, out, seed)
        console.print_json(json.dumps(metrics))


@bench_app.command("kernels")
def bench_kernels(
    kernels: Optional[str] = typer.Option(None, help="Comma-separated subset of kernels (default: all)."),
    m: Optional[str] = typer.Option(None, help="Comma-separated token counts M (default 1,2,4,...,1024,4096)."),
    dtypes: Optional[str] = typer.Option(None, help="Comma-separated subset of fp16, bf16 (default: both)."),
    reps: int = typer.Option(50, help="Timed runs per figure; the median is reported (L2 flushed before each)."),
    peak_gbps: Optional[float] = typer.Option(None, help="Peak DRAM bandwidth in GB/s (default: by GPU name)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the rows to this JSON file."),
    tune: bool = typer.Option(False, help="Also tune the packed kernels' tiles and large-M crossover for this GPU."),
) -> None:
    """Time every Triton kernel, kernel-only (CUDA graph) and end to end, against cuBLAS and torch's int4
    kernel (MoE: a grouped GEMM) for fp16/bf16, outputs checked against the reference. Needs a CUDA GPU."""
    from quantkit.kernels.bench import main as bench_main

    argv = ["--reps", str(reps)] + (["--tune"] if tune else [])
    for flag, value in (("--kernels", kernels), ("--m", m), ("--dtypes", dtypes), ("--peak-gbps", peak_gbps),
                        ("--json", json_path)):
        if value is not None:
            argv += [flag, str(value)]
    code = bench_main(argv)
    if code:
        raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

import quantkit.cli_export  # noqa: E402,F401  (registers `quantkit export` on app)
