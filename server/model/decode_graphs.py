"""Decode steps over static buffers, replayed as CUDA graphs per batch-size bucket and adapter variant.

A pure decode step (every sequence runs one token and samples) is padded to the next captured batch
size (`batch_sizes`: 1, 2, 4, 8, 16, 32, 64, then steps of 32). Each size is captured twice: the
"lora" variant runs the LoRA op only, the "vectors" variant also DoRA's and IA3's per-slot vectors
(`LoRALinear.out_scale`, `ia3_in`), which exist from wrap time on; a step takes "vectors" when one of
its slots holds a DoRA or IA3 adapter. Nothing the captured forward branches on changes after capture
(tests/model/test_graph_capture.py records the op sequence and replays it against eager steps).

Every input a graph reads lives at a fixed place of one pinned host buffer and its device twin
(`StepBuffers`), laid out once:

    token_ids, positions, slot_mapping, keep, lora_rows, table_rows   [max_batch] int64 each
    lengths                                                          [max_batch] int32 (Triton) / int64
    LoRA layout                                                      LoRAMeta's int32 tables
    attachment                                                       the sampler's arrays (not read by graphs)
    tables                                                           [max_batch + 1, max_blocks]

Block tables are persistent per sequence: a sequence keeps its row of `tables` (row 0 is the padding
rows' scratch block) while it decodes, the host writes only the entries appended since the last step
(a block table is append-only; a reset makes a new list), and the graph gathers the step's rows
(`table_rows`) on the device. A step rewrites the small arrays of its bucket's rows, then sends bytes
[0, end of the highest table row in use) in one non-blocking copy: host work does not grow with the
model's context length. Padding rows decode token 0 at position 0 into the runner's scratch KV block
with no adapter. Graphs share one memory pool and are captured largest first at start-up.
"""

from __future__ import annotations

import heapq
import logging
import time
from typing import TYPE_CHECKING, Callable

import torch

from loraplex.kernels.meta import LoRAMeta
from loraplex.server.adapters.kind import AdapterKind
from loraplex.server.model import attention
from loraplex.server.model.step_buffers import ALIGN, StepAttachment, StepBuffers

if TYPE_CHECKING:
    from loraplex.server.model.runner import ModelRunner, StepInput

log = logging.getLogger(__name__)

VARIANTS: dict[str, frozenset[AdapterKind]] = {
    "lora": frozenset({AdapterKind.LORA}),
    "vectors": frozenset({AdapterKind.LORA, AdapterKind.DORA, AdapterKind.IA3}),
}
"""The adapter work each captured variant does (`LoRAStepContext.begin`'s kinds)."""
SMALL = ("token_ids", "positions", "slot_mapping", "keep", "lora_rows", "table_rows")
ATTACH_BYTES_PER_ROW = 256
"""Room for the sampler's per-row arrays; a step needing more runs eagerly."""

Recorder = Callable[[Callable[[], torch.Tensor]], tuple[object, torch.Tensor]]
"""Captures a forward: returns something with `replay()` and the output tensor replay rewrites."""


def batch_sizes(max_seqs: int) -> list[int]:
    """Captured decode batch sizes: 1, 2, 4, ..., 64, then steps of 32, the last >= max_seqs."""
    sizes = [1]
    while sizes[-1] < max_seqs:
        sizes.append(sizes[-1] * 2 if sizes[-1] < 64 else sizes[-1] + 32)
    return sizes


