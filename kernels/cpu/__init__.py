"""CPU-only code: the C kernels (``cpu_lora.c``, bound in ``native``) and the CPU backends (``backend``)."""
