"""torchrun entry for tests/test_distributed.py: the quantize command, with rank 1 killed (os._exit)
when block number QK_KILL_AT (default 1, counted from 0) of its walk starts, as a crashed or preempted
rank would die. QK_KILL_METHOD names the method whose blocks count (default rtn)."""
from __future__ import annotations

import os
import sys

from quantkit.cli import app
from quantkit.methods.base import METHODS

if os.environ.get("RANK") == "1":
    cls = METHODS[os.environ.get("QK_KILL_METHOD", "rtn")]
    original = cls.quantize_block
    kill_at = int(os.environ.get("QK_KILL_AT", "1"))
    seen: list[str] = []

    def dies_at(self, ctx):
        if len(seen) == kill_at:
            os._exit(9)
        seen.append(ctx.name)
        return original(self, ctx)

    cls.quantize_block = dies_at

sys.exit(app(sys.argv[1:]))
