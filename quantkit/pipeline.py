"""The block-by-block walk: capture a block's inputs on calibration data, let the method quantize
it, swap its layers, move on. Later blocks are captured through the already quantized ones, so
each block sees quantized inputs; only one block's inputs are held at a time."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from quantkit.adapters.base import CallArgs
from quantkit.calib.capture import _detach
from quantkit.config import Recipe
from quantkit.errors import QuantkitError
from quantkit.layers import LayerTask, layer_record, plan_layers, set_submodule
from quantkit.methods import BlockContext, get_method
from quantkit.models import LoadedModel
from quantkit.nn import QuantExperts, _QuantModule
from quantkit.numeric_guard import check_inputs_finite, check_module_finite
from quantkit.propagate import BlockPropagator
from quantkit.spill import SpillManager
from quantkit.walk_resume import BlockStream, WalkStore
from quantkit.quantizers.step_clock import install_step_clock

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass
class QuantizationResult:
    layers: dict[str, dict[str, Any]]  # quantized layer name -> record (see layers.layer_record)
    skipped: dict[str, str]  # layer kept in full precision -> its role
    calibration: dict[str, Any]
    seconds: float
    blocks: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)  # method records for quantization.json (e.g. attention)
    spill: dict[str, Any] = field(default_factory=dict)  # calibration activations kept / sent to disk (--calib-memory)
    block_seconds: dict[str, float] = field(default_factory=dict)  # wall time per walked block (benchmarks)
    # blocks reused from a killed run (not saved: a resumed checkpoint equals an uninterrupted one)
    resumed_blocks: list[str] = field(default_factory=list)


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the block is needed."""


@torch.no_grad()
def capture_block_inputs(root: nn.Module, block: nn.Module, calls: list[CallArgs]) -> list[CallArgs]:
    """The arguments `block` receives for each calibration call of `root`."""
    captured: list[CallArgs] = []

    def hook(_mod, args, kwargs):
        captured.append(CallArgs(_detach(tuple(args)), _detach(dict(kwargs))))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for c in calls:
            n = len(captured)
            try:
                root(*c.args, **c.kwargs)
            except _StopForward:
                pass
            if len(captured) == n:
                log.debug("block not reached by one calibration call")
    finally:
        handle.remove()
    return captured


def _owner(name: str, block_names: list[str]) -> str:
    for b in block_names:
        if name == b or name.startswith(b + "."):
            return b
    return ""


def check_plan(loaded: LoadedModel, recipe: Recipe) -> list[LayerTask]:
    """Validate the recipe against the model before any work: method, group sizes, expert layouts."""
    get_method(recipe.method, recipe).check_model(loaded)
    tasks = plan_layers(loaded.root, loaded.adapter, recipe)
    if all(t.plan.skip for t in tasks):
        raise QuantkitError("the recipe quantizes no layer of this model (every layer is skipped)")
    return tasks


