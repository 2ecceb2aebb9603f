"""The in-memory cache of unwrapped data keys: bounded LRU with a TTL, plus "current key per scope".

Pure and synchronous (the clock is injected), so the proxy's hot path can look a key up without
awaiting, and the eviction rules are tested without a database. It never fetches, unwraps or logs
keys; :mod:`keymgmt.keystore` fills it and tells it what to forget.

A scope is ``(column_id, subject)``: ``subject`` is None for per-column keys. The scope index maps a
scope to the key id of its current ENABLED version and is only a pointer into the LRU: when a key is
evicted, expires or is invalidated, its scope pointer goes with it.

``generation`` changes on every invalidation and at the start of every refresh. A loader records it
before reading the keystore and passes it to :meth:`KeyCache.put`; if an invalidation or a refresh
started meanwhile the loaded key is not cached, so a change that races a load cannot be undone by the
load finishing late (the refresh only checks keys that were cached when it started).

``epoch`` changes whenever what :meth:`KeyCache.get` or :meth:`KeyCache.get_current` would return can
change other than by the clock: every put, drop (invalidation, refresh, eviction, expiry), pointer change
and flush. While it stays the same, a key found by ``get_current`` is the one it would find again until
:meth:`KeyCache.fresh` says its entry is past its TTL, so a caller may reuse what it found instead of looking
up again (the native Bind rewrite, proxy/encrypt/bindseal.py).

Refresh: :meth:`KeyCache.begin_refresh` snapshots which keys and scope pointers are cached;
the keystore re-reads their state and :meth:`KeyCache.apply_refresh` drops exactly the keys whose
state, scope or version changed (or whose row is gone) and the pointers whose scope has another current
version now. :class:`RefreshGate` decides when refreshes run: any number of hints (notifications) make
at most one refresh run and one wait, and refreshes start at least ``min_interval`` apart, so a flood of
hints costs a bounded amount of keystore work per second.

Counters (plain ints, read by the metrics): ``hits``, ``misses``, ``evictions`` (the LRU bound),
``expirations`` (the TTL), ``invalidations`` (keys dropped because they changed or were named), and
``flushes`` (the whole cache dropped: listener lost or reconnected, a failed refresh, closing).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from keymgmt.envelope import DataKey, KeyState

Scope = tuple[str, bytes | None]


@dataclass(slots=True)
class _Entry:
    key: DataKey
    loaded_at: float


@dataclass(frozen=True, slots=True)
class KeyFacts:
    """What the keystore says about one key version now (never the key material)."""

    state: KeyState
    column_id: str
    subject: bytes | None
    version: int

    @classmethod
    def of(cls, key: DataKey) -> KeyFacts:
        return cls(key.state, key.column_id, key.subject, key.version)


@dataclass(frozen=True, slots=True)
class RefreshSnapshot:
    """The cached keys and scope pointers a refresh must re-read, taken when the refresh starts."""

    generation: int
    key_ids: tuple[bytes, ...]
    current: tuple[tuple[Scope, bytes], ...]  # (scope, key id it points to)

    @property
    def scopes(self) -> tuple[Scope, ...]:
        return tuple(scope for scope, _ in self.current)


@dataclass(frozen=True, slots=True)
class RefreshResult:
    keys_checked: int
    keys_dropped: int
    pointers_dropped: int


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
        self.epoch = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expirations = 0
        self.invalidations = 0
        self.flushes = 0

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KeyCache(keys={len(self._keys)}, max_keys={self.max_keys}, ttl_seconds={self.ttl_seconds})"

    def get(self, key_id: bytes) -> DataKey | None:
        entry = self._keys.get(key_id)
        if entry is None:
            self.misses += 1
            return None
        if self._clock() - entry.loaded_at >= self.ttl_seconds:
            self._drop(key_id)
            self.expirations += 1
            self.misses += 1
            return None
        self._keys.move_to_end(key_id)
        self.hits += 1
        return entry.key

    def loaded_at(self, key_id: bytes) -> float:
        """When ``key_id``'s entry was cached (its TTL runs from then); -inf when it is not cached."""
        entry = self._keys.get(key_id)
        return -math.inf if entry is None else entry.loaded_at

    def fresh(self, loaded_at: float) -> bool:
        """Whether an entry cached at ``loaded_at`` is still within the TTL (as :meth:`get` decides)."""
        return self._clock() - loaded_at < self.ttl_seconds

    def get_current(self, column_id: str, subject: bytes | None = None) -> DataKey | None:
        scope = (column_id, subject)
        key_id = self._current.get(scope)
        if key_id is None:
            return None
        key = self.get(key_id)
        if key is None and self._current.pop(scope, None) is not None:
            self.epoch += 1
        return key

    def put(self, key: DataKey, *, current: bool, generation: int | None = None) -> bool:
        """Caches ``key`` (and, with ``current``, makes it its scope's current key).

        Returns False, caching nothing, when ``generation`` is given and an invalidation happened since.
        """
        if generation is not None and generation != self.generation:
            return False
        self.epoch += 1
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
            self.evictions += 1
        return True

    def invalidate_key(self, key_id: bytes) -> None:
        self.generation += 1
        if self._drop(key_id):
            self.invalidations += 1

    def invalidate_column(self, column_id: str) -> None:
        """Forgets every version and every subject's keys of one column (a rotation or shred there)."""
        self.generation += 1
        for key_id in [k for k, e in self._keys.items() if e.key.column_id == column_id]:
            self._drop(key_id)
            self.invalidations += 1
        for scope in [s for s in self._current if s[0] == column_id]:
            del self._current[scope]
            self.epoch += 1

    def clear(self) -> None:
        self.generation += 1
        self.epoch += 1
        self._keys.clear()
        self._current.clear()
        self.flushes += 1

    def begin_refresh(self) -> RefreshSnapshot:
        """Starts a refresh: loads already under way will not be cached (they may have read the state
        from before the change), and the snapshot names everything the refresh must re-read."""
        self.generation += 1
        return RefreshSnapshot(self.generation, tuple(self._keys), tuple(self._current.items()))

    def apply_refresh(
        self,
        snapshot: RefreshSnapshot,
        facts: Mapping[bytes, KeyFacts],
        current: Mapping[Scope, bytes | None],
    ) -> RefreshResult:
        """Drops what the keystore's answer shows to have changed since the keys were cached.

        ``facts`` holds the keystore's rows for the snapshot's key ids (a missing id: the row is gone);
        ``current`` maps each snapshot scope to the key id of its highest version if that version is
        ENABLED, else None (destroyed, disabled, or no row)."""
        dropped = 0
        for key_id in snapshot.key_ids:
            entry = self._keys.get(key_id)
            if entry is None:
                continue
            now = facts.get(key_id)
            if now is None or now != KeyFacts.of(entry.key):
                self._drop(key_id)
                dropped += 1
        pointers = 0
        for scope, key_id in snapshot.current:
            if self._current.get(scope) == key_id and current.get(scope) != key_id:
                del self._current[scope]
                self.epoch += 1
                pointers += 1
        self.invalidations += dropped
        return RefreshResult(len(snapshot.key_ids), dropped, pointers)

    def _drop(self, key_id: bytes) -> bool:
        entry = self._keys.pop(key_id, None)
        if entry is None:
            return False
        self.epoch += 1
        self._forget_scope(key_id, entry.key)
        return True

    def _forget_scope(self, key_id: bytes, key: DataKey) -> None:
        scope = (key.column_id, key.subject)
        if self._current.get(scope) == key_id:
            del self._current[scope]


