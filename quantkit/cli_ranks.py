"""`quantkit quantize` under torchrun (see quantkit.distributed for why both splits give the single-process
checkpoint bit for bit).

Independent blocks: every rank quantizes its share of the blocks into the progress folder, then rank 0
runs the single-process command, which reuses them and writes the checkpoint. Calibrated methods:
rank 0 runs the single-process command and the others walk beside it, each doing its share of every
MoE layer's experts (duquant, eaquant) or of the calibration calls (rtn's static ranges); rank 0 writes
(and, in a streamed expert split, each rank its experts' rows of the same files)."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Optional

from rich.console import Console

from quantkit.distributed import DistEnv, PrepassStream, RankShare, barrier, check_supported
from quantkit.errors import QuantkitError


def quantize_ranks(env: DistEnv, model: str, out: Path, rec, calib: Optional[Path], calib_prompts: Optional[Path],
                   calib_text: Optional[Path], calib_steps: Optional[int], resume: bool, device: str,
                   overwrite: bool, max_shard_mb: int, say: Console, json_path: Optional[str], dtype: str = "auto",
                   stream: Optional[bool] = None, calib_memory: Optional[str] = None) -> None:
    """The quantize command on rank `env.rank` of a torchrun job (flags already checked)."""
    from quantkit.cli_quantize import load_and_plan, quantize_locked
    from quantkit.methods import get_method
    from quantkit.models import DTYPES
    from quantkit.output_guard import output_lock
    from quantkit.pipeline import quantize_model
    from quantkit.walk_resume import WalkStore

    if dtype != "auto" and dtype not in DTYPES:
        raise QuantkitError(f"unknown --dtype {dtype!r}; allowed: auto, bfloat16, float16, float32")
    if calib is not None or calib_memory is not None:
        raise QuantkitError(f"--calib / --calib-memory do not run across ranks yet (WORLD_SIZE={env.world_size}); "
                            "run without torchrun")
    if stream and device != "cpu":
        raise QuantkitError("--stream materializes blocks on the CPU; use --no-stream with --device cuda")
    method = get_method(rec.method, rec)
    work_dir = out.parent / f".{out.name}.progress"
    with contextlib.ExitStack() as held:
        if env.is_main:  # one writer of --out: rank 0 holds the lock for the whole job
            held.enter_context(output_lock(out))
        loaded, loader, tasks = load_and_plan(model, rec, method, stream, device, dtype, calib, calib_prompts,
                                              calib_text, calib_steps)
        todo = [t for t in tasks if not t.plan.skip]
        check_supported(method, todo, env)
        if method.needs_calibration(todo):
            if env.is_main:  # rank 0 runs the single-process command, which loads its own: nothing of this
                loaded = loader = None  # load may stay referenced (the tasks hold its modules), or a whole
                tasks = todo = None  # --no-stream model would sit beside the second one
            _calibrated_split(env, (loaded, loader), model, out, rec, calib_prompts, calib_text, calib_steps,
                              resume, device, overwrite, max_shard_mb, say, json_path, dtype, stream, work_dir)
            return
        if env.is_main:
            if not resume:
                shutil.rmtree(work_dir, ignore_errors=True)
            WalkStore(work_dir, rec, loaded, None)  # drops a different run's blocks before any rank saves one
            say.print(f"[bold]{env.world_size} ranks[/]: each quantizes its share of the blocks into {work_dir}, "
                      "then rank 0 writes the checkpoint", highlight=False)
        barrier()
        share = quantize_model(loaded, rec, work_dir=work_dir, owns=env.owns,
                               stream=PrepassStream(loader) if loader is not None else None)
        if env.is_main:
            say.print(f"rank 0: {len(share.block_seconds) - len(share.resumed_blocks)} blocks quantized, "
                      f"{len(share.resumed_blocks)} reused from a killed run", highlight=False)
        del loaded, loader
        barrier()  # every share is in work_dir
        if env.is_main:
            with _ranks_blocks_reused() as reused:
                quantize_locked(model, out, rec, calib, calib_prompts, calib_text, calib_steps, True, device,
                                overwrite, max_shard_mb, say, json_path, dtype, stream, calib_memory)
            say.print(f"rank 0: the checkpoint took {reused[0]} blocks from the ranks' shares", highlight=False)
    barrier()  # the others exit once the checkpoint is in place


def _calibrated_split(env: DistEnv, model_loaded: tuple, model: str, out: Path, rec, calib_prompts: Optional[Path],
                      calib_text: Optional[Path], calib_steps: Optional[int], resume: bool, device: str,
                      overwrite: bool, max_shard_mb: int, say: Console, json_path: Optional[str], dtype: str,
                      stream: Optional[bool], work_dir: Path) -> None:
    """A calibrated run with each MoE layer's experts, or the calibration calls, split across ranks: rank 0
    runs the single-process command (it writes the checkpoint and the progress folder), the other ranks
    walk beside it."""
    from quantkit.cli_quantize import quantize_locked
    from quantkit.methods import get_method
    from quantkit.pipeline import quantize_model

    share = RankShare(env)
    if env.is_main:
        split = ("each quantizes its share of every MoE layer's experts" if get_method(rec.method, rec).expert_parallel
                 else "each carries its share of the calibration calls, statistics reduced")
        say.print(f"[bold]{env.world_size} ranks[/]: every rank walks the calibrated blocks, {split}; rank 0 writes "
                  "the checkpoint", highlight=False)
        quantize_locked(model, out, rec, None, calib_prompts, calib_text, calib_steps, resume, device, overwrite,
                        max_shard_mb, say, json_path, dtype, stream, None, ranks=share)
    else:
        import logging

        # the same walk as rank 0's: its warnings are rank 0's, said once there; errors still show
        logging.getLogger("quantkit").setLevel(logging.ERROR)
        loaded, loader = model_loaded  # (loaded and checked by quantize_ranks)
        names = [n for n, _ in loaded.adapter.blocks(loaded.root)]
        quantize_model(loaded, rec, calib_prompts=str(calib_prompts) if calib_prompts else None,
                       calib_text=str(calib_text) if calib_text else None, calib_steps=calib_steps, work_dir=work_dir,
                       stream=PrepassStream(loader, names) if loader is not None else None, ranks=share)
    barrier()  # the others exit once the checkpoint is in place


@contextlib.contextmanager
def _ranks_blocks_reused():
    """Rank 0's writing pass reuses every block the ranks quantized: the walk's per-block "finished by an
    earlier run" warning (meant for a resumed kill) would be printed once per block, so it is counted instead."""
    import logging

    count = [0]

    def drop(record: logging.LogRecord) -> bool:
        if "finished by an earlier run" in record.getMessage():
            count[0] += 1
            return False
        return True

    logger = logging.getLogger("quantkit.pipeline")
    logger.addFilter(drop)
    try:
        yield count
    finally:
        logger.removeFilter(drop)
