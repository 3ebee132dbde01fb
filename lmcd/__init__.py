"""lmcd: a standalone KV-cache daemon for vLLM (LMCache multi-process protocol)."""

__version__ = "0.1.0"
