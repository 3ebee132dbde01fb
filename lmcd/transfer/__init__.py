"""The data plane: KV layouts, opened KV caches, and the two copy paths.

`layouts` is pure bookkeeping; `host` copies through shared-memory CPU
tensors; `cuda` copies through CUDA IPC with streams and events. The
scheduler (`lmcd.scheduler`) owns when copies run and what they commit.
"""
