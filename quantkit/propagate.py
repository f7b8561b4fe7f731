"""Calibration propagation in linear time: every calibration call of the root runs once, paused at
each block until that block is quantized, then carried on through the quantized block.

Each call runs the root's own forward in a worker thread that a forward pre-hook stops at the
next block of the walk. The glue between blocks (embeddings, skip connections of a UNet, per-layer
attention masks of a decoder, ...) is the model's own code, so nothing about a family's block graph
is re-implemented; skip tensors live in the paused forward. Only one thread runs at a time, handed a
baton by the walk, so the computation is the same sequence of operations as running each call by
itself: deterministic and bit for bit reproducible.

Cost: each block runs once per call (plus what the method does), whatever its depth; the old
re-capture from the first layer ran block j i+1 times for block i (quadratic in depth).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Sequence

import torch
from torch import nn

from quantkit.adapters.base import CallArgs
from quantkit.errors import QuantkitError
from quantkit.spill import SpilledInputs, SpillManager

log = logging.getLogger(__name__)


class _Abort(BaseException):
    """Raised in a paused worker when the walk ends early: unwinds its forward."""


class BlockPropagator:
    """Drive calibration calls of `root` block by block.

    `advance(i)` resumes every call until it reaches block i (or finishes) and returns the arguments
    block i receives, with the indices of the calls they belong to. `before_resume(k)` runs on the
    walk's thread just before call k is resumed (e.g. to set per-call state such as a step clock).
    """

    def __init__(self, root: nn.Module, blocks: list[nn.Module], calls: list[CallArgs],
                 before_resume: Callable[[int], None] | None = None, spill: SpillManager | None = None,
                 names: list[str] | None = None) -> None:
        self.root, self.calls, self.before_resume, self.spill = root, calls, before_resume, spill
        self.names = names or [str(i) for i in range(len(blocks))]
        self.index = {id(b): i for i, b in enumerate(blocks)}
        if len(self.index) != len(blocks):
            raise QuantkitError("the same module appears twice among the blocks of the walk")
        self.target = 0
        self.pos: list[int | None] = [None] * len(calls)  # block index a call waits at; None = not started
        self.args: list[CallArgs | None] = [None] * len(calls)
        self.finished = [False] * len(calls)
        self.errors: list[BaseException | None] = [None] * len(calls)
        self._go = [threading.Semaphore(0) for _ in calls]
        self._back = threading.Semaphore(0)
        self._abort = False
        self._local = threading.local()
        self._threads: list[threading.Thread | None] = [None] * len(calls)
        self._handles = [b.register_forward_pre_hook(self._hook, with_kwargs=True) for b in blocks]
        if spill is not None:  # block outputs a call carries on (a UNet's skips) count towards the budget
            self._handles += [b.register_forward_hook(self._track_output) for b in blocks]
        self.block_calls = [0] * len(blocks)  # forward calls each block received from the walk's threads

    # -- worker side --------------------------------------------------------------------------
    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        k = getattr(self._local, "k", None)
        if k is None:  # the walk's own thread (a method running the block): not ours
            return None
        j = self.index[id(module)]
        if j >= self.target:
            self.pos[k], self.args[k] = j, CallArgs(tuple(args), dict(kwargs))
            if self.spill is not None:
                self.spill.track(k, (args, kwargs))
                self.spill.paused(k)
            self._back.release()
            self._go[k].acquire()
            if self._abort:
                raise _Abort
            self.args[k] = None
        self.block_calls[j] += 1
        return None

    def _track_output(self, module: nn.Module, args: tuple, out: object) -> None:
        k = getattr(self._local, "k", None)
        if k is not None and self.spill is not None:
            self.spill.track(k, out)

    def _work(self, k: int) -> None:
        self._local.k = k
        self._go[k].acquire()
        try:
            if not self._abort:
                with torch.no_grad():
                    c = self.calls[k]
                    self.root(*c.args, **c.kwargs)
        except _Abort:
            pass
        except BaseException as e:  # re-raised on the walk's thread
            self.errors[k] = e
        finally:
            self.finished[k] = True
            self.pos[k] = None
            self._back.release()

    def _resume(self, k: int) -> None:
        if self.before_resume is not None:
            self.before_resume(k)
        if self.spill is not None:
            self.spill.resuming(k)
        if self._threads[k] is None:
            t = threading.Thread(target=self._work, args=(k,), daemon=True, name=f"quantkit-calib-{k}")
            self._threads[k] = t
            t.start()
        self._go[k].release()
        self._back.acquire()
        err = self.errors[k]
        if err is not None:
            self.close()
            if isinstance(err, QuantkitError):
                raise err
            raise QuantkitError(f"calibration call {k} failed in the model's forward: "
                                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err

    # -- walk side ----------------------------------------------------------------------------
    def advance(self, i: int) -> tuple[Sequence[CallArgs], list[int]]:
        """Inputs of block i for every call that reaches it, and those calls' indices."""
        if i < self.target:
            raise QuantkitError(f"blocks must be walked in order (asked for block {i} after {self.target})")
        self.target = i
        for k in range(len(self.calls)):
            while not self.finished[k] and (self.pos[k] is None or self.pos[k] < i):
                self._resume(k)
        reached = [k for k in range(len(self.calls)) if self.pos[k] == i]
        later = [self.pos[k] for k in range(len(self.calls)) if self.pos[k] is not None and self.pos[k] > i]
        if not reached and later:
            # One pass per call needs the walk in execution order; a block that runs later would be skipped.
            raise QuantkitError(f"block {self.names[min(later)]} ran before block {self.names[i]}: the adapter "
                                "lists blocks out of execution order")
        if len(reached) < len(self.calls):
            log.debug("block %d reached by %d of %d calibration calls", i, len(reached), len(self.calls))
        args = [self.args[k] for k in reached]
        if self.spill is not None:
            return SpilledInputs(args, reached, self.spill), reached  # type: ignore[arg-type]
        return args, reached  # type: ignore[return-value]

    def finish(self) -> None:
        """Run every call to its end (through all quantized blocks)."""
        self.target = len(self.index)
        for k in range(len(self.calls)):
            while not self.finished[k]:
                self._resume(k)

    def close(self) -> None:
        """Unwind paused calls and remove the hooks (idempotent)."""
        self._abort = True
        for k, t in enumerate(self._threads):
            if t is not None and not self.finished[k]:
                self._go[k].release()
                t.join()
        for h in self._handles:
            h.remove()
        self._handles = []

    def __deepcopy__(self, memo: dict) -> "BlockPropagator":
        # Methods deep-copy blocks (e.g. reconstruction's working copy); the copy's hooks point here,
        # and they are inert on the walk's own thread, where methods run blocks.
        return self

    def __enter__(self) -> "BlockPropagator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
