"""zoo:digits-clip loads offline with the standard classes and reads held-out digits zero-shot."""

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from quantkit.zoo.common import read_metrics
from quantkit.zoo.digits_data import digits_splits
from quantkit.zoo.registry import zoo_path
from quantkit.zoo.train_digits_clip import zero_shot_predict


@pytest.fixture(scope="module")
def model_dir():
    return zoo_path("digits-clip")


def test_recorded_accuracy_meets_bar(model_dir):
    assert read_metrics(model_dir)["heldout_zero_shot_accuracy"] >= 0.90


def test_loads_and_classifies_heldout_digits(model_dir):
    model = CLIPModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    _, (images, labels) = digits_splits()
    predicted = zero_shot_predict(model, tokenizer, images[:100])
    assert predicted.shape == (100,)
    assert (predicted == labels[:100]).float().mean() >= 0.85


def test_standard_processor_path(model_dir):
    """The image processor + tokenizer a CLIP-score tool would use give finite, well-shaped logits."""
    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    _, (images, _) = digits_splits()
    uint8 = [((img.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy() for img in images[:4]]
    pixels = processor(images=[np.asarray(x) for x in uint8], return_tensors="pt").pixel_values
    assert pixels.shape == (4, 3, 32, 32)
    text = tokenizer(["a handwritten seven", "the digit 3"], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=text.input_ids, pixel_values=pixels)
    assert out.logits_per_image.shape == (4, 2)
    assert torch.isfinite(out.logits_per_image).all()
