from __future__ import annotations

import pytest

from keymgmt.envelope import DataKey, KeyState
from keymgmt.keycache import KeyCache


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_key(n: int, column: str = "s.t.c", subject: bytes | None = None, version: int = 1) -> DataKey:
    return DataKey.from_material(
        n.to_bytes(16, "big"), bytes([n % 256]) * 32, column_id=column, subject=subject, version=version
    )


def test_lru_evicts_least_recently_used() -> None:
    cache = KeyCache(max_keys=2, ttl_seconds=60, clock=FakeClock())
    a, b, c = make_key(1), make_key(2), make_key(3)
    cache.put(a, current=False)
    cache.put(b, current=False)
    assert cache.get(a.key_id) is a  # a is now the most recent
    cache.put(c, current=False)
    assert cache.get(b.key_id) is None
    assert cache.get(a.key_id) is a
    assert cache.get(c.key_id) is c
    assert len(cache) == 2


def test_ttl_expiry_uses_the_injected_clock() -> None:
    clock = FakeClock()
    cache = KeyCache(max_keys=10, ttl_seconds=30, clock=clock)
    key = make_key(1)
    cache.put(key, current=True)
    clock.now += 29.9
    assert cache.get(key.key_id) is key
    assert cache.get_current("s.t.c") is key
    clock.now += 0.1
    assert cache.get(key.key_id) is None
    assert cache.get_current("s.t.c") is None
    assert len(cache) == 0


def test_ttl_can_be_tightened_for_existing_entries() -> None:
    clock = FakeClock()
    cache = KeyCache(max_keys=10, ttl_seconds=300, clock=clock)
    key = make_key(1)
    cache.put(key, current=False)
    clock.now += 2
    cache.ttl_seconds = 1.0
    assert cache.get(key.key_id) is None


def test_current_pointer_per_scope() -> None:
    cache = KeyCache(max_keys=10, ttl_seconds=60, clock=FakeClock())
    column = make_key(1)
    alice = make_key(2, subject=b"alice")
    bob = make_key(3, subject=b"bob")
    not_current = make_key(4, version=2)
    for key in (column, alice, bob):
        cache.put(key, current=True)
    cache.put(not_current, current=False)
    assert cache.get_current("s.t.c") is column
    assert cache.get_current("s.t.c", b"alice") is alice
    assert cache.get_current("s.t.c", b"bob") is bob
    assert cache.get_current("s.t.c", b"carol") is None
    assert cache.get_current("s.t.other") is None


def test_disabled_key_never_becomes_current() -> None:
    cache = KeyCache(max_keys=10, ttl_seconds=60, clock=FakeClock())
    key = make_key(1)
    cache.put(key, current=True)
    cache.put(key.with_state(KeyState.DISABLED), current=True)
    assert cache.get_current("s.t.c") is None
    assert cache.get(key.key_id) is not None


def test_eviction_drops_the_current_pointer() -> None:
    cache = KeyCache(max_keys=1, ttl_seconds=60, clock=FakeClock())
    first = make_key(1, column="a.b.c")
    cache.put(first, current=True)
    cache.put(make_key(2, column="x.y.z"), current=True)
    assert cache.get_current("a.b.c") is None
    # re-adding the evicted key without "current" must not resurrect its pointer
    cache.put(first, current=False)
    assert cache.get_current("a.b.c") is None


def test_invalidate_key() -> None:
    cache = KeyCache(max_keys=10, ttl_seconds=60, clock=FakeClock())
    a, b = make_key(1), make_key(2, subject=b"s")
    cache.put(a, current=True)
    cache.put(b, current=True)
    cache.invalidate_key(a.key_id)
    assert cache.get(a.key_id) is None
    assert cache.get_current("s.t.c") is None
    assert cache.get_current("s.t.c", b"s") is b


def test_invalidate_column_drops_all_versions_and_subjects() -> None:
    cache = KeyCache(max_keys=10, ttl_seconds=60, clock=FakeClock())
    keys = [make_key(1), make_key(2, version=2), make_key(3, subject=b"s")]
    other = make_key(4, column="s.t.other")
    for key in [*keys, other]:
        cache.put(key, current=True)
    cache.invalidate_column("s.t.c")
    assert all(cache.get(k.key_id) is None for k in keys)
    assert cache.get_current("s.t.c", b"s") is None
    assert cache.get(other.key_id) is other
    assert cache.get_current("s.t.other") is other


def test_put_after_an_invalidation_is_discarded() -> None:
    cache = KeyCache(max_keys=10, ttl_seconds=60, clock=FakeClock())
    key = make_key(1)
    generation = cache.generation  # a loader starts reading the keystore
    cache.invalidate_key(key.key_id)  # a shred is announced meanwhile
    assert cache.put(key, current=True, generation=generation) is False
    assert cache.get(key.key_id) is None
    assert cache.put(key, current=True, generation=cache.generation) is True
    assert cache.get_current("s.t.c") is key


def test_clear() -> None:
    cache = KeyCache(max_keys=10, ttl_seconds=60, clock=FakeClock())
    key = make_key(1)
    cache.put(key, current=True)
    before = cache.generation
    cache.clear()
    assert cache.generation > before
    assert len(cache) == 0
    assert cache.get_current("s.t.c") is None


def test_bounds_are_validated() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        KeyCache(max_keys=0, ttl_seconds=1, clock=FakeClock())
    with pytest.raises(ValueError, match="ttl_seconds"):
        KeyCache(max_keys=1, ttl_seconds=0, clock=FakeClock())
