"""EAQuant: smoothing aggregation (exact before quantization), KL-Top router alignment, expert balance,
and quantize -> save -> load on fused experts (Mixtral and DeepSeek styles, shared experts included)."""
import json

import pytest
import torch

import quantkit
from quantkit.adapters import adapter_for
from quantkit.config import Recipe
from quantkit.errors import QuantkitError
from quantkit.formats.spec import FormatSpec
from quantkit.io import save_checkpoint
from quantkit.methods.expert_balance import select_expert_tokens
from quantkit.models import load_model
from quantkit.nn import QuantExperts
from quantkit.pipeline import quantize_model
from quantkit.quant_router import QuantRouter
from quantkit.quantizers.clip_search import align_router, kl_top, top_m
from quantkit.quantizers.smoothing import NormGroup, SmoothingStats, eaquant_scale, fold_scale, norm_groups
from helpers import cli, forward

FAST = {"steps": 8}


def _recipe(name="eaquant-w4a4-fast", **opts):
    r = Recipe.load(name)
    return r.replace(calib_size=2, method_options={**r.method_options, **FAST, **opts})


def test_eaquant_scale_is_the_max_over_router_and_experts():
    experts = torch.ones(2, 4, 3)  # [E, 2I, K]
    experts[1, :, 2] = 4.0
    g = NormGroup(norm=torch.nn.Identity(), router=[torch.ones(2, 3)], experts=experts)
    act = torch.tensor([1.0, 16.0, 1.0])  # router input (all tokens)
    per_expert = {0: torch.tensor([4.0, 1.0, 1.0]), 1: torch.tensor([1.0, 1.0, 16.0])}
    s = eaquant_scale(g, act, per_expert, alpha=0.5, merge="max_gate")
    # s_j = max(router: act_j^.5 / 1, expert0: x0_j^.5 / 1, expert1: x1_j^.5 / w1_j^.5)
    assert torch.allclose(s, torch.tensor([2.0, 4.0, 2.0]))
    s_code = eaquant_scale(g, act, per_expert, alpha=0.5, merge="max")  # the code's default: no router term
    assert torch.allclose(s_code, torch.tensor([2.0, 1.0, 2.0]))


@pytest.mark.parametrize("model", ["zoo:tiny-mixtral", "zoo:tiny-deepseek"])
def test_smoothing_folded_into_norms_keeps_the_block_exact(model):
    loaded = load_model(model)
    adapter = adapter_for(loaded.root)
    layer = loaded.root.model.layers[-1]  # an MoE layer (DeepSeek: with a shared expert)
    calls = adapter.synthetic_inputs(loaded.root, 2, 0)
    ref = forward(adapter, loaded.root)
    groups = norm_groups(layer, adapter)
    assert groups[-1].experts is not None and groups[-1].router
    if "deepseek" in model:
        assert len(groups[-1].others) == 2  # the shared expert's gate_proj and up_proj
    with SmoothingStats(groups) as stats, torch.no_grad():
        for c in calls:
            loaded.root(*c.args, **c.kwargs)
    for gi, g in enumerate(groups):
        s = eaquant_scale(g, stats.act[gi], stats.expert.get(gi, {}), 0.6) if g.experts is not None else stats.act[gi] ** 0.6
        assert torch.isfinite(s).all() and (s > 0).all()
        fold_scale(g, s)
    out = forward(adapter, loaded.root)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_kl_top_on_a_hand_made_router():
    z_fp = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = torch.softmax(z_fp, -1)
    z_q = torch.tensor([[1.0, 2.0, 0.0, -1.0]])
    q = torch.log_softmax(z_q, -1)
    for m, expect in ((2, p[0, :2] @ (p[0, :2].log() - q[0, :2])), (4, p[0] @ (p[0].log() - q[0]))):
        assert torch.isclose(kl_top(z_fp, z_q, m), expect)
    assert kl_top(z_fp, z_fp, 2).abs() < 1e-7
    assert top_m(64, 8, 0.25) == 22 and top_m(8, 2, 0.0) == 2


