"""zoo:digits-ddpm is a standard DDIMPipeline folder that loads offline and samples."""

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline

from quantkit.zoo.common import read_metrics
from quantkit.zoo.registry import zoo_path


@pytest.fixture(scope="module")
def model_dir():
    return zoo_path("digits-ddpm")


def test_loads_and_samples(model_dir):
    pipe = DDIMPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, size, size, 3)
    assert np.isfinite(images).all()


def test_recorded_samples_cover_the_digits(model_dir):
    metrics = read_metrics(model_dir)
    assert sum(metrics["judged_digit_counts"]) == metrics["sample_setting"]["n"]
    assert metrics["judged_digit_entropy"] > 0.8  # no collapse onto a few digits
