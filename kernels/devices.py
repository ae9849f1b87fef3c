"""One spelling per device: the device that tensors report, and the thread's current CUDA device.

``torch.device("cuda") != torch.device("cuda:0")`` although a tensor made on the first is on the
second, and ``torch.device("cpu", 0) != torch.device("cpu")`` although CPU tensors report the
latter. Devices are normalised once where they enter (configuration, ``LoRAMeta``) and compared
through ``same_device``, never with ``==`` on what a caller passed.

Triton launches on the thread's current CUDA device, not on the device of its arguments, so every
thread that launches work for a ``cuda:N`` model calls ``make_current`` first.
"""

from __future__ import annotations

import torch


def normalize(device: torch.device | str | int) -> torch.device:
    """The device a tensor created on ``device`` reports: ``cpu`` without an index, ``cuda`` with one
    (the current CUDA device where the index is omitted, as torch places such tensors)."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return torch.device("cuda", index)
    return device


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    return normalize(a) == normalize(b)


def make_current(device: torch.device | str) -> None:
    """Make ``device`` the calling thread's current CUDA device (nothing to do for other devices)."""
    device = normalize(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
