"""Per-step segment metadata for the LoRA kernels (built once per step, read by every LoRA layer).

A step's tokens each carry an adapter *slot* (an index into the stacked weight pools, −1 = no
adapter). ``LoRAMeta.update`` groups them into one segment per slot and cuts segments into *tiles*
of at most ``block_m`` tokens; a kernel program handles one tile. Worked example, max_slots=4,
block_m=2:

    token_slots = [2, -1, 0, 2, 2, 0]
    token_order = [2, 5, 0, 3, 4, 1]          tokens grouped by slot (stable); −1 tokens last
    segments    (slot, start, len) = (0, 0, 2), (2, 2, 3)        start indexes token_order
    tiles       (slot, start, len) = (0, 0, 2), (2, 2, 2), (2, 4, 1), then slot −1 (no work)
    num_tiles   = cdiv(6, 2) + min(6, 4) = 7  grid size: a bound known from T alone, no host sync

Every table is preallocated for ``max_tokens`` / ``max_slots`` as one int32 block and rewritten in
place, so a CUDA graph captured over the kernels stays valid across steps. ``build`` computes the
tables on the host (no device kernel, no device read); ``update`` then sends the block in one
non-blocking copy. The model runner instead ``bind``s the tables to its step buffer and sends them
with the rest of the step's metadata in its single copy.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import devices
from .triton import configs


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class LoRAMeta:
    """Segment and tile layout of one step, in reusable buffers. Create with ``allocate``.

    Device tables (int32 views of ``table``, see ``bind``; the first ``num_tokens`` / ``num_tiles`` entries are live):
        token_slots  [max_tokens]       slot of each token, as given to ``update``
        token_order  [max_tokens]       token indices grouped by slot; identity when contiguous
        seg_slot     [max_slots + 1]    slot of the k-th non-empty segment (ascending slot), −1 after
        seg_start    [max_slots + 1]    first position of segment k in token_order
        seg_len      [max_slots + 1]    tokens in segment k (0 after the last)
        tile_slot    [max_tiles]        slot of tile j; −1 = the program exits at once
        tile_start   [max_tiles]        first position of tile j in token_order
        tile_len     [max_tiles]        tokens in tile j (<= block_m)
    Host attributes, set by ``build`` (and so by ``update``):
        num_tokens, shape_class ("decode"/"prefill"), block_m, num_tiles (the kernels' grid size),
        contiguous (the caller declared slot-contiguous order),
        segments: [(slot, start, length), ...] on CPU (for the torch path, no device read);
                  None on other devices.
    """

    def __init__(self, max_tokens: int, max_slots: int, device: torch.device | str,
                 max_slices: int = 3, max_rank: int = 0, min_block_m: int = configs.MIN_BLOCK_M):
        if max_tokens < 1 or max_slots < 1:
            raise ValueError(f"max_tokens ({max_tokens}) and max_slots ({max_slots}) must be >= 1")
        self.max_tokens = max_tokens
        self.max_slots = max_slots
        self.device = devices.normalize(device)
        # Enough tiles for the smallest block_m used: sum_k cdiv(len_k, bm) < cdiv(T, bm) + segments.
        self.min_block_m = min_block_m
        self.max_tiles = _cdiv(max_tokens, min_block_m) + min(max_tokens, max_slots)
        self.table_numel = self.layout_numel(max_tokens, max_slots, self.max_tiles)
        # host tables: pinned on CUDA so the copy to the device is asynchronous
        self.host = torch.empty(self.table_numel, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        self._host_views = self._views(self.host)
        self._host_arrays = {name: view.numpy() for name, view in self._host_views.items()}
        self.bind(torch.empty(self.table_numel, dtype=torch.int32, device=self.device))
        self._sent: torch.cuda.Event | None = None
        """Recorded after `update`'s copy from the pinned host tables."""
        self.host.copy_(self._initial())
        self.table.copy_(self.host)
        # fp32 scratch for shrink's output v, sliced per call by workspace(); 0 = none reserved.
        self._workspace = torch.empty(max_slices * max_tokens * max_rank, dtype=torch.float32,
                                      device=self.device)
        self.num_tokens = 0
        self.shape_class = configs.shape_class(0)
        self.block_m = configs.block_m_for(0)
        self.num_tiles = 0
        self.contiguous = True
        self.segments: list[tuple[int, int, int]] | None = [] if self.device.type == "cpu" else None

    @classmethod
    def allocate(cls, max_tokens: int, max_slots: int, device: torch.device | str,
                 max_slices: int = 3, max_rank: int = 0,
                 min_block_m: int = configs.MIN_BLOCK_M) -> "LoRAMeta":
        """Buffers for steps of up to ``max_tokens`` tokens over ``max_slots`` pool slots.

        ``max_slices``/``max_rank`` > 0 also reserve the fp32 scratch that ``workspace`` hands out
        (``max_slices * max_tokens * max_rank * 4`` bytes), so ``lora_apply`` allocates nothing.
        ``min_block_m``: the smallest tile height ``update`` will be asked for (sizes the tile list).
        """
        return cls(max_tokens, max_slots, device, max_slices=max_slices, max_rank=max_rank,
                   min_block_m=min_block_m)

    @staticmethod
    def layout_numel(max_tokens: int, max_slots: int, max_tiles: int) -> int:
        """int32 entries of the table block: token_slots, token_order, 3 segment and 3 tile tables."""
        return 2 * max_tokens + 3 * (max_slots + 1) + 3 * max_tiles

    def _views(self, block: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = {"token_slots": self.max_tokens, "token_order": self.max_tokens, "seg_slot": self.max_slots + 1,
                 "seg_start": self.max_slots + 1, "seg_len": self.max_slots + 1, "tile_slot": self.max_tiles,
                 "tile_start": self.max_tiles, "tile_len": self.max_tiles}
        return dict(zip(sizes, block.split(list(sizes.values()))))

    def _initial(self) -> torch.Tensor:
        """The empty layout: no tokens, every segment and tile slot -1."""
        block = torch.zeros(self.table_numel, dtype=torch.int32)
        for name, view in self._views(block).items():
            if name in ("token_slots", "seg_slot", "tile_slot"):
                view.fill_(-1)
        return block

    def bind(self, table: torch.Tensor) -> None:
        """Let the device tables be views of ``table`` ([table_numel] int32 on the device), which the
        caller fills from ``host`` (the model runner: inside its one copy per step)."""
        if table.shape != (self.table_numel,) or table.dtype != torch.int32:
            raise ValueError(f"table must be [{self.table_numel}] int32, got {tuple(table.shape)} {table.dtype}")
        self.table = table
        for name, view in self._views(table).items():
            setattr(self, name, view)

    def bind_host(self, host: torch.Tensor) -> None:
        """Let ``build`` write into ``host`` ([table_numel] int32, e.g. a region of a caller's pinned step
        buffer that reaches the device in the caller's copy); it is reset to the empty layout."""
        if host.shape != (self.table_numel,) or host.dtype != torch.int32 or host.device.type != "cpu":
            raise ValueError(f"host must be [{self.table_numel}] int32 on the CPU, got {tuple(host.shape)} "
                             f"{host.dtype} on {host.device}")
        self.host = host
        self._host_views = self._views(host)
        self._host_arrays = {name: view.numpy() for name, view in self._host_views.items()}
        self.host.copy_(self._initial())

    # ----------------------------------------------------------------- views of the live part
    @property
    def slots(self) -> torch.Tensor:  # [num_tokens] int32
        return self.token_slots[: self.num_tokens]

    @property
    def order(self) -> torch.Tensor:  # [num_tokens] int32
        return self.token_order[: self.num_tokens]

    def workspace(self, num_slices: int, max_rank: int) -> torch.Tensor:
        """A ``[num_slices, num_tokens, max_rank]`` fp32 view of the scratch (contents stale).

        Grows the scratch when it is too small; reserve it in ``allocate`` (max_slices, max_rank) so
        that nothing is allocated after start-up, e.g. inside CUDA graph capture.
        """
        need = num_slices * self.num_tokens * max_rank
        if need > self._workspace.numel():
            self._workspace = torch.empty(num_slices * self.max_tokens * max_rank,
                                          dtype=torch.float32, device=self.device)
        return self._workspace[:need].view(num_slices, self.num_tokens, max_rank)

    # ----------------------------------------------------------------- per-step build
    def update(self, token_slots: torch.Tensor | Sequence[int], contiguous: bool = False,
               block_m: int | None = None, check: bool | None = None) -> "LoRAMeta":
        """``build`` the layout for this step's per-token slots, then send it to the device tables
        (one non-blocking copy). The arguments are ``build``'s."""
        self.build(token_slots, contiguous, block_m, check)
        self.table.copy_(self.host, non_blocking=True)
        if self.host.is_pinned():
            self._sent = torch.cuda.Event()
            self._sent.record()
        return self

    def build(self, token_slots: torch.Tensor | Sequence[int], contiguous: bool = False,
              block_m: int | None = None, check: bool | None = None) -> "LoRAMeta":
        """Rebuild the layout for this step's per-token slots (−1 = no adapter) in ``host``.

        contiguous: the caller guarantees that each slot's tokens form one run (the engine lays a
            step out that way); token_order is then the identity and the kernels read rows in place.
            Otherwise tokens are grouped with a stable sort (any order is accepted).
        block_m:    tile height; default from the shape-class table (``configs``).
        check:      validate slot range (−1 <= slot < max_slots) and the contiguity claim (a few
            vectorized ops). Default: when token_slots is on the host (free: no device sync);
            slots already on a GPU are trusted.
        """
        if self._sent is not None:  # the last update's copy still reads host: let it finish first
            self._sent.synchronize()
            self._sent = None
        slots_in = torch.as_tensor(token_slots)
        on_host = slots_in.device.type == "cpu"
        slots_in = slots_in.cpu()  # a caller's device tensor: the one read this costs is theirs
        if slots_in.dim() != 1:
            raise ValueError(f"token_slots must be 1-D, got shape {tuple(slots_in.shape)}")
        if slots_in.dtype.is_floating_point or slots_in.dtype == torch.bool:
            raise ValueError(f"token_slots must be an integer tensor, got {slots_in.dtype}")
        T = slots_in.shape[0]
        if T > self.max_tokens:
            raise ValueError(f"token_slots has {T} tokens, more than max_tokens={self.max_tokens}")
        S = self.max_slots
        bm = configs.block_m_for(T) if block_m is None else block_m
        if bm < 1:
            raise ValueError(f"block_m must be >= 1, got {bm}")
        num_tiles = _cdiv(T, bm) + min(T, S)
        if num_tiles > self.max_tiles:
            raise ValueError(f"block_m={bm} needs {num_tiles} tiles for {T} tokens, "
                             f"buffers hold {self.max_tiles} (allocated for block_m >= {self.min_block_m})")
        if check is None:
            check = on_host
        if check:
            self._check(slots_in, contiguous)

        self.num_tokens, self.block_m, self.num_tiles = T, bm, num_tiles
        self.shape_class = configs.shape_class(T)
        self.contiguous = contiguous
        if T == 0:
            self.segments = [] if self.device.type == "cpu" else None
            return self

        host = self._host_views
        slots = host["token_slots"][:T]
        slots.copy_(slots_in)
        key = slots.long()
        key = torch.where(key < 0, torch.full_like(key, S), key)   # −1 sorts last, as slot S
        pos = torch.arange(T)
        order = pos if contiguous else torch.sort(key, stable=True).indices
        host["token_order"][:T].copy_(order)
        sorted_key = key if contiguous else key[order]

        counts = torch.zeros(S + 1, dtype=torch.long).scatter_add_(0, key, torch.ones_like(key))
        first = torch.full((S + 1,), T, dtype=torch.long).scatter_reduce_(0, sorted_key, pos, reduce="amin")
        # Compact non-empty slots to the front: segment k is the k-th used slot; unused go to dump S.
        active = counts[:S] > 0
        seg_idx = torch.where(active, torch.cumsum(active, 0) - 1, torch.full_like(counts[:S], S))
        all_slots = torch.arange(S, dtype=torch.int32)
        seg_slot, seg_start, seg_len = host["seg_slot"], host["seg_start"], host["seg_len"]
        seg_slot.fill_(-1).scatter_(0, seg_idx, all_slots)
        seg_start.zero_().scatter_(0, seg_idx, first[:S].int())
        seg_len.zero_().scatter_(0, seg_idx, counts[:S].int())
        seg_slot[S] = -1
        seg_start[S] = 0
        seg_len[S] = 0

        # Tiles: segment k owns cdiv(len_k, bm) consecutive tiles; tile j finds its segment by search.
        lengths = seg_len[:S].long()
        ntiles = (lengths + bm - 1) // bm
        tile_end = torch.cumsum(ntiles, 0)
        j = torch.arange(num_tiles)
        k = torch.searchsorted(tile_end, j, right=True)
        valid = k < S
        kc = k.clamp(max=S - 1)
        m0 = (j - (tile_end[kc] - ntiles[kc])) * bm
        host["tile_slot"][:num_tiles].copy_(torch.where(valid, seg_slot[kc].long(), -1))
        host["tile_start"][:num_tiles].copy_(torch.where(valid, seg_start[kc].long() + m0, 0))
        host["tile_len"][:num_tiles].copy_(torch.where(valid, torch.clamp(lengths[kc] - m0, max=bm), 0))

        if self.device.type == "cpu":
            n = int(active.sum())
            self.segments = list(zip(seg_slot[:n].tolist(), seg_start[:n].tolist(), seg_len[:n].tolist()))
        else:
            self.segments = None
        return self

    def build_runs(self, runs: Sequence[tuple[int, int]]) -> "LoRAMeta":
        """``build`` for a step laid out as runs of (slot, tokens), slots ascending and −1 last, each slot in
        one run: the same tables, computed in Python over runs rather than over tokens (a decode step of
        a few hundred tokens is laid out in microseconds, `decode_graphs.py`)."""
        if self._sent is not None:
            self._sent.synchronize()
            self._sent = None
        T = sum(length for _, length in runs)
        S = self.max_slots
        if T > self.max_tokens:
            raise ValueError(f"the runs hold {T} tokens, more than max_tokens={self.max_tokens}")
        slots = [slot for slot, length in runs if length > 0]
        used = [slot for slot in slots if slot >= 0]
        if used != sorted(set(used)) or any(slot < -1 or slot >= S for slot in slots) or -1 in slots[:-1]:
            raise ValueError(f"runs must have ascending slots in [0, {S}), each once, then -1: got {slots}")
        bm = configs.block_m_for(T)
        num_tiles = _cdiv(T, bm) + min(T, S)
        host = self._host_arrays
        position = 0
        segments, tiles = [], []
        for slot, length in runs:
            if length <= 0:
                continue
            host["token_slots"][position : position + length] = slot
            if slot >= 0:
                segments.append((slot, position, length))
                tiles += [(slot, position + m0, min(bm, length - m0)) for m0 in range(0, length, bm)]
            position += length
        host["token_order"][:T] = range(T)
        for name, column in (("seg_slot", 0), ("seg_start", 1), ("seg_len", 2)):
            host[name][:] = [segment[column] for segment in segments] + [(-1, 0, 0)[column]] * (S + 1 - len(segments))
        for name, column in (("tile_slot", 0), ("tile_start", 1), ("tile_len", 2)):
            host[name][:num_tiles] = [tile[column] for tile in tiles] + [(-1, 0, 0)[column]] * (num_tiles - len(tiles))
        self.num_tokens, self.block_m, self.num_tiles = T, bm, num_tiles
        self.shape_class = configs.shape_class(T)
        self.contiguous = True
        self.segments = segments if self.device.type == "cpu" else None
        return self

    def _check(self, slots: torch.Tensor, contiguous: bool) -> None:
        slots = slots.long()
        bad = slots[(slots < -1) | (slots >= self.max_slots)]
        if bad.numel():
            raise ValueError(f"token_slots values must be -1 or in [0, {self.max_slots}), "
                             f"got {bad[:5].tolist()}")
        if contiguous and slots.numel():
            # A run starts wherever the slot changes (a −1 token ends a run too); used slots must
            # start exactly one run each.
            starts = torch.ones_like(slots, dtype=torch.bool)
            starts[1:] = slots[1:] != slots[:-1]
            runs = slots[starts]
            runs = runs[runs >= 0]
            values, counts = torch.unique(runs, return_counts=True)
            if (counts > 1).any():
                raise ValueError(f"contiguous=True but slot {int(values[counts > 1][0])} appears in "
                                 f"more than one run")

    def __repr__(self) -> str:
        return (f"LoRAMeta(num_tokens={self.num_tokens}, shape_class={self.shape_class!r}, "
                f"block_m={self.block_m}, num_tiles={self.num_tiles}, max_tokens={self.max_tokens}, "
                f"max_slots={self.max_slots}, device={self.device})")
