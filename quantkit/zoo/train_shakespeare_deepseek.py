"""Train `zoo:shakespeare-deepseek`: a byte-level DeepseekV3ForCausalLM (MLA, shared + grouped routed experts)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from quantkit.zoo.byte_tokenizer import BYTE_VOCAB_SIZE, save_byte_tokenizer
from quantkit.zoo.common import seed_everything, timed, write_metrics
from quantkit.zoo.lm_data import perplexity, shakespeare_splits
from quantkit.zoo.lm_training import train_causal_lm

log = logging.getLogger(__name__)

SEQ_LEN = 256
BIAS_UPDATE_SPEED = 1e-3  # DeepSeek-V3's aux-loss-free balancing step (gamma in the paper)


def build_config() -> DeepseekV3Config:
    """DeepSeek-V3 in miniature: first layer dense, then 16 routed experts in 4 groups (top-2 groups,
    top-4 experts) plus one shared expert, sigmoid routing scaled by 2.5, multi-head latent attention."""
    return DeepseekV3Config(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )


class LoadBalancer:
    """Aux-loss-free balancing: nudge each router's `e_score_correction_bias` up for under-loaded experts
    and down for over-loaded ones after every step; the bias steers selection, not the gate weights."""

    def __init__(self, model: DeepseekV3ForCausalLM, speed: float = BIAS_UPDATE_SPEED) -> None:
        self.speed = speed
        self.loads: dict[torch.nn.Module, torch.Tensor] = {}
        self.routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
        for router in self.routers:
            router.register_forward_hook(self._count)

    def _count(self, router: torch.nn.Module, _inputs: tuple, output: tuple) -> None:
        indices = output[2]  # (router_logits, topk_weights, topk_indices)
        self.loads[router] = torch.bincount(indices.flatten(), minlength=router.num_experts).float()

    @torch.no_grad()
    def update(self, _step: int) -> None:
        for router in self.routers:
            load = self.loads.get(router)
            if load is not None:
                router.e_score_correction_bias += self.speed * torch.sign(load.mean() - load)

    def imbalance(self) -> float:
        """max/mean expert load over routers in the last batch (1.0 = perfectly balanced)."""
        return max((load.max() / load.mean()).item() for load in self.loads.values())


def train(out_dir: Path, seed: int = 0, steps: int = 1200, batch: int = 16, lr: float = 2e-3) -> dict:
    """Train, save an HF folder (model, config, byte tokenizer) in `out_dir`, return FP metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = seed_everything(seed)
    train_data, held_out = shakespeare_splits()
    model = DeepseekV3ForCausalLM(build_config())
    balancer = LoadBalancer(model)
    times: dict[str, float] = {}
    with timed("train_seconds", times):
        train_causal_lm(model, train_data, held_out, gen, steps, batch, SEQ_LEN, lr, after_step=balancer.update)
    log.info("last-batch expert load imbalance (max/mean) %.2f", balancer.imbalance())
    model.save_pretrained(out_dir)
    save_byte_tokenizer(out_dir)
    reloaded = DeepseekV3ForCausalLM.from_pretrained(out_dir)
    with timed("eval_seconds", times):
        ppl = perplexity(reloaded, held_out)
        train_ppl = perplexity(reloaded, train_data, max_windows=len(held_out) // SEQ_LEN)
    metrics = {
        "model": "shakespeare-deepseek",
        "seed": seed,
        "steps": steps,
        "tokens_seen": steps * batch * SEQ_LEN,
        "heldout_perplexity": round(ppl, 4),
        "train_perplexity_same_size_sample": round(train_ppl, 4),
        "perplexity_window": SEQ_LEN,
        "heldout_bytes": len(held_out),
        "last_batch_expert_load_max_over_mean": round(balancer.imbalance(), 3),
        "parameters": sum(p.numel() for p in reloaded.parameters()),
        **times,
    }
    write_metrics(out_dir, metrics)
    return metrics
