"""The hot path's synchronous view of the keystore, and the asynchronous fetch behind a miss.

A lookup either returns a key from memory, raises :class:`~proxy.protocol.relay.KeyMiss` (the session
fetches the key and the relay retries the message), or reports the key as unavailable: a fetch that
failed is remembered for a few seconds, so a dead keystore or a destroyed key fails statements quickly
instead of looping. Nothing here logs key ids together with data.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from keymgmt.envelope import DataKey, KeyState, Subject, derive_key
from keymgmt.errors import KeyManagementError
from keymgmt.keycache import KeyCache
from proxy.errors import ProxyError, RefusalReason
from proxy.protocol.relay import KeyMiss

log = logging.getLogger(__name__)


class KeyUnavailable(ProxyError):
    """The keystore or key provider cannot supply the key a statement needs."""

    sqlstate = "58000"
    reason = RefusalReason.KEY_UNAVAILABLE


# The keystore scope of the ``hash`` mask's key: one DEK for every column (the column's id is part of what
# the HMAC authenticates), created on first use like a column's key and shared by every session and
# instance. Never used to seal: no column can have this id (a column id has three dotted parts).
MASK_KEY_SCOPE = "pgveil.mask"


class KeySource(Protocol):
    def cached_key(self, key_id: bytes) -> DataKey | None: ...
    def cached_active_key(self, column_id: str, subject: bytes | None = None) -> DataKey | None: ...
    async def key_by_id(self, key_id: bytes) -> DataKey: ...
    async def active_key(self, column_id: str, subject: bytes | None = None) -> DataKey: ...
    async def preload(self, column_ids: Iterable[str]) -> int: ...
    def cached_subject_key(self, subject: Subject) -> DataKey | None: ...
    async def subject_key(self, subject: Subject) -> DataKey: ...
    async def keys_by_ids(self, key_ids: Iterable[bytes]) -> int: ...


class KeyRing:
    def __init__(
        self,
        source: KeySource | None,
        *,
        negative_ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self._negative_ttl = negative_ttl
        self._clock = clock
        self._missing_ids: dict[bytes, float] = {}
        self._missing_columns: dict[str, float] = {}
        self._missing_subjects: dict[Subject, float] = {}
        self.hits = 0
        self.misses = 0
        self._derived: tuple[bytes, bytes] | None = None  # (key id, the mask's HMAC key derived from it)

    def _recently_missing(
        self, table: dict[bytes, float] | dict[str, float] | dict[Subject, float], key: bytes | str | Subject
    ) -> bool:
        until = table.get(key)  # type: ignore[arg-type]
        if until is None:
            return False
        if until < self._clock():
            del table[key]  # type: ignore[arg-type]
            return False
        return True

    def by_id(self, key_id: bytes) -> DataKey | None:
        """The key for ``key_id``, None if it is known to be unavailable (unknown, destroyed, keystore
        down), or KeyMiss when it should be fetched."""
        if self.source is not None:
            key = self.source.cached_key(key_id)
            if key is not None:
                self.hits += 1
                return key
        if self.source is None or self._recently_missing(self._missing_ids, key_id):
            return None
        self.misses += 1
        raise KeyMiss(key_id=bytes(key_id))

    def active(self, column_id: str) -> DataKey:
        """The column's current key for writing; KeyMiss to fetch it, KeyUnavailable if it cannot be had."""
        if self.source is not None:
            key = self.source.cached_active_key(column_id)
            if key is not None:
                self.hits += 1
                return key
        if self.source is None or self._recently_missing(self._missing_columns, column_id):
            raise KeyUnavailable(
                f"pgveil: the data key of column {column_id} is unavailable (keystore or key provider down?)"
            )
        self.misses += 1
        raise KeyMiss(column_id=column_id)

    def write_stamp(self, keys: Iterable[DataKey]) -> tuple[KeyCache, int, float] | None:
        """A stamp under which :meth:`active` keeps returning exactly these keys (just returned by it):
        the key cache, its epoch, and when the earliest of the keys was cached (for its TTL). None when the
        source has no such cache. See :meth:`stamp_holds`."""
        cache = getattr(self.source, "cache", None)
        if not isinstance(cache, KeyCache):
            return None
        return cache, cache.epoch, min((cache.loaded_at(k.key_id) for k in keys), default=-math.inf)

    def stamp_holds(self, stamp: tuple[KeyCache, int, float], lookups: int) -> bool:
        """Whether ``lookups`` calls of :meth:`active` would return the stamp's keys again (nothing in the
        cache changed and no key reached its TTL); they are then counted as the cache hits they replace."""
        cache, epoch, loaded_at = stamp
        if cache.epoch != epoch or not cache.fresh(loaded_at) or getattr(self.source, "cache", None) is not cache:
            return False
        self.hits += lookups
        cache.hits += lookups
        return True

    def subject(self, subject: Subject, column_id: str) -> DataKey:
        """The data subject's current key for writing a value of ``column_id``; KeyMiss to fetch it (the
        keystore creates its first version), KeyUnavailable if it cannot be had. Never a column's key."""
        if self.source is not None:
            key = self.source.cached_subject_key(subject)
            if key is not None:
                self.hits += 1
                return key
        if self.source is None or self._recently_missing(self._missing_subjects, subject):
            raise KeyUnavailable(
                f"pgveil: the data key of the data subject of a row of column {column_id} (subject kind "
                f"{subject.kind}) is unavailable (keystore or key provider down, or the subject was shredded?)"
            )
        self.misses += 1
        raise KeyMiss(column_id=column_id, subject=subject)

    def mask_key(self) -> bytes:
        """The ``hash`` mask's HMAC key (derived from the current key of :data:`MASK_KEY_SCOPE`); KeyMiss
        to fetch it (the keystore creates its first version), KeyUnavailable if it cannot be had."""
        key = self.active(MASK_KEY_SCOPE)
        if key.state is not KeyState.ENABLED:
            raise KeyUnavailable("pgveil: the key of the hash mask is not enabled")
        derived = self._derived
        if derived is None or derived[0] != key.key_id:
            derived = self._derived = (bytes(key.key_id), derive_key(key, MASK_KEY_SCOPE.encode("ascii")))
        return derived[1]

    def missing(self, key_ids: Iterable[bytes]) -> tuple[bytes, ...]:
        """Those of ``key_ids`` that are not in memory (and not known to be unavailable), each once."""
        if self.source is None:
            return ()
        cached = self.source.cached_key
        out = {
            bytes(k): None
            for k in key_ids
            if cached(k) is None and not self._recently_missing(self._missing_ids, bytes(k))
        }
        return tuple(out)

    async def fetch(
        self,
        *,
        key_id: bytes | None = None,
        column_id: str | None = None,
        subject: object = None,
        key_ids: tuple[bytes, ...] = (),
    ) -> bool:
        """Loads a missing key into the keystore's cache; remembers a failure for ``negative_ttl``.
        ``subject`` (a :class:`~keymgmt.envelope.Subject`) asks for that data subject's key; ``key_ids``
        for more keys by id, in one keystore query (a result of many subjects' keys)."""
        if self.source is None:
            return False
        wanted_subject = subject if isinstance(subject, Subject) else None
        if key_ids:
            try:
                await self.source.keys_by_ids(key_ids)
            except (KeyManagementError, OSError) as e:
                log.warning("batched key fetch failed: %s", type(e).__name__)
            if key_id is not None and self.source.cached_key(key_id) is not None:
                return True
        try:
            if key_id is not None:
                await self.source.key_by_id(key_id)
            elif wanted_subject is not None:
                await self.source.subject_key(wanted_subject)
            elif column_id is not None:
                await self.source.active_key(column_id)
            return True
        except (KeyManagementError, OSError) as e:
            log.warning("key fetch failed: %s", type(e).__name__)
            until = self._clock() + self._negative_ttl
            if key_id is not None:
                self._missing_ids[bytes(key_id)] = until
            elif wanted_subject is not None:
                if len(self._missing_subjects) > 10_000:
                    self._missing_subjects.clear()
                self._missing_subjects[wanted_subject] = until
            elif column_id is not None:
                self._missing_columns[column_id] = until
            return False
