"""The visibility policy's metrics: values served per role and outcome (labels bounded by the policy's
role names), policy reloads, and the role-membership reads read from the policy runtime at scrape time."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from proxy.admin.metrics import Metrics


def samples(m: Metrics, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = m.render()[0].decode()
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == family:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_values_served_role_labels_come_only_from_the_policy() -> None:
    m = Metrics("t", process_metrics=False)
    m.set_policy_roles(frozenset({"billing", "support"}))
    m.add_served({("billing", "plaintext"): 3, ("support", "masked"): 2, ("mallory", "hidden"): 4})
    m.add_served({("support", "match"): 1, ("eve", "hidden"): 1, ("billing", "ciphertext"): 0})
    m.add_served({("billing", "exfiltrated"): 9})  # not an outcome: never a label value
    got = samples(m, "pgveil_values_served_total")
    assert got == {
        (("outcome", "plaintext"), ("role", "billing")): 3,
        (("outcome", "masked"), ("role", "support")): 3,
        (("outcome", "hidden"), ("role", "default")): 5,
    }


def test_a_role_dropped_from_the_policy_counts_as_default_afterwards() -> None:
    m = Metrics("t", process_metrics=False)
    m.set_policy_roles(frozenset({"contractor"}))
    m.add_served({("contractor", "hidden"): 1})
    m.set_policy_roles(frozenset())
    m.add_served({("contractor", "hidden"): 1})
    got = samples(m, "pgveil_values_served_total")
    assert got[(("outcome", "hidden"), ("role", "contractor"))] == 1
    assert got[(("outcome", "hidden"), ("role", "default"))] == 1


def test_policy_reloads_by_result() -> None:
    m = Metrics("t", process_metrics=False)
    m.policy_reloaded(True)
    m.policy_reloaded(False)
    m.policy_reloaded(False)
    got = samples(m, "pgveil_policy_reloads_total")
    assert got == {(("result", "success"),): 1, (("result", "failure"),): 2}


@dataclass
class _Membership:
    membership_reads: int = 0
    membership_read_failures: int = 0
    membership_changes: int = 0


def test_membership_reads_are_read_at_scrape_time() -> None:
    m = Metrics("t", process_metrics=False)
    assert samples(m, "pgveil_role_membership_reads_total") == {
        (("result", "success"),): 0,
        (("result", "failure"),): 0,
    }
    src = _Membership()
    m.watch_membership(src)
    src.membership_reads, src.membership_read_failures, src.membership_changes = 7, 2, 3
    assert samples(m, "pgveil_role_membership_reads_total") == {
        (("result", "success"),): 7,
        (("result", "failure"),): 2,
    }
    assert samples(m, "pgveil_role_membership_changes_total") == {(): 3}
