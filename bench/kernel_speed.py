"""Kernel speed benchmark (same as `quantkit bench kernels`): python bench/kernel_speed.py --help"""
from quantkit.kernels.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
