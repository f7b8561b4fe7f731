"""`quantkit calib select`: choose and write a calibration set for a diffusion model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

calib_app = typer.Typer(no_args_is_help=True, help="Calibration sets for diffusion models.")


@calib_app.command("select")
def select(
    model: str = typer.Argument(..., help="Diffusion pipeline folder or zoo:NAME."),
    out: Path = typer.Option(..., "--out", "-o", help="Calibration file to write (.safetensors; FILE.json next to it)."),
    method: str = typer.Option("eda-dm", help="eda-dm (TDAC density/diversity), uniform (over timesteps) or random."),
    size: int = typer.Option(64, help="Samples to select (one per sampler trajectory)."),
    steps: Optional[int] = typer.Option(None, help="Sampler steps (default: the model's eval profile, else 20)."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance (default: the eval profile's)."),
    lamda: float = typer.Option(5.0, help="TDAC: weight of diversity against density (w = D + lamda V); 5.0 is the "
                                "paper's text-to-image value."),
    radius: Optional[float] = typer.Option(None, help="TDAC density radius r (default: median pairwise distance)."),
    batch: int = typer.Option(16, help="Trajectories sampled per batch (TDAC scores the first batch)."),
    prompts: Optional[Path] = typer.Option(None, "--calib-prompts", "--prompts",
                                           help="Prompts file, one a line (default: the eval profile's, else builtin)."),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Run the full-precision sampler, pick calibration samples, write them with their provenance."""
    from quantkit.cli import _progress, _setup_logging, console, user_errors

    _setup_logging(False)
    with user_errors():
        import quantkit
        from quantkit.calib.calib_file import save_calibration
        from quantkit.calib.data_files import read_prompts
        from quantkit.calib.selection import select_calibration
        from quantkit.errors import QuantkitError
        from quantkit.eval.profile import EvalProfile
        from quantkit.models import load_model

        from quantkit.calib.selection import SELECTIONS

        if device not in ("cpu", "cuda"):
            raise QuantkitError(f"unknown --device {device!r}; allowed: cpu, cuda")
        if method not in SELECTIONS:
            raise QuantkitError(f"unknown --method {method!r}; allowed: {', '.join(SELECTIONS)}")
        loaded = load_model(model, device)
        if not loaded.is_pipeline:
            raise QuantkitError(f"{model} is a bare {type(loaded.root).__name__}: calibration selection needs a "
                                "pipeline folder with a scheduler (it runs the sampler)")
        profile = EvalProfile.read(loaded.path)
        prompt_list = read_prompts(prompts) if prompts else (profile.prompts or read_prompts(None))
        with _progress() as bar:
            task = bar.add_task("sampling", total=size)

            def progress(what: str, done: int, total: int) -> None:
                bar.update(task, description=what, completed=done, total=total)

            cs = select_calibration(loaded, method, size, seed, steps or profile.steps, prompt_list,
                                    guidance if guidance is not None else profile.guidance_scale, lamda, radius,
                                    batch, progress)
        cs.provenance.update(model=model, quantkit_version=quantkit.__version__,
                             prompts=str(prompts) if prompts else ("eval profile" if profile.prompts else "builtin"))
        save_calibration(out, cs.items, cs.provenance)
        console.print(f"[green]wrote[/] {out}: {size} samples over {cs.provenance['denoiser_calls']} steps, "
                      f"per step {cs.provenance['counts']}")
