import subprocess
import sys


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_kernels_and_calib_are_not_top_level(tmp_path):
    # From outside the source tree, only quantkit.kernels / quantkit.calib exist.
    r = _run(
        "import importlib.util as u, quantkit.kernels, quantkit.calib\n"
        "spec = u.find_spec('kernels')\n"
        "print('KERNELS', None if spec is None else spec.origin)\n"
        "c = u.find_spec('calib')\n"
        "print('CALIB', None if c is None else c.origin)\n"
        "print('QK', quantkit.kernels.__name__)\n",
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "QK quantkit.kernels" in out
    for line in out.splitlines():
        if line.startswith(("KERNELS", "CALIB")):
            origin = line.split(" ", 1)[1]
            assert origin == "None" or "quantkit" not in origin and "/work/" not in origin, line


def test_import_touches_neither_triton_nor_cuda(tmp_path):
    r = _run(
        "import sys, quantkit, quantkit.kernels, quantkit.nn, quantkit.pipeline, quantkit.io\n"
        "import torch\n"
        "print('triton' in sys.modules, torch.cuda.is_initialized())\n",
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False False"


def test_run_from_the_repository_root_names_the_hidden_kernels_package():
    # transformers (>= 5.25) imports Hugging Face's `kernels`; from the repository root (on sys.path, as
    # `python -m` puts it) this project's kernels/ folder would hide it behind an unrelated ImportError.
    import importlib.metadata
    import os
    from pathlib import Path

    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        import pytest

        pytest.skip("Hugging Face's kernels package is not installed: nothing to hide")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    r = subprocess.run([sys.executable, "-c", "import quantkit"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    assert "hides the `kernels` package transformers imports" in r.stderr.strip().splitlines()[-1]
    r = subprocess.run([sys.executable, "-c", "import quantkit, transformers.integrations.hub_kernels"], cwd=root,
                       env={**env, "PYTHONSAFEPATH": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
