"""The Triton kernels (CUDA; on CPU under TRITON_INTERPRET=1): one kernel per module, tile sizes in
``configs``. Importing this package does not import triton; the kernel modules do."""
