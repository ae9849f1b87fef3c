"""Record Triton launches as the key each would compile a variant under on an H100 (sm_90), without a
GPU: the constexprs, the arguments' specialization (a value of 1, divisibility by 16, 16-byte
alignment) and the options (num_warps, num_stages). Patch it over a launcher module's
`for_current_mode`; the kernels are then recorded, not run."""

from __future__ import annotations

from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime.jit import JITFunction, create_function_from_signature

from loraplex.kernels.triton.utils import jit_options

SM90 = GPUTarget("cuda", 90, 32)


class Recorder:
    """Stands in for `for_current_mode`: `kernel[grid](...)` adds the launch's compile key to `keys`."""

    def __init__(self):
        self.keys: set = set()
        self._binders: dict = {}

    def __call__(self, kernel):
        if kernel.fn not in self._binders:
            jit = JITFunction(kernel.fn, **jit_options(kernel))
            self._binders[kernel.fn] = create_function_from_signature(jit.signature, jit.params, CUDABackend(SM90))
        binder, keys = self._binders[kernel.fn], self.keys

        class Launch:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    _, specialization, options = binder(*args, **kwargs)
                    keys.add((kernel.fn.__name__, tuple(map(tuple, specialization)), tuple(sorted(options.items()))))
                return launch

        return Launch()
