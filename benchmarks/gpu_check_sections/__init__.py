"""The sections of benchmarks/gpu_check.py, one module each (what it checks is in its docstring); the
driver, its order and its JSON are gpu_check.py's."""
