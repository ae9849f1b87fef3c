"""Argument checks shared by the launchers and the torch path: each failure names the argument."""

from __future__ import annotations

from typing import Sequence

import torch

from .devices import same_device

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, t: object, ndim: int, dtypes: Sequence[torch.dtype] | None = None,
                 device: torch.device | None = None, contiguous: bool = False,
                 last_dim_contiguous: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}, expected one of {allowed}")
    if device is not None and not same_device(t.device, device):
        raise ValueError(f"{name} is on {t.device}, expected {device} (same device as x)")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)})")
    if last_dim_contiguous and t.numel() > 0 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dimension, got strides {t.stride()}")


def check_dim(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name}.shape[{dim}] is {t.shape[dim]} but {what} is {expected} "
                         f"({name} shape {tuple(t.shape)})")


def resolve_slices(num_slices: int, out_total: int, slice_offsets: Sequence[int] | None,
                   slice_widths: Sequence[int] | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Slice column ranges in y; None means equal widths, side by side."""
    if slice_widths is None:
        if out_total % num_slices:
            raise ValueError(f"slice_widths not given and out_total={out_total} does not split "
                             f"into {num_slices} equal slices")
        slice_widths = (out_total // num_slices,) * num_slices
    widths = tuple(int(w) for w in slice_widths)
    if slice_offsets is None:
        offsets = tuple(sum(widths[:i]) for i in range(len(widths)))
    else:
        offsets = tuple(int(o) for o in slice_offsets)
    if len(widths) != num_slices or len(offsets) != num_slices:
        raise ValueError(f"slice_offsets ({len(offsets)}) and slice_widths ({len(widths)}) must "
                         f"have one entry per slice ({num_slices})")
    for i, (o, w) in enumerate(zip(offsets, widths)):
        if o < 0 or w < 0 or o + w > out_total:
            raise ValueError(f"slice {i}: columns [{o}, {o + w}) are outside y's {out_total} columns "
                             f"(slice_offsets/slice_widths)")
    return offsets, widths


def check_pools(ranks: torch.Tensor, scalings: torch.Tensor | None, num_slices: int, num_slots: int) -> None:
    """ranks (int32) and scalings (fp32), both [num_slices, S] and contiguous; scalings may be None."""
    check_tensor("ranks", ranks, 2, (torch.int32,), contiguous=True)
    if tuple(ranks.shape) != (num_slices, num_slots):
        raise ValueError(f"ranks has shape {tuple(ranks.shape)}, expected (num_slices, S) = "
                         f"({num_slices}, {num_slots})")
    if scalings is not None:
        check_tensor("scalings", scalings, 2, (torch.float32,), contiguous=True)
        if tuple(scalings.shape) != (num_slices, num_slots):
            raise ValueError(f"scalings has shape {tuple(scalings.shape)}, expected (num_slices, S) = "
                             f"({num_slices}, {num_slots})")
