"""The in-memory cache of unwrapped data keys: bounded LRU with a TTL, plus "current key per scope".

Pure and synchronous (the clock is injected), so the proxy's hot path can look a key up without
awaiting, and the eviction rules are tested without a database. It never fetches, unwraps or logs
keys; :mod:`keymgmt.keystore` fills it and tells it what to forget.

A scope is ``(column_id, subject)``: ``subject`` is None for per-column keys. The scope index maps a
scope to the key id of its current ENABLED version and is only a pointer into the LRU: when a key is
evicted, expires or is invalidated, its scope pointer goes with it.

``generation`` changes on every invalidation. A loader records it before reading the keystore and
passes it to :meth:`KeyCache.put`; if an invalidation arrived meanwhile the loaded key is not cached,
so a NOTIFY that races a load cannot be undone by the load finishing late.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from keymgmt.envelope import DataKey, KeyState

Scope = tuple[str, bytes | None]


@dataclass(slots=True)
class _Entry:
    key: DataKey
    loaded_at: float


class KeyCache:
    """Bounded LRU of :class:`DataKey` by key id; entries older than ``ttl_seconds`` are misses."""

    def __init__(self, max_keys: int, ttl_seconds: float, clock: Callable[[], float]) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        self.max_keys = max_keys
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._keys: OrderedDict[bytes, _Entry] = OrderedDict()
        self._current: dict[Scope, bytes] = {}
        self.generation = 0

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KeyCache(keys={len(self._keys)}, max_keys={self.max_keys}, ttl_seconds={self.ttl_seconds})"

    def get(self, key_id: bytes) -> DataKey | None:
        entry = self._keys.get(key_id)
        if entry is None:
            return None
        if self._clock() - entry.loaded_at >= self.ttl_seconds:
            self._drop(key_id)
            return None
        self._keys.move_to_end(key_id)
        return entry.key

    def get_current(self, column_id: str, subject: bytes | None = None) -> DataKey | None:
        scope = (column_id, subject)
        key_id = self._current.get(scope)
        if key_id is None:
            return None
        key = self.get(key_id)
        if key is None:
            self._current.pop(scope, None)
        return key

    def put(self, key: DataKey, *, current: bool, generation: int | None = None) -> bool:
        """Caches ``key`` (and, with ``current``, makes it its scope's current key).

        Returns False, caching nothing, when ``generation`` is given and an invalidation happened since.
        """
        if generation is not None and generation != self.generation:
            return False
        key_id = key.key_id
        self._keys[key_id] = _Entry(key, self._clock())
        self._keys.move_to_end(key_id)
        scope = (key.column_id, key.subject)
        if current and key.state is KeyState.ENABLED:
            self._current[scope] = key_id
        elif self._current.get(scope) == key_id:
            del self._current[scope]
        while len(self._keys) > self.max_keys:
            old_id, old = self._keys.popitem(last=False)
            self._forget_scope(old_id, old.key)
        return True

    def invalidate_key(self, key_id: bytes) -> None:
        self.generation += 1
        self._drop(key_id)

    def invalidate_column(self, column_id: str) -> None:
        """Forgets every version and every subject's keys of one column (a rotation or shred there)."""
        self.generation += 1
        for key_id in [k for k, e in self._keys.items() if e.key.column_id == column_id]:
            self._drop(key_id)
        for scope in [s for s in self._current if s[0] == column_id]:
            del self._current[scope]

    def clear(self) -> None:
        self.generation += 1
        self._keys.clear()
        self._current.clear()

    def _drop(self, key_id: bytes) -> None:
        entry = self._keys.pop(key_id, None)
        if entry is not None:
            self._forget_scope(key_id, entry.key)

    def _forget_scope(self, key_id: bytes, key: DataKey) -> None:
        scope = (key.column_id, key.subject)
        if self._current.get(scope) == key_id:
            del self._current[scope]