def quantize_model(loaded: LoadedModel, recipe: Recipe, *, calib_prompts: str | None = None,
                   calib_text: str | None = None, calib_steps: int | None = None, calls: list[CallArgs] | None = None,
                   progress: Progress | None = None, work_dir: str | Path | None = None,
                   stream: BlockStream | None = None, calib_memory: int | None = None,
                   owns: Callable[[int], bool] | None = None, ranks: Any = None) -> QuantizationResult:
    """Quantize `loaded.root` in place by `recipe`; returns what was done.

    Calibration calls run once through the model, block by block (see quantkit.propagate). With
    `stream`, blocks are materialized just before the calls reach them and handed back (written and
    released) once every call has passed them. With `work_dir`, each finished block is kept there and
    a rerun picks it up (see quantkit.walk_resume). With `calib_memory` (bytes), calibration activations
    above it wait on disk (see quantkit.spill). With `owns` (a rank's share, see quantkit.distributed),
    only the units it accepts are quantized and kept in `work_dir`; the result then lists only those.
    With `ranks` (quantkit.distributed.RankShare, every rank walking the same calibrated run), each MoE
    layer's per-expert work is split across the ranks and gathered (methods with expert_parallel), or each
    rank carries only its share of the calls (methods with data_parallel); only the main rank keeps blocks
    in `work_dir`, and all ranks agree on which blocks a killed run finished."""
    t0 = time.time()
    root, adapter = loaded.root, loaded.adapter
    method = get_method(recipe.method, recipe)
    tasks = check_plan(loaded, recipe)
    todo = [t for t in tasks if not t.plan.skip]
    calibration: dict[str, Any] = {"used": False}
    if calib_steps is None:
        calib_steps = method.default_calib_steps
    if calib_steps < 1:
        raise QuantkitError(f"calibration steps must be at least 1, got {calib_steps}")
    if calls is None and method.needs_calibration(todo):
        sampled = [0]

        def tick(k: int) -> None:
            sampled[0] += k
            if progress:
                progress("calibration sampling", sampled[0], recipe.calib_size)

        whole = getattr(stream, "whole_model", None) if loaded.is_pipeline else None
        with whole() if whole is not None else contextlib.nullcontext():
            calls = method.build_calibration(loaded, calib_steps, calib_prompts, calib_text, progress=tick)
    if calls is not None:
        calibration = {"used": True, "calls": len(calls), "size": recipe.calib_size, "seed": recipe.seed,
                       "steps": calib_steps if loaded.is_pipeline else None,
                       "prompts": calib_prompts or ("builtin" if loaded.is_pipeline else None),
                       "text": calib_text or ("builtin" if adapter.kind == "lm" else None)}
        if getattr(method, "selection_provenance", None):  # e.g. EDA-DM's TDAC allocation
            calibration["selection"] = method.selection_provenance
    blocks = adapter.blocks(root)
    block_names = [n for n, _ in blocks]
    by_block: dict[str, list[LayerTask]] = {}
    for t in tasks:
        by_block.setdefault(_owner(t.name, block_names), []).append(t)
    is_unit = [any(not t.plan.skip for t in by_block.get(n, [])) for n in block_names]
    outside = any(not t.plan.skip for t in by_block.get("", []))
    if stream is not None and outside and calls is not None:
        raise QuantkitError("layers outside every block need a whole-model forward for calibration, which "
                            "layer streaming cannot do; skip them in the recipe or quantize with --no-stream")
    units = [(n, b) for (n, b), u in zip(blocks, is_unit) if u] + ([("", root)] if outside else [])
    if calls is not None:
        calls = [cast_call(c, model_dtype(root)) for c in calls]
    method.ranks = ranks
    method.expert_shard = (_expert_shard(root, ranks, stream, tasks) if ranks is not None and method.expert_parallel
                           else None)
    store = _walk_store(work_dir, recipe, loaded, calls, ranks) if work_dir is not None and method.walk_resume else None
    if ranks is not None and calls is not None and method.data_parallel:
        calls = ranks.calls_of(calls)  # (after the store: its fingerprint is the whole run's)
    done: dict[str, nn.Module] = {}
    if stream is not None and not method.supports_streaming:
        raise QuantkitError(f"method {recipe.method} cannot run on a streamed model; quantize with --no-stream")
    if stream is not None and calls is not None:
        _stream_outside(stream)  # the calls start in the embeddings
    hooked = [b for _, b in blocks]
    spill = SpillManager(calib_memory, work_dir, calls) if calib_memory is not None and calls is not None else None
    prop = (BlockPropagator(root, hooked, calls, _clock_setter(root, calls), spill, block_names)
            if calls is not None else None)
    # Methods that compare with the full-precision block get a second stream of calls that runs every
    # block before it is quantized (the same modules, one step ahead), instead of a copy of the model.
    fp_prop = (BlockPropagator(root, hooked, calls, _clock_setter(root, calls), spill, block_names)
               if calls is not None and method.needs_fp_inputs else None)
    walk = [(i, n, b) for i, ((n, b), u) in enumerate(zip(blocks, is_unit)) if u or stream is not None]
    unit_of = {i: k for k, i in enumerate(i for i, u in enumerate(is_unit) if u)}
    if owns is not None:
        if calls is not None or store is None:
            raise QuantkitError("a rank's share of blocks needs independent blocks (no calibration) and a work_dir")
        walk = [(i, n, b) for i, n, b in walk if is_unit[i] and owns(unit_of[i])]
    unit_no = 0
    give_back_outside = stream is not None and calls is not None and not adapter.outside_between_blocks
    block_seconds: dict[str, float] = {}
    split_forwards = contextlib.ExitStack()
    if method.expert_shard is not None:  # each rank runs its own experts in the full-precision forwards
        split_forwards.enter_context(method.expert_shard.forwards())
    # ... and, in a streamed walk, keeps and writes only its experts' rows of the quantized ones
    rows_only = method.expert_shard if method.expert_shard is not None and method.expert_shard.rows_only else None
    try:
        for i, bname, block in walk:
            tb = time.perf_counter()
            # Carry the calls up to block i (through block i-1) before block i is read: block i-1, its
            # dense dequantization and block i are never in memory together.
            inputs, reached = prop.advance(i) if prop is not None else (None, [])
            if give_back_outside and i == walk[0][0] and fp_prop is None:
                # Every call is past the embeddings and the head never runs (the calls stop at the last
                # block): they are read again for the final write, not held beside every block.
                _release_outside(stream)
            if stream is not None and i > 0:
                stream.leave(*blocks[i - 1])
            if stream is not None:
                stream.enter(bname, block)
            fp_inputs = None
            if fp_prop is not None:
                fp_args, fp_reached = fp_prop.advance(i)
                if fp_reached != reached:
                    raise QuantkitError(f"block {bname}: full-precision and quantized calibration calls diverged")
                if is_unit[i]:
                    fp_inputs = [CallArgs(_detach(c.args), _detach(c.kwargs)) for c in fp_args]  # (spilled: copies)
                nxt = next((j for j, _, _ in walk if j > i), None)
                if nxt is not None:
                    fp_prop.advance(nxt)  # runs FP block i now, before it is quantized
            if give_back_outside and i == walk[0][0] and fp_prop is not None:
                _release_outside(stream)  # (both streams of calls are past the embeddings now)
            if not is_unit[i]:
                continue
            if progress:
                progress(bname, unit_no, len(units))
            unit_no = unit_of[i] + 1  # (a rank's share skips the others' units)
            q = None
            here = {} if rows_only is None else {"rank": ranks.env.rank, "ranks": ranks.env.world_size}
            if store is not None and (ranks is None or ranks.all(store.has(unit_no - 1, bname, **here))):
                q = store.load(unit_no - 1, bname, block, **here, owns=ranks.owns if here else None)
                if q is not None and rows_only is not None:
                    for qmodule in q.values():
                        if isinstance(qmodule, QuantExperts):
                            rows_only.adopt(qmodule)
            if q is None:
                q = _quantize_unit(method, bname, block, by_block, inputs, reached, root, calls, progress, work_dir,
                                   recipe.seed, unit_no - 1, fp_inputs)
                for name, qmodule in q.items():
                    set_submodule(root, name, qmodule)
                if store is not None:
                    _keep_block(store, unit_no - 1, bname, block, q, by_block, method, ranks, rows_only)
            else:
                # a warning, so it shows without -v: this block's result comes from an earlier (killed) run
                log.warning("block %s: finished by an earlier run, reused from %s", bname, work_dir)
                method.resumed_blocks.append(bname)
            done.update(q)
            if stream is not None:
                # The calls carried through this block must not leave a dense dequantized copy of every
                # expert beside the codes (a block's weights again, in 16 bits): dequantize per call instead.
                for qmodule in q.values():
                    for m in qmodule.modules():
                        if isinstance(m, _QuantModule):
                            m.cache_dequantized = False
                            m.__dict__.pop("_dequant_cache", None)
                # the replaced full-precision layers: the plan still refers to them
                for t in by_block.get(bname, []):
                    if not t.plan.skip:
                        t.module.to("meta")
            block_seconds[bname] = time.perf_counter() - tb  # (its write happens in the next step's leave)
        # Nothing needs the calls past the last block (the head would only cost time): close() unwinds them.
        if stream is not None and walk:
            stream.leave(*blocks[walk[-1][0]])
    finally:
        split_forwards.close()
        for p in (prop, fp_prop):
            if p is not None:
                p.close()
        calibration_spill: dict[str, Any] = {}
        if spill is not None:
            calibration_spill = {"budget": calib_memory, "peak_resident": spill.peak_resident,
                                 "spilled": spill.bytes_spilled}
            log.info("calibration activations: %s", calibration_spill)
            spill.close()
    if owns is not None:  # a share: its blocks are in work_dir; rank 0's full walk makes the result
        return QuantizationResult({}, {}, calibration, time.time() - t0, [n for n, _ in units], {}, {},
                                  block_seconds, list(method.resumed_blocks))
    if outside:
        if stream is not None:
            _stream_outside(stream)
        if progress:
            progress("(outside blocks)", unit_no, len(units))
        q = _quantize_unit(method, "", root, by_block, calls, list(range(len(calls or []))), root, calls, progress,
                           work_dir, recipe.seed, len(units) - 1)
        for name, qmodule in q.items():
            set_submodule(root, name, qmodule)
            done[name] = qmodule
    if progress:
        progress("done", len(units), len(units))
    extras = method.checkpoint_extras()
    if store is not None:
        extras = store.merged_extras(extras)
    _verify(root, todo, done)
    install_step_clock(root)  # timestep-aware quantizers (DGQ) follow the sampler from now on
    layers = {t.name: layer_record(t, done[t.name]) for t in todo}
    skipped = {t.name: t.role for t in tasks if t.plan.skip}
    return QuantizationResult(layers, skipped, calibration, time.time() - t0, [n for n, _ in units], extras,
                              calibration_spill, block_seconds,
                              list(method.resumed_blocks))


