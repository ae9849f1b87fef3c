"""LoRA (and the other per-projection adapter types) on the base model's linear projections, for a
batch that mixes adapters.

Every linear projection of every decoder layer is wrapped by a `LoRALinear`. Projections that read
the same input (q/k/v; gate/up) form one `LoRAGroup` whose weights live in one stacked pool, so a
decoder layer runs at most four shrink/expand pairs (qkv, o, gate_up, down):

    pool.a      [num_slices, num_slots, max_rank, in_features]   lora_A rows, first r used
    pool.b_t    [num_slots, max_rank, out_total]                 lora_B transposed, slices side by side
    pool.ranks  [num_slices, num_slots] int32                    0: the adapter does not target it
    pool.scale  [num_slices, num_slots] float32

Plain `nn.Linear` groups are fused at wrap time: the group owns one weight `[out_total, in]`, handed to
the kernel backend (`kernels/backend.py`, chosen once by the model runner), which keeps it in whatever
layout its GEMM reads fastest; each projection's base layer becomes a `GroupProjection` over it, whose
`weight` is its rows (DoRA's norms at adapter load). The first projection
of a group called in a step computes the whole group's output once, `y = x @ weightᵀ + bias`, adds
every token's LoRA into it in place (`Backend.lora_apply`), and returns its columns as a view; its siblings
take their columns of the same `y`. Compared with a zero-filled delta buffer added to each
projection's own output, this saves a buffer and an add per projection. Other base layers (4-bit, 8-bit) run
their own forward, and the group's LoRA delta is computed once into a buffer and added.
The step's adapter layout (`LoRAMeta`, one slot per token) is set on the shared `LoRAStepContext` by
the model runner before the forward pass and cleared after it.

Per-projection vectors of the other types live on each `LoRALinear`, one row per slot plus a last
row for tokens without such an adapter, all allocated at wrap time (before any CUDA graph is captured,
so a graph reads them at the addresses they keep):

    out_scale   [num_slots + 1, out]   DoRA's g or IA3's output vector; ones elsewhere
    out_bias    [num_slots + 1, out]   projections with a bias: the bias for DoRA slots, zeros elsewhere
                                       y = out_scale ⊙ (base(x) + LoRA(x) − out_bias) + out_bias
    ia3_in      [num_slots + 1, in]    IA3 on a feed-forward module: y = base(x ⊙ l); in a group of one
                                       projection, x is scaled before the group's base and LoRA (a slot is
                                       one adapter kind: IA3 slots have rank 0, LoRA slots ones)

A group of several projections (q/k/v, gate/up) shares one input, so IA3 input vectors there (an
unusual `feedforward_modules`) are allocated on first load and served by the split path
(`LoRAStepContext.split_inputs`), which the runner only takes in eager steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from loraplex.kernels.backend import Backend, Projection
from loraplex.kernels.meta import LoRAMeta
from loraplex.server.adapters.kind import AdapterKind

# Sibling projections that read the same input tensor; anything else is a group of its own.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
LINEAR_TYPES = (nn.Linear,)


def _linear_types() -> tuple[type, ...]:
    try:
        import bitsandbytes as bnb

        return LINEAR_TYPES + (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:  # bitsandbytes is a dependency, but keep plain serving importable without it
        return LINEAR_TYPES


def linear_features(module: nn.Module) -> tuple[int, int]:
    return module.in_features, module.out_features


@dataclass
class LoRAStepContext:
    """What the LoRA layers read during one forward pass; owned by the model runner."""

    backend: Backend
    """The kernels of the model's platform, chosen once when the runner builds the model."""
    meta: LoRAMeta | None = None
    """This step's slot layout; None when no token of the step uses an adapter."""
    rows: torch.Tensor | None = None
    """[tokens] long: each token's slot, the base model's -1 mapped to the vector tables' identity row (the last)."""
    has_lora: bool = False
    """Run the LoRA op (some token's slot holds LoRA or DoRA weights)."""
    scale_rows: bool = False
    """Apply out_scale/out_bias (some token's slot is DoRA or IA3)."""
    scale_inputs: bool = False
    """Apply the IA3 input vectors of single-projection groups (some token's slot is IA3)."""
    split_inputs: bool = False
    """Some token's IA3 adapter scales the input of one projection of a shared-input group: such groups
    run projection by projection (eager steps only)."""
    cache: dict = field(default_factory=dict)
    """Per-step group outputs: id(group) -> (input tensor, output, projections yet to read it)."""
    step: object | None = None
    """This step's layout as the backend takes it (`Backend.begin_step`); None without meta."""

    def begin(self, meta: LoRAMeta | None, rows: torch.Tensor | None = None, kinds: set[AdapterKind] = frozenset(),
              split_inputs: bool = False) -> None:
        """kinds: the adapter kinds whose work the step does (a CUDA graph: fixed at capture)."""
        self.meta = meta
        self.rows = rows
        self.has_lora = bool(kinds & {AdapterKind.LORA, AdapterKind.DORA})
        self.scale_rows = bool(kinds & {AdapterKind.DORA, AdapterKind.IA3})
        self.scale_inputs = AdapterKind.IA3 in kinds
        self.split_inputs = split_inputs
        self.cache.clear()
        self.step = None if meta is None else self.backend.begin_step(meta)

    def end(self) -> None:
        self.begin(None)

    def apply_lora(self, x: torch.Tensor, y: torch.Tensor, pool: LoRAPool) -> None:
        """y += every token's LoRA for this step, with the pool as the backend prepared it at wrap time:
        a decode step makes 4 calls per layer, and checks per call would cost more than its LoRA."""
        self.backend.lora_apply(x, y, pool, pool.prepared, self.step)


