"""`quantkit quantize` under torchrun: the work of a run split across ranks.

Three splits, each giving the single-process checkpoint bit for bit:

- Independent blocks (no calibration calls, e.g. RTN weight-only): each rank quantizes the blocks whose
  unit number is its own (unit % world_size == rank) into the run's progress folder
  (quantkit.walk_resume); after a barrier, rank 0 runs the ordinary single-process walk, which finds
  every block finished and writes the checkpoint (same per-block seeds, same writer).
- Calibrated MoE methods that quantize experts one by one (duquant, eaquant: `Method.expert_parallel`):
  every rank walks the blocks on the same calibration calls; what spans experts (smoothing statistics
  and their maximum over experts, router alignment, token counts) is computed on every rank from all the
  tokens, so it is exact, not a per-rank approximation; the per-expert work (rotation search, clipping
  search or GPTQ) is split by expert (e % world_size == rank). In a streamed walk each rank keeps only its
  experts' rows of the quantized experts, runs them in the quantized block's forward and writes them into
  the shards rank 0 lays out (quantkit.expert_shard); otherwise they are gathered (RankShare.gather), so
  every rank holds the same quantized block. Either way every rank carries the same activations into the
  next block. Rank 0 writes the rest of the checkpoint and the progress folder (each rank its own rows);
  whether a block is reused from a killed run is agreed by all ranks.
- Calibrated methods whose statistics are exact reductions over calls (RTN with static activation ranges:
  a min and a max, `Method.data_parallel`): the calibration calls are split across ranks (call k on rank
  k % world_size), each rank carries its calls through the blocks, and the observed ranges are reduced
  (all-reduce of min and max, exact in any order) before the block is quantized. Each rank holds 1/N of
  the activations and runs 1/N of the block forwards.

A killed rank's finished blocks survive for the rerun, and no half-written checkpoint is ever valid
(the writer's atomic rename). Other calibrated methods are refused in one line, never run wrong.
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


def check_supported(method: Any, todo: list[Any], env: DistEnv) -> None:
    """Refuse (one line) what the rank splits cannot run exactly (`--calib` files are refused before loading)."""
    if method.needs_calibration(todo) and not (method.expert_parallel or method.data_parallel):
        raise QuantkitError(f"method {method.name} calibrates block by block and has no expert or data split, so it "
                            f"does not run across ranks (WORLD_SIZE={env.world_size}); run it as a single process "
                            "(without torchrun); across ranks: duquant, eaquant, rtn")
    if not method.walk_resume:
        raise QuantkitError(f"method {method.name} cannot resume mid-walk, so its blocks cannot be split across "
                            "ranks; run it as a single process (without torchrun)")


class PrepassStream:
    """The BlockStream of a rank that writes nothing: materialize blocks from the source shards and release
    them (rank 0 writes the checkpoint: from the progress folder, or in its own walk of a calibrated run)."""

    def __init__(self, loader: Any, block_names: list[str] | None = None) -> None:
        self.loader = loader
        self.block_names = block_names or []
        self.entered: set[str] = set()
        self._outside_loaded = False
        self.expert_shard = None  # set by the pipeline when this rank keeps only its experts' rows

    def outside(self) -> None:
        """Embeddings, norms, heads: where a calibrated walk's calls start (rank 0 checks their values)."""
        if not self._outside_loaded:
            self.loader.materialize([""], exclude=self.block_names)
            self._outside_loaded = True

    def release_outside(self) -> None:
        if self._outside_loaded:
            self.loader.release_outside(self.block_names)
            self._outside_loaded = False

    def enter(self, name: str, module: nn.Module) -> None:
        for earlier in list(self.entered):  # one block at a time (the walk only hands back block i-1)
            self.leave(earlier, module)
        self.loader.materialize([name])
        self.entered.add(name)

    def leave(self, name: str, module: nn.Module) -> None:
        if name not in self.entered:  # the walk hands back the previous block, which may not be ours
            return
        from quantkit.streaming import release_freed_memory

        shard = self.expert_shard
        if shard is not None and shard.split_keys(module, f"{name}."):
            shard.write_rows(None, module.state_dict(prefix=f"{name}."))  # its experts' rows, into rank 0's file
        self.entered.discard(name)
        self.loader.release(name)
        release_freed_memory()


