"""The benchmark suite (`nox -s bench`): lmcd next to same-run baselines.

Baselines need lmcache 0.3.11 (the reference server's storage manager and
message queue), installed by the nox session; lmcd itself never imports it.
"""