class RefreshGate:
    """When refreshes run: a pure schedule the keystore's refresh task follows (clock injected).

    :meth:`hint` records a reason to refresh; :meth:`wait` says how long until one may start (None when
    none is queued or one is running); :meth:`start` and :meth:`finish` bracket a refresh. However many
    hints arrive, at most one refresh runs and one is queued, and two starts are ``min_interval`` apart.
    """

    def __init__(self, min_interval: float, clock: Callable[[], float]) -> None:
        if min_interval < 0:
            raise ValueError("min_interval must not be negative")
        self.min_interval = min_interval
        self._clock = clock
        self.running = False
        self.queued = False
        self._last_start = -math.inf
        self.hints = 0
        self.coalesced = 0  # hints that found a refresh already queued
        self.started = 0

    def __repr__(self) -> str:
        return f"RefreshGate(running={self.running}, queued={self.queued}, started={self.started})"

    def hint(self) -> None:
        self.hints += 1
        if self.queued:
            self.coalesced += 1
        self.queued = True

    def wait(self) -> float | None:
        if self.running or not self.queued:
            return None
        return max(0.0, self._last_start + self.min_interval - self._clock())

    def start(self) -> None:
        if self.wait() != 0.0:
            raise RuntimeError("no refresh may start now")
        self.running = True
        self.queued = False
        self._last_start = self._clock()
        self.started += 1

    def finish(self) -> None:
        self.running = False
