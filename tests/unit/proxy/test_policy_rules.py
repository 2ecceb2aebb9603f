"""The policy as data: patterns, visibility strings, the most specific pattern within a role, the most
permissive grant across a login role's roles, the default only where no role covers a column."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.policy.model import Grant, Mask, MaskFunction, Visibility
from proxy.policy.rules import (
    Pattern,
    Policy,
    RoleRules,
    Rule,
    Specificity,
    make_grant,
    parse_pattern,
    parse_visibility,
    permissiveness,
)
from proxy.rewrite.catalog import ProtectedColumn

COLUMNS = frozenset(
    {
        "public.customers.email",
        "public.customers.ssn",
        "public.customers.phone",
        "public.orders.total",
        "billing.cards.pan",
    }
)


def col(column_id: str) -> ProtectedColumn:
    schema, table, name = column_id.split(".")
    return ProtectedColumn(schema=schema, table=table, name=name, declared_type="text")


def g(text: str, source: str = "test") -> Grant:
    visibility, mask = parse_visibility(text)
    return make_grant(visibility, mask, source)


def role(name: str, **rules: str) -> RoleRules:
    """``role("support", **{"public.customers.ssn": "masked:last4"})``."""
    return RoleRules(name, tuple(Rule(parse_pattern(p), g(v, f"{name}: {p}")) for p, v in rules.items()))


# -- patterns ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pattern", "specificity"),
    [
        ("*", Pattern(), Specificity.EVERYTHING),
        ("public.*", Pattern("public"), Specificity.SCHEMA),
        ("public.customers.*", Pattern("public", "customers"), Specificity.TABLE),
        ("public.customers.ssn", Pattern("public", "customers", "ssn"), Specificity.COLUMN),
        ("Public.Customers.SSN", Pattern("public", "customers", "ssn"), Specificity.COLUMN),
        (" public . customers . * ", Pattern("public", "customers"), Specificity.TABLE),
    ],
)
def test_patterns(text: str, pattern: Pattern, specificity: Specificity) -> None:
    assert parse_pattern(text) == pattern
    assert pattern.specificity is specificity
    assert parse_pattern(str(pattern)) == pattern


@pytest.mark.parametrize(
    "text",
    ["", "public", "public.customers", "*.customers.ssn", "public.*.ssn", "a.b.c.d", "public..ssn", "pub-lic.*", "**"],
)
def test_malformed_patterns_are_refused(text: str) -> None:
    with pytest.raises(
        ValueError, match=r"a pattern must be schema\.table\.column, schema\.table\.\*, schema\.\* or \*"
    ):
        parse_pattern(text)


def test_pattern_coverage() -> None:
    assert Pattern().covers("billing.cards.pan")
    assert Pattern("public").covers("public.customers.ssn")
    assert not Pattern("public").covers("billing.cards.pan")
    assert Pattern("public", "customers").covers("public.customers.ssn")
    assert not Pattern("public", "customers").covers("public.customers_archive.ssn")
    assert not Pattern("public", "customers", "ssn").covers("public.customers.ssn2")


# -- visibility strings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "visibility", "mask"),
    [
        ("plaintext", Visibility.PLAINTEXT, None),
        ("PlainText", Visibility.PLAINTEXT, None),
        ("hidden", Visibility.HIDDEN, None),
        ("ciphertext", Visibility.CIPHERTEXT, None),
        ("deny", Visibility.DENY, None),
        ("match", Visibility.MATCH, Mask(MaskFunction.PARTIAL)),
        ("match:email", Visibility.MATCH, Mask(MaskFunction.EMAIL)),
        ("masked:last4", Visibility.MASKED, Mask(MaskFunction.LAST4)),
        ("masked:HASH", Visibility.MASKED, Mask(MaskFunction.HASH)),
        ("masked:null", Visibility.MASKED, Mask(MaskFunction.NULL)),
        ("masked:fixed:N/A", Visibility.MASKED, Mask(MaskFunction.FIXED, "N/A")),
        ("masked:fixed:a:B c", Visibility.MASKED, Mask(MaskFunction.FIXED, "a:B c")),
        ("masked:fixed:", Visibility.MASKED, Mask(MaskFunction.FIXED, "")),
        (" masked : fixed: N/A ", Visibility.MASKED, Mask(MaskFunction.FIXED, " N/A ")),
        ("deny ", Visibility.DENY, None),
    ],
)
def test_visibility_strings(text: str, visibility: Visibility, mask: Mask | None) -> None:
    assert parse_visibility(text) == (visibility, mask)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "maskd",
            'unknown visibility "maskd"; expected one of plaintext, match, match:<function>, masked:<function>, '
            "hidden, ciphertext, deny (did you mean 'masked'?)",
        ),
        ("maskd:last4", "(did you mean 'masked:last4'?)"),
        ("plain", 'unknown visibility "plain"; expected one of'),
        ("masked", "masked needs a function: masked:<function>, the function one of last4, partial, email, hash,"),
        (
            "masked:lst4",
            'unknown mask function "lst4"; expected one of last4, partial, email, hash, fixed:<text>, null '
            "(did you mean 'last4'?)",
        ),
        ("masked:fixed", "mask fixed needs its text: fixed:<text>"),
        ("masked:last4:x", 'mask last4 takes no text, got "last4:x"'),
        ("hidden:null", 'hidden takes no function, got "hidden:null"'),
        ("deny:", 'deny takes no function, got "deny:"'),
    ],
)
def test_bad_visibility_strings(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_visibility(text)


def test_a_grant_has_a_mask_exactly_when_it_masks() -> None:
    with pytest.raises(ValueError, match="needs mask"):
        make_grant(Visibility.MASKED, None, "x")
    with pytest.raises(ValueError, match="takes no mask"):
        make_grant(Visibility.HIDDEN, Mask(MaskFunction.NULL), "x")


def test_permissiveness_follows_the_visibility_then_the_mask_order() -> None:
    texts = [
        "plaintext",
        "match:last4",
        "match:email",
        "match:partial",
        "masked:last4",
        "masked:email",
        "masked:partial",
        "masked:hash",
        "masked:fixed:x",
        "masked:null",
        "ciphertext",
        "hidden",
        "deny",
    ]
    grants = [g(t) for t in texts]
    assert sorted(reversed(grants), key=permissiveness) == grants


# -- one role: the most specific pattern -----------------------------------------------------------------


def test_the_most_specific_pattern_of_a_role_wins() -> None:
    support = role(
        "support",
        **{
            "*": "deny",
            "public.*": "hidden",
            "public.customers.*": "masked:partial",
            "public.customers.email": "plaintext",
        },
    )
    policy = Policy(roles=(support,), column_ids=COLUMNS)
    view = policy.view("support", frozenset(), epoch=1)
    assert {c: (gr.visibility, gr.source) for c, gr in view.grants.items()} == {
        "public.customers.email": (Visibility.PLAINTEXT, "support: public.customers.email"),
        "public.customers.ssn": (Visibility.MASKED, "support: public.customers.*"),
        "public.customers.phone": (Visibility.MASKED, "support: public.customers.*"),
        "public.orders.total": (Visibility.HIDDEN, "support: public.*"),
        "billing.cards.pan": (Visibility.DENY, "support: *"),
    }
    # The order the rules were written in does not matter.
    shuffled = RoleRules("support", tuple(reversed(support.rules)))
    assert shuffled == support


def test_a_pattern_twice_in_one_role_is_refused() -> None:
    rule = Rule(Pattern("public"), g("hidden"))
    with pytest.raises(ValueError, match="listed twice"):
        RoleRules("r", (rule, dataclasses.replace(rule, grant=g("plaintext"))))


# -- several roles: the most permissive grant; the default only where none covers -------------------------


ISSUE_POLICY = Policy(
    roles=(
        role("billing", **{"public.customers.*": "plaintext"}),
        role(
            "support",
            **{
                "public.customers.email": "plaintext",
                "public.customers.ssn": "masked:last4",
                "public.customers.phone": "masked:partial",
            },
        ),
        role("contractor", **{"public.customers.*": "deny"}),
        role("backup", **{"public.customers.*": "ciphertext"}),
        role("auditor", **{"public.customers.ssn": "masked:hash", "public.customers.*": "hidden"}),
    ),
    default=g("hidden", "default"),
    column_ids=COLUMNS,
)


def seen(view_role: str, *member_of: str) -> dict[str, str]:
    view = ISSUE_POLICY.view(view_role, frozenset(member_of), epoch=7)
    return {
        c.rpartition(".")[2]: str(gr.visibility) + (f":{gr.mask}" if gr.mask else "") for c, gr in view.grants.items()
    }


def test_each_role_of_the_issue_example() -> None:
    assert seen("billing") == {
        "email": "plaintext",
        "ssn": "plaintext",
        "phone": "plaintext",
        "total": "hidden",
        "pan": "hidden",
    }
    assert seen("support") == {
        "email": "plaintext",
        "ssn": "masked:last4",
        "phone": "masked:partial",
        "total": "hidden",
        "pan": "hidden",
    }
    assert seen("contractor") == {"email": "deny", "ssn": "deny", "phone": "deny", "total": "hidden", "pan": "hidden"}
    assert seen("backup")["ssn"] == "ciphertext"
    assert set(seen("somebody_else").values()) == {"hidden"}  # fmt: skip


def test_the_most_permissive_grant_of_the_role_set_wins() -> None:
    # A contractor who is also a member of support: deny only where nothing grants more.
    assert seen("contractor", "support") == seen("support")
    # Two masks: the mask order decides (last4 before hash).
    assert seen("auditor", "support")["ssn"] == "masked:last4"
    # The auditor's hidden covers phone, but support grants more.
    assert seen("auditor", "support")["phone"] == "masked:partial"
    assert seen("auditor")["phone"] == "hidden"
    # Memberships that the policy does not name change nothing.
    assert seen("support", "pg_read_all_data", "someone") == seen("support")


def test_the_default_applies_only_where_no_role_covers_the_column() -> None:
    lenient = dataclasses.replace(ISSUE_POLICY, default=g("plaintext", "default"))
    view = lenient.view("contractor", frozenset(), epoch=1)
    assert view.grant(col("public.customers.ssn")).visibility is Visibility.DENY  # covered: the default is not asked
    assert view.grant(col("public.orders.total")) == Grant(Visibility.PLAINTEXT, source="default")


def test_the_view_carries_the_login_role_the_epoch_and_a_bounded_label() -> None:
    view = ISSUE_POLICY.view("support", frozenset({"billing"}), epoch=3)
    assert (view.login_role, view.epoch, view.label, view.roles) == (
        "support",
        3,
        "support",
        frozenset({"support", "billing"}),
    )
    # A login role the policy does not name is counted as "default", whatever it is a member of.
    stranger = ISSUE_POLICY.view("alice", frozenset({"support"}), epoch=3)
    assert (stranger.login_role, stranger.label) == ("alice", "default")
    assert stranger.grant(col("public.customers.ssn")).mask == Mask(MaskFunction.LAST4)


def test_a_partition_column_gets_its_root_columns_grant() -> None:
    partition = ProtectedColumn(
        schema="public", table="customers_2024", name="ssn", declared_type="text", identity="public.customers.ssn"
    )
    view = ISSUE_POLICY.view("support", frozenset(), epoch=1)
    assert view.grant(partition).mask == Mask(MaskFunction.LAST4)


def test_a_column_the_view_was_not_built_for_is_resolved_from_the_rules() -> None:
    view = ISSUE_POLICY.view("billing", frozenset(), epoch=1)
    assert view.grant(col("public.customers.added_later")).visibility is Visibility.PLAINTEXT
    assert view.grant(col("other.t.c")).source == "default"


def test_a_policy_compares_by_content_not_by_order_or_epoch() -> None:
    reordered = dataclasses.replace(ISSUE_POLICY, roles=tuple(reversed(ISSUE_POLICY.roles)))
    assert reordered == ISSUE_POLICY
    assert hash(reordered) == hash(ISSUE_POLICY)
    assert dataclasses.replace(ISSUE_POLICY, default=g("deny", "default")) != ISSUE_POLICY
    assert ISSUE_POLICY.view("support", frozenset(), 1).grants == ISSUE_POLICY.view("support", frozenset(), 2).grants
    with pytest.raises(ValueError, match="listed twice"):
        Policy(roles=(role("a", **{"*": "hidden"}), role("a", **{"*": "deny"})))


def test_an_absent_policy_hides_everything() -> None:
    policy = Policy(column_ids=COLUMNS)
    view = policy.view("postgres", frozenset(), epoch=0)
    assert {gr.visibility for gr in view.grants.values()} == {Visibility.HIDDEN}
    assert not policy.configured
    assert policy.masks == frozenset()


# -- the combination, for random policies ------------------------------------------------------------------

ROLES = ("r0", "r1", "r2", "r3")
PATTERNS = ("*", "public.*", "billing.*", "public.customers.*", "public.customers.ssn", "billing.cards.pan")
VISIBILITIES = (
    "plaintext",
    "match",
    "match:last4",
    "masked:last4",
    "masked:email",
    "masked:hash",
    "masked:fixed:x",
    "masked:fixed:y",
    "masked:null",
    "ciphertext",
    "hidden",
    "deny",
)

policies = st.builds(
    lambda rules, default: Policy(
        roles=tuple(
            RoleRules(r, tuple(Rule(parse_pattern(p), g(v, f"{r}: {p}")) for p, v in by_pattern.items()))
            for r, by_pattern in rules.items()
        ),
        default=g(default, "default"),
        column_ids=COLUMNS,
    ),
    st.dictionaries(
        st.sampled_from(ROLES), st.dictionaries(st.sampled_from(PATTERNS), st.sampled_from(VISIBILITIES), max_size=4)
    ),
    st.sampled_from(VISIBILITIES),
)
role_sets = st.frozensets(st.sampled_from((*ROLES, "not_in_policy")))


def own_grant(policy: Policy, name: str, column_id: str) -> Grant | None:
    rr = next((r for r in policy.roles if r.role == name), None)
    rule = rr.rule_for(column_id) if rr is not None else None
    return rule.grant if rule is not None else None


@given(policies, st.sampled_from((*ROLES, "not_in_policy")), role_sets)
def test_the_combined_grant_is_the_most_permissive_own_grant_or_the_default(
    policy: Policy, login: str, member_of: frozenset[str]
) -> None:
    view = policy.view(login, member_of, epoch=1)
    for column_id in COLUMNS:
        got = view.grant(col(column_id))
        owns = [own for r in {login} | member_of if (own := own_grant(policy, r, column_id)) is not None]
        if not owns:
            assert got == policy.default
            continue
        assert got in owns  # one of the roles' own grants, with its source
        assert all(permissiveness(got) <= permissiveness(o) for o in owns)  # none of them grants more


@given(policies, st.sampled_from(ROLES), role_sets, st.sampled_from(ROLES))
def test_a_further_membership_never_reveals_less_where_a_role_already_covers(
    policy: Policy, login: str, member_of: frozenset[str], extra: str
) -> None:
    before = policy.view(login, member_of, epoch=1)
    after = policy.view(login, member_of | {extra}, epoch=1)
    for column_id in COLUMNS:
        if before.grant(col(column_id)).source != "default":
            assert permissiveness(after.grant(col(column_id))) <= permissiveness(before.grant(col(column_id)))
