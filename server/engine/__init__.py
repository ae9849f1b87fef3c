"""The engine: requests in, tokens out; the scheduler decides each step, the block manager owns the KV cache."""
