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


def for_current_mode(kernel):
    from triton.runtime.interpreter import InterpretedFunction

    want_interp = interpreting()
    if isinstance(kernel, InterpretedFunction) == want_interp:
        return kernel
    key = id(kernel)
    if key not in _rewrapped or isinstance(_rewrapped[key], InterpretedFunction) != want_interp:
        _rewrapped[key] = triton.jit(kernel.fn)
    return _rewrapped[key]


def check_launch_device(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"{name} is on {t.device}: the Triton kernels need CUDA tensors "
                         f"(or TRITON_INTERPRET=1 to interpret them on CPU)")


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
