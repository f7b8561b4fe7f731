"""Train `zoo:digits-clip`: a small transformers CLIPModel on sklearn digits and varied captions."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerBase

from quantkit.zoo.captions import TEMPLATES, ZERO_SHOT_TEMPLATES, all_caption_texts, caption, random_caption
from quantkit.zoo.common import cosine_lr, seed_everything, timed, write_metrics
from quantkit.zoo.digits_data import IMAGE_SIZE, augment, digits_splits
from quantkit.zoo.word_tokenizer import MAX_LENGTH, build_word_tokenizer, save_word_tokenizer

log = logging.getLogger(__name__)


def build_config(tokenizer: PreTrainedTokenizerBase) -> CLIPConfig:
    """Two small towers; the vision tower sees 8x8 patches of 4x4 pixels on 32x32 RGB."""
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=4, num_channels=3,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def build_image_processor() -> CLIPImageProcessor:
    """uint8 RGB -> [-1, 1] at 32x32, matching the tensors the model was trained on."""
    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": IMAGE_SIZE}, do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True,
    )


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """Pad to model_max_length exactly as StableDiffusionPipeline does, so both uses agree."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def _features(out: object) -> torch.Tensor:
    """transformers v5 returns projected features as `pooler_output` of an output object; v4 a tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


@torch.no_grad()
def class_text_embeddings(model: CLIPModel, tokenizer: PreTrainedTokenizerBase,
                          templates: tuple[str, ...]) -> torch.Tensor:
    """[10, D] unit text embeddings per digit, averaged over `templates` (prompt ensembling)."""
    per_template = []
    for template in templates:
        ids = tokenize(tokenizer, [caption(label, template) for label in range(10)])
        per_template.append(F.normalize(_features(model.get_text_features(input_ids=ids)), dim=-1))
    return F.normalize(torch.stack(per_template).mean(0), dim=-1)


@torch.no_grad()
def image_embeddings(model: CLIPModel, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """[N, D] unit image embeddings of images in [-1, 1]."""
    feats = []
    for i in range(0, len(images), batch):
        feats.append(_features(model.get_image_features(pixel_values=images[i : i + batch])))
    return F.normalize(torch.cat(feats), dim=-1)


@torch.no_grad()
def zero_shot_predict(model: CLIPModel, tokenizer: PreTrainedTokenizerBase, images: torch.Tensor,
                      templates: tuple[str, ...] = ZERO_SHOT_TEMPLATES) -> torch.Tensor:
    """Predicted digit per image: the nearest class text embedding."""
    model.eval()
    return (image_embeddings(model, images) @ class_text_embeddings(model, tokenizer, templates).T).argmax(-1)


def _contrastive_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss whose targets spread over all same-digit pairs: with ten classes most of
    a batch shares a digit, and treating those pairs as negatives would fight the task."""
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    loss_img = torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
    loss_txt = torch.sum(-targets * F.log_softmax(logits.T, dim=1), dim=1).mean()
    return (loss_img + loss_txt) / 2


def train(out_dir: Path, seed: int = 0, steps: int = 1500, batch: int = 128, lr: float = 2e-3) -> dict:
    """Train, save a CLIPModel folder with tokenizer and image processor, return FP metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = seed_everything(seed)
    rng = random.Random(seed)
    (train_x, train_y), (test_x, test_y) = digits_splits()
    tokenizer = build_word_tokenizer(all_caption_texts())
    model = CLIPModel(build_config(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    times: dict[str, float] = {}
    with timed("train_seconds", times):
        for step in range(steps):
            model.train()
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, steps, warmup=100, peak=lr, floor_ratio=0.02)
            pick = torch.randint(0, len(train_y), (batch,), generator=gen)
            labels = train_y[pick]
            ids = tokenize(tokenizer, [random_caption(int(label), rng) for label in labels])
            out = model(input_ids=ids, pixel_values=augment(train_x[pick], gen))
            loss = _contrastive_loss(out.logits_per_image, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % 100 == 0 or step == steps - 1:
                acc = (zero_shot_predict(model, tokenizer, test_x) == test_y).float().mean().item()
                log.info("step %d/%d loss %.4f held-out zero-shot %.3f", step, steps, loss.item(), acc)
    model.save_pretrained(out_dir)
    save_word_tokenizer(tokenizer, out_dir)
    build_image_processor().save_pretrained(out_dir)
    reloaded = CLIPModel.from_pretrained(out_dir)
    with timed("eval_seconds", times):
        acc_ensemble = (zero_shot_predict(reloaded, tokenizer, test_x) == test_y).float().mean().item()
        acc_single = {t: round((zero_shot_predict(reloaded, tokenizer, test_x, (t,)) == test_y).float().mean().item(), 4)
                      for t in ZERO_SHOT_TEMPLATES}
        acc_train = (zero_shot_predict(reloaded, tokenizer, train_x) == train_y).float().mean().item()
    metrics = {
        "model": "digits-clip",
        "seed": seed,
        "steps": steps,
        "batch": batch,
        "heldout_zero_shot_accuracy": round(acc_ensemble, 4),
        "heldout_zero_shot_accuracy_per_template": acc_single,
        "train_zero_shot_accuracy": round(acc_train, 4),
        "zero_shot_templates": list(ZERO_SHOT_TEMPLATES),
        "train_templates": len(TEMPLATES),
        "heldout_images": len(test_y),
        "parameters": sum(p.numel() for p in reloaded.parameters()),
        **times,
    }
    write_metrics(out_dir, metrics)
    return metrics
