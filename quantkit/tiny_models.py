"""Tiny random-weight models made on the spot (no download): the built-in defaults until trained zoo
models exist, and the small configs the tests quantize. Built deterministically from a seed."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)


def _clip_tokenizer(out: Path) -> None:
    """A character-level CLIP tokenizer (vocab.json + empty merges) in the format SD pipelines load."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16).save_pretrained(out)


def make_tiny_sd(out: Path, seed: int = 0) -> None:
    """A StableDiffusionPipeline with a 2-level UNet2DConditionModel, tiny VAE and CLIP text encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = _tiny_unet()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    tok_dir = out.parent / (out.name + ".tokenizer")
    _clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    import shutil

    shutil.rmtree(tok_dir, ignore_errors=True)


def make_tiny_dit(out: Path, seed: int = 0) -> None:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=4, num_layers=2,
                          sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8).save_pretrained(out)


def _tiny_unet():
    # Widths are multiples of 128 so that every group size up to 128 divides every layer.
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(128, 128),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=32, norm_num_groups=8,
    )


def make_tiny_unet(out: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    _tiny_unet().save_pretrained(out)


def make_tiny_mixtral(out: Path, seed: int = 0) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128, tie_word_embeddings=False)
    MixtralForCausalLM(cfg).save_pretrained(out)


def make_tiny_deepseek(out: Path, seed: int = 0) -> None:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                           num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
                           num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                           n_group=2, topk_group=1, kv_lora_rank=128, q_lora_rank=128, qk_rope_head_dim=16,
                           qk_nope_head_dim=16, v_head_dim=32, max_position_embeddings=128,
                           tie_word_embeddings=False)
    DeepseekV3ForCausalLM(cfg).save_pretrained(out)


def make_tiny_qwen3_moe(out: Path, seed: int = 0) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, max_position_embeddings=128,
                         tie_word_embeddings=False)
    Qwen3MoeForCausalLM(cfg).save_pretrained(out)


def make_tiny_olmoe(out: Path, seed: int = 0) -> None:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    cfg = OlmoeConfig(vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
                      max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=None,
                      eos_token_id=255, pad_token_id=1)
    OlmoeForCausalLM(cfg).save_pretrained(out)


def make_tiny_clip(out: Path, seed: int = 0) -> None:
    """A random CLIPModel with tokenizer and image processor (a stand-in judge for eval tests)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    _clip_tokenizer(out)
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(out)
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 4},
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                       image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)


TINY: dict[str, tuple[str, Callable[[Path, int], None]]] = {
    "tiny-sd": ("random-weight Stable Diffusion pipeline (UNet2DConditionModel, tiny VAE, CLIP text)", make_tiny_sd),
    "tiny-unet": ("random-weight UNet2DConditionModel", make_tiny_unet),
    "tiny-dit": ("random-weight class-conditional DiTTransformer2DModel", make_tiny_dit),
    "tiny-mixtral": ("random-weight MixtralForCausalLM, 4 fused experts, top-2", make_tiny_mixtral),
    "tiny-qwen3-moe": ("random-weight Qwen3MoeForCausalLM, 4 fused experts, top-2", make_tiny_qwen3_moe),
    "tiny-olmoe": ("random-weight OlmoeForCausalLM, 4 fused experts, top-2", make_tiny_olmoe),
    "tiny-clip": ("random-weight CLIPModel with tokenizer and image processor", make_tiny_clip),
    "tiny-deepseek": ("random-weight DeepseekV3ForCausalLM, shared + 8 routed experts, grouped top-k", make_tiny_deepseek),
}



def _modern_pipelines() -> dict[str, tuple[str, Callable[[Path, int], None]]]:
    from quantkit.tiny_pipelines import TINY_PIPELINES  # FLUX, SD3, ... (imports this module's tokenizer)

    return TINY_PIPELINES


TINY.update(_modern_pipelines())

def tiny_model_path(name: str, cache: Path | None = None) -> Path:
    """Folder of tiny model `name`, built on first use into $QUANTKIT_CACHE/tiny (default ~/.cache/quantkit)."""
    import os

    cache = cache or Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit")) / "tiny"
    out = cache / name
    if not (out / "model_index.json").exists() and not (out / "config.json").exists():
        log.info("building %s into %s", name, out)
        tmp = cache / f".{name}.tmp"
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        TINY[name][1](tmp, 0)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out
