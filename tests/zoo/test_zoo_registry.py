"""The zoo registry: names resolve to shipped folders, unknown names fail with the list of known ones."""

import importlib
import json

import pytest

from quantkit.errors import QuantkitError
from quantkit.zoo.common import METRICS_FILE
from quantkit.zoo.registry import ZOO, train_model, zoo_path


def test_unknown_name_lists_known_models():
    with pytest.raises(QuantkitError) as info:
        zoo_path("no-such-model")
    message = str(info.value)
    assert "no-such-model" in message
    for name in ZOO:
        assert name in message


def test_train_model_rejects_unknown_name_before_training():
    with pytest.raises(QuantkitError, match="known models"):
        train_model("zoo:nope")


def test_prefix_accepted():
    name = next(iter(ZOO))
    assert zoo_path(f"zoo:{name}") == zoo_path(name)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_entry_is_complete(name):
    entry = ZOO[name]
    assert entry.name == name
    assert entry.kind in {"diffusion-pipeline", "transformers-lm", "clip"}
    module_name, function_name = entry.trainer.split(":")
    assert callable(getattr(importlib.import_module(module_name), function_name))
    metrics = json.loads((zoo_path(name) / METRICS_FILE).read_text())
    assert metrics["model"] == name
    assert all(dependency in ZOO for dependency in entry.depends_on)
