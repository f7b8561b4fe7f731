import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _quantkit_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Tiny on-the-spot models are built once per test session into a private cache.
    os.environ.setdefault("QUANTKIT_CACHE", str(tmp_path_factory.mktemp("quantkit-cache")))


@pytest.fixture
def shared_data() -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"
