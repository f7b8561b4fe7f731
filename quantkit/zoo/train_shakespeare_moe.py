"""Train `zoo:shakespeare-moe`: a byte-level MixtralForCausalLM on tinyshakespeare."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import MixtralConfig, MixtralForCausalLM

from quantkit.zoo.byte_tokenizer import BYTE_VOCAB_SIZE, save_byte_tokenizer
from quantkit.zoo.common import seed_everything, timed, write_metrics
from quantkit.zoo.lm_data import perplexity, shakespeare_splits
from quantkit.zoo.lm_training import train_causal_lm

log = logging.getLogger(__name__)

SEQ_LEN = 256


def build_config() -> MixtralConfig:
    """Mixtral in miniature: 8 experts top-2, GQA, fused 3-D experts (transformers v5 layout)."""
    return MixtralConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.01,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )


def train(out_dir: Path, seed: int = 0, steps: int = 1500, batch: int = 16, lr: float = 2e-3) -> dict:
    """Train, save an HF folder (model, config, byte tokenizer) in `out_dir`, return FP metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = seed_everything(seed)
    train_data, held_out = shakespeare_splits()
    model = MixtralForCausalLM(build_config())
    times: dict[str, float] = {}
    with timed("train_seconds", times):
        # output_router_logits adds Mixtral's load-balancing loss (router_aux_loss_coef) to the LM loss.
        train_causal_lm(model, train_data, held_out, gen, steps, batch, SEQ_LEN, lr,
                        forward_kwargs={"output_router_logits": True})
    model.save_pretrained(out_dir)
    save_byte_tokenizer(out_dir)
    # Measure what was saved, reloaded the way users load it.
    reloaded = MixtralForCausalLM.from_pretrained(out_dir)
    with timed("eval_seconds", times):
        ppl = perplexity(reloaded, held_out)
        train_ppl = perplexity(reloaded, train_data, max_windows=len(held_out) // SEQ_LEN)
    metrics = {
        "model": "shakespeare-moe",
        "seed": seed,
        "steps": steps,
        "tokens_seen": steps * batch * SEQ_LEN,
        "heldout_perplexity": round(ppl, 4),
        "train_perplexity_same_size_sample": round(train_ppl, 4),
        "perplexity_window": SEQ_LEN,
        "heldout_bytes": len(held_out),
        "parameters": sum(p.numel() for p in reloaded.parameters()),
        **times,
    }
    write_metrics(out_dir, metrics)
    return metrics
