"""Layer streaming from shards, linear-time calibration propagation, the model's dtype, resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantkit.config import Recipe
from quantkit.io import read_quant_json, save_checkpoint
from quantkit.models import load_model
from quantkit.pipeline import quantize_model
from quantkit.streaming import quantize_streaming

STATIC_W8A8 = {"weight": {"kind": "int", "bits": 8},
               "activation": {"kind": "int", "bits": 8, "symmetric": False, "granularity": "tensor",
                              "dynamic": False}, "calib_size": 3}


def make_olmoe(out: Path, layers: int = 3, hidden: int = 128, shard: str = "300KB", tied: bool = False) -> Path:
    """A bf16 OLMoE saved as the hub does: per-expert tensor names, several shards and an index."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    cfg = OlmoeConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
                      max_position_embeddings=128, tie_word_embeddings=tied, eos_token_id=1, pad_token_id=0)
    OlmoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, max_shard_size=shard)
    return out


def make_unet(out: Path) -> Path:
    from quantkit.tiny_models import _tiny_unet

    torch.manual_seed(0)
    _tiny_unet().to(torch.bfloat16).save_pretrained(out, max_shard_size="200KB")
    return out


def tensors(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    meta = read_quant_json(ckpt)
    folder = ckpt / meta["model"]["component"] if meta["model"]["component"] else ckpt
    state: dict[str, torch.Tensor] = {}
    for f in meta["weights"]["files"]:
        state.update(load_file(str(folder / f)))
    return state, meta


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ in dtype, shape or any bit."""
    bad = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.reshape(-1).view(torch.uint8),
                                                                      y.reshape(-1).view(torch.uint8)):
            bad.append(k)
    return bad


def comparable(meta: dict) -> dict:
    meta = dict(meta)
    meta.pop("seconds")
    meta.pop("files", None)  # the file list differs with the shard size
    meta["weights"] = {"tied": meta["weights"]["tied"]}
    return meta


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory) -> Path:
    return make_olmoe(tmp_path_factory.mktemp("src") / "olmoe")


@pytest.fixture(scope="module")
def unet(tmp_path_factory) -> Path:
    return make_unet(tmp_path_factory.mktemp("src") / "unet")


# EAQuant with forced balance (its "more data" balance needs the whole model, and falls back when streamed):
# smoothing, rotations, router alignment and per-expert calibration through the streamed walk.
EAQUANT = {**Recipe.load("eaquant-w4a4-fast").to_dict(), "calib_size": 2}
EAQUANT["method_options"] = {**EAQUANT["method_options"], "balance": "force", "steps": 4, "calib_seq_len": 32}


@pytest.mark.parametrize("which,recipe", [("olmoe", "rtn-w4a16-g128"), ("olmoe", STATIC_W8A8),
                                          ("unet", STATIC_W8A8), ("olmoe", EAQUANT)])
def test_streaming_equals_whole_model_load(which, recipe, olmoe, unet, tmp_path):
    src = str(olmoe if which == "olmoe" else unet)
    rec = Recipe.load(recipe) if isinstance(recipe, str) else Recipe.from_dict(recipe)
    loaded = load_model(src)
    result = quantize_model(loaded, rec)
    save_checkpoint(loaded, rec, result, tmp_path / "whole")
    quantize_streaming(src, rec, tmp_path / "streamed", max_shard_bytes=100_000)
    a, ma = tensors(tmp_path / "whole")
    b, mb = tensors(tmp_path / "streamed")
    assert len(mb["weights"]["files"]) > 1  # sharded output with an index
    assert list((tmp_path / "streamed").glob("*.safetensors.index.json"))  # named as the library names it
    assert a and not same_bits(a, b)
    assert comparable(ma) == comparable(mb)
    if which == "olmoe":  # per-expert hub tensors arrived fused and quantized as 3-D experts
        assert any(r["kind"] == "experts" for r in ma["layers"].values())
    assert not list(tmp_path.glob(".streamed.tmp*"))


def test_streaming_memory_is_one_block(tmp_path):
    """Weights resident at once stay near one block, where a whole-model load holds them all."""
    from quantkit.streaming import StreamSession

    src = make_olmoe(tmp_path / "big", layers=8, hidden=256, shard="2MB")
    whole = sum(v.numel() * v.element_size() for f in src.glob("*.safetensors") for v in load_file(str(f)).values())
    peaks: list[int] = []
    enter = StreamSession.enter

    outside_meta: list[bool] = []

    def spy(self, name, module):  # resident tensors of the root each time a block comes in
        enter(self, name, module)
        peaks.append(sum(t.numel() * t.element_size() for t in self.loaded.root.state_dict().values()
                         if not t.is_meta) + self.writer.pending_bytes)
        root = self.loaded.root  # nothing calibrates: embeddings and head wait for the final write
        outside_meta.append(root.model.embed_tokens.weight.is_meta and root.lm_head.weight.is_meta)

    StreamSession.enter = spy
    try:
        quantize_streaming(str(src), Recipe.load("rtn-w4a16-g128"), tmp_path / "q", max_shard_bytes=1 << 20)
    finally:
        StreamSession.enter = enter
    block = whole / 8  # embeddings and head are small here: about one layer's worth each
    assert len(peaks) == 8 and all(outside_meta)
    assert max(peaks) < 0.5 * whole, (max(peaks), whole)
    assert max(peaks) < 4 * block + (1 << 20)


@pytest.mark.parametrize("tied", [False, True])
def test_calibrating_walk_gives_embeddings_and_head_back(tied, tmp_path):
    """A decoder's embeddings run before the first block and its head after the last: once the calibration
    calls reach block 0 they are given back (read again for the final write), so no block is quantized beside
    them; the checkpoint equals the whole-model load's."""
    from quantkit.streaming import StreamSession

    src = make_olmoe(tmp_path / "src", tied=tied)
    rec = Recipe.from_dict(STATIC_W8A8)
    outside_meta: list[bool] = []
    enter = StreamSession.enter

    def spy(self, name, module):
        enter(self, name, module)
        root = self.loaded.root
        outside_meta.append(root.model.embed_tokens.weight.is_meta and root.lm_head.weight.is_meta)

    StreamSession.enter = spy
    try:
        quantize_streaming(str(src), rec, tmp_path / "streamed")
    finally:
        StreamSession.enter = enter
    assert outside_meta == [True] * 3
    loaded = load_model(str(src))
    save_checkpoint(loaded, rec, quantize_model(loaded, rec), tmp_path / "whole")
    a, ma = tensors(tmp_path / "whole")
    b, mb = tensors(tmp_path / "streamed")
    assert a and not same_bits(a, b) and comparable(ma) == comparable(mb)
    assert torch.equal(b["lm_head.weight"], b["model.embed_tokens.weight"]) is tied  # the head read back as tied


def _count_block_calls(root, adapter) -> tuple[list[int], list]:
    counts = [0] * len(adapter.blocks(root))
    handles = [b.register_forward_pre_hook(lambda *_a, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, (_, b) in enumerate(adapter.blocks(root))]
    return counts, handles


@pytest.mark.parametrize("layers", [2, 6])
def test_calibration_cost_is_linear_in_depth(layers, tmp_path):
    src = make_olmoe(tmp_path / "m", layers=layers)
    loaded = load_model(str(src))
    counts, handles = _count_block_calls(loaded.root, loaded.adapter)
    rec = Recipe.from_dict(STATIC_W8A8)
    quantize_model(loaded, rec)
    for h in handles:
        h.remove()
    n = rec.calib_size
    # Each block: once per call carried through the walk, once per call in the method's own
    # statistics pass. The old re-capture from the first layer gave block j (layers - j) more.
    assert counts == [2 * n] * layers


@pytest.mark.parametrize("model", ["zoo:tiny-unet", "zoo:tiny-mixtral"])
def test_propagated_inputs_equal_a_fresh_capture(model, monkeypatch):
    """Carried-forward inputs are exactly what running the partly quantized model from its start gives
    (UNet skip connections included)."""
    from quantkit.methods import base as mbase
    from quantkit.methods.rtn import RTN
    from quantkit.pipeline import capture_block_inputs

    import copy

    checked = []

    def same(fresh, carried):
        assert len(fresh) == len(carried)
        for a, b in zip(fresh, carried):
            for x, y in zip(list(a.args) + list(a.kwargs.values()), list(b.args) + list(b.kwargs.values())):
                assert type(x) is type(y)
                if isinstance(x, torch.Tensor):
                    assert torch.equal(x, y)

    class Checking(RTN):
        needs_fp_inputs = True  # the walk's second stream, through the not yet quantized blocks

        def quantize_block(self, ctx):
            same(capture_block_inputs(ctx.root, ctx.block, ctx.calls), ctx.inputs)
            same(capture_block_inputs(fp_root, fp_root.get_submodule(ctx.name), ctx.calls), ctx.fp_inputs)
            checked.append(ctx.name)
            return super().quantize_block(ctx)

    monkeypatch.setitem(mbase.METHODS, "checking", Checking)
    loaded = load_model(model)
    fp_root = copy.deepcopy(loaded.root)
    rec = Recipe.from_dict({**STATIC_W8A8, "method": "checking", "calib_size": 2})
    quantize_model(loaded, rec)
    assert len(checked) >= 2


def test_dtype_auto_keeps_bf16_and_float32_is_asked_for(olmoe, tmp_path):
    rec = Recipe.load("rtn-w4a16-g128")
    loaded = load_model(str(olmoe))
    assert loaded.root.model.embed_tokens.weight.dtype == torch.bfloat16
    quantize_streaming(str(olmoe), rec, tmp_path / "auto")
    quantize_streaming(str(olmoe), rec, tmp_path / "f32", dtype="float32")
    a, _ = tensors(tmp_path / "auto")
    b, _ = tensors(tmp_path / "f32")
    assert a["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert b["model.embed_tokens.weight"].dtype == torch.float32
    import quantkit

    m = quantkit.load(tmp_path / "auto")
    assert m.model.norm.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    assert m(input_ids=ids).logits.dtype == torch.bfloat16
    m32 = quantkit.load(tmp_path / "auto", dtype="float32")
    assert m32.model.norm.weight.dtype == torch.float32
    assert torch.isfinite(m32(input_ids=ids).logits).all()


class _Killed(BaseException):
    pass


@pytest.mark.parametrize("recipe", ["rtn-w4a16-g128", "static", "eaquant-w4a4-fast"])
def test_kill_and_resume_equals_uninterrupted(recipe, olmoe, tmp_path, monkeypatch):
    from quantkit.methods.base import METHODS

    rec = (Recipe.from_dict(STATIC_W8A8) if recipe == "static" else Recipe.load(recipe)).replace(calib_size=2)
    quantize_streaming(str(olmoe), rec, tmp_path / "ref", work_dir=tmp_path / "w-ref")

    cls = METHODS[rec.method]
    original = cls.quantize_block
    seen: list[str] = []

    def dies_at_third(self, ctx):
        if len(seen) == 2:
            raise _Killed
        seen.append(ctx.name)
        return original(self, ctx)

    monkeypatch.setattr(cls, "quantize_block", dies_at_third)
    with pytest.raises(_Killed):
        quantize_streaming(str(olmoe), rec, tmp_path / "out", work_dir=tmp_path / "work")
    assert not (tmp_path / "out").exists()  # nothing half-written in place
    rerun: list[str] = []

    def counting(self, ctx):
        rerun.append(ctx.name)
        return original(self, ctx)

    monkeypatch.setattr(cls, "quantize_block", counting)
    quantize_streaming(str(olmoe), rec, tmp_path / "out", work_dir=tmp_path / "work")
    assert rerun == ["model.layers.2"]  # the two finished blocks were not quantized again
    a, ma = tensors(tmp_path / "ref")
    b, mb = tensors(tmp_path / "out")
    assert not same_bits(a, b)
    assert comparable(ma) == comparable(mb)


def test_resume_ignores_blocks_of_a_different_run(olmoe, tmp_path):
    rec = Recipe.load("rtn-w4a16-g128")
    quantize_streaming(str(olmoe), rec, tmp_path / "a", work_dir=tmp_path / "work")
    other = rec.replace(seed=rec.seed + 1)
    quantize_streaming(str(olmoe), other, tmp_path / "b", work_dir=tmp_path / "work")
    assert json.loads((tmp_path / "work" / "walk" / "run.json").read_text())["fingerprint"]
    _, mb = tensors(tmp_path / "b")
    assert mb["recipe"]["seed"] == rec.seed + 1


def test_missing_source_tensor_is_one_line_error_and_writes_nothing(tmp_path):
    from safetensors.torch import save_file

    from quantkit.errors import QuantkitError

    src = make_olmoe(tmp_path / "m", shard="50MB")
    f = src / "model.safetensors"
    state = load_file(str(f))
    del state["model.layers.1.self_attn.q_proj.weight"]
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(QuantkitError, match="model.layers.1.self_attn.q_proj.weight") as e:
        quantize_streaming(str(src), Recipe.load("rtn-w4a16-g128"), tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))


@pytest.mark.parametrize("which", ["olmoe", "unet"])
def test_calibration_activations_over_budget_spill_to_disk_same_result(which, olmoe, unet, tmp_path, monkeypatch):
    import quantkit.spill
    from quantkit.spill import parse_bytes

    monkeypatch.setattr(quantkit.spill, "MIN_SPILL_BYTES", 0)  # the tiny models' activations are a few KB

    src = str(olmoe if which == "olmoe" else unet)
    rec = Recipe.from_dict(STATIC_W8A8)
    ref = load_model(src)
    r0 = quantize_model(ref, rec)
    low = load_model(src)
    r1 = quantize_model(low, rec, calib_memory=parse_bytes("1B"), work_dir=tmp_path / "work")
    assert r1.spill["spilled"] > 0 and r1.spill["peak_resident"] == 0
    assert not list((tmp_path / "work").glob("spill/*"))  # cleaned up
    a = {k: v for k, v in ref.root.state_dict().items()}
    b = {k: v for k, v in low.root.state_dict().items()}
    assert not same_bits(a, b)
    assert r0.layers == r1.layers


def test_calib_memory_parsing():
    from quantkit.errors import QuantkitError
    from quantkit.spill import parse_bytes

    assert parse_bytes("4GB") == 4 * 1000**3 and parse_bytes("512MiB") == 512 * 1024**2
    with pytest.raises(QuantkitError, match="4GB"):
        parse_bytes("lots")


@pytest.mark.parametrize("spec", [{"bits": 4, "granularity": "group", "group_size": 32},
                                  {"bits": 4, "granularity": "channel", "symmetric": False},
                                  {"bits": 3, "granularity": "group", "group_size": 64},
                                  {"bits": 8, "granularity": "channel", "symmetric": False}])
def test_row_chunked_weight_quantization_is_bit_identical(spec, monkeypatch):
    import quantkit.formats.qweight as qw
    from quantkit.formats.spec import FormatSpec

    fs = FormatSpec(kind="int", **spec)
    w = (torch.randn(3, 40, 128, generator=torch.Generator().manual_seed(1)) * 0.1).to(torch.bfloat16)
    whole = qw.QuantizedWeight.quantize(w, fs)
    monkeypatch.setattr(qw, "_CHUNK_ELEMS", 7 * 128)  # 7 rows a chunk: uneven last chunk
    rows = qw.QuantizedWeight.quantize(w, fs)
    for a, b in zip(whole.tensors().values(), rows.tensors().values()):
        assert a.shape == b.shape and torch.equal(a, b)
    assert rows.shape == whole.shape


def test_blocks_out_of_execution_order_are_an_error(monkeypatch):
    from quantkit.adapters.moe_lm import CausalLMAdapter
    from quantkit.errors import QuantkitError

    loaded = load_model("zoo:tiny-mixtral")
    blocks = loaded.adapter.blocks(loaded.root)
    monkeypatch.setattr(CausalLMAdapter, "blocks", lambda self, root: blocks[::-1])
    with pytest.raises(QuantkitError, match="out of execution order"):
        quantize_model(loaded, Recipe.from_dict({**STATIC_W8A8, "calib_size": 1}))


@pytest.mark.parametrize("reserve", [0, 4096, 16])  # none; header fits its gap; header outgrows it (moved)
def test_shard_writer_files_load_as_written(reserve, tmp_path):
    from quantkit.streaming import ShardWriter

    g = torch.Generator().manual_seed(0)
    blocks = [{f"b{i}.w": torch.randn(3, 5, generator=g).to(torch.bfloat16),
               f"b{i}.codes": torch.randint(0, 255, (7,), dtype=torch.uint8, generator=g)} for i in range(3)]
    writer = ShardWriter(tmp_path, max_shard_bytes=60, reserve_header=reserve)
    for b in blocks:
        writer.add(b)
    files = writer.finish()
    assert len(files) > 1 and not list(tmp_path.glob("*.data"))
    got = {}
    for f in files:
        got.update(load_file(tmp_path / f))
    want = {k: v for b in blocks for k, v in b.items()}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_per_expert_tensors_fuse_in_one_copy_with_the_libraries_values(olmoe, monkeypatch):
    """The single-copy merge of hub per-expert tensors is used, and gives exactly what transformers' own
    stack-then-concatenate load gives."""
    from transformers import OlmoeForCausalLM

    from quantkit import expert_merge
    from quantkit.streaming import load_model_meta

    calls = []
    real = expert_merge.MergeConcatInPlace.convert
    monkeypatch.setattr(expert_merge.MergeConcatInPlace, "convert",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    loaded, loader = load_model_meta(str(olmoe))
    loader.materialize([""])
    assert calls  # gate_up_proj of every layer went through the fused op
    want = OlmoeForCausalLM.from_pretrained(olmoe, dtype=torch.bfloat16).state_dict()
    got = loaded.root.state_dict()
    assert same_bits(got, want) == []


def test_pages_of_a_copied_mapped_tensor_are_given_back(tmp_path):
    """After a tensor read from a safetensors map is copied, its pages leave the process's resident memory
    (a block is not held twice while it is read), and the view still reads the file's values."""
    import mmap

    from safetensors import safe_open
    from safetensors.torch import save_file

    from quantkit import mapped_pages

    def resident() -> int:
        return int(open("/proc/self/statm").read().split()[1]) * mmap.PAGESIZE

    ref = torch.arange(16 * 2 ** 20, dtype=torch.float32)  # 64 MB
    save_file({"w": ref}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as h:
        view = h.get_tensor("w")
        assert float(view[::1024].sum()) == float(ref[::1024].sum())  # every page touched
        own = view.clone()
        before = resident()
        mapped_pages.release_pages(view)
        if mapped_pages._disabled:
            pytest.skip("madvise(MADV_PAGEOUT) is not available on this kernel")
        dropped = before - resident()
        assert dropped > 0.8 * ref.numel() * 4, dropped
        assert torch.equal(view, ref) and torch.equal(own, ref)
