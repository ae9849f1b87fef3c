"""LORAPLEX_ATTENTION_BACKEND: chosen once per model runner, refused with a message naming why where
it cannot serve the model."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels.cpu import native
from loraplex.server.errors import UserError
from loraplex.server.model import attention
from loraplex.server.model.step_buffers import StepBuffers

CPU = torch.device("cpu")


def test_defaults(monkeypatch):
    monkeypatch.delenv(attention.BACKEND_ENV, raising=False)
    expected = "native" if native.available() else "torch"
    assert attention.select_backend(CPU, torch.float32) == expected
    assert attention.select_backend(CPU, torch.bfloat16) == "torch"


@pytest.mark.parametrize("value, dtype, interpret, message", [
    ("flash", torch.float32, "0", "expected one of triton, torch, native"),
    ("triton", torch.float32, "0", "triton needs a CUDA device"),
    ("native", torch.float16, "0", "native runs float32 models on CPU"),
])
def test_refused(monkeypatch, value, dtype, interpret, message):
    monkeypatch.setenv(attention.BACKEND_ENV, value)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    with pytest.raises(UserError, match=message):
        attention.select_backend(CPU, dtype)


def test_forced(monkeypatch):
    monkeypatch.setenv(attention.BACKEND_ENV, " Torch ")
    assert attention.select_backend(CPU, torch.float32) == "torch"
    monkeypatch.setenv(attention.BACKEND_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert attention.select_backend(CPU, torch.float32) == "triton"


def test_paged_batch_is_part_of_the_step_buffer_with_the_worked_example():
    buffers = StepBuffers(CPU)
    buffers.begin(4096)
    batch = attention.PagedBatch.build([1, 3], [6, 8], [[7, 2], [5, 1]], [None, None], buffers.put)
    buffers.send()
    assert batch.query_start.tolist() == [0, 1, 4] and batch.kv_lens.tolist() == [6, 8]
    assert batch.block_tables.tolist() == [[7, 2], [5, 1]] and batch.max_query_len == 3 and batch.skip is None
    assert batch.block_tables.untyped_storage().data_ptr() == buffers.table.untyped_storage().data_ptr()
    buffers.begin(4096)
    batch = attention.PagedBatch.build([1, 2], [13, 3], [[4, 5, 6, 7], [1]], [(6, 8), None], buffers.put)
    buffers.send()
    assert batch.skip.tolist() == [[6, 8], [0, 0]] and batch.block_tables.tolist() == [[4, 5, 6, 7], [1, 0, 0, 0]]
