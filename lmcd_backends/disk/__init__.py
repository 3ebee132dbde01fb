"""The disk tier: verified chunk files in a local directory (`DiskTier`).

`format` encodes headers and journal records (pure), `io` does the blocking
file work in worker threads, `tier` keeps the index on the Trio thread.
"""

from lmcd_backends.disk.tier import DiskTier

__all__ = ["DiskTier"]