def cuda_graph_recorder() -> Recorder:
    """CUDA graphs sharing one memory pool (capture the largest first)."""
    pool = None

    def record(forward: Callable[[], torch.Tensor]) -> tuple[object, torch.Tensor]:
        nonlocal pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = forward()
        pool = graph.pool()
        return graph, output

    return record


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_seqs: int):
        if runner.decoder is None:
            raise ValueError("static decode steps need the lean decoder forward (server/model/decoder.py)")
        self.runner = runner
        self.sizes = batch_sizes(max_seqs)
        self.max_batch = b = self.sizes[-1]
        self.max_blocks = -(-runner.max_model_len // runner.block_size)
        self.lora_meta = LoRAMeta.allocate(b, runner.num_slots, runner.device, max_slices=3,
                                           max_rank=runner.config.adapters.max_rank)
        self.paged = runner.attention_backend == "triton"
        """The Triton kernel reads int32 block tables and lengths (`attention.PagedBatch`); the torch path
        gathers through int64 ones (`attention.DecodeBatch`)."""
        index = torch.int32 if self.paged else torch.int64
        self.attach_capacity = max(1 << 16, ATTACH_BYTES_PER_ROW * b)
        regions = [("small", (len(SMALL), b), torch.int64), ("lengths", (b,), index),
                   ("lora", (self.lora_meta.table_numel,), torch.int32), ("attach", (self.attach_capacity,), torch.uint8),
                   ("tables", (b + 1, self.max_blocks), index)]
        offsets, end = {}, 0
        for name, shape, dtype in regions:
            start = -(-end // ALIGN) * ALIGN
            offsets[name] = start
            end = start + torch.Size(shape).numel() * dtype.itemsize
        self.buffers = StepBuffers(runner.device, end)
        host, device = {}, {}
        for name, shape, dtype in regions:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            host[name] = self.buffers.host[offsets[name] : offsets[name] + nbytes].view(dtype).view(shape)
            device[name] = self.buffers.table[offsets[name] : offsets[name] + nbytes].view(dtype).view(shape)
        self._small = host["small"].numpy()  # host views, written in place every step
        self._lengths = host["lengths"].numpy()
        self._tables = host["tables"].numpy()
        self._attach_at, self._tables_at = offsets["attach"], offsets["tables"]
        self._row_bytes = self.max_blocks * index.itemsize
        self.lora_meta.bind_host(host["lora"])
        self.lora_meta.bind(device["lora"])
        self.token_ids, self.positions, self.slot_mapping, self.keep, self.lora_rows, self.table_rows = device["small"]
        self.token_ids, self.positions = self.token_ids.view(1, -1), self.positions.view(1, -1)
        self.lengths, self.tables = device["lengths"], device["tables"]
        self._tables[:] = runner.scratch_block  # row 0 (padding) and rows never written
        # constant across steps, so outside the step buffer: one query row per sequence, rows in order
        self.query_start = torch.arange(b + 1, dtype=torch.int32, device=runner.device)
        self.rows = torch.arange(b, device=runner.device)
        self._table_of: dict[int, list] = {}
        """id(block table) -> [row, the table, entries written]: the table is held, so its id cannot be
        reused while it has a row."""
        self._free_rows = list(range(1, b + 1))
        self._meta_runs: list[list[int]] | None = None
        self.graphs: dict[tuple[int, str], tuple[object, torch.Tensor]] = {}
        self._stage([], self.max_batch)
        self.buffers.send(self.buffers.table.numel())  # every byte once: the scratch table row included

    def takes(self, inputs: list[StepInput], attach: StepAttachment | None = None) -> bool:
        """Whether `inputs` is a step these buffers run: plain decodes that all sample, few enough, no
        adapter that needs the split path, an attachment that fits."""
        runner = self.runner
        return (0 < len(inputs) <= self.max_batch and (attach is None or attach.nbytes <= self.attach_capacity)
                and all(len(item.token_ids) == 1 and item.virtual_embeddings is None and item.skip is None
                        and item.samples and len(item.block_table) <= self.max_blocks
                        and not (item.slot >= 0 and runner.slot_splits[item.slot]) for item in inputs))

    def variant(self, inputs: list[StepInput]) -> str:
        kinds = {self.runner.slot_kinds[item.slot] for item in inputs if item.slot >= 0}
        return "vectors" if kinds & {AdapterKind.DORA, AdapterKind.IA3} else "lora"

    def _table_row(self, table: list[int]) -> int:
        """The sequence's row of `tables`, its new entries written on the host."""
        entry = self._table_of.get(id(table))
        if entry is None:
            entry = [heapq.heappop(self._free_rows), table, 0]
            self._table_of[id(table)] = entry
        row, _, written = entry
        if len(table) < written:  # not append-only after all: write it whole
            written = 0
        if len(table) > written:
            self._tables[row, written : len(table)] = table[written:]
            entry[2] = len(table)
        return row

    def _stage(self, inputs: list[StepInput], size: int, attach: StepAttachment | None = None) -> None:
        """Write `inputs` padded to `size` rows into the fixed layout and send it (one copy)."""
        runner, n = self.runner, len(inputs)
        self.buffers.begin(0)  # waits for the last copy of these host bytes (long done: no stall)
        bs, no_adapter = runner.block_size, runner.num_slots
        present = {id(item.block_table) for item in inputs}
        for key in [key for key in self._table_of if key not in present]:
            heapq.heappush(self._free_rows, self._table_of.pop(key)[0])  # its sequence left the batch
        by_slot: dict[int, list[int]] = {}  # the LoRA layout: rows grouped by slot, ascending, -1 last
        for i, item in enumerate(inputs):
            by_slot.setdefault(item.slot, []).append(i)
        runs = [[slot, len(by_slot[slot])] for slot in sorted(by_slot, key=lambda slot: slot % (no_adapter + 1))]
        token_ids, positions, slots, lora_rows, table_rows = [], [], [], [], []
        keep = list(range(size))  # logits come out in input order, then the padding rows
        table_of = self._table_of
        row = 0
        for slot, _ in runs:
            lora_row = slot if slot >= 0 else no_adapter
            for i in by_slot[slot]:
                item = inputs[i]
                start, table = item.start, item.block_table
                keep[i] = row
                row += 1
                token_ids.append(item.token_ids[0])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
                lora_rows.append(lora_row)
                entry = table_of.get(id(table))
                table_rows.append(entry[0] if entry is not None and entry[2] == len(table) else self._table_row(table))
        lengths = [position + 1 for position in positions]
        pad = size - n
        scratch_slot = runner.scratch_block * bs
        self._small[:, :size] = [token_ids + [0] * pad, positions + [0] * pad, slots + [scratch_slot] * pad, keep,
                                 lora_rows + [no_adapter] * pad, table_rows + [0] * pad]
        self._lengths[:size] = lengths + [1] * pad
        if pad:
            if runs and runs[-1][0] == -1:
                runs[-1][1] += pad
            else:
                runs.append([-1, pad])
        if runs != self._meta_runs:  # consecutive steps of one batch keep their layout
            self._meta_runs = None  # a failed build must not pass for the layout it was building
            self.lora_meta.build_runs(runs)
            self._meta_runs = runs
        if attach is not None:
            self.buffers.seek(self._attach_at)
            attach.put(self.buffers)
            if self.buffers.used > self._tables_at:
                raise RuntimeError(f"the step's attachment takes {attach.nbytes} bytes, more than the "
                                   f"{self.attach_capacity} reserved (takes() should have refused it)")
        self.buffers.send(self._tables_at + (max(table_rows, default=0) + 1) * self._row_bytes)

    def _forward(self, size: int, variant: str) -> torch.Tensor:
        """Float32 logits [size, vocab] of the staged step, rows in input order then padding."""
        runner = self.runner
        tables = self.tables.index_select(0, self.table_rows[:size])  # [size, max_blocks]
        if self.paged:
            paged = attention.PagedBatch(block_tables=tables, query_start=self.query_start[: size + 1],
                                         kv_lens=self.lengths[:size], max_query_len=1)
            meta = attention.AttentionMeta(cache=runner.kv_cache, slot_mapping=self.slot_mapping[:size], spans=[],
                                           backend="triton", paged=paged)
        else:
            decode = attention.DecodeBatch(rows=self.rows[:size], row_range=(0, size), blocks=tables.view(-1),
                                           blocks_per_seq=self.max_blocks, lengths=self.lengths[:size], uniform=False)
            meta = attention.AttentionMeta(cache=runner.kv_cache, slot_mapping=self.slot_mapping[:size], spans=[],
                                           decode=decode)
        runner.lora_context.begin(self.lora_meta, self.lora_rows[:size], VARIANTS[variant])
        try:
            return runner.decoder(self.positions[:, :size], self.keep[:size], meta,
                                  input_ids=self.token_ids[:, :size]).float()
        finally:
            runner.lora_context.end()

    def run(self, inputs: list[StepInput], attach: StepAttachment | None = None) -> torch.Tensor:
        """Float32 logits [len(inputs), vocab] in input order: the captured graph of the batch's size and
        variant replayed, or the same forward run eagerly where none was captured."""
        size = next(s for s in self.sizes if s >= len(inputs))
        variant = self.variant(inputs)
        self._stage(inputs, size, attach)
        captured = self.graphs.get((size, variant))
        if captured is None:
            return self._forward(size, variant)[: len(inputs)]
        graph, logits = captured
        graph.replay()
        return logits[: len(inputs)]

    def capture(self, record: Recorder | None = None) -> None:
        """Capture every batch size and variant, largest first (default: CUDA graphs in one memory pool);
        logs the time taken."""
        started = time.perf_counter()
        cuda = record is None
        record = record or cuda_graph_recorder()
        for size in reversed(self.sizes):
            for variant in VARIANTS:
                self._stage([], size)
                self._forward(size, variant)  # warm-up: kernels compiled, workspaces allocated outside the graph
                if cuda:
                    torch.cuda.synchronize(self.runner.device)
                self.graphs[(size, variant)] = record(lambda: self._forward(size, variant))
        log.info("captured %d decode graphs (batch sizes %s; variants %s) in %.1f s", len(self.graphs),
                 ", ".join(map(str, self.sizes)), ", ".join(VARIANTS), time.perf_counter() - started)