def _walk_store(work_dir: str | Path, recipe: Recipe, loaded: LoadedModel, calls: list[CallArgs] | None,
                ranks: Any) -> WalkStore:
    """The progress folder of this run. Across ranks: the same run on every rank (checked), opened by the
    main rank first (it drops a different run's blocks), then by the others."""
    if ranks is None:
        return WalkStore(work_dir, recipe, loaded, calls)
    from quantkit.walk_resume import run_fingerprint

    fingerprint = run_fingerprint(recipe, loaded, calls)
    ranks.same(fingerprint, "runs (recipe, model or calibration calls)")
    store = WalkStore(work_dir, recipe, loaded, calls, fingerprint) if ranks.is_main else None
    ranks.barrier()
    return store if store is not None else WalkStore(work_dir, recipe, loaded, calls, fingerprint)


def _keep_block(store: WalkStore, unit: int, bname: str, block: nn.Module, q: dict[str, nn.Module],
                by_block: dict[str, list[LayerTask]], method: Any, ranks: Any, rows_only: Any) -> None:
    """The finished block into the progress folder: by the main rank; with split experts' rows, every rank
    first keeps its own rows (the block counts as finished only once the main rank's files exist)."""
    split = rows_only.split_keys(block, "") if rows_only is not None else {}
    if split:
        store.save_rows(unit, ranks.env.rank, split, block, ranks.owns)
        ranks.barrier()
    if ranks is None or ranks.is_main:
        store.save(unit, bname, block, q, [t for t in by_block.get(bname, []) if not t.plan.skip],
                   method.checkpoint_extras(), split, ranks.env.world_size if split else 1)


