"""`quantkit eval`: load a model or checkpoint, sample / score it, compare with its full-precision source."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from quantkit.errors import QuantkitError
from quantkit.eval.diffusion import DIFFUSION_METRICS, SampleSet, diffusion_metrics, sample_images
from quantkit.eval.lm import LM_METRICS, perplexity, router_fidelity, router_records, token_ids, windows
from quantkit.eval.profile import EvalProfile

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]


@dataclass
class EvalOptions:
    metrics: list[str] | None = None
    n: int = 100
    seed: int = 0
    reference: str | None = None  # full-precision model to compare with (default: the checkpoint's source)
    clip_model: str | None = None
    real_images: str | None = None
    inception_weights: Path | None = None
    prompts_file: Path | None = None
    text_file: Path | None = None
    steps: int | None = None
    guidance: float | None = None
    seq_len: int = 256
    batch: int = 50


def _checkpoint_meta(path: Path) -> dict[str, Any] | None:
    from quantkit.io import QUANT_JSON, read_quant_json

    return read_quant_json(path) if (path / QUANT_JSON).exists() else None


def _bits_per_weight(path: Path, meta: dict[str, Any] | None) -> float:
    if meta is None:
        return 16.0
    from quantkit.inspect_ckpt import inspect_checkpoint

    return float(inspect_checkpoint(path)["totals"]["bits_per_weight_quantized"])


def model_kind(model: str) -> str:
    """'diffusion' or 'lm' for a checkpoint, model folder or zoo:NAME (from its JSON files only)."""
    from quantkit.models import folder_kind, resolve_path

    path = resolve_path(model)
    meta = _checkpoint_meta(path)
    if meta is not None:
        return "lm" if meta["model"]["adapter"] == "transformers-causal-lm" else "diffusion"
    return "lm" if folder_kind(path) == "transformers-model" else "diffusion"


def check_metrics(kind: str, metrics: list[str] | None) -> None:
    """Fail before any work on a metric that does not apply to this kind of model."""
    allowed = DIFFUSION_METRICS if kind == "diffusion" else LM_METRICS
    what = "diffusion" if kind == "diffusion" else "language-model"
    for m in metrics or []:
        if m not in allowed:
            raise QuantkitError(f"unknown {what} metric {m!r}; allowed: {', '.join(allowed)}")


def evaluate(model: str, opts: EvalOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate `model` (a checkpoint, a model folder or zoo:NAME); returns the JSON report."""
    import quantkit
    from quantkit.models import load_model, load_tokenizer, resolve_path

    path = resolve_path(model)
    meta = _checkpoint_meta(path)
    obj = quantkit.load(path)
    reference = opts.reference or (meta["model"]["source"] if meta else None)
    profile = EvalProfile.read(path)
    report: dict[str, Any] = {"model": model, "n": opts.n, "seed": opts.seed, "reference": reference,
                              "bits_per_weight": _bits_per_weight(path, meta), "metrics": {}}
    if hasattr(obj, "scheduler") and (hasattr(obj, "unet") or hasattr(obj, "transformer")):
        ref_obj = None
        if reference is not None:
            try:
                ref_obj = load_model(reference).obj
            except QuantkitError as e:
                log.warning("no full-precision reference (%s): fid_fp skipped", e)
        report.update(_eval_diffusion(obj, ref_obj, profile, opts, progress))
    elif hasattr(obj, "generate") and hasattr(obj, "lm_head"):
        ref_obj = load_model(reference).obj if reference is not None else None
        report.update(_eval_lm(obj, ref_obj, load_tokenizer(path), opts, progress))
    else:
        raise QuantkitError(f"cannot evaluate a bare {type(obj).__name__}: give a pipeline folder or a causal LM")
    return report


def _clip_dir(opts: EvalOptions, profile: EvalProfile) -> Path | None:
    from quantkit.models import resolve_path

    src = opts.clip_model or profile.clip_model
    return resolve_path(src) if src else None


