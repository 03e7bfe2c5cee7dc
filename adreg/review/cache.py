"""A small thread-safe memo for the review side's per-file facts (a capture's sha256, its ranking signals)."""

from __future__ import annotations

import threading
from typing import Generic, Hashable, TypeVar

V = TypeVar("V")


class BoundedCache(Generic[V]):
    """A dict shared by threads that forgets everything once it holds ``max_items`` (a review queue sees a
    few thousand captures a day: memory stays bounded without bookkeeping per entry)."""

    def __init__(self, max_items: int = 50_000):
        self.max_items = int(max_items)
        self._items: dict[Hashable, V] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            return self._items.get(key)

    def put(self, key: Hashable, value: V) -> V:
        with self._lock:
            if len(self._items) >= self.max_items:
                self._items.clear()
            self._items[key] = value
        return value

    def __len__(self) -> int:
        return len(self._items)
