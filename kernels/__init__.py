"""LoRA kernels: segmented-gather shrink/expand over stacked adapter pools, one backend per platform.

What the model layer uses (server/model/runner.py, server/adapters/lora.py):

    backend = select(device, dtype, pool_dtype)                   once, when the runner builds the model
    prepared = backend.prepare_pool(pool)                         once per stacked weight pool, at wrap time
    meta = LoRAMeta.allocate(...); meta.bind(table)               once, at start-up (the step buffer's tables)
    meta.build(token_slots) / meta.build_runs(runs)               per step, on the host (``meta``)
    step = backend.begin_step(meta)                               per step
    backend.lora_apply(x, y, pool, prepared, step)                per projection group

``backend`` holds ``Backend`` (torch), ``TritonBackend`` (CUDA: ``triton/shrink.py``: ``triton_shrink``, then
``triton/expand.py``: ``triton_expand``; ``triton/paged_attention.py`` for attention) and ``select``;
``cpu/`` the C kernels. ``ops`` is the LoRA op on loose tensors for the kernel tests, ``testing`` the
references tests and benchmarks check against. Triton is imported only when used.
"""

if __name__ == "loraplex.kernels":
    from .backend import BACKEND_ENV, Backend, select
    from .meta import LoRAMeta

    __all__ = ["BACKEND_ENV", "Backend", "LoRAMeta", "select"]
else:
    # Found by the bare name `kernels` because the checkout root is on sys.path (`python -c` or a notebook
    # started in the checkout). That name belongs to Hugging Face's `kernels` package, which transformers
    # imports: hand it over, or refuse when it is not installed. Never this folder.
    from ._bare_name import hand_over

    hand_over(__name__, __file__)
