"""Decode steps over static buffers, replayed as CUDA graphs per batch-size bucket.

A pure decode step (every sequence runs one token and samples) is padded to the next captured batch
size (`batch_sizes`: 1, 2, 4, 8, 16, 32, 64, then steps of 32). Its token ids, positions, KV slots,
block tables (padded to the model's longest context), context lengths and LoRA layout live in one
fixed layout of a `StepBuffers` pair, rewritten on the host and sent in one copy before each replay,
so the captured kernels read this step's values at the addresses they were captured with. Padding
rows decode token 0 at position 0 into the runner's scratch KV block with no adapter. The LoRA
context has every adapter kind on (rows of ones for the slots without DoRA/IA3), so one graph serves
any adapter mix. Graphs share one memory pool and are captured largest first at start-up.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from loraplex.kernels.meta import LoRAMeta
from loraplex.server.adapters.kind import AdapterKind
from loraplex.server.model import attention
from loraplex.server.model.step_buffers import StepAttachment, StepBuffers

if TYPE_CHECKING:
    from loraplex.server.model.runner import ModelRunner, StepInput

log = logging.getLogger(__name__)

ALL_KINDS = frozenset({AdapterKind.LORA, AdapterKind.DORA, AdapterKind.IA3})


def batch_sizes(max_seqs: int) -> list[int]:
    """Captured decode batch sizes: 1, 2, 4, ..., 64, then steps of 32, the last >= max_seqs."""
    sizes = [1]
    while sizes[-1] < max_seqs:
        sizes.append(sizes[-1] * 2 if sizes[-1] < 64 else sizes[-1] + 32)
    return sizes


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_seqs: int):
        if runner.decoder is None:
            raise ValueError("static decode steps need the lean decoder forward (server/model/decoder.py)")
        self.runner = runner
        self.sizes = batch_sizes(max_seqs)
        self.max_batch = self.sizes[-1]
        self.max_blocks = -(-runner.max_model_len // runner.block_size)
        self.lora_meta = LoRAMeta.allocate(self.max_batch, runner.num_slots, runner.device, max_slices=3,
                                           max_rank=runner.config.adapters.max_rank)
        self.paged = runner.attention_backend == "triton"
        """The Triton kernel reads int32 block tables and lengths (`attention.PagedBatch`); the torch path
        gathers through int64 ones (`attention.DecodeBatch`)."""
        b, blocks = self.max_batch, self.max_batch * self.max_blocks
        self._bound = 8 * (7 * b + blocks + 16) + 4 * self.lora_meta.table_numel  # 8 arrays, each 8-byte aligned
        # constant across steps, so outside the step buffer: one query row per sequence, rows in order
        self.query_start = torch.arange(b + 1, dtype=torch.int32, device=runner.device)
        self.rows = torch.arange(b, device=runner.device)
        self.buffers = StepBuffers(runner.device, self._bound)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._stage([], self.max_batch)  # fixes the device views every graph reads

    def takes(self, inputs: list[StepInput], attach: StepAttachment | None = None) -> bool:
        """Whether `inputs` is a step these buffers run: plain decodes that all sample, few enough."""
        return 0 < len(inputs) <= self.max_batch and all(
            len(item.token_ids) == 1 and item.virtual_embeddings is None and item.skip is None and item.samples
            and len(item.block_table) <= self.max_blocks for item in inputs)

    def _stage(self, inputs: list[StepInput], size: int, attach: StepAttachment | None = None) -> None:
        """Write `inputs` padded to `size` rows into the fixed layout and send it (one copy)."""
        runner, n = self.runner, self.max_batch
        order = sorted(range(len(inputs)), key=lambda i: (inputs[i].slot < 0, inputs[i].slot))
        scratch = runner.scratch_block
        token_ids, positions, slots, lengths = [0] * n, [0] * n, [scratch * runner.block_size] * n, [1] * n
        keep, lora_rows = list(range(n)), [runner.num_slots] * n
        token_slots = [-1] * size
        tables = [scratch] * (n * self.max_blocks)
        for row, i in enumerate(order):
            item = inputs[i]
            keep[i] = row  # logits come out in input order
            token_ids[row] = item.token_ids[0]
            positions[row] = item.start
            slots[row] = runner.kv_slots(item.block_table, item.start, item.start + 1)[0]
            lengths[row] = item.start + 1
            tables[row * self.max_blocks : row * self.max_blocks + len(item.block_table)] = item.block_table
            token_slots[row] = item.slot
            if item.slot >= 0:
                lora_rows[row] = item.slot
        self.lora_meta.build(token_slots, contiguous=True)
        buffers = self.buffers
        buffers.begin(self._bound + (0 if attach is None else attach.nbytes))
        self.token_ids = buffers.put(token_ids).view(1, -1)
        self.positions = buffers.put(positions).view(1, -1)
        self.slot_mapping = buffers.put(slots)
        index = torch.int32 if self.paged else torch.int64
        self.lengths = buffers.put(lengths, index)
        self.keep = buffers.put(keep)
        self.lora_rows = buffers.put(lora_rows)
        self.tables = buffers.put(tables, index)
        table = buffers.put(self.lora_meta.host, torch.int32)
        if table.data_ptr() != self.lora_meta.table.data_ptr():
            self.lora_meta.bind(table)
        if attach is not None:
            attach.put(buffers)
        buffers.send()

    def _forward(self, size: int) -> torch.Tensor:
        """Float32 logits [size, vocab] of the staged step, rows in input order then padding."""
        runner = self.runner
        tables = self.tables[: size * self.max_blocks]
        if self.paged:
            paged = attention.PagedBatch(block_tables=tables.view(size, self.max_blocks),
                                         query_start=self.query_start[: size + 1], kv_lens=self.lengths[:size],
                                         max_query_len=1)
            meta = attention.AttentionMeta(cache=runner.kv_cache, slot_mapping=self.slot_mapping[:size], spans=[],
                                           backend="triton", paged=paged)
        else:
            decode = attention.DecodeBatch(rows=self.rows[:size], row_range=(0, size), blocks=tables,
                                           blocks_per_seq=self.max_blocks, lengths=self.lengths[:size], uniform=False)
            meta = attention.AttentionMeta(cache=runner.kv_cache, slot_mapping=self.slot_mapping[:size], spans=[],
                                           decode=decode)
        runner.lora_context.begin(self.lora_meta, self.lora_rows[:size], ALL_KINDS)
        try:
            return runner.decoder(self.positions[:, :size], self.keep[:size], meta,
                                  input_ids=self.token_ids[:, :size]).float()
        finally:
            runner.lora_context.end()

    def run(self, inputs: list[StepInput], attach: StepAttachment | None = None) -> torch.Tensor:
        """Float32 logits [len(inputs), vocab] in input order: the captured graph of the batch's size
        replayed, or the same forward run eagerly where none was captured."""
        size = next(s for s in self.sizes if s >= len(inputs))
        self._stage(inputs, size, attach)
        captured = self.graphs.get(size)
        if captured is None:
            return self._forward(size)[: len(inputs)]
        graph, logits = captured
        graph.replay()
        return logits[: len(inputs)]

    def capture(self) -> None:
        """Capture every batch size, largest first, in one memory pool (CUDA); logs the time taken."""
        started = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):
            self._stage([], size)
            self._forward(size)  # warm-up: kernels compiled, workspaces allocated outside the graph
            torch.cuda.synchronize(self.runner.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = (graph, logits)
        log.info("captured %d decode CUDA graphs (batch sizes %s) in %.1f s", len(self.sizes),
                 ", ".join(map(str, self.sizes)), time.perf_counter() - started)
