"""`quantkit quantize` under torchrun: blocks split across ranks through the per-block resume store.

Supported today: methods whose blocks are independent (no calibration calls, e.g. RTN weight-only).
Each rank quantizes the blocks whose unit number is its own (unit % world_size == rank) and keeps
them in the run's progress folder (quantkit.walk_resume); after a barrier, rank 0 runs the ordinary
single-process walk, which finds every block finished and writes the checkpoint. The checkpoint is
therefore the single-process one bit for bit (same per-block seeds, same writer), a killed rank's
finished blocks survive for the rerun, and no half-written checkpoint is ever valid (the writer's
atomic rename). Calibrated methods carry activations from block to block, which needs the expert-
and data-parallel walk that is not built yet: they are refused in one line, never run wrong.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)

# Rank 0 writes the whole checkpoint while the others wait at the last barrier: allow for real sizes.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, unit: int) -> bool:
        """Whether this rank quantizes unit number `unit` (round robin: neighbouring blocks, similar sizes)."""
        return unit % self.world_size == self.rank


def detect() -> DistEnv | None:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), or None for a single process."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise QuantkitError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise QuantkitError(f"RANK={rank} WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return None if world == 1 else DistEnv(rank, world, local)


def init(env: DistEnv, device: str) -> None:
    """gloo on CPU, NCCL on CUDA (the one installed with torch: nothing else to install)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)
    log.info("rank %d of %d joined (%s)", env.rank, env.world_size, backend)


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def finish() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def check_supported(method: Any, todo: list[Any], calls: Any, env: DistEnv) -> None:
    """Refuse (one line) what the rank split cannot run exactly."""
    if calls is not None or method.needs_calibration(todo):
        raise QuantkitError(f"method {method.name} calibrates block by block, which does not run across ranks "
                            f"yet (WORLD_SIZE={env.world_size}); run it as a single process (without torchrun), "
                            "or use a weight-only method without calibration (e.g. rtn, no static activations)")
    if not method.walk_resume:
        raise QuantkitError(f"method {method.name} cannot resume mid-walk, so its blocks cannot be split across "
                            "ranks; run it as a single process (without torchrun)")


class PrepassStream:
    """The BlockStream of a rank's share: materialize its blocks from the source shards, write nothing
    (rank 0's final walk writes the checkpoint from the progress folder)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.entered: set[str] = set()

    def enter(self, name: str, module: nn.Module) -> None:
        for earlier in list(self.entered):  # one block at a time (the walk only hands back block i-1)
            self.leave(earlier, module)
        self.loader.materialize([name])
        self.entered.add(name)

    def leave(self, name: str, module: nn.Module) -> None:
        if name not in self.entered:  # the walk hands back the previous block, which may not be ours
            return
        from quantkit.streaming import release_freed_memory

        self.entered.discard(name)
        self.loader.release(name)
        release_freed_memory()
