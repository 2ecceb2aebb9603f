"""The policy runtime's bookkeeping without a server: views per login role cached per epoch, an equal
policy changing nothing, a changed policy or membership bumping the epoch, and the fail-closed
refusals (55000) before the first membership read and for a role the graph does not know."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from proxy.config import parse_config
from proxy.policy.membership import Membership, MembershipGraph
from proxy.policy.model import Visibility
from proxy.policy.rules import Policy
from proxy.policy_runtime import MembershipNotLoaded, PolicyRuntime
from proxy.rewrite.catalog import ProtectedColumn

SSN = ProtectedColumn(schema="public", table="customers", name="ssn", declared_type="text", encrypted=True)
TABLES = {"public.customers": {"columns": {"ssn": {"type": "text", "encrypt": True}}}}


def policy(roles: Mapping[str, object]) -> Policy:
    return parse_config({"tables": TABLES, "roles": roles}, base_dir=Path.cwd(), environ={}).policy


GRAPH = MembershipGraph.build(
    ["sue", "support", "ivan", "noinh"],
    [Membership("sue", "support", True), Membership("noinh", "support", False)],
)


def test_fails_closed_until_the_membership_is_read() -> None:
    # Why not guess: with a permissive default and a restrictive group, "member of nothing" would give
    # sue (a member of support) plaintext, while her policy gives her NULL.
    rt = PolicyRuntime(policy({"default": "plaintext", "support": "hidden"}))
    with pytest.raises(MembershipNotLoaded) as e:
        rt.view("sue")
    assert e.value.sqlstate == "55000"
    rt.install_membership(GRAPH)
    assert rt.view("sue").grant(SSN).visibility is Visibility.HIDDEN
    assert rt.view("ivan").grant(SSN).visibility is Visibility.PLAINTEXT


def test_a_role_the_graph_does_not_know_is_refused_not_guessed() -> None:
    rt = PolicyRuntime(policy({"default": "plaintext", "support": "hidden"}))
    rt.install_membership(GRAPH)
    with pytest.raises(MembershipNotLoaded, match="login role"):
        rt.view("newcomer")


def test_views_are_cached_per_epoch_and_an_equal_policy_changes_nothing() -> None:
    roles = {"default": "hidden", "support": {"public.customers.ssn": "masked:last4"}}
    rt = PolicyRuntime(policy(roles))
    rt.install_membership(GRAPH)
    first = rt.view("sue")
    assert rt.view("sue") is first
    assert first.grant(SSN).visibility is Visibility.MASKED
    assert rt.view("noinh").grant(SSN).visibility is Visibility.HIDDEN  # NOINHERIT: support's grant does not count
    epoch = rt.epoch
    assert not rt.install_policy(policy(roles))  # the same file loaded again
    assert rt.epoch == epoch
    assert rt.view("sue") is first
    assert not rt.install_membership(MembershipGraph.build(GRAPH.roles, GRAPH.memberships))
    assert rt.epoch == epoch
    assert rt.install_policy(policy({"default": "hidden", "support": "plaintext"}))
    assert rt.epoch > epoch
    again = rt.view("sue")
    assert again.epoch == rt.epoch
    assert again.grant(SSN).visibility is Visibility.PLAINTEXT
    epoch = rt.epoch
    assert rt.install_membership(MembershipGraph.build(GRAPH.roles, [Membership("noinh", "support", False)]))
    assert rt.epoch > epoch
    assert rt.view("sue").grant(SSN).visibility is Visibility.HIDDEN  # no longer a member of support


def test_the_view_source_is_bound_to_the_login_role() -> None:
    rt = PolicyRuntime(policy({"default": "hidden", "support": "plaintext"}))
    rt.install_membership(GRAPH)
    source = rt.view_source("ivan")
    assert source().login_role == "ivan"
    assert source().grant(SSN).visibility is Visibility.HIDDEN


@pytest.mark.parametrize(
    "roles",
    [
        {"default": "plaintext"},  # nobody below the default: membership cannot lower anything
        {"default": "hidden", "support": "plaintext", "contractor": "deny"},  # deny reveals no more than hidden
        {"default": "plaintext", "support": "hidden", "newcomer": "plaintext"},  # its own entry is its floor
    ],
)
def test_a_new_role_is_resolved_alone_where_no_membership_could_lower_it(roles: dict[str, object]) -> None:
    rt = PolicyRuntime(policy(roles))
    rt.install_membership(GRAPH)
    view = rt.view("newcomer")
    assert view.grant(SSN) == rt.policy.view("newcomer", frozenset(), 0).grant(SSN)  # type: ignore[union-attr]
    # The read that knows it replaces that view (a new epoch).
    epoch = rt.epoch
    rt.install_membership(
        MembershipGraph.build([*GRAPH.roles, "newcomer"], [*GRAPH.memberships, Membership("newcomer", "support", True)])
    )
    assert rt.epoch > epoch
    assert rt.view("newcomer").epoch == rt.epoch


@pytest.mark.parametrize(
    "roles",
    [
        {"default": "plaintext", "support": "hidden"},
        {"default": "masked:last4", "support": {"public.customers.ssn": "masked:hash"}},  # a less revealing mask
    ],
)
def test_a_new_role_is_refused_where_a_group_could_lower_the_default(roles: dict[str, object]) -> None:
    rt = PolicyRuntime(policy(roles))
    rt.install_membership(GRAPH)
    with pytest.raises(MembershipNotLoaded):
        rt.view("newcomer")