def _eval_diffusion(pipe: Any, ref: Any, profile: EvalProfile, opts: EvalOptions,
                    progress: Progress | None) -> dict[str, Any]:
    check_metrics("diffusion", opts.metrics)
    metrics = opts.metrics or list(DIFFUSION_METRICS)
    prompts, labels = profile.prompts, profile.labels
    if opts.prompts_file is not None:
        from quantkit.calib import read_prompts

        prompts, labels = read_prompts(opts.prompts_file), []
    elif not prompts:
        from quantkit.calib import read_prompts

        prompts = read_prompts()
    steps = opts.steps or profile.steps
    guidance = opts.guidance if opts.guidance is not None else profile.guidance_scale

    def run(p: Any, what: str) -> SampleSet:
        done = [0]

        def tick(k: int) -> None:
            done[0] += k
            if progress:
                progress(what, done[0], opts.n)

        return sample_images(p, opts.n, opts.seed, steps, prompts, labels, profile.class_prompts, guidance,
                             opts.batch, tick, profile.pipeline_kwargs)

    samples = run(pipe, "sampling")
    reference = run(ref, "sampling full precision") if ref is not None and "fid_fp" in metrics else None
    if progress:
        progress("features", 0, 1)
    values = diffusion_metrics(samples, reference, metrics, opts.seed, _clip_dir(opts, profile),
                               opts.real_images or profile.real_images, profile.class_prompts, opts.inception_weights)
    if progress:
        progress("features", 1, 1)
    return {"metrics": values, "kind": "diffusion", "steps": steps, "guidance_scale": guidance,
            "_samples": samples, "_reference_samples": reference}


def _eval_lm(model: Any, ref: Any, tokenizer: Any, opts: EvalOptions, progress: Progress | None) -> dict[str, Any]:
    from quantkit.adapters import adapter_for
    from quantkit.calib import heldout_text, read_text

    check_metrics("lm", opts.metrics)
    metrics = opts.metrics or list(LM_METRICS)
    text = read_text(opts.text_file) if opts.text_file else heldout_text()
    wins = windows(token_ids(tokenizer, text, model.config.vocab_size), opts.seq_len, opts.n)
    if not wins:
        raise QuantkitError(f"the evaluation text is shorter than one window of {opts.seq_len} tokens")
    values: dict[str, Any] = {}
    details: dict[str, Any] = {"windows": len(wins), "seq_len": opts.seq_len}
    if "perplexity" in metrics:
        done = [0]

        def tick(k: int) -> None:
            done[0] += k
            if progress:
                progress("perplexity", done[0], len(wins))

        values["perplexity"] = perplexity(model, wins, tick)
    if ref is not None and any(m.startswith("router") for m in metrics):
        adapter = adapter_for(model)
        q_rec = router_records(model, adapter, wins)
        fp_rec = router_records(ref, adapter, wins)
        fid = router_fidelity(fp_rec, q_rec)
        for m in ("router_topk_agreement", "router_topk_exact", "router_kl"):
            if m in metrics:
                values[m] = fid[m]
        details["tokens_per_expert"] = fid["tokens_per_expert"]
        details["experts_without_tokens"] = fid["experts_without_tokens"]
    return {"metrics": values, "kind": "lm", "details": details}


def write_report(report: dict[str, Any], json_path: Path | None, out_dir: Path | None) -> dict[str, Any]:
    """Write the JSON report and, for diffusion, a PNG of full-precision vs quantized samples."""
    clean = {k: v for k, v in report.items() if not k.startswith("_")}
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(clean, indent=1))
    if out_dir is not None and report.get("_samples") is not None:
        from quantkit.eval.plots import samples_grid

        out_dir.mkdir(parents=True, exist_ok=True)
        samples_grid(report["_samples"].images, report.get("_reference_samples") and report["_reference_samples"].images,
                     out_dir / "samples.png")
    return clean

