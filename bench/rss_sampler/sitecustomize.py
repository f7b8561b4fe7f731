"""Where a process's memory goes, sampled from inside it (BENCHMARKS.md, "2026-12-05").

Python imports `sitecustomize` at start-up from any folder on PYTHONPATH, so putting this folder there
instruments every quantkit process, torchrun's ranks included, without touching quantkit:

    QK_PEAK_OUT=/tmp/peak PYTHONPATH=bench/rss_sampler torchrun --nproc-per-node 2 --no-python \
        quantkit quantize SRC --out OUT --recipe eaquant-w4a4-fast --calib-size 4 --stream

Every 20 ms a thread reads RssAnon (the process's own memory: no mapped file pages) from /proc. At exit each
process writes QK_PEAK_OUT.RANK.txt (RANK "single" outside torchrun) with:
- the peak and the main thread's stack at that moment;
- optionally a census of the live CPU tensors (unique storages, by shape and dtype), taken once the first
  time the main thread's innermost quantkit frames contain QK_CENSUS_AT (e.g. "materialize": a block being
  read) after QK_CENSUS_AFTER seconds (default 30);
- a timeline: every 0.5 s, RssAnon and the innermost three quantkit frames.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import traceback
from types import FrameType

_OUT = os.environ.get("QK_PEAK_OUT")
_CENSUS_AT = os.environ.get("QK_CENSUS_AT")
_CENSUS_AFTER = float(os.environ.get("QK_CENSUS_AFTER", "30"))


def _anon_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def _where(frame: FrameType | None) -> str:
    if frame is None:
        return ""
    names = [f"{fs.filename.rsplit('/', 1)[-1]}:{fs.name}" for fs in traceback.extract_stack(frame)
             if "quantkit" in fs.filename]
    return " > ".join(names[-3:])


def _census(label: str) -> str:
    """The live CPU tensors, by shape and dtype, each storage counted once."""
    import gc

    import torch

    seen: set[int] = set()
    by_kind: dict[tuple, int] = {}
    for o in gc.get_objects():
        try:
            if not isinstance(o, torch.Tensor) or o.is_meta or o.device.type != "cpu":
                continue
            storage = o.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                continue
            seen.add(storage.data_ptr())
            kind = (tuple(o.shape), str(o.dtype))
            by_kind[kind] = by_kind.get(kind, 0) + storage.nbytes()
        except RuntimeError:  # (tensors without storage, e.g. some wrapper subclasses)
            continue
    top = sorted(by_kind.items(), key=lambda kv: -kv[1])[:25]
    return (f"census {label}: {len(seen)} storages, {sum(by_kind.values()) / 1e9:.3f} GB\n"
            + "\n".join(f"  {nbytes / 1e6:9.1f} MB  {kind}" for kind, nbytes in top))


def _start(out: str) -> None:
    main = threading.main_thread().ident
    t0 = time.time()
    peak = {"kb": 0, "t": 0.0, "stack": ""}
    timeline: list[str] = []
    census: list[str] = []

    def sample() -> None:
        n = 0
        while True:
            kb = _anon_kb()
            frame = sys._current_frames().get(main)
            now = time.time() - t0
            if _CENSUS_AT and not census and now > _CENSUS_AFTER and _CENSUS_AT in _where(frame):
                census.append(_census(f"at {now:.1f} s, RssAnon {kb / 1e6:.3f} GB, {_where(frame)}"))
            if n % 25 == 0:
                timeline.append(f"{now:7.1f} {kb / 1e6:6.3f} GB  {_where(frame)}")
            if kb > peak["kb"]:
                peak.update(kb=kb, t=now, stack="".join(traceback.format_stack(frame)) if frame else "")
            n += 1
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()

    @atexit.register
    def write() -> None:
        with open(f"{out}.{os.environ.get('RANK', 'single')}.txt", "w") as f:
            f.write(f"peak RssAnon {peak['kb']} KB at {peak['t']:.1f} s\n{peak['stack']}\n")
            f.write("\n".join(census + timeline) + "\n")


if _OUT:
    _start(_OUT)
