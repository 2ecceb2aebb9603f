"""The per-statement decision over the references a statement makes, for a role's grants."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import ProxyError, RefusalReason
from proxy.policy.decide import PolicyDenied, decide
from proxy.policy.model import Grant, Mask, MaskFunction, Reference, ReferenceKind, Visibility
from proxy.policy.rules import Policy, RoleRules, Rule, make_grant, parse_pattern, parse_visibility
from proxy.rewrite.catalog import ProtectedColumn

EMAIL = ProtectedColumn(schema="public", table="customers", name="email", declared_type="text")
SSN = ProtectedColumn(schema="public", table="customers", name="ssn", declared_type="text")
PHONE = ProtectedColumn(schema="public", table="customers", name="phone", declared_type="text", encrypted=False)
TOTAL = ProtectedColumn(schema="public", table="orders", name="total", declared_type="numeric", encrypted=False)
COLUMNS = (EMAIL, SSN, PHONE, TOTAL)


@dataclass(frozen=True)
class FakeView:
    """A RoleView with given grants (by column_id); everything else hidden."""

    grants: Mapping[str, Grant]
    login_role: str = "support"
    epoch: int = 1
    label: str = "support"

    def grant(self, column: ProtectedColumn) -> Grant:
        return self.grants.get(column.column_id, Grant(Visibility.HIDDEN))


def g(text: str, source: str = "support: public.customers.*") -> Grant:
    visibility, mask = parse_visibility(text)
    return make_grant(visibility, mask, source)


def ref(column: ProtectedColumn, kind: ReferenceKind, construct: str) -> Reference:
    return Reference(column, kind, construct)


SUPPORT = Policy(
    roles=(
        RoleRules(
            "support",
            (
                Rule(parse_pattern("public.customers.email"), g("plaintext", "support: public.customers.email")),
                Rule(parse_pattern("public.customers.ssn"), g("masked:last4", "support: public.customers.ssn")),
                Rule(parse_pattern("public.customers.phone"), g("match", "support: public.customers.phone")),
            ),
        ),
        RoleRules(
            "contractor", (Rule(parse_pattern("public.customers.*"), g("deny", "contractor: public.customers.*")),)
        ),
        RoleRules("backup", (Rule(parse_pattern("*"), g("ciphertext", "backup: *")),)),
    ),
    column_ids=frozenset(c.column_id for c in COLUMNS),
)


def test_a_predicate_on_a_masked_column_is_refused_with_42501() -> None:
    view = SUPPORT.view("support", frozenset(), epoch=1)
    error = decide([ref(SSN, ReferenceKind.OUTPUT, "SELECT"), ref(SSN, ReferenceKind.EXPRESSION, "LIKE")], view)
    assert isinstance(error, PolicyDenied)
    assert (error.sqlstate, error.reason) == ("42501", RefusalReason.POLICY_DENIED)
    assert error.message == (
        "pgveil: permission denied for column public.customers.ssn: LIKE needs plaintext access "
        "(role support sees it masked)"
    )
    assert error.hint == "the grant comes from the pgveil policy: support: public.customers.ssn"


def test_what_a_role_may_do_with_what_it_sees() -> None:
    view = SUPPORT.view("support", frozenset(), epoch=1)
    allowed = [
        ref(EMAIL, ReferenceKind.EXPRESSION, "ORDER BY"),  # plaintext: anything
        ref(EMAIL, ReferenceKind.EQUALITY, "WHERE"),
        ref(SSN, ReferenceKind.OUTPUT, "SELECT *"),  # masked in the result
        ref(SSN, ReferenceKind.WRITE, "UPDATE SET"),  # may write what it may not read
        ref(TOTAL, ReferenceKind.OUTPUT, "RETURNING"),  # hidden (the default): NULL in the result
        ref(TOTAL, ReferenceKind.WRITE, "INSERT"),
    ]
    assert decide(allowed, view) is None
    assert decide([], view) is None


def test_match_is_masked_until_the_column_is_searchable() -> None:
    view = SUPPORT.view("support", frozenset(), epoch=1)
    assert decide([ref(PHONE, ReferenceKind.OUTPUT, "SELECT")], view) is None
    error = decide([ref(PHONE, ReferenceKind.EQUALITY, "WHERE =")], view)
    assert error is not None
    assert error.message == (
        "pgveil: permission denied for column public.customers.phone: WHERE = needs plaintext access "
        "(role support sees it masked; match allows equality only on a searchable column)"
    )


def test_deny_refuses_any_reference_and_is_reported_first() -> None:
    view = SUPPORT.view("contractor", frozenset(), epoch=1)
    for kind in ReferenceKind:
        error = decide([ref(SSN, kind, "SELECT *")], view)
        assert isinstance(error, PolicyDenied)
        assert error.message == (
            "pgveil: permission denied for column public.customers.ssn: the column is denied to role contractor "
            "(SELECT *)"
        )
    both = decide(
        [ref(TOTAL, ReferenceKind.EXPRESSION, "GROUP BY"), ref(EMAIL, ReferenceKind.OUTPUT, "SELECT *")], view
    )
    assert both is not None
    assert "column public.customers.email: the column is denied to role contractor (SELECT *)" in both.message
    # A member of support too: the most permissive grant wins, nothing is denied any more.
    assert (
        decide([ref(EMAIL, ReferenceKind.EXPRESSION, "lower()")], SUPPORT.view("contractor", frozenset({"support"}), 1))
        is None
    )


def test_what_each_grant_says_the_role_sees() -> None:
    for text, sees in (("hidden", "hidden"), ("ciphertext", "as ciphertext"), ("masked:hash", "masked")):
        error = decide([ref(SSN, ReferenceKind.EXPRESSION, "ORDER BY")], FakeView({SSN.column_id: g(text)}))
        assert error is not None
        assert error.message.endswith(f"ORDER BY needs plaintext access (role support sees it {sees})")


def test_a_partition_column_is_named_with_its_configured_column() -> None:
    partition = ProtectedColumn(
        schema="public", table="customers_2024", name="ssn", declared_type="text", identity="public.customers.ssn"
    )
    error = decide([ref(partition, ReferenceKind.EXPRESSION, "ORDER BY")], SUPPORT.view("support", frozenset(), 1))
    assert error is not None
    assert error.message.startswith(
        "pgveil: permission denied for column public.customers_2024.ssn (of public.customers.ssn): ORDER BY"
    )


# -- for random grants and references, the decision follows the rules ----------------------------------------

GRANTS = st.sampled_from(
    [
        Grant(Visibility.PLAINTEXT, source="r"),
        Grant(Visibility.MATCH, Mask(MaskFunction.PARTIAL), source="r"),
        Grant(Visibility.MASKED, Mask(MaskFunction.LAST4), source="r"),
        Grant(Visibility.MASKED, Mask(MaskFunction.FIXED, "x"), source="r"),
        Grant(Visibility.CIPHERTEXT, source="r"),
        Grant(Visibility.HIDDEN, source="r"),
        Grant(Visibility.DENY, source="r"),
    ]
)
REFERENCES = st.lists(
    st.builds(
        Reference,
        st.sampled_from(COLUMNS),
        st.sampled_from(list(ReferenceKind)),
        st.sampled_from(["SELECT", "SELECT *", "WHERE", "ORDER BY", "JOIN", "lower()", "INSERT", "COPY TO"]),
    ),
    max_size=8,
)


@given(st.fixed_dictionaries({c.column_id: GRANTS for c in COLUMNS}), REFERENCES)
def test_the_decision_follows_the_rules(grants: dict[str, Grant], references: list[Reference]) -> None:
    view = FakeView(grants)
    error = decide(references, view)
    seen = [(r, grants[r.column.column_id].visibility) for r in references]
    denied = [r for r, v in seen if v is Visibility.DENY]
    oracle = [
        r
        for r, v in seen
        if r.kind in (ReferenceKind.EXPRESSION, ReferenceKind.EQUALITY) and v is not Visibility.PLAINTEXT
    ]
    if not denied and not oracle:
        # OUTPUT and WRITE of anything not denied, and anything at all on plaintext, are allowed.
        assert error is None
        return
    assert isinstance(error, PolicyDenied)
    assert isinstance(error, ProxyError)
    assert (error.sqlstate, error.reason) == ("42501", RefusalReason.POLICY_DENIED)
    culprit = denied[0] if denied else oracle[0]
    assert f"column {culprit.column.column_id}: " in error.message
    assert (
        f"({culprit.construct})" in error.message
        if denied
        else f": {culprit.construct} needs plaintext" in error.message
    )
    assert "role support" in error.message
