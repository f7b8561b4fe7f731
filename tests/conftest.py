import os
import sys
from pathlib import Path

import pytest

# transformers (>= 5.25) imports Hugging Face's `kernels` package, and `python -m pytest` puts the repository
# root first on sys.path, where this project's kernels/ folder (installed as quantkit.kernels) would hide it.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
os.environ["PYTHONSAFEPATH"] = "1"  # the same for the interpreters tests start (python -m ..., python -c)


@pytest.fixture(scope="session", autouse=True)
def _quantkit_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Tiny on-the-spot models are built once per test session into a private cache.
    os.environ.setdefault("QUANTKIT_CACHE", str(tmp_path_factory.mktemp("quantkit-cache")))


@pytest.fixture
def shared_data() -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"
