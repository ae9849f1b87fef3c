"""LoRA kernels: segmented-gather shrink/expand over stacked adapter pools, one backend per platform.

Per step:   meta.update(token_slots)                        (LoRAMeta.allocate once, at start-up)
Per module: lora_apply(x, y, A, B_t, ranks, scalings, meta, slice_offsets, slice_widths)
See ``ops`` for the semantics, ``meta`` for the layout and ``backend`` for the per-platform backends
(``triton/``: the CUDA kernels; ``cpu/``: the C kernels). Triton is imported only when used.
"""

if __name__ == "loraplex.kernels":
    from .backend import BACKEND_ENV, Backend, select
    from .meta import LoRAMeta
    from .ops import lora_apply, lora_expand, lora_shrink, select_backend
    from .reference import expand_reference, shrink_reference

    __all__ = [
        "BACKEND_ENV",
        "Backend",
        "LoRAMeta",
        "expand_reference",
        "lora_apply",
        "lora_expand",
        "lora_shrink",
        "select",
        "select_backend",
        "shrink_reference",
    ]
else:
    # Found by the bare name `kernels` because the checkout root is on sys.path (`python -c` or a notebook
    # started in the checkout). That name belongs to Hugging Face's `kernels` package, which transformers
    # imports: hand it over, or refuse when it is not installed. Never this folder.
    from ._bare_name import hand_over

    hand_over(__name__, __file__)
