"""Progress of the library's own long loops (expert rotations / GPTQ, router records, feature extraction).

Library code never prints: a loop wraps its iterable in `track`, which reports `(depth, what, done, total)` to the
reporter the caller installed with `reporting` (the CLI draws one bar per nesting depth). Without a reporter,
`track` only iterates."""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
Reporter = Callable[[int, str, int, int], None]  # depth, what, done, total

_REPORTER: ContextVar[Reporter | None] = ContextVar("quantkit_progress_reporter", default=None)
_DEPTH: ContextVar[int] = ContextVar("quantkit_progress_depth", default=0)


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    """Send every `track` inside this context to `reporter`."""
    token = _REPORTER.set(reporter)
    try:
        yield
    finally:
        _REPORTER.reset(token)


def track(items: Iterable[T], what: str, total: int | None = None) -> Iterator[T]:
    """Iterate `items`, reporting `what` and the count done before the first item and after each one."""
    reporter = _REPORTER.get()
    if reporter is None:
        yield from items
        return
    if total is None:
        total = len(items)  # type: ignore[arg-type]
    depth = _DEPTH.get()
    _DEPTH.set(depth + 1)  # loops run inside this one report one level deeper
    try:
        reporter(depth, what, 0, total)
        for done, item in enumerate(items, 1):
            yield item
            reporter(depth, what, done, total)
    finally:
        _DEPTH.set(depth)
