"""Kernel speed benchmark (same as `quantkit bench kernels`): python bench/kernels.py --help"""
from quantkit.kernels.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