def _release_outside(stream: BlockStream) -> None:
    release = getattr(stream, "release_outside", None)
    if release is not None:
        release()


def _expert_shard(root: nn.Module, ranks: Any, stream: BlockStream | None, tasks: list[LayerTask]) -> Any:
    """The expert split with each rank holding only its own experts (quantkit.expert_shard), when every experts
    module of the model can be split that way and is quantized (one left in full precision is written whole);
    the stream's loader then reads only those experts."""
    from quantkit.expert_shard import ExpertShard, splittable_experts

    modules, problem = splittable_experts(root)
    if not modules:
        return None
    quantized = {id(t.module) for t in tasks if not t.plan.skip}
    kept = next((type(m).__name__ for m in modules if id(m) not in quantized), None)
    if problem is None and kept is not None:
        problem = f"a {kept} module stays in full precision, so it is written whole"
    if problem is not None:
        log.warning("every rank holds all the experts of each block (their work is still split): %s", problem)
        return None
    loader = getattr(stream, "loader", None)
    if loader is not None:
        loader.keep_expert = ranks.owns
    # A streamed walk's writer takes each rank's rows of the quantized experts: nobody gathers them.
    shard = ExpertShard(ranks, modules, rows_only=hasattr(stream, "expert_shard"))
    if shard.rows_only:
        stream.expert_shard = shard
    return shard


