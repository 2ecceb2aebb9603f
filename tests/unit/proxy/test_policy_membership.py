"""Role resolution over the membership graph (proxy.policy.membership), against PostgreSQL's rule."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.policy.membership import Membership, MembershipGraph

ROLES = ("alice", "bob", "support", "staff", "billing", "admins", "noinh")


def graph(*edges: tuple[str, str, bool], roles: tuple[str, ...] = ROLES) -> MembershipGraph:
    return MembershipGraph.build(roles, [Membership(m, r, i) for m, r, i in edges])


def test_own_role_always_counts() -> None:
    assert graph().inherited_roles("alice") == {"alice"}


def test_nested_groups_are_followed() -> None:
    g = graph(("alice", "support", True), ("support", "staff", True), ("staff", "admins", True))
    assert g.inherited_roles("alice") == {"alice", "support", "staff", "admins"}
    assert g.inherited_roles("support") == {"support", "staff", "admins"}
    assert g.inherited_roles("admins") == {"admins"}  # membership is directed


def test_noinherit_login_role_gets_only_its_own_grants() -> None:
    # PostgreSQL 15: the edge carries the member's rolinherit; a NOINHERIT login inherits nothing.
    g = graph(("noinh", "billing", False), ("noinh", "support", False))
    assert g.inherited_roles("noinh") == {"noinh"}


def test_noinherit_group_counts_but_passes_nothing_on() -> None:
    # alice INHERIT is a member of noinh (NOINHERIT), which is a member of billing: alice gets noinh's
    # grants (her membership inherits) but not billing's (noinh's does not).
    g = graph(("alice", "noinh", True), ("noinh", "billing", False))
    assert g.inherited_roles("alice") == {"alice", "noinh"}


def test_other_path_still_reaches_a_role_behind_a_noinherit_one() -> None:
    g = graph(
        ("alice", "noinh", True), ("noinh", "billing", False), ("alice", "staff", True), ("staff", "billing", True)
    )
    assert g.inherited_roles("alice") == {"alice", "noinh", "staff", "billing"}


def test_cycles_and_self_edges_terminate() -> None:
    g = graph(("alice", "staff", True), ("staff", "support", True), ("support", "alice", True), ("bob", "bob", True))
    assert g.inherited_roles("alice") == {"alice", "staff", "support"}
    assert g.inherited_roles("bob") == {"bob"}


def test_unknown_role_resolves_to_itself_and_is_not_known() -> None:
    g = graph(("alice", "staff", True))
    assert not g.knows("mallory")
    assert g.inherited_roles("mallory") == {"mallory"}
    assert g.knows("alice")


def test_role_names_are_case_sensitive() -> None:
    g = graph(("Alice", "staff", True), roles=("Alice", "alice", "staff"))
    assert g.inherited_roles("alice") == {"alice"}
    assert g.inherited_roles("Alice") == {"Alice", "staff"}


def test_json_round_trip_and_equality() -> None:
    g = graph(("alice", "staff", True), ("noinh", "billing", False))
    again = MembershipGraph.from_json(json.loads(json.dumps(g.to_json())))
    assert again == g
    assert again.inherited_roles("alice") == g.inherited_roles("alice")
    assert graph(("alice", "staff", True)) != g


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ([], "membership"),
        ({"roles": "x", "memberships": []}, "membership.roles"),
        ({"roles": [], "memberships": {}}, "membership.memberships"),
        ({"roles": [], "memberships": [{"member": "a", "role": "b", "inherit": "yes"}]}, "memberships[0]"),
    ],
)
def test_malformed_json_names_the_place(data: object, where: str) -> None:
    with pytest.raises(ValueError, match=where.replace("[", r"\[").replace("]", r"\]")):
        MembershipGraph.from_json(data)


# -- against a brute-force reference -------------------------------------------------------------------


def reference(login: str, edges: list[tuple[str, str, bool]]) -> set[str]:
    """Every role at the end of some path of inheriting memberships from ``login`` (by enumerating
    simple paths, which is exponential and obviously right), plus ``login`` itself."""
    out = {login}

    def walk(role: str, path: frozenset[str]) -> None:
        for member, granted, inherit in edges:
            if member == role and inherit and granted not in path:
                out.add(granted)
                walk(granted, path | {granted})

    walk(login, frozenset({login}))
    return out


names = st.sampled_from(ROLES)
edge_lists = st.lists(st.tuples(names, names, st.booleans()), max_size=14)


@settings(max_examples=400, deadline=None)
@given(edges=edge_lists, login=names)
def test_matches_brute_force_reference(edges: list[tuple[str, str, bool]], login: str) -> None:
    assert graph(*edges).inherited_roles(login) == reference(login, edges)


@settings(max_examples=200, deadline=None)
@given(edges=edge_lists, login=names, extra=st.tuples(names, names))
def test_adding_an_inheriting_grant_never_removes_a_role(
    edges: list[tuple[str, str, bool]], login: str, extra: tuple[str, str]
) -> None:
    before = graph(*edges).inherited_roles(login)
    after = graph(*edges, (extra[0], extra[1], True)).inherited_roles(login)
    assert before <= after


@settings(max_examples=200, deadline=None)
@given(edges=edge_lists, login=names)
def test_pg15_rolinherit_semantics(edges: list[tuple[str, str, bool]], login: str) -> None:
    """With PostgreSQL 15's per-role flag (every edge of a member carries its rolinherit), a
    NOINHERIT role reached on the way is included but not expanded (acl.c, roles_is_member_of)."""
    noinherit = {m for m, _r, i in edges if not i}
    pg15 = [(m, r, m not in noinherit) for m, r, _i in edges]
    result: list[str] = [login]
    for member in result:  # the server's own loop: a list that grows while it is walked
        if member in noinherit:
            continue
        for m, r, _i in pg15:
            if m == member and r not in result:
                result.append(r)
    assert graph(*pg15).inherited_roles(login) == set(result)
