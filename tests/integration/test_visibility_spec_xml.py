"""Functions that run SQL given as a string or dump a table by name (query_to_xml, table_to_xml) return
governed values inside XML, which pgveil cannot attribute: a role without plaintext is refused, and an
encrypted column comes back as its envelope only."""

from __future__ import annotations

import pytest
import visfixtures
from test_visibility_spec_paths import REFUSAL_STATES, make_fresh
from visfixtures import Session, VisEnv, leaked

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> VisEnv:
    return visfixtures.shared_env(pg, tmp_path_factory, pytestconfig)


MORE = [
    "SELECT query_to_xml('SELECT pin FROM vis_plain WHERE id = {pid}', true, false, '')",
    "SELECT table_to_xml('vis_plain', true, false, '')",
    "SELECT table_to_xml('vis_customers', true, false, '')",
]


@pytest.mark.parametrize("role", ["support", "outsider"])
@pytest.mark.parametrize("sql", MORE)
def test_more_shapes(env: VisEnv, role: str, sql: str) -> None:
    with Session(env, role) as s:
        r, pid, pin = make_fresh(env)
        got = s.run(sql.format(pid=pid, id=r.id))
    for secret in (pin, r.phone, r.ssn, r.email):
        assert not leaked(got.raw, secret), f"{role}: {sql} -> {got.sqlstate} {got.message or got.rows}"
    assert got.sqlstate is None or got.sqlstate in REFUSAL_STATES, f"{got.sqlstate} {got.message}"


def test_a_plaintext_role_still_gets_the_xml(env: VisEnv) -> None:
    """billing sees vis_plain in plaintext: query_to_xml works for it; of vis_customers, whose ssn and email
    are encrypted, table_to_xml returns their envelopes, never the plaintext."""
    with Session(env, "billing") as s:
        r, pid, pin = make_fresh(env)
        got = s.run(f"SELECT query_to_xml('SELECT pin FROM vis_plain WHERE id = {pid}', true, false, '')")
        assert got.sqlstate is None, got.message
        assert leaked(got.raw, pin)
        whole = s.run("SELECT table_to_xml('vis_customers', true, false, '')")
    assert whole.sqlstate is None, whole.message
    assert leaked(whole.raw, r.phone)  # plain, and billing sees it in plaintext
    for secret in (r.ssn, r.email):
        assert not leaked(whole.raw, secret)