def test_router_alignment_keeps_the_routing_better_than_plain_rounding():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g)
    w[:, 0] *= 30  # one large column: min-max 4-bit rounding loses the rest
    x = torch.randn(512, 64, generator=g)
    spec = FormatSpec("int", 4, False, "channel")
    from quantkit.formats.qweight import QuantizedWeight

    qa, info = align_router(w, x, spec, top_k=2, ratio=0.0, objective="kl")
    rtn = QuantizedWeight.quantize(w, spec)
    z = x @ w.T
    kl = lambda q: kl_top(z, x @ q.dequantize().T, 2)  # noqa: E731
    assert kl(qa) < 0.8 * kl(rtn)  # measured 0.476 vs 0.745
    # Known answer, computed independently: per-row asymmetric int4 on [r min, r max] for every r of the
    # code's grid {0.35 + 0.0065 i}; 'kl' picks one ratio for all rows, the KL-minimizing one.
    grid = [0.35 + i * 0.0065 for i in range(101)]

    def kl_at(r):
        lo = (w * r).amin(1, keepdim=True).clamp(max=0)
        hi = (w * r).amax(1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / 15).half().float()
        zero = torch.round(-lo / scale)
        deq = (torch.clamp(torch.round(w / scale) + zero, 0, 15) - zero) * scale
        return float(kl_top(z, x @ deq.T, 2))

    kls = [kl_at(r) for r in grid]
    best = min(range(101), key=kls.__getitem__)
    assert info["top_m"] == 2 and info["objective"] == "kl"
    assert abs(info["clip_ratio_mean"] - grid[best]) <= 0.0065 + 1e-9
    assert info["clip_ratio_mean"] < 0.9  # the outlier column forces real clipping
    qm, im = align_router(w, x, spec, top_k=2, objective="mse_kl")
    assert torch.isfinite(qm.dequantize()).all() and im["objective"] == "mse_kl"


def test_expert_with_no_routed_tokens_is_handled_and_reported():
    idx = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 2]])  # expert 3 never routed, expert 2 once
    logits = torch.tensor([[0.0, 0.0, 0.0, 3.0], [0, 0, 0, 1.0], [0, 0, 0, 2.0], [0, 0, 0, 0.0]])
    sel, info = select_expert_tokens(idx, logits, 4, target=2, mode="none")
    assert info["expert_tokens"] == [4, 3, 1, 0] and info["layer_input_fallback"] == [3]
    assert sel[3].tolist() == [0, 1, 2, 3] and info["under_target"] == [2, 3]
    sel, info = select_expert_tokens(idx, logits, 4, target=2, mode="force")
    assert sel[3].tolist() == [0, 2]  # the two tokens its router scores highest
    assert sorted(sel[2].tolist()) == [0, 3] and info["layer_input_fallback"] == []
    assert info["expert_tokens_used"] == [4, 3, 2, 2]


def test_expert_tokens_capped_at_the_target_as_the_official_code():
    idx = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 2], [0, 3]])  # expert 0 routed 5 times, 1 three times
    sel, info = select_expert_tokens(idx, None, 4, target=2, mode="none", cap=True)
    assert [s.tolist() for s in sel] == [[0, 1], [0, 1], [3], [4]]  # the first T routed tokens, in order
    assert info["expert_tokens"] == [5, 3, 1, 1] and info["expert_tokens_used"] == [2, 2, 1, 1]
    sel, _ = select_expert_tokens(idx, None, 4, target=2, mode="none", cap=False)
    assert [s.tolist() for s in sel][:2] == [[0, 1, 2, 3, 4], [0, 1, 2]]


