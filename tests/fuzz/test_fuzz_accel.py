"""The bounded fuzz run of the test suite: the accelerator against the Python reference on arbitrary
bytes and on mutated valid runs (see accel_oracle.py; ``make fuzz`` runs the coverage-guided harness)."""

from __future__ import annotations

import pytest
from accel_oracle import check, seeds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keymgmt import envelope

pytestmark = pytest.mark.skipif(
    envelope._accel is None, reason="the accelerator is not loaded (not built, or PGVEIL_IMPL=python)"
)

SEEDS = seeds()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_arbitrary_bytes(raw: bytes) -> None:
    check(raw)


@st.composite
def mutated_seeds(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        edit = draw(st.integers(0, 3))
        at = draw(st.integers(1, max(1, len(raw) - 1)))
        if edit == 0 and at < len(raw):
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == 1:
            del raw[at : at + draw(st.integers(1, 8))]
        elif edit == 2:
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif at + 4 <= len(raw):
            raw[at : at + 4] = draw(st.integers(-(2**31), 2**31 - 1)).to_bytes(4, "big", signed=True)
    return bytes(raw)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_seeds())
def test_mutated_valid_runs(raw: bytes) -> None:
    check(raw)


def test_the_seeds_decrypt() -> None:
    """The seeds are valid runs, so the mutations start from the decrypting path, not from refusals."""
    from accel_oracle import PLANS, _python_outcome

    valid = [raw for raw in SEEDS if raw[0] < 0x80][::4]
    assert all(isinstance(_python_outcome(raw[1:], PLANS[raw[0] % len(PLANS)]), bytes) for raw in valid)
    for raw in SEEDS:
        check(raw)


def test_the_bind_seeds_seal() -> None:
    """Most Bind seeds are sealed by the native path (and some go to Python), so the mutations start
    from both; each agrees with the reference."""
    from accel_oracle import BIND_PLANS, reference_seal_bind

    binds = [raw for raw in SEEDS if raw[0] >= 0x80]
    outcomes = [reference_seal_bind(BIND_PLANS[(raw[0] & 0x7F) % len(BIND_PLANS)], raw[1:]) for raw in binds]
    assert sum(isinstance(o[0], bytes) for o in outcomes) > len(binds) // 2
    assert any(o == ("python",) for o in outcomes)
    for raw in binds:
        check(raw)