def _stream_outside(stream: BlockStream) -> None:
    outside = getattr(stream, "outside", None)  # (a rank's prepass stream never needs them)
    if outside is not None:
        outside()


def _quantize_unit(method: Any, bname: str, block: nn.Module, by_block: dict[str, list[LayerTask]],
                   inputs: list[CallArgs] | None, reached: list[int], root: nn.Module, calls: list[CallArgs] | None,
                   progress: Progress | None, work_dir: str | Path | None, seed: int, unit: int,
                   fp_inputs: list[CallArgs] | None = None) -> dict[str, nn.Module]:
    """One block through the method, with a per-block seed for methods that draw from torch's global RNG
    (so a resumed run draws the same numbers as an uninterrupted one)."""
    ctx = BlockContext(bname, block, by_block.get(bname, []), inputs, root,
                       calls=[calls[k] for k in reached] if calls is not None else None, progress=progress,
                       work_dir=Path(work_dir) if work_dir is not None else None, fp_inputs=fp_inputs)
    if inputs is not None:
        check_inputs_finite(inputs, f"block {bname or '(root)'}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100_003 + unit)
        q = method.quantize_block(ctx)
    shard = method.expert_shard
    for name, qmodule in q.items():
        # (a rank that keeps only its experts' rows checks those: the others are unwritten memory)
        check_module_finite(name, qmodule, shard.held(qmodule) if shard is not None else None)
    log.info("quantized %s (%d layers)", bname or "layers outside blocks", len(ctx.tasks))
    return q


def _clock_setter(root: nn.Module, calls: list[CallArgs]) -> Callable[[int], None]:
    """Before call k resumes: point timestep-aware quantizers at call k's step (calls interleave)."""

    def set_clock(k: int) -> None:
        fn = getattr(root, "_quantkit_clock_fn", None)
        if fn is not None:
            fn(calls[k].args, calls[k].kwargs)

    return set_clock


def model_dtype(root: nn.Module) -> torch.dtype:
    """The floating dtype of the root's parameters (the first floating one)."""
    for p in root.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def cast_call(call: CallArgs, dtype: torch.dtype) -> CallArgs:
    """Floating tensors of a calibration call in the model's dtype (timesteps and ids are left alone)."""

    def cv(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 1 and v.dtype != dtype:
            return v.to(dtype)
        if isinstance(v, dict):
            return {k: cv(x) for k, x in v.items()}
        return v

    return CallArgs(tuple(cv(a) for a in call.args), {k: cv(v) for k, v in call.kwargs.items()})


def _verify(root: nn.Module, todo: list[LayerTask], done: dict[str, nn.Module]) -> None:
    """Every planned layer was replaced; no fused expert weight was left behind silently."""
    missing = [t.name for t in todo if t.name not in done]
    if missing:
        raise QuantkitError(f"{len(missing)} planned layers were not quantized, e.g. {missing[0]}")
    planned_experts = {t.name for t in todo if t.kind == "experts"}
    for name, m in root.named_modules():
        if name in planned_experts and not isinstance(m, QuantExperts):
            raise QuantkitError(f"expert weights of {name} were left unquantized")
