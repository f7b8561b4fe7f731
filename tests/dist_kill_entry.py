"""torchrun entry for tests/test_distributed.py: the quantize command, with rank 1 killed (os._exit)
when its second block starts, as a crashed or preempted rank would die."""
from __future__ import annotations

import os
import sys

from quantkit.cli import app
from quantkit.methods.base import METHODS

if os.environ.get("RANK") == "1":
    cls = METHODS["rtn"]
    original = cls.quantize_block
    seen: list[str] = []

    def dies_at_second(self, ctx):
        if seen:
            os._exit(9)
        seen.append(ctx.name)
        return original(self, ctx)

    cls.quantize_block = dies_at_second

sys.exit(app(sys.argv[1:]))
