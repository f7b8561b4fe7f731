"""torchrun entry for tests/test_distributed.py: the quantize command, with rank 1 recording which experts it
quantized itself in each MoE layer (what it hands to the gather) and saying so at the end."""
from __future__ import annotations

import atexit
import os
import sys

from quantkit.cli import app
from quantkit.distributed import RankShare

if os.environ.get("RANK") == "1":
    original = RankShare.gather
    mine_per_layer: list[list[int]] = []

    def recording(self, mine, n):
        mine_per_layer.append(sorted(mine))
        return original(self, mine, n)

    RankShare.gather = recording

    @atexit.register
    def say() -> None:
        if mine_per_layer and all(m == mine_per_layer[0] for m in mine_per_layer):
            print(f"rank 1 quantized experts {mine_per_layer[0]} of every layer ({len(mine_per_layer)} layers)")
        else:
            print(f"rank 1 quantized experts {mine_per_layer}")

sys.exit(app(sys.argv[1:]))
