"""Kernel tests run the Triton kernels on CPU through Triton's interpreter.

TRITON_INTERPRET=1 is set for each kernel test only (and restored after it), so the rest of the
suite runs with the environment it was given. Setting it when this file is imported would not be
enough: other test folders import loraplex.server, which imports triton, before this folder is
collected. The launchers pick the interpreted or compiled flavour of a kernel when they launch it
(``kernels/triton/utils.py``), so the import order does not matter.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("LORAPLEX_LORA_BACKEND", raising=False)
    # These tests are many tiny ops: on the shared 2-core CI machine a second intra-op thread only
    # adds millisecond stalls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
