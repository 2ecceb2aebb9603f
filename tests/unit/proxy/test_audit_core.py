"""The access audit's pure core (proxy.audit): period totals, anomaly windows and the statement-time
refusal, with injected clocks."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.audit import BUCKETS, AccessAudit, AnomalyEnded, AnomalyRefused, AnomalyStarted, SessionAudit
from proxy.config.types import AnomalyRule
from proxy.errors import RefusalReason
from proxy.policy.model import Grant, Mask, MaskFunction, Visibility
from proxy.rewrite.catalog import ProtectedColumn

EMAIL = ProtectedColumn(schema="public", table="customers", name="email", declared_type="text", encrypted=True)
SSN = ProtectedColumn(schema="public", table="customers", name="ssn", declared_type="text", encrypted=True)
COLUMNS = (EMAIL.column_id, SSN.column_id, "public.orders.card")
PLAIN = Grant(Visibility.PLAINTEXT)
MASKED = Grant(Visibility.MASKED, Mask(MaskFunction.LAST4))


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass(frozen=True)
class View:
    """A RoleView with ``roles`` as a PolicyView has them."""

    label: str
    roles: frozenset[str]
    grants: dict[str, Grant]
    epoch: int = 1
    login_role: str = "sue"

    def grant(self, column: ProtectedColumn) -> Grant:
        return self.grants.get(column.column_id, PLAIN)


def audit(*rules: AnomalyRule, window: float = 12.0) -> tuple[AccessAudit, Clock, Clock]:
    mono, wall = Clock(), Clock(1_700_000_000.0)
    return AccessAudit(rules, COLUMNS, window_seconds=window, clock=mono, wall=wall), mono, wall


# -- period totals -----------------------------------------------------------------------------------------


def test_drain_sums_per_session_role_column_and_outcome_and_starts_a_new_period() -> None:
    a, _, wall = audit()
    a.record(1, "sue", frozenset({"support"}), {("support", EMAIL.column_id, "plaintext"): 3})
    a.record(1, "sue", frozenset({"support"}), {("support", EMAIL.column_id, "plaintext"): 4})
    a.record(
        2,
        "bill",
        frozenset({"billing"}),
        {("billing", SSN.column_id, "masked"): 2, ("billing", SSN.column_id, "hidden"): 0},
    )
    wall.t += 10
    records = a.drain()
    assert [(r.session_id, r.login_role, r.policy_role, r.column, r.outcome, r.count) for r in records] == [
        (1, "sue", "support", EMAIL.column_id, "plaintext", 7),
        (2, "bill", "billing", SSN.column_id, "masked", 2),
    ]
    assert {(r.period_start, r.period_end) for r in records} == {(1_700_000_000.0, 1_700_000_010.0)}
    wall.t += 5
    assert a.drain() == []
    a.record(1, "sue", frozenset({"support"}), {("support", EMAIL.column_id, "masked"): 1})
    (r,) = a.drain()
    assert (r.period_start, r.period_end) == (1_700_000_015.0, 1_700_000_015.0)


KEYS = st.tuples(
    st.integers(1, 3),
    st.sampled_from(["sue", "bill"]),
    st.sampled_from(["support", "billing", "default"]),
    st.sampled_from(COLUMNS),
    st.sampled_from(["plaintext", "masked", "hidden", "ciphertext"]),
)


@given(st.lists(st.tuples(KEYS, st.integers(0, 10_000)), max_size=40), st.lists(st.integers(0, 40), max_size=4))
def test_what_is_drained_is_exactly_what_was_recorded(
    calls: list[tuple[tuple[int, str, str, str, str], int]], cuts: list[int]
) -> None:
    a, _, wall = audit()
    drained: Counter[tuple[int, str, str, str, str]] = Counter()
    for i, ((sid, login, label, column, outcome), n) in enumerate(calls):
        if i in cuts:
            wall.t += 1
            for r in a.drain():
                drained[(r.session_id, r.login_role, r.policy_role, r.column, r.outcome)] += r.count
        a.record(sid, login, frozenset({label}), {(label, column, outcome): n})
    for r in a.drain():
        assert r.count > 0
        assert r.period_start <= r.period_end
        drained[(r.session_id, r.login_role, r.policy_role, r.column, r.outcome)] += r.count
    expected: Counter[tuple[int, str, str, str, str]] = Counter()
    for key, n in calls:
        if n:
            expected[key] += n
    assert drained == expected


# -- anomaly windows ---------------------------------------------------------------------------------------

RULE = AnomalyRule(role="support", column=EMAIL.column_id, plaintext_per_minute=50, refuse=True)  # 10 per 12 s


def plaintext(
    a: AccessAudit, n: int, *, roles: frozenset[str] = frozenset({"support"}), column: str = EMAIL.column_id
) -> None:
    a.record(1, "sue", roles, {("support", column, "plaintext"): n})


def test_reading_up_to_the_limit_is_no_anomaly_and_one_more_raises_it() -> None:
    a, mono, _ = audit(RULE)
    plaintext(a, 10)  # 50 per minute over 12 s: 10 allowed
    assert not a.active("support", EMAIL.column_id)
    assert a.events == []
    mono.t += 1
    plaintext(a, 1)
    assert a.active("support", EMAIL.column_id)
    assert a.events == [AnomalyStarted("support", EMAIL.column_id, 50, 12.0, 11, True)]
    assert a.refusing == 1
    plaintext(a, 5)  # still raised: no second event
    assert len(a.events) == 1


def test_masked_reads_and_other_columns_and_roles_do_not_count() -> None:
    a, _, _ = audit(RULE)
    a.record(1, "sue", frozenset({"support"}), {("support", EMAIL.column_id, "masked"): 1000})
    plaintext(a, 1000, column=SSN.column_id)
    plaintext(a, 1000, roles=frozenset({"billing"}))
    assert a.events == []
    assert not a.active("support", EMAIL.column_id)


def test_a_member_of_the_rule_role_counts_toward_it() -> None:
    a, _, _ = audit(RULE)
    a.record(1, "sue", frozenset({"sue", "support"}), {("sue", EMAIL.column_id, "plaintext"): 11})
    assert a.active("support", EMAIL.column_id)


def test_the_anomaly_ends_a_whole_window_after_the_limit_was_last_exceeded() -> None:
    a, mono, _ = audit(RULE)
    plaintext(a, 11)
    mono.t += 6
    plaintext(a, 1)  # exceeds again (12 in the window): the window starts over
    mono.t += 11.9
    a.tick()
    assert a.active("support", EMAIL.column_id)
    mono.t += 0.1
    assert not a.active("support", EMAIL.column_id)
    a.tick()
    assert a.events[-1] == AnomalyEnded("support", EMAIL.column_id)
    assert a.refusing == 0
    plaintext(a, 10)  # the burst has left the window: the limit applies afresh
    assert not a.active("support", EMAIL.column_id)


@settings(max_examples=200)
@given(st.lists(st.tuples(st.floats(0, 30), st.integers(0, 4)), max_size=50), st.integers(0, 100))
def test_never_raised_while_the_total_stays_within_the_limit(steps: list[tuple[float, int]], limit: int) -> None:
    rule = AnomalyRule(role="support", column=EMAIL.column_id, plaintext_per_minute=limit * 5)  # limit per 12 s
    a, mono, _ = audit(rule)
    total = 0
    for dt, n in steps:
        mono.t += dt
        total += n
        plaintext(a, n)
        if total <= limit:
            assert not a.active("support", EMAIL.column_id)
            assert a.events == []


@settings(max_examples=200)
@given(st.lists(st.tuples(st.floats(0, 30), st.integers(0, 40)), min_size=1, max_size=50))
def test_raised_exactly_while_a_window_holds_an_excess_and_for_one_window_after(steps: list[tuple[float, int]]) -> None:
    """A model of the window: the reads of the buckets of the last window; raised from a read that makes
    them exceed the limit until one window after the last such read."""
    a, mono, _ = audit(RULE)
    width = 12.0 / BUCKETS
    reads: list[tuple[int, int]] = []
    raised_until: float | None = None
    for dt, n in steps:
        mono.t += dt
        bucket = int(mono.t // width)
        if n:
            reads.append((bucket, n))
            in_window = sum(k for b, k in reads if b > bucket - BUCKETS)
            if in_window > 10:
                raised_until = mono.t + 12.0
        plaintext(a, n)
        expected = raised_until is not None and mono.t < raised_until
        assert a.active("support", EMAIL.column_id) is expected


def test_within_one_role_the_most_specific_pattern_decides() -> None:
    broad = AnomalyRule(role="support", column="public.customers.*", plaintext_per_minute=5)  # 1 per 12 s
    narrow = AnomalyRule(role="support", column=EMAIL.column_id, plaintext_per_minute=500)
    a, _, _ = audit(broad, narrow)
    plaintext(a, 50)
    assert not a.active("support", EMAIL.column_id)
    plaintext(a, 2, column=SSN.column_id)
    assert a.active("support", SSN.column_id)  # each column of the pattern counts on its own
    assert not a.refusing  # neither rule refuses


# -- the statement-time refusal ----------------------------------------------------------------------------


def test_a_refusing_anomaly_refuses_plaintext_outputs_of_that_column_with_53400() -> None:
    a, mono, _ = audit(RULE)
    s = SessionAudit(a, 7, "sue")
    support = View("support", frozenset({"support"}), {})
    assert s.refusal(support, [EMAIL, SSN]) is None
    assert not s.refusing
    plaintext(a, 11)
    e = s.refusal(support, [SSN, EMAIL])
    assert isinstance(e, AnomalyRefused)
    assert e.sqlstate == "53400"
    assert e.reason is RefusalReason.AUDIT_ANOMALY
    assert EMAIL.column_id in e.message
    assert "support" in e.message
    assert "50" in e.message
    assert s.refusal(support, [SSN]) is None  # another column
    assert s.refusal(View("support", frozenset({"support"}), {EMAIL.column_id: MASKED}), [EMAIL]) is None
    assert s.refusal(View("billing", frozenset({"billing"}), {}), [EMAIL]) is None
    mono.t += 12
    assert s.refusal(support, [EMAIL]) is None  # the window has passed


def test_a_flagging_rule_never_refuses() -> None:
    a, _, _ = audit(AnomalyRule(role="support", column=EMAIL.column_id, plaintext_per_minute=0))
    s = SessionAudit(a, 1, "sue")
    plaintext(a, 1)
    assert a.active("support", EMAIL.column_id)
    assert s.refusal(View("support", frozenset({"support"}), {}), [EMAIL]) is None


def test_take_hands_over_and_clears_the_counts_under_the_roles_of_the_last_view() -> None:
    a, _, _ = audit(RULE)
    s = a.session(3, "sue")
    s.refusal(View("sue", frozenset({"sue", "support"}), {}), [EMAIL])
    counts = {("sue", EMAIL.column_id, "plaintext"): 11}
    s.take(counts)
    assert counts == {}
    assert a.active("support", EMAIL.column_id)
    (r,) = a.drain()
    assert (r.session_id, r.login_role, r.policy_role, r.count) == (3, "sue", "sue", 11)


def test_window_seconds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window_seconds"):
        AccessAudit((), (), window_seconds=0)