def test_more_data_balance_known_answer():
    """The paper's rule: an expert under target gets tokens *naturally routed to it* in extra samples."""
    idx = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 2]])  # main tokens 0..3
    extra = torch.tensor([[2, 3], [3, 0], [1, 2]])  # extra tokens 4..6
    sel, info = select_expert_tokens(idx, None, 4, target=2, mode="more_data", extra_index=extra)
    assert [s.tolist() for s in sel] == [[0, 1, 2, 3], [0, 1, 2], [3, 4], [4, 5]]
    assert info["extra_tokens_added"] == [0, 0, 1, 2] and info["still_under_target"] == []
    assert info["layer_input_fallback"] == [] and info["forced"] == []
    sel, info = select_expert_tokens(idx, None, 4, target=3, mode="more_data", extra_index=extra[:1])
    assert sel[3].tolist() == [4] and info["still_under_target"] == [2, 3]
    sel, info = select_expert_tokens(idx, None, 5, target=1, mode="more_data", extra_index=extra)
    assert info["still_under_target"] == [4] and info["layer_input_fallback"] == [4]  # never routed anywhere


def test_more_data_balance_end_to_end_reads_further_samples():
    loaded = load_model("zoo:tiny-mixtral")
    rec = _recipe()
    assert rec.method_options["balance"] == "more_data"
    result = quantize_model(loaded, rec.replace(calib_size=2))
    infos = [r["calibration"] for r in result.layers.values() if r["kind"] == "experts"]
    added = [a for c in infos for a in c["extra_tokens_added"]]
    assert sum(added) > 0  # the tiny model leaves some expert under target on 2 samples
    for c in infos:
        for e, (nat, used, add) in enumerate(zip(c["expert_tokens"], c["expert_tokens_used"], c["extra_tokens_added"])):
            assert add == 0 or nat < c["token_target"]  # only experts under target get extra tokens
            kept = min(nat, c["token_target"]) if c["capped_at_target"] else nat  # capped: the first T routed
            assert used == kept + add or e in c["layer_input_fallback"]
            assert used <= max(nat, c["token_target"]) or e in c["layer_input_fallback"]


@pytest.mark.parametrize("model,method", [("zoo:tiny-mixtral", "eaquant"), ("zoo:tiny-deepseek", "eaquant"),
                                          ("zoo:tiny-mixtral", "duquant")])
def test_quantize_save_load_exact_with_rotations_and_quantized_router(model, method, tmp_path):
    loaded = load_model(model)
    ref = forward(loaded.adapter, loaded.root)
    rec = _recipe("duquant-w4a4-fast") if method == "duquant" else _recipe()
    result = quantize_model(loaded, rec)
    a = forward(loaded.adapter, loaded.root)
    assert torch.isfinite(a).all() and not torch.equal(a, ref)
    assert ((a - ref).norm() / ref.norm()).item() < 0.6
    experts = [r for r in result.layers.values() if r["kind"] == "experts"]
    assert experts and all(r["rot_in"]["experts"] == r["experts"] and r["rot_mid"]["block"] >= 2 for r in experts)
    for r in experts:  # every expert calibrated on something, counts recorded
        c = r["calibration"]
        assert len(c["expert_tokens"]) == r["experts"] and min(c["expert_tokens_used"]) > 0
    routers = [n for n, r in result.layers.items() if r["kind"] == "router"]
    assert routers and all(isinstance(loaded.root.get_submodule(n), QuantRouter) for n in routers)
    out = save_checkpoint(loaded, rec, result, tmp_path / "ckpt")
    reloaded = quantkit.load(out)
    assert torch.equal(a, forward(loaded.adapter, reloaded))
    assert any(isinstance(m, QuantExperts) and m.rot_in is not None for m in reloaded.modules())


