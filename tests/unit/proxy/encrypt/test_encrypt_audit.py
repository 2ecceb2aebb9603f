"""The engine's side of the access audit: values read counted per (label, column, outcome) per batch
of rows, handed to the audit at ReadyForQuery, and the anomaly refusal at statement decision time
(simple Query, Parse, and a Bind of a statement prepared before the anomaly was raised)."""

from __future__ import annotations

from encrypt_support import SCORE, SSN
from test_encrypt_visibility import (
    LAST4,
    Switchable,
    bind,
    parse_select,
    session,
    simple_select,
    sqlstate,
    stored_row,
)

from proxy.audit import AccessAudit
from proxy.config.types import AnomalyRule
from proxy.encrypt.engine import PortalCrypto, SessionCrypto

RULE = AnomalyRule(role="support", column=SSN.column_id, plaintext_per_minute=60, refuse=True)  # 60 per 60 s


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


def audited(source: Switchable | None = None) -> tuple[SessionCrypto, AccessAudit, Clock]:
    crypto, _ = session(source)
    clock = Clock()
    audit = AccessAudit((RULE,), (SSN.column_id, SCORE.column_id), window_seconds=60, clock=clock)
    crypto.audit = audit.session(5, "agent")
    return crypto, audit, clock


def test_values_read_are_counted_per_column_and_outcome_per_batch() -> None:
    crypto, _ = session(Switchable(grants={SCORE.column_id: LAST4}))
    simple_select(crypto, stored_row(), stored_row(), (b"9", None, None))
    assert crypto.values_read == {
        ("support", SSN.column_id, "plaintext"): 3,
        ("support", SCORE.column_id, "masked"): 3,
    }
    assert crypto.values_served == {("support", "plaintext"): 3, ("support", "masked"): 3}


def test_ready_for_query_hands_the_counts_to_the_audit() -> None:
    crypto, audit, _ = audited()
    simple_select(crypto, stored_row(), stored_row())
    crypto.ready_for_query(b"I")
    assert crypto.values_read == {}
    records = {(r.session_id, r.login_role, r.policy_role, r.column, r.outcome): r.count for r in audit.drain()}
    assert records == {
        (5, "agent", "support", SSN.column_id, "plaintext"): 2,
        (5, "agent", "support", SCORE.column_id, "plaintext"): 2,
    }


def test_an_anomaly_refuses_the_next_statements_and_a_prepared_statements_bind() -> None:
    crypto, audit, clock = audited()
    stmt = parse_select(crypto)  # prepared before the anomaly
    simple_select(crypto, *[stored_row()] * 61)
    crypto.ready_for_query(b"I")
    assert audit.active("support", SSN.column_id)
    out = crypto.query("SELECT id, ssn, score FROM customers")
    assert sqlstate(out.refusal) == "53400"
    assert sqlstate(crypto.query("SELECT ssn FROM customers").refusal) == "53400"
    assert crypto.query("SELECT id, score FROM customers").refusal is None  # another column
    refused = bind(crypto, stmt)
    assert isinstance(refused, bytes)
    assert sqlstate(refused) == "53400"
    clock.t += 60
    assert crypto.query("SELECT ssn FROM customers").refusal is None
    assert isinstance(bind(crypto, stmt), PortalCrypto)


def test_a_masked_role_is_never_refused_by_a_plaintext_rule() -> None:
    crypto, audit, _ = audited(Switchable(grants={SSN.column_id: LAST4}))
    audit.record(1, "other", frozenset({"support"}), {("support", SSN.column_id, "plaintext"): 100})
    assert audit.active("support", SSN.column_id)
    assert crypto.query("SELECT ssn FROM customers").refusal is None
