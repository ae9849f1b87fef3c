"""The model runner: owns the model, its LoRA pools and the KV cache, and runs one step.

A step's tokens are laid out flat, `(1, num_tokens)`, sequences ordered by adapter slot so that the
tokens of one slot are contiguous (one segment per slot, no-adapter tokens last); the runner builds
the step's `LoRAMeta` and `AttentionMeta` once and hands them to the layers (the LoRA context and the
`loraplex_attention` forward kwarg), then keeps the logits of the sequences that sample. Every index
array of the step is built on the host and reaches the device in one copy (`step_buffers.py`); a pure
decode step replays a CUDA graph where one was captured (`decode_graphs.py`). Llama,
Mistral, Qwen2 and Qwen3 models run through the lean forward of `decoder.py` (the same layers without
the transformers framework around them); other models through their transformers forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from loraplex.kernels import backend as kernel_backend
from loraplex.kernels import devices
from loraplex.kernels.cpu.backend import check_adapter_dtype
from loraplex.kernels.meta import LoRAMeta
from loraplex.server.model import attention
from loraplex.server.adapters.kind import AdapterKind
from loraplex.server.adapters.loader import AdapterWeights, BaseModelSpec
from loraplex.server.config import EngineConfig
from loraplex.server.model.decode_graphs import ATTACH_BYTES_PER_ROW, DecodeGraphs
from loraplex.server.model.decoder import DecoderForward
from loraplex.server.model.step_buffers import StepAttachment, StepBuffers
from loraplex.server.errors import UserError
from loraplex.server.adapters.lora import LoRAStepContext, linear_features, wrap_model
from loraplex.server.model.quantization import bnb_config, dequantized_weight, keep_bnb_off_packed_cpu_path

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CPU_DEFAULT_KV_TOKENS = 32768


@dataclass
class StepInput:
    """One scheduled sequence, as the runner needs it.

    The sequence's KV indices are its cache positions: `[start, start + n)` are computed this step.
    Two adapter types put virtual entries first:
    - prompt tuning: KV indices [0, P) are P virtual input embeddings, computed like any prefill;
      `virtual_embeddings` holds the rows of this step's part of them (they come before token_ids);
    - prefix tuning: KV indices [0, P) hold the adapter's shared prefix keys/values and [P, P_pad) are
      padding to a block boundary (so the shared blocks are never written); `skip` = (P, P_pad) are
      left out of attention and the model sees position `index - (P_pad - P)`.
    """

    token_ids: list[int]
    """Real tokens to run this step."""
    start: int
    """KV index of the step's first entry (= entries already in the cache)."""
    block_table: list[int]
    slot: int
    """Device adapter slot, -1 for the base model."""
    samples: bool
    """Keep the logits of the last entry (the sequence samples its next token)."""
    virtual_embeddings: torch.Tensor | None = None
    """[v, hidden] virtual input rows computed this step, before token_ids (prompt tuning)."""
    skip: tuple[int, int] | None = None
    """KV index range of prefix padding, invisible to attention and to positions (prefix tuning)."""


