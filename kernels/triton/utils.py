"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import torch
import triton
from triton import knobs

# @triton.jit decides between compiling and interpreting when a module is imported. Tests set
# TRITON_INTERPRET=1 later than that (other test folders may import this package first), so each
# launcher asks for the kernel flavour that matches the current setting. For the same reason the
# kernels call no @triton.jit helpers, not even triton.language's own (tl.cdiv, tl.sum, ...): those
# keep the flavour of the moment triton was imported, and a compiled one cannot run interpreted
# (so tl.full rather than tl.zeros, and integer arithmetic rather than tl.cdiv).
_rewrapped: dict[int, object] = {}


def interpreting() -> bool:
    return bool(knobs.runtime.interpret)


def _index_scalars_on_older_interpreters() -> None:
    """Let Triton 3.4-3.6's interpreter use a scalar kernel argument as a Python int with NumPy >= 2.4.

    Those interpreters hold a scalar argument as a one-element array and turn it into an int (a loop bound:
    ``range(0, (K + ...) // ...)``) with ``int(array)``, which NumPy 2.4 refuses for arrays of one dimension
    ("only 0-dimensional arrays can be converted to Python scalars"). Triton 3.7 squeezes the array first;
    this does the same on the older ones, once per process. Compiled kernels never come here.
    """
    from triton.runtime import interpreter

    if tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 7) or getattr(
            interpreter._patch_lang_tensor, "_loraplex_squeezes", False):
        return
    patch = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, *args):
        patch(tensor, *args)
        tensor.__index__ = lambda self: int(self.handle.data.squeeze())

    patch_lang_tensor._loraplex_squeezes = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def for_current_mode(kernel):
    from triton.runtime.interpreter import InterpretedFunction

    want_interp = interpreting()
    if want_interp:
        _index_scalars_on_older_interpreters()
    if isinstance(kernel, InterpretedFunction) == want_interp:
        return kernel
    key = id(kernel)
    if key not in _rewrapped or isinstance(_rewrapped[key], InterpretedFunction) != want_interp:
        _rewrapped[key] = triton.jit(kernel.fn, **jit_options(kernel))
    return _rewrapped[key]


def jit_options(kernel) -> dict:
    """The specialization options `kernel` was decorated with (``@triton.jit(do_not_specialize=...)``),
    whichever flavour it is, so that a rewrapped kernel keeps them."""
    options = getattr(kernel, "kwargs", None) or vars(kernel)  # InterpretedFunction keeps them in .kwargs
    return {name: options.get(name) for name in ("do_not_specialize", "do_not_specialize_on_alignment")}


def check_launch_device(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"{name} is on {t.device}: the Triton kernels need CUDA tensors "
                         f"(or TRITON_INTERPRET=1 to interpret them on CPU)")


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
