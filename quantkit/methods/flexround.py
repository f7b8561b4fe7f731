"""FlexRound (Lee et al., ICML 2023): block reconstruction with learnable rounding by element-wise
division, W_hat = s1 * round(W / (s1 * S2 * s3 * s4)).

As the official block-wise code (quant/REM_fast.py): the block input is the quantized model's
(no QDrop mixing), the target the FP block output, loss lp without a rounding regularizer, Adam
with cosine decay. Static activation steps are learned too (LSQ) unless `learn_act_step: false`:
the official LLM W4A8 runs leave activations out of the reconstruction, diffusion needs static steps.
"""
from __future__ import annotations

from quantkit.methods.base import register
from quantkit.methods.eda_dm import ReconMethod


@register("flexround")
class FlexRoundMethod(ReconMethod):
    recon_defaults = {"rounding": "flexround", "lambda_add": 0.0, "input_prob": 1.0, "act_drop_prob": 0.0,
                      "weight_init": "minmax", "act_init": "mse", "lr_w": 3e-3, "lr_a": 1e-4, "iters": 200,
                      "batch_size": 8, "flexround_s4": True}
    # Calibration: every sampler step of the calibration prompts (the spine's default capture).
    default_selection = "all"