def load_base_model(config: EngineConfig):
    """The base model and tokenizer from a local directory, quantized as configured."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_config = config.model
    path = model_config.path
    if not (path / "config.json").is_file():
        raise UserError(f"model directory {path} has no config.json (expected a Hugging Face model directory)")
    dtype = DTYPES[model_config.dtype]
    kwargs: dict = {"dtype": dtype}
    if model_config.quantization != "none":
        kwargs["quantization_config"] = bnb_config(model_config.quantization, dtype, model_config.int8_threshold)
        kwargs["device_map"] = {"": model_config.device}
    hf_config = AutoConfig.from_pretrained(path)
    if getattr(hf_config, "is_encoder_decoder", False):
        raise UserError(f"{path} is an encoder-decoder model; loraplex serves decoder-only causal LMs")
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if model_config.quantization == "none":
        model.to(model_config.device)
    if dtype != torch.bfloat16:  # compute in the configured dtype, not bitsandbytes' bfloat16 CPU path
        keep_bnb_off_packed_cpu_path(model)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = devices.normalize(config.model.device)
        devices.make_current(self.device)  # the model, pools and KV cache are created on it
        self.dtype = DTYPES[config.model.dtype]
        self.model, self.tokenizer = load_base_model(config)
        hf = self.model.config
        self.hf_config = hf
        self.num_layers = hf.num_hidden_layers
        self.num_kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        self.head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        self.max_model_len = hf.max_position_embeddings
        self.vocab_size = hf.vocab_size

        attention.register()
        self.model.set_attn_implementation(attention.ATTENTION_NAME)
        self.attention_backend = attention.select_backend(self.device, self.dtype)
        log.info("attention backend: %s", self.attention_backend)

        adapters = config.adapters
        self.num_slots = adapters.max_device_adapters
        self.backend = kernel_backend.select(self.device, self.dtype, self._adapter_dtype(adapters.dtype))
        """The platform's kernels (kernels/backend.py), chosen once here for every layer and step."""
        self.adapter_dtype = self.backend.pool_dtype
        self.lora_context = LoRAStepContext(self.backend)
        self.lora_table = wrap_model(self.model, self.num_slots, adapters.max_rank, self.dtype, self.device,
                                     self.lora_context)
        self.decoder = DecoderForward.create(self.model, self.backend)
        """The lean forward for Llama-shaped models (server/model/decoder.py); None: the transformers forward."""
        self.base_spec = BaseModelSpec(
            targets={path: linear_features(module.base) for path, module in self.lora_table.items()},
            hidden_size=hf.hidden_size,
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            base_weight=self._base_weight,
            bias=lambda path: getattr(self.lora_table[path].base, "bias", None),
        )
        self.slot_kinds: list[AdapterKind | None] = [None] * self.num_slots
        self.slot_splits: list[bool] = [False] * self.num_slots
        """The slot's IA3 adapter scales the input of a projection in a shared-input group (eager steps only:
        `LoRAStepContext.split_inputs`)."""
        self.slot_prompts: list[torch.Tensor | None] = [None] * self.num_slots  # prompt tuning, on device
        self._copy_stream: torch.cuda.Stream | None = None
        self._loading: dict[int, torch.cuda.Event] = {}
        """Slots whose copy (on the copy stream) the next step that reads them must wait for."""

        block_size = config.cache.block_size
        self.block_size = block_size
        self.num_blocks = self._num_kv_blocks()
        self.scratch_block = self.num_blocks
        """One KV block past the block manager's: the padding rows of static decode steps write there."""
        self.kv_cache = attention.PagedKVCache(self.num_layers, self.num_blocks + 1, block_size, self.num_kv_heads,
                                               self.head_dim, self.dtype, self.device)
        self.max_gather_tokens = attention.GATHER_MAX_ELEMENTS // (self.num_kv_heads * self.head_dim)
        """Positions one gathered decode attention call may hold (`attention.decode_groups`)."""
        self.buffers = StepBuffers(self.device)
        self.decode_graphs: DecodeGraphs | None = None
        """Captured decode steps (`prepare_decode_graphs`); None: every step runs eagerly."""
        self.lora_meta: LoRAMeta | None = None
        self._meta_slots: list[int] | None = None
        """The token slots lora_meta was last built for."""

    def _adapter_dtype(self, name: str) -> torch.dtype:
        """The LoRA pools' dtype: the model's, or bfloat16 for a float32 model on CPU (C kernel)."""
        check_adapter_dtype(name, self.config.model.dtype, self.device.type)
        return self.dtype if name == "auto" else DTYPES[name]

    # ------------------------------------------------------------------ sizing
    def _num_kv_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_tokens is not None:
            return -(-cache.num_tokens // cache.block_size)
        per_block = attention.PagedKVCache.bytes_per_block(self.num_layers, cache.block_size, self.num_kv_heads,
                                                           self.head_dim, self.dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(1, int(free * cache.memory_fraction) // per_block - 1)  # less the scratch block
        return -(-CPU_DEFAULT_KV_TOKENS // cache.block_size)

    def lora_pools(self) -> list:
        """Each projection group's pool, once (a group's projections share it)."""
        return list({id(module.group): module.group.pool for module in self.lora_table.values()}.values())

    def lora_bytes(self) -> int:
        return sum(pool.nbytes() for pool in self.lora_pools())

    def _base_weight(self, path: str) -> torch.Tensor:
        """The projection's weight [out, in] on its device in its dtype, dequantized as peft does for DoRA
        (a 4-bit/8-bit weight whole, in the compute dtype: one weight's worth, freed after its norms)."""
        with torch.no_grad():
            return dequantized_weight(self.lora_table[path].base).detach()

    # ------------------------------------------------------------------ adapters
    def host_tier(self, adapter: AdapterWeights) -> AdapterWeights:
        """The adapter as the host tier keeps it: LoRA weights in the pools' dtype, the rest in the
        model's, pinned on CUDA so that `load_slot` is one asynchronous copy per tensor."""
        pin = self.device.type == "cuda"

        def host(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
            if tensor is None:
                return None
            tensor = tensor.to(dtype).contiguous()
            return tensor.pin_memory() if pin else tensor

        lora = {path: dataclasses.replace(w, a=host(w.a, self.adapter_dtype), b=host(w.b, self.adapter_dtype))
                for path, w in adapter.lora.items()}
        vectors = {name: {path: host(t, self.dtype) for path, t in getattr(adapter, name).items()}
                   for name in ("dora_scale", "ia3_in", "ia3_out")}
        return dataclasses.replace(adapter, lora=lora, **vectors,
                                   prompt_embeddings=host(adapter.prompt_embeddings, self.dtype),
                                   prefix_kv=host(adapter.prefix_kv, self.kv_cache.k[0].dtype))

    def load_slot(self, slot: int, adapter: AdapterWeights) -> None:
        """Copy a host-tier adapter (`host_tier`) into device slot `slot`; what it does not target gets
        rank 0 / ones. On CUDA the copies run on the copy stream and the first step that uses the
        slot waits for them (`_wait_for_loads`); on CPU they are done when this returns."""
        with self._copying() as stream:
            for path, module in self.lora_table.items():
                weights = adapter.lora.get(path)
                if weights is None:
                    module.group.pool.load(slot, module.slice_index, None, None, 0.0)
                else:
                    a, b = (w.to(self.device, non_blocking=True) for w in (weights.a, weights.b))
                    module.group.pool.load(slot, module.slice_index, a, b, weights.scaling)
                module.load_slot(slot, *(self._on_device(table.get(path))
                                         for table in (adapter.dora_scale, adapter.ia3_in, adapter.ia3_out)))
            self.slot_prompts[slot] = self._on_device(adapter.prompt_embeddings)
            if stream is not None:
                self._loading[slot] = stream.record_event()
        self.slot_kinds[slot] = adapter.kind
        self.slot_splits[slot] = any(not self.lora_table[path].scales_input for path in adapter.ia3_in)

    @contextlib.contextmanager
    def _copying(self):
        """The copy stream on CUDA (made current), None elsewhere."""
        if self.device.type != "cuda":
            yield None
            return
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        # the slot's previous tenant may still be read by steps already queued
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            yield self._copy_stream

    def _wait_for_loads(self, token_slots: list[int]) -> None:
        """The step's stream waits for the copies into the slots it reads (device-side: no host wait)."""
        for slot in set(token_slots) & self._loading.keys():
            torch.cuda.current_stream(self.device).wait_event(self._loading.pop(slot))

    def _on_device(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(self.device, self.dtype, non_blocking=True)

    def write_prefix(self, blocks: list[int], prefix_kv: torch.Tensor) -> None:
        """Store a prefix-tuning adapter's keys/values ([layers, 2, kv_heads, P, head_dim], the host tier's:
        pinned on CUDA) in the first positions of `blocks`: one non-blocking copy to the device, then each
        layer's runs of consecutive blocks written as slices (no index tensor, no host wait)."""
        kv = prefix_kv.to(self.device, self.kv_cache.k[0].dtype, non_blocking=True)
        bs, length = self.block_size, prefix_kv.shape[3]
        runs: list[list[int]] = []  # [first block, positions]: consecutive blocks hold consecutive positions
        for i, block in enumerate(blocks[: -(-length // bs)]):
            n = min(bs, length - i * bs)
            if runs and runs[-1][0] * bs + runs[-1][1] == block * bs:
                runs[-1][1] += n
            else:
                runs.append([block, n])
        for layer in range(self.num_layers):
            start = 0
            for block, n in runs:
                for cache, values in ((self.kv_cache.k[layer], kv[layer, 0]), (self.kv_cache.v[layer], kv[layer, 1])):
                    cache[block * bs : block * bs + n].copy_(values[:, start : start + n].transpose(0, 1))
                start += n

    # ------------------------------------------------------------------ one step
    def _lora_meta(self, token_slots: list[int]) -> LoRAMeta:
        """This step's LoRA layout, built on the host and bound to its part of the step buffer."""
        meta = self.lora_meta
        if token_slots != self._meta_slots:  # consecutive decode steps of one batch keep their layout
            self._meta_slots = None  # a failed build must not pass for the layout it was building
            meta.build(token_slots, contiguous=True)
            self._meta_slots = list(token_slots)
        table = self.buffers.put(meta.host, torch.int32)
        if table.data_ptr() != meta.table.data_ptr():
            meta.bind(table)
            # a new list: what a backend cached for the old one holds the old tables' addresses
            meta.segments = None if meta.segments is None else list(meta.segments)
        return meta

    def warm_up(self, max_seqs: int) -> None:
        """Compile every paged-attention variant (`attention.warm_up`) and LoRA kernel variant
        (`Backend.warm_up`) serving can reach, so that no step compiles one while serving (CUDA only)."""
        attention.warm_up(self.attention_backend, self.model, num_heads=self.hf_config.num_attention_heads,
                          kv_heads=self.num_kv_heads, head_dim=self.head_dim, block_size=self.block_size,
                          dtype=self.dtype, device=self.device, max_num_seqs=max_seqs)
        if self.device.type != "cuda":
            return
        started = time.perf_counter()
        launches = self.backend.warm_up(self.lora_pools())
        torch.cuda.synchronize(self.device)
        log.info("compiled the LoRA kernels' variants (%d launches) in %.1f s", launches, time.perf_counter() - started)

    def prepare_decode_graphs(self, max_seqs: int) -> None:
        """Capture decode steps of up to `max_seqs` sequences as CUDA graphs, unless the config says
        enforce_eager, the device is not CUDA, the model runs its transformers forward, or the attention
        backend is not graph-safe (`attention.graph_safe`). First compiles every kernel variant an eager
        step can reach (`warm_up`)."""
        self.warm_up(max_seqs)
        if self.config.enforce_eager or self.device.type != "cuda" or self.decoder is None:
            return
        if not attention.graph_safe(self.attention_backend):
            log.info("decode steps run eagerly: the attention backend cannot be captured in a CUDA graph")
            return
        graphs = DecodeGraphs(self, max_seqs)
        try:
            with torch.inference_mode():
                graphs.capture()
        except Exception:  # serving eagerly beats not serving; the log says why decode is slower
            log.exception("capturing the decode CUDA graphs failed: decode steps run eagerly")
            torch.cuda.synchronize(self.device)
            return
        self.decode_graphs = graphs

    def reserve(self, max_tokens: int, max_seqs: int) -> None:
        """Size the per-step buffers once, at start-up, for the scheduler's budgets (`max_tokens` computed
        positions and `max_seqs` sequences a step): no step of those budgets allocates pinned memory or
        makes a blocking copy while serving. The context slots the torch attention path lays out per
        sequence are bounded by the KV cache; prefix blocks shared by many sequences could exceed that,
        and then the buffer grows once (logged)."""
        self.lora_meta = LoRAMeta.allocate(max(max_tokens, 1), self.num_slots, self.device, max_slices=3,
                                           max_rank=self.config.adapters.max_rank)
        self._meta_slots = None
        max_blocks = -(-self.max_model_len // self.block_size)
        context = 0 if self.attention_backend == "triton" else (self.num_blocks + 1) * self.block_size
        self.buffers.reserve(self._bytes(max_tokens, max_seqs, max_blocks, context)
                             + max_seqs * ATTACH_BYTES_PER_ROW)

    def _bytes(self, tokens: int, seqs: int, blocks: int, context: int) -> int:
        """A bound of the bytes a step's metadata takes in the step buffer (see `execute`)."""
        arrays = 16 + 4 * seqs
        elements = 6 * tokens + 4 * seqs * (2 + blocks) + context
        return 8 * (elements + arrays) + 4 * self.lora_meta.table_numel

    def _bound(self, inputs: list[StepInput]) -> int:
        """Bytes this step's metadata can take in the step buffer; grows the LoRA layout for a step past
        the reserved budget (`reserve`)."""
        tokens = sum(len(item.token_ids) + (0 if item.virtual_embeddings is None else item.virtual_embeddings.shape[0])
                     for item in inputs)
        blocks = max(len(item.block_table) for item in inputs)
        context = 0 if self.attention_backend == "triton" else sum(len(item.block_table) for item in inputs) * self.block_size
        if self.lora_meta is None or self.lora_meta.max_tokens < tokens:
            log.warning("a step of %d tokens is past the reserved budget: LoRA layout reallocated", tokens)
            self.lora_meta = LoRAMeta.allocate(max(tokens, 256), self.num_slots, self.device,
                                               max_slices=3, max_rank=self.config.adapters.max_rank)
            self._meta_slots = None
        return self._bytes(tokens, len(inputs), blocks, context)

    @torch.inference_mode()
    def execute(self, inputs: list[StepInput], attach: StepAttachment | None = None) -> torch.Tensor:
        """Run one step; returns float32 logits [num sampling inputs, vocab] in input order.

        All of the step's index arrays, and `attach`'s (the sampler's), are laid out on the host and
        reach the device in one copy (`StepBuffers`); nothing here reads a device value back."""
        devices.make_current(self.device)  # Triton launches on the calling thread's current device
        if self.decode_graphs is not None and self.decode_graphs.takes(inputs, attach):
            self._wait_for_loads([item.slot for item in inputs])
            return self.decode_graphs.run(inputs, attach)
        order = sorted(range(len(inputs)), key=lambda i: (inputs[i].slot < 0, inputs[i].slot))
        token_ids: list[int] = []
        positions: list[int] = []
        token_slots: list[int] = []
        slot_mapping: list[int] = []
        spans: list[tuple[int, int, list[int]]] = []  # (row, n, context slots): attended one by one
        decoding: list[tuple[int, StepInput]] = []  # (row, input): one query, attended as a batch
        fresh: list[tuple[int, int]] = []  # (row, n): prefills of positions [0, n), batched by n
        virtual: list[tuple[int, torch.Tensor]] = []  # (first row, embeddings) to place
        keep: dict[int, int] = {}
        triton = self.attention_backend == "triton"
        paged: list[tuple[int, StepInput]] = []  # (n, input) of every sequence, in row order (triton)
        for i in order:
            item = inputs[i]
            num_virtual = 0 if item.virtual_embeddings is None else item.virtual_embeddings.shape[0]
            n = num_virtual + len(item.token_ids)
            row = len(token_ids)
            if item.samples:
                keep[i] = row + n - 1
            token_slots.extend([item.slot] * n)
            if triton:
                paged.append((n, item))
            if num_virtual:
                virtual.append((row, item.virtual_embeddings))
            token_ids.extend([0] * num_virtual)  # placeholders, replaced by the embeddings
            token_ids.extend(item.token_ids)
            end = item.start + n
            slot_mapping.extend(self.kv_slots(item.block_table, item.start, end))
            shift = 0 if item.skip is None else item.skip[1] - item.skip[0]  # hidden prefix padding
            positions.extend(range(item.start - shift, end - shift))
            if triton:  # the kernel reads every context through its block table
                continue
            if item.skip is not None:
                low, high = item.skip
                context = self.kv_slots(item.block_table, 0, end)
                spans.append((row, n, context[:low] + context[high:]))
            elif n == 1 and not num_virtual:
                decoding.append((row, item))
            elif item.start == 0:  # a fresh prefill: its context is its own tokens
                fresh.append((row, n))
            else:
                spans.append((row, n, self.kv_slots(item.block_table, 0, end)))

        buffers = self.buffers
        buffers.begin(self._bound(inputs) + (0 if attach is None else attach.nbytes))
        self._wait_for_loads(token_slots)
        try:
            self._begin_adapters(token_slots)  # first: the LoRA tables keep their address from step to step
            ids = buffers.put(token_ids).view(1, -1)
            position_ids = buffers.put(positions).view(1, -1)
            sampling = [i for i in range(len(inputs)) if i in keep]
            keep_index = buffers.put([keep[i] for i in sampling])
            meta = attention.AttentionMeta(
                cache=self.kv_cache,
                slot_mapping=buffers.put(slot_mapping),
                spans=[attention.SequenceSpan(row, n, buffers.put(context)) for row, n, context in spans],
                decode=self._decode_batch(decoding) if decoding else None,
                prefills=self._prefill_batches(fresh),
                backend=self.attention_backend,
                paged=self._paged_batch(paged) if triton else None,
            )
            if attach is not None:
                attach.put(buffers)
            buffers.send()
            model_inputs = {"input_ids": ids}
            if virtual:
                embeds = self.model.get_input_embeddings()(ids)
                for row, rows in virtual:
                    embeds[0, row : row + rows.shape[0]] = rows.to(embeds.dtype)
                model_inputs = {"inputs_embeds": embeds}
            if self.decoder is not None:
                return self.decoder(position_ids, keep_index, meta, **model_inputs).float()
            output = self.model(
                **model_inputs,
                position_ids=position_ids,
                use_cache=False,
                logits_to_keep=keep_index,
                **{attention.META_KWARG: meta},
            )
        finally:
            self.lora_context.end()
        return output.logits[0].float()

    def kv_slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """KV cache slots of positions [start, end) of a sequence with this block table."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def _decode_batch(self, decoding: list[tuple[int, StepInput]]) -> attention.DecodeBatch:
        """The blocks holding every decoding sequence's context, grouped by length for gathering."""
        return attention.DecodeBatch.build([row for row, _ in decoding], [item.block_table for _, item in decoding],
                                           [item.start + 1 for _, item in decoding], self.block_size,
                                           self.buffers.put, self.max_gather_tokens)

    def _paged_batch(self, sequences: list[tuple[int, StepInput]]) -> attention.PagedBatch:
        """Every sequence's rows, cache length, block table and hidden prefix padding (Triton kernel)."""
        return attention.PagedBatch.build([n for n, _ in sequences], [item.start + n for n, item in sequences],
                                          [item.block_table for _, item in sequences],
                                          [item.skip for _, item in sequences], self.buffers.put)

    def _prefill_batches(self, fresh: list[tuple[int, int]]) -> list[attention.PrefillBatch]:
        """Fresh prefills grouped by length; a group's rows are a view when they are consecutive."""
        by_length: dict[int, list[int]] = {}
        for row, n in fresh:
            by_length.setdefault(n, []).append(row)
        batches = []
        for n, rows in by_length.items():
            if rows == list(range(rows[0], rows[0] + n * len(rows), n)):
                batches.append(attention.PrefillBatch(n, len(rows), rows[0]))
            else:
                index = self.buffers.put([row + i for row in rows for i in range(n)])
                batches.append(attention.PrefillBatch(n, len(rows), rows[0], index))
        return batches

    def _begin_adapters(self, token_slots: list[int]) -> None:
        kinds = {self.slot_kinds[slot] for slot in set(token_slots) if slot >= 0} - {None}
        if not kinds & {AdapterKind.LORA, AdapterKind.DORA, AdapterKind.IA3}:
            self.lora_context.begin(None)
            return
        rows = None  # per-token vector rows: only DoRA and IA3 read them
        if kinds & {AdapterKind.DORA, AdapterKind.IA3}:
            rows = self.buffers.put([slot if slot >= 0 else self.num_slots for slot in token_slots])
        split = any(self.slot_splits[slot] for slot in set(token_slots) if slot >= 0)
        self.lora_context.begin(self._lora_meta(token_slots), rows, kinds, split)
