"""Eviction policies: which evictable chunk goes first.

The storage manager hands a policy only the chunks that may be evicted now
(committed, not locked, not pinned) and takes them back while they are in
use, so a policy never has to skip anything. No trio, zmq or torch here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Protocol

import attrs


class EvictionPolicy(Protocol):
    """Orders evictable chunks. Keys are opaque hashables."""

    def add(self, key: Hashable) -> None:
        """`key` became evictable (or was just used): it goes last in line."""
        ...

    def discard(self, key: Hashable) -> None:
        """`key` is no longer evictable; no error if it was not tracked."""
        ...

    def victim(self) -> Hashable | None:
        """The key to evict next (it stays tracked until discarded), or None."""
        ...

    def __iter__(self) -> Iterator[Hashable]:
        """Every tracked key, the next victim first (for a caller that must
        skip some; the policy must not change while it is iterated)."""
        ...

    def __len__(self) -> int: ...


@attrs.define(slots=True)
class LRUPolicy:
    """Least recently used first: the order in which keys were last added."""

    _order: OrderedDict[Hashable, None] = attrs.field(factory=OrderedDict)

    def add(self, key: Hashable) -> None:
        order = self._order
        if key in order:
            order.move_to_end(key)
        else:
            order[key] = None

    def discard(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victim(self) -> Hashable | None:
        return next(iter(self._order), None)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __repr__(self) -> str:
        return f"LRUPolicy(tracked={len(self._order)})"


POLICIES = {"lru": LRUPolicy}
