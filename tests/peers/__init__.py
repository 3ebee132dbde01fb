"""Clients of other lmcache releases, run as subprocesses from their own
environments (one lmcache per interpreter) by tests that need several
releases on one daemon at once. See `tests.peers.run`."""
