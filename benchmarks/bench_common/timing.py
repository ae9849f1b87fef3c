"""Timing of the developer scripts: a kernel timer and the device's measured copy bandwidth, both with
triton's do_bench on CUDA so that a kernel's fraction of copy bandwidth compares like with like.
(`loraplex bench` times whole runs by the wall clock and has its own copy bandwidth in
server/bench/report.py, measured the same way as its steps.)"""

from __future__ import annotations

import time

import torch


def timer(device: torch.device):
    """Median GPU time in seconds (triton's do_bench, L2 flushed between reps) or, on CPU, the best of a few."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn, rep=100: do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e-3

    def cpu_time(fn, rep=None):
        fn()
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    return cpu_time


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted)."""
    if device.type != "cuda":
        nbytes = 1 << 24
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timer(device)(lambda: dst.copy_(src))
    return 2 * nbytes / seconds
