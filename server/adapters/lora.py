"""LoRA (and the other per-projection adapter types) on the base model's linear projections, for a
batch that mixes adapters.

Every linear projection of every decoder layer is wrapped by a `LoRALinear`. Projections that read
the same input (q/k/v; gate/up) form one `LoRAGroup` whose weights live in one stacked pool, so a
decoder layer runs at most four shrink/expand pairs (qkv, o, gate_up, down):

    pool.a      [num_slices, num_slots, max_rank, in_features]   lora_A rows, first r used
    pool.b_t    [num_slots, max_rank, out_total]                 lora_B transposed, slices side by side
    pool.ranks  [num_slices, num_slots] int32                    0: the adapter does not target it
    pool.scale  [num_slices, num_slots] float32

Plain `nn.Linear` groups are fused at wrap time: the group owns one weight `[out_total, in]` and each
projection's `weight` becomes a view of its rows, so nothing is stored twice. On CPU (float32) the
fused weight is kept only in a GEMM's own layout, packed once: the C kernel's panels
(`kernels/native.py`, `pack_weight`) where it builds, else oneDNN's blocked layout. A decode step
reads every weight once for ~16 rows, and both read them faster than MKL's GEMM on the plain layout
(docs/benchmarks.md); the projections then
become `PackedProjection`s, whose `weight` is unpacked on demand (DoRA's norms at adapter load). The first projection
of a group called in a step computes the whole group's output once, `y = x @ weightᵀ + bias`, adds
every token's LoRA into it in place (`lora_apply`), and returns its columns as a view; its siblings
take their columns of the same `y`. Compared with a zero-filled delta buffer added to each
projection's own output, this saves a buffer and an add per projection. Other base layers (4-bit, 8-bit) run
their own forward, and the group's LoRA delta is computed once into a buffer and added.
The step's adapter layout (`LoRAMeta`, one slot per token) is set on the shared `LoRAStepContext` by
the model runner before the forward pass and cleared after it.

Per-projection vectors of the other types live on each `LoRALinear`, one row per slot plus a last
row of ones for tokens without such an adapter (allocated on first use):

    dora_scale  [num_slots + 1, out]   DoRA: y = g ⊙ (base(x) − bias + LoRA(x)) + bias
    ia3_in      [num_slots + 1, in]    IA3 on a feed-forward module: y = base(x ⊙ l)
    ia3_out     [num_slots + 1, out]   IA3 elsewhere: y = base(x) ⊙ l
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.kernels import native
from loraplex.kernels.meta import LoRAMeta
from loraplex.kernels.ops import apply_backend, lora_apply
from loraplex.server.adapters.kind import AdapterKind

# oneDNN lays a packed weight out for GEMMs of about this many rows (a decode step's batch); any row
# count works.
PACK_ROWS_HINT = 16
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

    meta: LoRAMeta | None = None
    """This step's slot layout; None when no token of the step uses an adapter."""
    rows: torch.Tensor | None = None
    """[tokens] long: each token's slot, with the base model's -1 mapped to the row of ones."""
    has_lora: bool = False
    has_dora: bool = False
    has_ia3: bool = False
    cache: dict = field(default_factory=dict)
    """Per-step group outputs: id(group) -> (input tensor, output, projections yet to read it)."""
    backends: dict = field(default_factory=dict)
    """Per-step LoRA backend by (activation dtype, pool dtype): chosen by the step's first call."""
    native_step: tuple | None = None
    """This step's layout as the C kernel takes it (`native.meta_args`), set by the first C call."""

    def begin(self, meta: LoRAMeta | None, rows: torch.Tensor | None = None, kinds: set[AdapterKind] = frozenset()) -> None:
        self.meta = meta
        self.rows = rows
        self.has_lora = bool(kinds & {AdapterKind.LORA, AdapterKind.DORA})
        self.has_dora = AdapterKind.DORA in kinds
        self.has_ia3 = AdapterKind.IA3 in kinds
        self.cache.clear()
        self.backends.clear()
        self.native_step = None

    def end(self) -> None:
        self.begin(None)

    def apply_lora(self, x: torch.Tensor, y: torch.Tensor, pool: LoRAPool) -> None:
        """y += every token's LoRA for this step (`ops.lora_apply`). The backend is chosen once per
        step and the C kernel takes the pool as checked at its first use: a decode step makes 4 calls
        per layer, and dispatch and checks per call would cost more than a small step's LoRA."""
        key = (x.dtype, pool.a.dtype)
        backend = self.backends.get(key)
        if backend is None:
            backend = self.backends[key] = apply_backend(x, y, pool.a, pool.b_t, self.meta)
        if backend == "native":
            if self.native_step is None:
                self.native_step = native.meta_args(self.meta)
            native.apply_prepared(x, y, pool.prepared(), self.native_step)
        else:
            lora_apply(x, y, pool.a, pool.b_t, pool.ranks, pool.scale, self.meta, pool.slice_offsets,
                       pool.slice_widths)


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
        self._prepared: native.PreparedPool | None = None

    def prepared(self) -> native.PreparedPool:
        """The pools as the C kernel takes them, checked on first use (they are only written in place)."""
        if self._prepared is None:
            self._prepared = native.prepare_pool(self.a, self.b_t, self.ranks, self.scale, self.out_total,
                                                 self.slice_offsets, self.slice_widths)
        return self._prepared

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
        self.fused = False
        """The projections' base weights are one [out_total, in] weight (plain nn.Linear groups)."""
        self.weight: torch.Tensor | None = None
        """The fused weight in the plain layout; None when it is only kept packed."""
        self.packed: torch.Tensor | None = None
        """The fused weight prepacked for oneDNN (CPU, float32, without the C kernel)."""
        self.panels: torch.Tensor | None = None
        """The fused weight in the C kernel's panel layout (CPU, float32)."""
        self.bias: torch.Tensor | None = None
        self.has_ia3_in = False
        """Some projection of the group holds IA3 input vectors: its input differs, no fused output."""

    def fuse(self, linears: list[nn.Linear]) -> list[nn.Module]:
        """Move the projections' weights into one [out_total, in] tensor (packed for the C kernel or
        oneDNN when it can be); returns the modules that stand for the projections' base layers now."""
        first = linears[0].weight
        weight = torch.empty(self.pool.out_total, self.pool.in_features, dtype=first.dtype, device=first.device)
        with_bias = any(linear.bias is not None for linear in linears)
        bias = torch.zeros(self.pool.out_total, dtype=first.dtype, device=first.device) if with_bias else None
        for linear, offset, width in zip(linears, self.pool.slice_offsets, self.pool.slice_widths):
            weight[offset : offset + width].copy_(linear.weight.detach())
            if linear.bias is not None:
                bias[offset : offset + width].copy_(linear.bias.detach())
        self.fused, self.bias = True, bias
        if native.takes_float32(weight):
            self.panels = native.pack_weight(weight)
        elif _can_pack(weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)
        if self.panels is not None or self.packed is not None:
            return [PackedProjection(self, index, linear.in_features, linear.out_features)
                    for index, linear in enumerate(linears)]
        self.weight = weight
        for linear, offset, width in zip(linears, self.pool.slice_offsets, self.pool.slice_widths):
            linear.weight = nn.Parameter(weight[offset : offset + width], requires_grad=False)
            if linear.bias is not None:
                linear.bias = nn.Parameter(bias[offset : offset + width], requires_grad=False)
        return linears

    def base_output(self, flat: torch.Tensor) -> torch.Tensor:
        """x @ weightᵀ + bias for the whole group: [tokens, out_total]."""
        if self.panels is not None:
            return native.linear(flat if flat.stride(-1) == 1 else flat.contiguous(), self.panels, self.bias,
                                 self.pool.out_total)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return F.linear(flat, self.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The fused weight [out_total, in] in the plain layout (unpacked: a copy when packed)."""
        if self.panels is not None:
            return native.unpack_weight(self.panels, self.pool.out_total)
        return self.weight if self.packed is None else self.packed.to_dense()

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
        out = self.base_output(flat)
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


def _can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedProjection(nn.Module):
    """One projection of a group whose fused weight is kept packed: its base layer.

    The fused path never calls it (the group computes all projections at once); the unfused path (a
    step with IA3 input vectors) does, computing the group's output and keeping its columns.
    """

    def __init__(self, group: LoRAGroup, index: int, in_features: int, out_features: int):
        super().__init__()
        self.group = group
        self.offset = group.pool.slice_offsets[index]
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if group.bias is None else group.bias[self.offset : self.offset + out_features]

    @property
    def weight(self) -> torch.Tensor:
        """[out, in], unpacked on demand (a copy: DoRA reads it once per adapter load)."""
        return self.group.dense_weight()[self.offset : self.offset + self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.base_output(x.reshape(-1, x.shape[-1]))[:, self.offset : self.offset + self.out_features]
        return y.reshape(*x.shape[:-1], self.out_features)


class LoRALinear(nn.Module):
    """A base projection plus each token's adapter: LoRA delta, DoRA row scale, IA3 scales."""

    def __init__(self, base: nn.Module, group: LoRAGroup, slice_index: int, num_slots: int,
                 vector_dtype: torch.dtype):
        super().__init__()
        self.vector_dtype = vector_dtype
        """DoRA/IA3 vectors' dtype: the model's (the pools may store LoRA weights in bfloat16)."""
        self.base = base
        self.group = group
        self.slice_index = slice_index
        self.num_slots = num_slots
        self.in_features, self.out_features = linear_features(base)
        self.dora_scale: torch.Tensor | None = None
        self.ia3_in: torch.Tensor | None = None
        self.ia3_out: torch.Tensor | None = None

    def _vectors(self, name: str, width: int) -> torch.Tensor:
        table = getattr(self, name)
        if table is None:
            pool = self.group.pool
            table = torch.ones(self.num_slots + 1, width, dtype=self.vector_dtype, device=pool.b_t.device)
            setattr(self, name, table)
            if name == "ia3_in":
                self.group.has_ia3_in = True
        return table

    def load_slot(self, slot: int, dora_scale: torch.Tensor | None, ia3_in: torch.Tensor | None,
                  ia3_out: torch.Tensor | None) -> None:
        """Set (or reset to ones) this projection's per-slot vectors."""
        for name, width, vector in (("dora_scale", self.out_features, dora_scale),
                                    ("ia3_in", self.in_features, ia3_in),
                                    ("ia3_out", self.out_features, ia3_out)):
            if vector is not None:
                self._vectors(name, width)[slot].copy_(vector)
            elif getattr(self, name) is not None:
                getattr(self, name)[slot].fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        context = group.context
        if group.fused and not (context.has_ia3 and group.has_ia3_in):
            offset = group.pool.slice_offsets[self.slice_index]
            y = group.output(x)[..., offset : offset + self.out_features]
            if context.meta is None:
                return y
            return self._scale_rows(y, context)
        if context.meta is None:
            return self.base(x)
        rows = context.rows
        x_base = x
        if context.has_ia3 and self.ia3_in is not None:
            x_base = x * self.ia3_in[rows].view(*x.shape[:-1], -1).to(x.dtype)
        y = self.base(x_base)
        if context.has_lora:
            pool = group.pool
            offset = pool.slice_offsets[self.slice_index]
            delta = group.delta(x)[:, offset : offset + self.out_features]
            y = y + delta.view(y.shape).to(y.dtype)
        return self._scale_rows(y, context)

    def _scale_rows(self, y: torch.Tensor, context: LoRAStepContext) -> torch.Tensor:
        """DoRA's row scale and IA3's output scale, per token's slot (no-ops without such adapters)."""
        rows = context.rows
        if context.has_dora and self.dora_scale is not None:
            scale = self.dora_scale[rows].view(y.shape).to(y.dtype)
            bias = getattr(self.base, "bias", None)
            y = scale * y if bias is None else scale * (y - bias) + bias
        if context.has_ia3 and self.ia3_out is not None:
            y = y * self.ia3_out[rows].view(y.shape).to(y.dtype)
        return y


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
               context: LoRAStepContext, adapter_dtype: torch.dtype | None = None) -> dict[str, LoRALinear]:
    """Replace every servable projection by a LoRALinear; returns module path -> its LoRALinear.

    dtype: the model's (DoRA/IA3 vectors are kept in it); adapter_dtype: the LoRA pools' (default dtype).
    """
    modules = dict(model.named_modules())
    table: dict[str, LoRALinear] = {}
    for name, paths in find_lora_targets(model):
        features = [linear_features(modules[path]) for path in paths]
        pool = LoRAPool(features[0][0], [out for _, out in features], num_slots, max_rank, adapter_dtype or dtype,
                        device)
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
