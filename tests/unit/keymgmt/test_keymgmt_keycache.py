from __future__ import annotations

import itertools

import pytest

from keymgmt.envelope import DataKey, KeyState
from keymgmt.keycache import KeyCache, KeyFacts, RefreshGate, RefreshResult, Scope


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


# -- refresh: a hint re-reads state; exactly what changed is dropped ---------------------------------------
def facts_of(*keys: DataKey) -> dict[bytes, KeyFacts]:
    return {k.key_id: KeyFacts.of(k) for k in keys}


def test_refresh_drops_exactly_the_changed_keys() -> None:
    cache = KeyCache(max_keys=10, ttl_seconds=60, clock=FakeClock())
    same, disabled, gone, moved = make_key(1), make_key(2, "s.t.d"), make_key(3, "s.t.e"), make_key(4, "s.t.f")
    for k in (same, disabled, gone, moved):
        cache.put(k, current=True)
    snapshot = cache.begin_refresh()
    assert set(snapshot.key_ids) == {k.key_id for k in (same, disabled, gone, moved)}
    facts = facts_of(same, moved)
    facts[disabled.key_id] = KeyFacts(KeyState.DISABLED, "s.t.d", None, 1)
    facts[moved.key_id] = KeyFacts(KeyState.ENABLED, "s.t.f", None, 7)  # the row says another version
    current: dict[Scope, bytes | None] = {("s.t.c", None): same.key_id, ("s.t.d", None): None}
    result = cache.apply_refresh(snapshot, facts, current)
    assert result == RefreshResult(keys_checked=4, keys_dropped=3, pointers_dropped=0)
    assert cache.get(same.key_id) is same
    assert cache.get_current("s.t.c") is same
    for k in (disabled, gone, moved):
        assert cache.get(k.key_id) is None
        assert cache.get_current(k.column_id) is None
    assert cache.invalidations == 3
    assert cache.flushes == 0


def test_refresh_drops_a_pointer_whose_scope_moved_on_but_keeps_the_key() -> None:
    cache = KeyCache(max_keys=10, ttl_seconds=60, clock=FakeClock())
    v1 = make_key(1)
    alice = make_key(2, subject=b"alice")
    cache.put(v1, current=True)
    cache.put(alice, current=True)
    snapshot = cache.begin_refresh()
    new_version = (9).to_bytes(16, "big")
    current: dict[Scope, bytes | None] = {("s.t.c", None): new_version, ("s.t.c", b"alice"): alice.key_id}
    result = cache.apply_refresh(snapshot, facts_of(v1, alice), current)
    assert result == RefreshResult(keys_checked=2, keys_dropped=0, pointers_dropped=1)
    assert cache.get(v1.key_id) is v1  # still good for reading old ciphertexts
    assert cache.get_current("s.t.c") is None  # writes look the current version up again
    assert cache.get_current("s.t.c", b"alice") is alice


def test_refresh_fences_loads_that_started_before_it() -> None:
    cache = KeyCache(max_keys=10, ttl_seconds=60, clock=FakeClock())
    before = cache.generation
    cache.begin_refresh()
    # a load that read the keystore before the refresh started may hold the state from before the change
    assert not cache.put(make_key(1), current=True, generation=before)
    assert cache.put(make_key(2), current=True, generation=cache.generation)


def test_refresh_leaves_entries_cached_after_the_snapshot_alone() -> None:
    cache = KeyCache(max_keys=10, ttl_seconds=60, clock=FakeClock())
    old = make_key(1)
    cache.put(old, current=True)
    snapshot = cache.begin_refresh()
    later = make_key(2, "s.t.other")
    cache.put(later, current=True, generation=cache.generation)  # loaded fresh after the refresh began
    result = cache.apply_refresh(snapshot, {}, {})
    assert result.keys_dropped == 1
    assert cache.get(later.key_id) is later
    assert cache.get_current("s.t.other") is later


def test_counters_move() -> None:
    clock = FakeClock()
    cache = KeyCache(max_keys=2, ttl_seconds=30, clock=clock)
    a, b, c = make_key(1), make_key(2), make_key(3)
    assert cache.get(a.key_id) is None
    cache.put(a, current=False)
    cache.put(b, current=False)
    cache.put(c, current=False)  # evicts a
    assert cache.get(b.key_id) is b
    clock.now += 31
    assert cache.get(c.key_id) is None  # expired
    cache.put(a, current=False)
    cache.invalidate_key(a.key_id)
    cache.invalidate_key(a.key_id)  # nothing left to drop: not counted twice
    cache.clear()
    assert (cache.hits, cache.misses, cache.evictions, cache.expirations, cache.invalidations, cache.flushes) == (
        1,
        2,
        1,
        1,
        1,
        1,
    )


