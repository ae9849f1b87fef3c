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

Every buffer is preallocated for ``max_tokens`` / ``max_slots`` and rewritten in place, so a CUDA
graph captured over the kernels stays valid across steps; ``update`` itself runs a handful of small
torch ops on the device and never reads a device value on the host.
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

    Device buffers (int32; views of the first ``num_tokens`` / ``num_tiles`` entries are the live part):
        token_slots  [max_tokens]       slot of each token, as given to ``update``
        token_order  [max_tokens]       token indices grouped by slot; identity when contiguous
        seg_slot     [max_slots + 1]    slot of the k-th non-empty segment (ascending slot), −1 after
        seg_start    [max_slots + 1]    first position of segment k in token_order
        seg_len      [max_slots + 1]    tokens in segment k (0 after the last)
        tile_slot    [max_tiles]        slot of tile j; −1 = the program exits at once
        tile_start   [max_tiles]        first position of tile j in token_order
        tile_len     [max_tiles]        tokens in tile j (<= block_m)
    Host attributes, set by ``update``:
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
        i32 = dict(dtype=torch.int32, device=self.device)
        self.token_slots = torch.full((max_tokens,), -1, **i32)
        self.token_order = torch.zeros(max_tokens, **i32)
        self.seg_slot = torch.full((max_slots + 1,), -1, **i32)
        self.seg_start = torch.zeros(max_slots + 1, **i32)
        self.seg_len = torch.zeros(max_slots + 1, **i32)
        self.tile_slot = torch.full((self.max_tiles,), -1, **i32)
        self.tile_start = torch.zeros(self.max_tiles, **i32)
        self.tile_len = torch.zeros(self.max_tiles, **i32)
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
        """Rebuild the layout for this step's per-token slots (−1 = no adapter).

        contiguous: the caller guarantees that each slot's tokens form one run (the engine lays a
            step out that way); token_order is then the identity and the kernels read rows in place.
            Otherwise tokens are grouped with a stable sort (any order is accepted).
        block_m:    tile height; default from the shape-class table (``configs``).
        check:      validate slot range (−1 <= slot < max_slots) and the contiguity claim (a few
            vectorized ops). Default: when token_slots is on the host (free: no device sync);
            slots already on a GPU are trusted.
        """
        slots_in = torch.as_tensor(token_slots)
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
            check = slots_in.device.type == "cpu"
        if check:
            self._check(slots_in, contiguous)

        self.num_tokens, self.block_m, self.num_tiles = T, bm, num_tiles
        self.shape_class = configs.shape_class(T)
        self.contiguous = contiguous
        if T == 0:
            self.segments = [] if self.device.type == "cpu" else None
            return self

        dev = self.device
        slots = self.token_slots[:T]
        slots.copy_(slots_in, non_blocking=True)
        key = slots.long()
        key = torch.where(key < 0, torch.full_like(key, S), key)   # −1 sorts last, as slot S
        pos = torch.arange(T, device=dev)
        order = pos if contiguous else torch.sort(key, stable=True).indices
        self.token_order[:T].copy_(order)
        sorted_key = key if contiguous else key[order]

        counts = torch.zeros(S + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
        first = torch.full((S + 1,), T, dtype=torch.long, device=dev).scatter_reduce_(
            0, sorted_key, pos, reduce="amin")
        # Compact non-empty slots to the front: segment k is the k-th used slot; unused go to dump S.
        active = counts[:S] > 0
        seg_idx = torch.where(active, torch.cumsum(active, 0) - 1, torch.full_like(counts[:S], S))
        all_slots = torch.arange(S, device=dev, dtype=torch.int32)
        self.seg_slot.fill_(-1).scatter_(0, seg_idx, all_slots)
        self.seg_start.zero_().scatter_(0, seg_idx, first[:S].int())
        self.seg_len.zero_().scatter_(0, seg_idx, counts[:S].int())
        self.seg_slot[S] = -1
        self.seg_start[S] = 0
        self.seg_len[S] = 0

        # Tiles: segment k owns cdiv(len_k, bm) consecutive tiles; tile j finds its segment by search.
        seg_len = self.seg_len[:S].long()
        ntiles = (seg_len + bm - 1) // bm
        tile_end = torch.cumsum(ntiles, 0)
        j = torch.arange(num_tiles, device=dev)
        k = torch.searchsorted(tile_end, j, right=True)
        valid = k < S
        kc = k.clamp(max=S - 1)
        m0 = (j - (tile_end[kc] - ntiles[kc])) * bm
        self.tile_slot[:num_tiles].copy_(torch.where(valid, self.seg_slot[kc].long(), -1))
        self.tile_start[:num_tiles].copy_(torch.where(valid, self.seg_start[kc].long() + m0, 0))
        self.tile_len[:num_tiles].copy_(
            torch.where(valid, torch.clamp(seg_len[kc] - m0, max=bm), 0))

        if dev.type == "cpu":
            n = int(active.sum())
            self.segments = list(zip(self.seg_slot[:n].tolist(), self.seg_start[:n].tolist(),
                                     self.seg_len[:n].tolist()))
        else:
            self.segments = None
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