class LoRAPool:
    """Stacked LoRA weights of one group of projections, one entry per device slot."""

    def __init__(self, in_features: int, slice_widths: list[int], num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device):
        self.in_features = in_features
        self.slice_widths = list(slice_widths)
        self.slice_offsets = [sum(slice_widths[:i]) for i in range(len(slice_widths))]
        self.out_total = sum(slice_widths)
        self.max_rank = max_rank
        n = len(slice_widths)
        self.a = torch.zeros(n, num_slots, max_rank, in_features, dtype=dtype, device=device)
        self.b_t = torch.zeros(num_slots, max_rank, self.out_total, dtype=dtype, device=device)
        self.ranks = torch.zeros(n, num_slots, dtype=torch.int32, device=device)
        self.scale = torch.zeros(n, num_slots, dtype=torch.float32, device=device)
        self.prepared: object | None = None
        """What the backend keeps of the pool (`Backend.prepare_pool`): its tensors are written in place only."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b_t, self.ranks, self.scale))

    def load(self, slot: int, slice_index: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> None:
        """Write one slice of one slot; `a` [r, in], `b` [out, r]; None clears it (rank 0)."""
        offset, width = self.slice_offsets[slice_index], self.slice_widths[slice_index]
        if a is None:
            self.ranks[slice_index, slot] = 0
            self.scale[slice_index, slot] = 0.0
            return
        rank = a.shape[0]
        self.a[slice_index, slot, :rank].copy_(a)
        self.b_t[slot, :rank, offset : offset + width].copy_(b.t())
        self.ranks[slice_index, slot] = rank
        self.scale[slice_index, slot] = scaling


class LoRAGroup:
    """Projections of one decoder layer that share their input, and their pool."""

    def __init__(self, name: str, paths: list[str], pool: LoRAPool, context: LoRAStepContext):
        self.name = name
        self.paths = paths
        self.pool = pool
        self.context = context
        self.projection: Projection | None = None
        """The projections' base weights as one [out_total, in] weight in the backend's layout (plain
        nn.Linear groups); None: each projection runs its own base layer."""
        self.has_ia3_in = False
        """A group of several projections where some projection holds IA3 input vectors (split path)."""

    @property
    def fused(self) -> bool:
        return self.projection is not None

    def fuse(self, linears: list[nn.Linear]) -> list[nn.Module]:
        """Move the projections' weights into one [out_total, in] weight held by the backend; returns the
        modules that stand for the projections' base layers now."""
        first = linears[0].weight
        weight = torch.empty(self.pool.out_total, self.pool.in_features, dtype=first.dtype, device=first.device)
        with_bias = any(linear.bias is not None for linear in linears)
        bias = torch.zeros(self.pool.out_total, dtype=first.dtype, device=first.device) if with_bias else None
        for linear, offset, width in zip(linears, self.pool.slice_offsets, self.pool.slice_widths):
            weight[offset : offset + width].copy_(linear.weight.detach())
            if linear.bias is not None:
                bias[offset : offset + width].copy_(linear.bias.detach())
        self.projection = self.context.backend.prepare_linear(weight, bias)
        return [GroupProjection(self, index, linear.in_features, linear.out_features, linear.bias is not None)
                for index, linear in enumerate(linears)]

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """Base plus LoRA output of the fused group for x, `[..., out_total]`, computed once per input.

        The first projection called computes it; the entry is dropped once every sibling has read it,
        so a step does not hold every layer's activations.
        """
        cache = self.context.cache
        cached = cache.get(id(self))
        if cached is not None and cached[0] is x:
            _, y, readers = cached
            if readers > 1:
                cache[id(self)] = (x, y, readers - 1)
            else:
                del cache[id(self)]
            return y
        flat = x.reshape(-1, x.shape[-1])
        out = self.projection(flat)
        context = self.context
        if context.meta is not None and context.has_lora:
            context.apply_lora(flat, out, self.pool)
        y = out.view(*x.shape[:-1], self.pool.out_total)
        if len(self.paths) > 1:
            cache[id(self)] = (x, y, len(self.paths) - 1)
        return y

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The group's LoRA output for this step's tokens, `[tokens, out_total]` (unfused groups).

        Computed by the first projection called and dropped once every sibling has read it, as in
        `output`: a step must not hold every layer's delta until it ends.
        """
        cache = self.context.cache
        cached = cache.get(id(self))
        if cached is not None and cached[0] is x:
            _, out, readers = cached
            if readers > 1:
                cache[id(self)] = (x, out, readers - 1)
            else:
                del cache[id(self)]
            return out
        flat = x.reshape(-1, x.shape[-1])
        out = torch.zeros(flat.shape[0], self.pool.out_total, dtype=flat.dtype, device=flat.device)
        self.context.apply_lora(flat, out, self.pool)
        if len(self.paths) > 1:
            cache[id(self)] = (x, out, len(self.paths) - 1)
        return out


class GroupProjection(nn.Module):
    """One projection of a fused group: its base layer, over the group's weight.

    The fused path never calls it (the group computes all projections at once); the unfused path (a
    step with IA3 input vectors) does, computing this projection's columns only.
    """

    def __init__(self, group: LoRAGroup, index: int, in_features: int, out_features: int, has_bias: bool):
        super().__init__()
        self.group = group
        self.offset = group.pool.slice_offsets[index]
        self.in_features, self.out_features = in_features, out_features
        bias = group.projection.bias
        self.bias = bias[self.offset : self.offset + out_features] if has_bias else None

    @property
    def weight(self) -> torch.Tensor:
        """[out, in]: a view of the group's weight, or a copy where the backend keeps another layout (DoRA
        reads it once per adapter load)."""
        return self.group.projection.dense()[self.offset : self.offset + self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.projection.columns(x.reshape(-1, x.shape[-1]), self.offset, self.out_features)
        return y.reshape(*x.shape[:-1], self.out_features)


class LoRALinear(nn.Module):
    """A base projection plus each token's adapter: LoRA delta, DoRA row scale, IA3 scales."""

    def __init__(self, base: nn.Module, group: LoRAGroup, slice_index: int, num_slots: int,
                 vector_dtype: torch.dtype):
        super().__init__()
        self.base = base
        self.group = group
        self.slice_index = slice_index
        self.num_slots = num_slots
        self.in_features, self.out_features = linear_features(base)
        self.vector_dtype = vector_dtype
        """DoRA/IA3 vectors' dtype: the model's (the pools may store LoRA weights in bfloat16)."""
        device = group.pool.b_t.device
        self.out_scale = torch.ones(num_slots + 1, self.out_features, dtype=vector_dtype, device=device)
        has_bias = getattr(base, "bias", None) is not None
        self.out_bias = torch.zeros_like(self.out_scale) if has_bias else None
        self.scales_input = len(group.paths) == 1
        """IA3 input vectors apply before the group's shared computation (a group of one projection)."""
        self.ia3_in = (torch.ones(num_slots + 1, self.in_features, dtype=vector_dtype, device=device)
                       if self.scales_input else None)

    def load_slot(self, slot: int, dora_scale: torch.Tensor | None, ia3_in: torch.Tensor | None,
                  ia3_out: torch.Tensor | None) -> None:
        """Set (or reset to identity) this projection's per-slot vectors."""
        if dora_scale is not None and ia3_out is not None:
            raise ValueError("a slot holds one adapter: DoRA and IA3 vectors for the same projection")
        scale = dora_scale if dora_scale is not None else ia3_out
        if scale is None:
            self.out_scale[slot].fill_(1.0)
        else:
            self.out_scale[slot].copy_(scale)
        if self.out_bias is not None:
            if dora_scale is None:
                self.out_bias[slot].zero_()
            else:
                self.out_bias[slot].copy_(self.base.bias.detach())
        if ia3_in is not None and self.ia3_in is None:  # a shared-input group: served by the split path
            self.ia3_in = torch.ones(self.num_slots + 1, self.in_features, dtype=self.vector_dtype,
                                     device=self.out_scale.device)
            self.group.has_ia3_in = True
        if ia3_in is not None:
            self.ia3_in[slot].copy_(ia3_in)
        elif self.ia3_in is not None:
            self.ia3_in[slot].fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        context = group.context
        if context.meta is None:
            return self._columns(group.output(x)) if group.fused else self.base(x)
        if context.split_inputs and group.has_ia3_in:
            x_base = x if self.ia3_in is None else x * self._rows(self.ia3_in, x)
            y = self.base(x_base)
            if context.has_lora:
                y = y + self._columns(group.delta(x)).view(y.shape).to(y.dtype)
            return self._scale_rows(y, context)
        if context.scale_inputs and self.scales_input:
            x = x * self._rows(self.ia3_in, x)
        if group.fused:
            y = self._columns(group.output(x))
        else:
            y = self.base(x)
            if context.has_lora:
                y = y + self._columns(group.delta(x)).view(y.shape).to(y.dtype)
        return self._scale_rows(y, context)

    def _columns(self, y: torch.Tensor) -> torch.Tensor:
        """This projection's columns of its group's output."""
        offset = self.group.pool.slice_offsets[self.slice_index]
        return y[..., offset : offset + self.out_features]

    def _rows(self, table: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Each token's row of a per-slot table, shaped and typed as `like`."""
        return table[self.group.context.rows].view(like.shape[:-1] + (-1,)).to(like.dtype)

    def _scale_rows(self, y: torch.Tensor, context: LoRAStepContext) -> torch.Tensor:
        """DoRA's row scale and IA3's output scale, per token's slot (identity for other slots)."""
        if not context.scale_rows:
            return y
        scale = self._rows(self.out_scale, y)
        if self.out_bias is None:
            return y * scale
        bias = self._rows(self.out_bias, y)
        return scale * (y - bias) + bias


def find_lora_targets(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The servable projections of `model`, grouped by shared input: [(group name, [module paths])].

    Only linear layers inside the decoder layers (`...layers.N...`) are servable; the embeddings and
    the LM head are not.
    """
    linear_types = _linear_types()
    by_parent: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        if isinstance(module, linear_types) and ".layers." in f".{path}":
            parent, _, _ = path.rpartition(".")
            by_parent.setdefault(parent, []).append(path)
    groups = []
    for parent, paths in by_parent.items():
        leaves = {path.rpartition(".")[2]: path for path in paths}
        for shared in SHARED_INPUT_GROUPS:
            if all(name in leaves for name in shared):
                groups.append((f"{parent}.{'_'.join(shared)}", [leaves.pop(name) for name in shared]))
        groups.extend((path, [path]) for path in leaves.values())
    return groups


def wrap_model(model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device,
               context: LoRAStepContext) -> dict[str, LoRALinear]:
    """Replace every servable projection by a LoRALinear; returns module path -> its LoRALinear.

    dtype: the model's (DoRA/IA3 vectors are kept in it); the LoRA pools' is the backend's `pool_dtype`.
    """
    modules = dict(model.named_modules())
    table: dict[str, LoRALinear] = {}
    for name, paths in find_lora_targets(model):
        features = [linear_features(modules[path]) for path in paths]
        pool = LoRAPool(features[0][0], [out for _, out in features], num_slots, max_rank,
                        context.backend.pool_dtype, device)
        pool.prepared = context.backend.prepare_pool(pool)
        group = LoRAGroup(name, paths, pool, context)
        bases = [modules[path] for path in paths]
        if all(type(base) is nn.Linear and base.weight.dtype == dtype and base.weight.device == pool.a.device
               for base in bases):
            bases = group.fuse(bases)
        for index, path in enumerate(paths):
            parent_path, _, leaf = path.rpartition(".")
            wrapped = LoRALinear(bases[index], group, index, num_slots, dtype)
            setattr(modules[parent_path], leaf, wrapped)
            table[path] = wrapped
    return table