# -- the refresh gate: coalesced and rate-limited, whatever the number of hints ---------------------------
def test_gate_coalesces_a_flood_into_one_running_and_one_queued() -> None:
    clock = FakeClock()
    gate = RefreshGate(0.5, clock)
    assert gate.wait() is None
    gate.hint()
    assert gate.wait() == 0.0
    gate.start()
    for _ in range(10_000):
        gate.hint()
    assert gate.wait() is None  # one is running: nothing else starts
    gate.finish()
    assert gate.queued
    assert gate.wait() == 0.5  # the queued one waits out the interval
    clock.now += 0.2
    assert gate.wait() == pytest.approx(0.3)
    with pytest.raises(RuntimeError):
        gate.start()
    clock.now += 0.3
    gate.start()
    gate.finish()
    assert gate.wait() is None  # the flood is fully served by two refreshes
    assert (gate.hints, gate.coalesced, gate.started) == (10_001, 9_999, 2)


def test_gate_bounds_refreshes_per_second_under_a_steady_flood() -> None:
    clock = FakeClock()
    gate = RefreshGate(0.1, clock)
    started_at: list[float] = []
    t0 = clock.now
    while clock.now < t0 + 10:
        gate.hint()
        wait = gate.wait()
        if wait == 0.0:
            gate.start()
            started_at.append(clock.now)
            gate.finish()
        clock.now += 0.001
    assert len(started_at) <= 10 / 0.1 + 1
    assert all(b - a >= 0.1 - 1e-9 for a, b in itertools.pairwise(started_at))


# -- epoch: what a caller reusing a found key relies on ------------------------------------------------------
def test_the_epoch_moves_on_every_change_and_only_then() -> None:
    """Every way what get/get_current return can change (other than by the clock) moves the epoch; hits,
    misses and reading the TTL do not."""
    clock = FakeClock()
    cache = KeyCache(max_keys=3, ttl_seconds=30, clock=clock)
    a, b, alice = make_key(1), make_key(2, "s.t.d"), make_key(3, subject=b"alice")
    epochs = [cache.epoch]

    def moved() -> bool:
        epochs.append(cache.epoch)
        return epochs[-1] != epochs[-2]

    cache.put(a, current=True)
    assert moved()
    cache.put(b, current=True)
    assert moved()
    for _ in range(3):  # hits and misses change nothing
        assert cache.get(a.key_id) is a
        assert cache.get_current("s.t.c") is a
        assert cache.get(b"\x00" * 16) is None
        assert cache.get_current("s.t.c", b"nobody") is None
        assert cache.fresh(cache.loaded_at(a.key_id))
    assert not moved()
    cache.put(a, current=False)  # the same key no longer current: its pointer goes
    assert moved()
    assert cache.get_current("s.t.c") is None
    cache.put(a, current=True)
    cache.put(alice, current=True)
    moved()
    cache.invalidate_key(a.key_id)
    assert moved()
    cache.invalidate_key(a.key_id)  # nothing left to drop
    assert not moved()
    cache.put(a, current=True)
    moved()
    cache.invalidate_column("s.t.c")  # a and alice's key
    assert moved()
    cache.invalidate_column("s.t.nothing")
    assert not moved()
    cache.put(a, current=True)
    moved()
    snapshot = cache.begin_refresh()
    assert not moved()  # a snapshot changes nothing yet
    cache.apply_refresh(snapshot, facts_of(a, b), {("s.t.c", None): a.key_id, ("s.t.d", None): b.key_id})
    assert not moved()  # nothing changed in the keystore
    snapshot = cache.begin_refresh()
    cache.apply_refresh(snapshot, facts_of(a, b), {("s.t.c", None): (9).to_bytes(16, "big"), ("s.t.d", None): b.key_id})
    assert moved()  # a's pointer dropped, a itself kept for reading
    assert cache.get(a.key_id) is a
    cache.put(a, current=True)
    moved()
    clock.now += 31
    assert cache.get_current("s.t.c") is None  # expired: entry and pointer dropped
    assert moved()
    cache.put(a, current=True)
    moved()
    for n in range(4, 8):  # evictions come with a put
        cache.put(make_key(n, f"s.t.e{n}"), current=True)
        assert moved()
    cache.clear()
    assert moved()
    cache.clear()
    assert moved()


def test_fresh_follows_the_ttl_as_get_does_even_when_tightened() -> None:
    clock = FakeClock()
    cache = KeyCache(max_keys=10, ttl_seconds=300, clock=clock)
    key = make_key(1)
    cache.put(key, current=True)
    loaded = cache.loaded_at(key.key_id)
    assert loaded == clock.now
    assert cache.loaded_at(b"\x00" * 16) == float("-inf")
    assert not cache.fresh(cache.loaded_at(b"\x00" * 16))
    clock.now += 2
    assert cache.fresh(loaded)
    cache.ttl_seconds = 1.0
    assert not cache.fresh(loaded)
    assert cache.get(key.key_id) is None