class RankShare:
    """A rank's part of a calibrated walk: its experts of every MoE layer, or its calibration calls (see the
    module docstring)."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def owns(self, expert: int) -> bool:
        return expert % self.env.world_size == self.env.rank

    def gather(self, mine: dict[int, Any], n: int) -> list[Any]:
        """Every rank's {expert: result} joined into the list of all n results, on every rank. A result is
        nested tuples / lists of tensors (and None): its layout travels as a small object, each tensor by a
        broadcast from its expert's rank straight into its final buffer, so a layer's codes are never held
        pickled or twice (pickling them all at once was a rank's memory peak). Bits travel unchanged."""
        import torch.distributed as dist

        tensors: dict[int, list[torch.Tensor]] = {}
        layouts = {}
        for e, result in mine.items():
            tensors[e] = []
            layouts[e] = _strip(result, tensors[e])
        metas = {e: [(tuple(t.shape), t.dtype) for t in ts] for e, ts in tensors.items()}
        parts: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(parts, (layouts, metas))
        all_layouts: dict[int, Any] = {}
        all_metas: dict[int, Any] = {}
        for lay, met in parts:
            all_layouts.update(lay)
            all_metas.update(met)
        missing = [e for e in range(n) if e not in all_layouts]
        if missing:
            raise QuantkitError(f"expert {missing[0]} was quantized by no rank (the ranks disagree on the layer)")
        device = self._device()
        out = []
        for e in range(n):  # the same order on every rank: the broadcasts pair up
            if e in tensors:
                ts = [t.contiguous() for t in tensors[e]]
            else:
                ts = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in all_metas[e]]
            for t in ts:
                dist.broadcast(t, src=e % self.env.world_size)
            out.append(_fill(all_layouts[e], ts))
        return out

    def exchange(self, mine: dict[int, torch.Tensor], rows: dict[int, int], like: torch.Tensor) -> dict[int, torch.Tensor]:
        """Every rank's {expert: output [rows[e], H]} joined, on every rank. Every rank knows every expert's
        row count (the routing is computed on every rank from the same tokens), so a rank's outputs travel
        as one tensor, broadcast from it into a buffer of the right size on the others: tensor collectives
        (gloo on CPU, NCCL on GPUs), nothing pickled. `like` gives the outputs' dtype, width and device."""
        import torch.distributed as dist

        world, device = self.env.world_size, self._device()
        h = like.shape[-1]
        joined: dict[int, torch.Tensor] = {}
        for r in range(world):  # the same order on every rank: the broadcasts pair up
            experts = [e for e in sorted(rows) if e % world == r]
            n = sum(rows[e] for e in experts)
            if r == self.env.rank:
                for e in experts:
                    if e not in mine:
                        raise QuantkitError(f"expert {e} has tokens but its rank computed no output for it")
                    if mine[e].dtype != like.dtype or tuple(mine[e].shape) != (rows[e], h):
                        raise QuantkitError(f"expert {e}'s output is {mine[e].dtype} {tuple(mine[e].shape)}, "
                                            f"expected {like.dtype} {(rows[e], h)} (the outputs travel in one dtype)")
                buf = torch.cat([mine[e] for e in experts]).to(device) if experts else None
            else:
                buf = torch.empty(n, h, dtype=like.dtype, device=device)
            if n == 0:
                continue
            dist.broadcast(buf, src=r)
            if r == self.env.rank:
                joined.update((e, mine[e]) for e in experts)
            else:
                joined.update((e, part.to(like.device)) for e, part in zip(experts, buf.split([rows[e] for e in experts])))
        return joined

    def broadcast_object(self, obj: Any) -> Any:
        """The main rank's `obj` on every rank (a small picklable object, e.g. where a file's tensors lie)."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum over the ranks (exact in any order)."""
        import torch.distributed as dist

        out = t.detach().to(self._device(), copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out.to(t.device)

    def calls_of(self, calls: list[Any]) -> list[Any]:
        """This rank's calibration calls: call k on rank k % world_size."""
        return calls[self.env.rank::self.env.world_size]

    def widen(self, observed_min: torch.Tensor, observed_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The range every rank's calls cover together: min of the minima, max of the maxima (exact)."""
        import torch.distributed as dist

        lo = observed_min.detach().float().to(self._device(), copy=True)
        hi = observed_max.detach().float().to(self._device(), copy=True)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return lo.to(observed_min.device), hi.to(observed_max.device)

    def all(self, flag: bool) -> bool:
        """True on every rank when it is true on every rank (e.g. a block finished by a killed run)."""
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def same(self, value: str, what: str) -> None:
        """Stop on every rank, in one line, when the ranks hold different `value`s (e.g. calibration)."""
        import torch.distributed as dist

        got: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(got, value)
        if len(set(got)) != 1:
            raise QuantkitError(f"the ranks built different {what}; the split would not equal a single process")

    def barrier(self) -> None:
        barrier()

    @staticmethod
    def _device() -> torch.device:
        """Where collective tensors live: NCCL reduces CUDA tensors only, gloo CPU ones."""
        import torch.distributed as dist

        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class _TensorSlot:
    """Where a tensor sits in a gathered result's layout (quantkit.distributed.RankShare.gather)."""

    def __init__(self, index: int) -> None:
        self.index = index


def _strip(obj: Any, out: list[torch.Tensor]) -> Any:
    """obj with each tensor replaced by a slot (the tensors appended to `out`, in order)."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return _TensorSlot(len(out) - 1)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_strip(x, out) for x in obj)
    return obj


def _fill(layout: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(layout, _TensorSlot):
        return tensors[layout.index]
    if isinstance(layout, (tuple, list)):
        return type(layout)(_fill(x, tensors) for x in layout)
    return layout