def test_rotations_stored_once_in_fp16_and_counted_by_inspect(tmp_path):
    """q/k/v read one input: one rotation in memory (the others tied to it in quantization.json); inspect
    counts every stored byte (codes, scales, rotations, permutations) in bits per weight."""
    from quantkit.inspect_ckpt import inspect_checkpoint
    from safetensors import safe_open

    loaded = load_model("zoo:tiny-mixtral")
    rec = _recipe("duquant-w4a4-fast")
    result = quantize_model(loaded, rec)
    out = save_checkpoint(loaded, rec, result, tmp_path / "ckpt")
    meta = json.loads((out / "quantization.json").read_text())
    attn = "model.layers.0.self_attn"
    tied = meta["weights"]["tied"]
    for proj in ("k_proj", "v_proj"):
        assert tied[f"{attn}.{proj}.rotation.rot1"] == f"{attn}.q_proj.rotation.rot1"
    (weights,) = meta["weights"]["files"]
    with safe_open(str(out / weights), "pt") as f:
        keys = list(f.keys())
        rot1 = f.get_tensor(f"{attn}.q_proj.rotation.rot1")
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
    assert rot1.dtype == torch.float16 and rot1.shape == (1, 128, 128)  # one shared block rotation
    report = inspect_checkpoint(out)
    by = {layer["name"]: layer for layer in report["layers"]}
    q = by[f"{attn}.q_proj"]
    assert q["bytes_by_part"]["rotation"] == 2 * 128 * 128 * 2 + 128 * 2  # rot1, rot2 fp16 + int16 perm
    # In memory q/k/v share one rotation; the file stores the aliases as copies (from_pretrained must find
    # every tensor name), and inspect counts those stored bytes too.
    assert by[f"{attn}.k_proj"]["bytes_by_part"]["rotation"] == q["bytes_by_part"]["rotation"]
    assert by[f"{attn}.k_proj"]["shares_tensors_with"] == [f"{attn}.q_proj"]
    t = report["totals"]
    assert t["bytes"] == stored  # every stored byte is somewhere in the report
    parts = t["bits_per_weight_by_part"]
    assert abs(sum(parts.values()) - t["bits_per_weight_quantized"]) < 1e-3 and parts["rotation"] > 0
    assert t["bits_per_weight_quantized"] == round(8 * t["bytes_quantized"] / t["params_quantized"], 4)


def test_duquantpp_mxfp4_with_gptq_and_log8_reloads(tmp_path):
    loaded = load_model("zoo:tiny-mixtral")
    base = Recipe.load("duquantpp-mxfp4-fast")
    w = FormatSpec.mxfp4("duquantpp_log8")
    rec = base.replace(calib_size=2, weight=w, method_options={**base.method_options, **FAST, "gptq": True})
    result = quantize_model(loaded, rec)
    assert all(r.get("rotation", r.get("rot_in", {})).get("block") == 32 for r in result.layers.values())
    out = save_checkpoint(loaded, rec, result, tmp_path / "ckpt")
    assert torch.equal(forward(loaded.adapter, loaded.root), forward(loaded.adapter, quantkit.load(out)))


