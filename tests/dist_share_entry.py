"""torchrun entry for tests/test_distributed.py: the quantize command, with rank 1 recording which experts it
quantized itself in each MoE layer, which experts it read of each fused experts tensor, and how many layers'
experts it gathered from the other rank, and saying so at the end."""
from __future__ import annotations

import atexit
import os
import sys

from quantkit.cli import app
from quantkit.distributed import RankShare

if os.environ.get("RANK") == "1":
    from quantkit.expert_merge import MergeConcatInPlace

    import quantkit.methods.duquant as duquant

    original = RankShare.gather
    track = duquant.track
    gathered: list[int] = []
    mine_per_layer: list[list[int]] = []
    held_per_tensor: list[object] = []  # per fused experts tensor read from per-expert source tensors
    convert = MergeConcatInPlace.convert

    def recording_convert(self, *args, **kwargs):
        keep, copied = self.keep, set()
        if keep is not None:
            self.keep = lambda e: keep(e) and not copied.add(e)
        try:
            return convert(self, *args, **kwargs)
        finally:
            self.keep = keep
            held_per_tensor.append(sorted(copied) if keep is not None else "all")

    MergeConcatInPlace.convert = recording_convert

    def recording(self, mine, n):
        gathered.append(n)
        return original(self, mine, n)

    def recording_track(items, what, *args, **kwargs):
        if what.endswith(": experts"):  # the loop over the experts this rank quantizes itself
            mine_per_layer.append(list(items))
        return track(items, what, *args, **kwargs)

    RankShare.gather = recording
    duquant.track = recording_track

    @atexit.register
    def say() -> None:
        if mine_per_layer and all(m == mine_per_layer[0] for m in mine_per_layer):
            print(f"rank 1 quantized experts {mine_per_layer[0]} of every layer ({len(mine_per_layer)} layers)")
        else:
            print(f"rank 1 quantized experts {mine_per_layer}")
        print(f"rank 1 gathered the experts of {len(gathered)} layers")
        if held_per_tensor and all(h == held_per_tensor[0] for h in held_per_tensor):
            print(f"rank 1 read experts {held_per_tensor[0]} of every fused experts tensor "
                  f"({len(held_per_tensor)} tensors)")
        elif held_per_tensor:
            print(f"rank 1 read experts {held_per_tensor}")

sys.exit(app(sys.argv[1:]))
