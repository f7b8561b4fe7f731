"""Calibration-set selection for diffusion models: which (x_t, t, conditioning) samples to calibrate on.

- eda-dm:  EDA-DM's TDAC (arXiv 2401.04585 v3): score each denoising step by the density and the
           diversity of a bottleneck feature, allocate samples to steps in proportion.
- uniform: the same number of samples at every step (Q-Diffusion's uniform-over-timesteps set).
- random:  a uniformly random step for every sample.
Every method takes trajectory i's x_t at the step assigned to sample i (with its conditioning and,
under classifier-free guidance, its unconditional half).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from quantkit.adapters.base import CallArgs
from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)

SELECTIONS = ("eda-dm", "uniform", "random")
Progress = Callable[[str, int, int], None]


# ---- TDAC scores and allocation (pure functions on tensors) ------------------------------------
def density_diversity(features: list[torch.Tensor], radius: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """TDAC's raw scores per step from one feature map per step ([B, C, H, W] or [B, L, C]).

    density D_t   = #{j != t : mean((F_t - F_j)^2) <= r}
    diversity V_t = sum_{j != t} sum_{b, positions} (1 - cos(F_t, F_j) over the channel axis)
    radius None: the median of the off-diagonal mean squared distances (our default: the official
    radii 0.3 / 3.0 are tuned to each dataset's feature scale). Returns (D, V, r used).
    """
    f = torch.stack([x.float() for x in features])  # [T, B, ...]
    t = f.shape[0]
    flat = f.reshape(t, -1)
    d2 = torch.cdist(flat, flat).pow(2) / flat.shape[1]  # mean squared distance
    off = ~torch.eye(t, dtype=torch.bool)
    if radius is None:
        radius = float(d2[off].median()) if t > 1 else 0.0
    density = ((d2 <= radius) & off).sum(1).float()
    ch = 2 if f.dim() == 5 else f.dim() - 1  # channel axis of the stacked maps: [T, B, C, H, W] or [T, B, L, C]
    unit = torch.nn.functional.normalize(f, dim=ch, eps=1e-12)
    diversity = torch.zeros(t)
    for i in range(t):
        cos = (unit[i:i + 1] * unit).sum(ch)  # [T, B, positions]
        diversity[i] = (1 - cos).reshape(t, -1).sum(1)[off[i]].sum()
    return density, diversity, radius


def minmax_normalize(x: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min); all zeros when every value is equal (the official code divides by 0)."""
    span = x.max() - x.min()
    return torch.zeros_like(x) if span <= 0 else (x - x.min()) / span


def allocate(weights: torch.Tensor, n: int) -> list[int]:
    """TDAC's allocation: n_t = round(n w_t / sum w); then add 1 to the largest n_t while short,
    remove 1 from the last steps (with n_t > 0) while over. Equal weights when they sum to 0."""
    w = weights.double().clamp(min=0)
    if w.sum() <= 0:
        w = torch.ones_like(w)
    counts = torch.round(n * w / w.sum()).long().tolist()
    while sum(counts) < n:
        short = n - sum(counts)
        order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
        for i in order[:short]:
            counts[i] += 1
    while sum(counts) > n:
        for i in reversed(range(len(counts))):
            if sum(counts) > n and counts[i] > 0:
                counts[i] -= 1
    return counts


def uniform_allocation(steps: int, n: int) -> list[int]:
    """n samples spread evenly over the steps; n < steps takes evenly spaced steps."""
    counts = [n // steps] * steps
    rest = n - sum(counts)
    for k in range(rest):
        counts[(k * steps) // rest] += 1
    return counts


def random_allocation(steps: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    counts = [0] * steps
    for _ in range(n):
        counts[rng.randrange(steps)] += 1
    return counts


def assign_steps(counts: list[int], seed: int) -> list[int]:
    """Shuffled step index of each sample (n_t copies of t)."""
    order = [t for t, c in enumerate(counts) for _ in range(c)]
    random.Random(seed).shuffle(order)
    return order


# ---- trajectories -----------------------------------------------------------------------------
@dataclass
class Trajectories:
    """Every denoiser call of the FP sampler: calls[b][s] = call of prompt batch b at step s."""

    calls: list[list[CallArgs]]
    batch_sizes: list[int]  # trajectories in each batch
    features: list[torch.Tensor] = field(default_factory=list)  # bottleneck input per step, first batch

    @property
    def steps(self) -> int:
        return len(self.calls[0])


def record_trajectories(loaded: Any, n: int, seed: int, steps: int, prompts: list[str] | None,
                        guidance: float | None, batch: int, feature_module: torch.nn.Module | None,
                        progress: Progress | None = None) -> Trajectories:
    """Run the FP sampler on n trajectories in batches; record all denoiser calls, and the bottleneck
    feature of every step of the first batch (TDAC scores on one trajectory batch, as the code)."""
    import inspect

    from quantkit.calib.capture import record_calls

    pipe, root = loaded.obj, loaded.root
    params = inspect.signature(pipe.__call__).parameters
    out = Trajectories([], [])
    gen = torch.Generator().manual_seed(seed)
    for b0 in range(0, n, batch):
        b = min(batch, n - b0)
        kwargs: dict[str, Any] = {"num_inference_steps": steps, "generator": gen}
        if "prompt" in params:
            kwargs["prompt"] = [prompts[(b0 + i) % len(prompts)] for i in range(b)]
        elif "class_labels" in params:
            kwargs["class_labels"] = [(b0 + i) % 10 for i in range(b)]
        else:
            kwargs["batch_size"] = b
        if guidance is not None and "guidance_scale" in params:
            kwargs["guidance_scale"] = guidance
        if "output_type" in params:
            kwargs["output_type"] = "latent" if "prompt" in params else "np"
        kwargs.update(loaded.adapter.sampling_kwargs(pipe))  # the family's calibration sampling arguments
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        calls, handle = record_calls(root)
        fh = None
        if feature_module is not None and b0 == 0:
            fh = feature_module.register_forward_pre_hook(
                lambda _m, args, kw: out.features.append((args[0] if args else kw["hidden_states"]).detach().clone()),
                with_kwargs=True)
        try:
            with torch.no_grad():
                pipe(**kwargs)
        finally:
            handle.remove()
            if fh is not None:
                fh.remove()
        out.calls.append(calls)
        out.batch_sizes.append(b)
        if progress is not None:
            progress("sampling trajectories", b0 + b, n)
    if any(len(c) != len(out.calls[0]) for c in out.calls):
        raise QuantkitError("the sampler made a different number of denoiser calls per batch")
    return out


def trajectory_sample(call: CallArgs, batch: int, i: int) -> CallArgs:
    """Trajectory i's rows of a batched call (with CFG: its unconditional and conditional rows),
    with the timestep as one value per row so that samples can be batched again."""
    from quantkit.recon.data import _rows, call_row, collate

    rows = _rows(call)
    if rows not in (batch, 2 * batch):
        raise QuantkitError(f"a denoiser call has {rows} rows for {batch} trajectories; cannot tell them apart")
    idx = [i] if rows == batch else [i, batch + i]
    one = collate([call_row(call, j, rows) for j in idx])
    per_row = lambda v: v.reshape(1).expand(len(idx)).clone() if isinstance(v, torch.Tensor) and v.numel() == 1 and v.dim() <= 1 else v  # noqa: E731
    return CallArgs((one.args[0], *[per_row(a) for a in one.args[1:]]) if one.args else (),
                    {k: per_row(v) if k in ("timestep", "t", "timesteps") else v for k, v in one.kwargs.items()})


# ---- selection ----------------------------------------------------------------------------------
@dataclass
class CalibrationSet:
    """Selected samples (root calls of 1 trajectory each) and where they came from."""

    items: list[CallArgs]
    provenance: dict[str, Any]


def select_calibration(loaded: Any, method: str = "eda-dm", size: int = 64, seed: int = 0, steps: int = 20,
                       prompts: list[str] | None = None, guidance: float | None = None, lamda: float = 5.0,
                       radius: float | None = None, batch: int = 16,
                       progress: Progress | None = None) -> CalibrationSet:
    """Run the FP sampler on `size` trajectories and pick one (x_t, t, c) sample from each."""
    if method not in SELECTIONS:
        raise QuantkitError(f"unknown selection method {method!r}; allowed: {', '.join(SELECTIONS)}")
    if size < 1 or steps < 1:
        raise QuantkitError(f"--size and --steps must be at least 1, got {size} and {steps}")
    if not loaded.is_pipeline:
        raise QuantkitError(f"{loaded.source} is a bare {type(loaded.root).__name__}: calibration selection needs a "
                            "pipeline folder with a scheduler (run the sampler)")
    feature_module = loaded.adapter.bottleneck(loaded.root) if method == "eda-dm" else None
    traj = record_trajectories(loaded, size, seed, steps, prompts, guidance, min(batch, size), feature_module, progress)
    t = traj.steps
    prov: dict[str, Any] = {"method": method, "size": size, "seed": seed, "sampler_steps": steps, "denoiser_calls": t,
                            "guidance_scale": guidance, "trajectory_batch": min(batch, size)}
    if method == "eda-dm":
        if len(traj.features) != t:
            raise QuantkitError(f"the bottleneck feature was seen {len(traj.features)} times for {t} denoiser calls")
        dens, div, r = density_diversity(traj.features, radius)
        w = minmax_normalize(dens) + lamda * minmax_normalize(div)
        counts = allocate(w, size)
        prov.update(lamda=lamda, radius=r, radius_rule="given" if radius is not None else "median distance",
                    density=dens.tolist(), diversity=div.tolist(), weights=w.tolist(),
                    feature=loaded.adapter.bottleneck_name(loaded.root))
    elif method == "uniform":
        counts = uniform_allocation(t, size)
    else:
        counts = random_allocation(t, size, seed)
    order = assign_steps(counts, seed)
    items = []
    for i, step in enumerate(order):  # sample i = trajectory i at its assigned step
        b, j = divmod(i, min(batch, size))
        items.append(trajectory_sample(traj.calls[b][step], traj.batch_sizes[b], j))
    prov.update(counts=counts, steps_of_samples=order)
    log.info("calibration %s: %d samples over %d steps %s", method, size, t, counts)
    return CalibrationSet(items, prov)