def test_cli_quantize_prints_and_records_expert_token_counts(tmp_path):
    recipe = tmp_path / "r.json"
    rec = _recipe().replace(method_options={**_recipe().method_options, "block": 32, "permute": False})
    recipe.write_text(json.dumps(rec.to_dict()))
    out = tmp_path / "ck"
    r = cli("quantize", "zoo:tiny-mixtral", "--out", out, "--recipe", recipe)
    assert r.exit_code == 0, r.output
    assert "calibration tokens per expert" in r.output
    meta = json.loads((out / "quantization.json").read_text())
    counts = meta["layers"]["model.layers.0.mlp.experts"]["calibration"]["expert_tokens"]
    assert len(counts) == 4 and sum(counts) > 0 and meta["calibration"]["used"]
    r = cli("generate", out, "--prompt", "ab", "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output


def test_starved_expert_is_quantized_on_the_layer_input_never_nan():
    from quantkit.config import LayerPlan
    from quantkit.layers import LayerTask
    from quantkit.methods import get_method

    loaded = load_model("zoo:tiny-mixtral")
    experts = loaded.root.model.layers[0].mlp.experts
    rec = _recipe("duquant-w4a4-fast")
    plan = LayerPlan(False, rec.weight, rec.activation)
    method = get_method("duquant", rec)
    method.tokens_per_sample = 16
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([[0, 1]] * 16 + [[1, 2]] * 16)  # expert 3 never routed
    q = method.quantize_experts(LayerTask("experts", experts, "expert", plan), x, idx, None)
    info = q.calibration_info
    assert info["expert_tokens"] == [16, 32, 16, 0] and info["layer_input_fallback"] == [3]
    for w in (q.gate_up.dequantize(), q.down.dequantize(), q.rot_in.rot1, q.rot_mid.rot1):
        assert torch.isfinite(w).all()
    y = q(x, torch.full((32, 1), 3), torch.ones(32, 1))  # route everything to the starved expert
    assert torch.isfinite(y).all() and y.abs().sum() > 0


def test_calib_seq_len_sets_the_calibration_sequence_length():
    """The named recipes carry the papers' sequence length, the -fast ones 128; the option reaches the calls."""
    from quantkit.methods import get_method

    assert Recipe.load("eaquant-w4a4").method_options["calib_seq_len"] == 4096
    assert Recipe.load("duquant-w4a4").method_options["calib_seq_len"] == 2048
    assert Recipe.load("eaquant-w4a4-fast").method_options["calib_seq_len"] == 128
    loaded = load_model("zoo:tiny-mixtral")
    for seq in (48, 96):
        rec = Recipe.load("duquant-w4a4-fast").replace(calib_size=2)
        rec = rec.replace(method_options={**rec.method_options, "calib_seq_len": seq})
        calls = get_method(rec.method, rec).build_calibration(loaded, 10, None, None)
        assert [c.kwargs["input_ids"].shape[-1] for c in calls] == [seq, seq]
    bad = Recipe.load("duquant-w4a4-fast")
    with pytest.raises(QuantkitError, match="calib_seq_len"):
        get_method(bad.method, bad.replace(method_options={**bad.method_options, "calib_seq_len": 1}))


@pytest.mark.parametrize("where", ["mean_sample", "all_tokens"])
def test_dense_rotations_fit_on_the_mean_sample_as_the_official_code(where, monkeypatch):
    """rotation_input "mean_sample": q_proj's rotation is searched on input_layernorm(mean of the calibration
    samples' block inputs), one sequence, as the official code's rotate_inps; "all_tokens": on every token."""
    from quantkit.calib.capture import text_calls
    from quantkit.methods.duquant import DuQuant

    loaded = load_model("zoo:tiny-mixtral")
    rec = Recipe.load("duquant-w4a4-fast")
    rec = rec.replace(calib_size=3, method_options={**rec.method_options, "steps": 2, "smooth": False,
                                                     "calib_seq_len": 40, "rotation_input": where})
    seen = []
    orig = DuQuant.fit
    monkeypatch.setattr(DuQuant, "fit", lambda self, x: seen.append(x.clone()) or orig(self, x))
    calls = text_calls(loaded.tokenizer, loaded.root.config.vocab_size, 3, rec.seed, 40)
    m = loaded.root.model
    with torch.no_grad():
        embeds = torch.stack([m.embed_tokens(c.kwargs["input_ids"])[0] for c in calls])  # [3, 40, H]
        mean_in = m.layers[0].input_layernorm(embeds.mean(0, keepdim=True))[0]
        all_in = m.layers[0].input_layernorm(embeds).reshape(-1, embeds.shape[-1])
    quantize_model(loaded, rec)
    first = seen[0]  # block 0's first fit: the q/k/v input
    if where == "mean_sample":
        assert first.shape == mean_in.shape and torch.allclose(first, mean_in, atol=1e-5)
    else:
        assert first.shape == all_in.shape and torch.allclose(first, all_in, atol=1e-5)
    bad = Recipe.load("duquant-w4a4-fast")
    with pytest.raises(QuantkitError, match="rotation_input"):
        DuQuant(bad.replace(method_options={**bad.method_options, "rotation_input": "median"}))


def test_rotation_search_dtype_option_reaches_the_search_and_bad_values_are_one_line():
    from quantkit.errors import QuantkitError
    from quantkit.methods import get_method

    rec = _recipe("duquant-w4a4-fast")
    assert get_method("duquant", rec).rot_cfg.search_dtype == "float64"  # default: earlier rotations kept
    fast = rec.replace(method_options={**rec.method_options, "rotation_search_dtype": "float32"})
    assert get_method("duquant", fast).rot_cfg.search_dtype == "float32"
    bad = rec.replace(method_options={**rec.method_options, "rotation_search_dtype": "half"})
    with pytest.raises(QuantkitError, match="float32 or float64"):
        get_method("duquant", bad)
