"""zoo:digits-dit is a standard class-conditional DiTPipeline folder that loads offline and samples."""

import pytest
import torch
from diffusers import DiTPipeline

from quantkit.zoo.common import read_metrics
from quantkit.zoo.registry import zoo_path


@pytest.fixture(scope="module")
def model_dir():
    return zoo_path("digits-dit")


def test_recorded_accuracy_meets_bar(model_dir):
    assert read_metrics(model_dir)["class_digit_accuracy"] >= 0.80


def test_loads_and_samples_by_label(model_dir):
    pipe = DiTPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    labels = pipe.get_label_ids(["seven", "two"])
    assert labels == [7, 2]
    out = pipe(labels, guidance_scale=3.0, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
               output_type="pt")
    assert out.images.shape == (2, 3, 32, 32)
    assert torch.isfinite(out.images).all()
