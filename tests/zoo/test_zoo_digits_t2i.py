"""zoo:digits-t2i is a standard StableDiffusionPipeline folder that loads offline and samples."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from quantkit.zoo.common import read_metrics
from quantkit.zoo.registry import zoo_path


@pytest.fixture(scope="module")
def model_dir():
    return zoo_path("digits-t2i")


def test_recorded_accuracy_meets_bar(model_dir):
    assert read_metrics(model_dir)["prompted_digit_accuracy"] >= 0.80


def test_folder_is_standard_without_safety_checker(model_dir):
    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]


def test_loads_and_samples_with_guidance(model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a handwritten seven", "the digit 2"], num_inference_steps=4, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (2, 3, 32, 32)
    assert torch.isfinite(out.images).all()
    # cross-attention is what the quantizer adapters look for; it must be present.
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
