"""Safe outputs: `--out` is validated before any work, `--overwrite` only ever replaces a previous
quantkit checkpoint (every file in it listed by its quantization.json), and one run at a time
writes a given output (a lock file beside it)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from quantkit.errors import QuantkitError

QUANT_JSON = "quantization.json"
FORMAT_NAME = "quantkit-checkpoint"


def _nearest_existing(p: Path) -> Path:
    for anc in (p, *p.parents):
        if anc.exists():
            return anc
    return Path("/")


def _writable(folder: Path) -> bool:
    """A real probe: os.access says yes to root on a read-only mount."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        tempfile.TemporaryDirectory(dir=folder, prefix=".quantkit-probe-").cleanup()
    except OSError:
        return False
    return True


def quantkit_files(out: Path) -> list[str] | None:
    """The files a quantkit checkpoint in `out` says it wrote, or None if `out` is no such checkpoint."""
    try:
        meta = json.loads((out / QUANT_JSON).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME or not isinstance(meta.get("files"), list):
        return None
    return [str(f) for f in meta["files"]]


def check_output_path(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse an --out that would fail after the work or destroy something: raises QuantkitError."""
    r = Path(os.path.abspath(out)).resolve()
    cwd = Path.cwd().resolve()
    if r == cwd or r in cwd.parents:
        raise QuantkitError(f"--out {out} is the current folder or one of its parents; give a new folder, "
                            "e.g. --out ./model-int8")
    for anc in (r, *r.parents):
        if anc.exists() and not anc.is_dir():
            what = "exists and is not a folder" if anc == r else f"is inside {anc}, which is a file"
            raise QuantkitError(f"output path {out} {what}; choose another --out")
    if source is not None:
        s = source.resolve()
        if r == s or s in r.parents or r in s.parents:
            rel = "is" if r == s else ("is inside" if s in r.parents else "contains")
            raise QuantkitError(f"--out {out} {rel} the source model folder {source}; write the checkpoint elsewhere")
    parent = _nearest_existing(r.parent)
    if not _writable(parent):
        raise QuantkitError(f"output folder {parent} is not writable (read-only or no permission); choose another --out")
    if r.exists() and any(r.iterdir()):
        if not overwrite:
            raise QuantkitError(f"output folder {out} is not empty; choose another --out or pass --overwrite")
        listed = quantkit_files(r)
        if listed is None:
            raise QuantkitError(f"--overwrite only replaces a quantkit checkpoint, and {out} is not one (no "
                                f"{QUANT_JSON} with a file list); move its files away or choose another --out")
        allowed = set(listed)
        for f in sorted(p for p in r.rglob("*") if not p.is_dir()):
            rel = f.relative_to(r).as_posix()
            if rel not in allowed:
                raise QuantkitError(f"--overwrite would delete {rel} in {out}, which quantkit did not write; "
                                    "move it away or choose another --out")


def written_files(folder: Path) -> list[str]:
    """Every file under `folder`, relative, sorted (the manifest a later --overwrite checks)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold `.OUT.lock` beside the output for the whole run; a second run on the same --out fails."""
    import fcntl

    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QuantkitError(f"another quantkit run is writing {out} (lock {lock.name} is held); "
                                "wait for it or choose another --out") from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                lock.unlink()
    finally:
        os.close(fd)
