"""A server error must not show a restricted role what its results may not: an integrity constraint
error's DETAIL repeats values of the row (``Failing row contains (...)``), so pgveil withholds it from a
role that sees any governed column of that table other than in plaintext. Found by the spec tests."""

from __future__ import annotations

import pytest
import visfixtures
from test_visibility_spec_paths import make_fresh
from visfixtures import Session, VisEnv, leaked

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

# Each UPDATE hits a CHECK constraint of the test tables (visfixtures), so the server answers 23514 with
# the whole failing row in its DETAIL: vis_plain's plain governed pin, vis_customers' plain phone.
VIOLATIONS = [
    "UPDATE vis_plain SET note = 'boom' WHERE id = {pid}",
    "UPDATE vis_customers SET name = 'boom' WHERE id = {id}",
]


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> VisEnv:
    return visfixtures.shared_env(pg, tmp_path_factory, pytestconfig)


@pytest.mark.parametrize("role", ["support", "outsider"])
@pytest.mark.parametrize("sql", VIOLATIONS)
def test_a_restricted_role_gets_the_error_without_the_rows_values(env: VisEnv, role: str, sql: str) -> None:
    with Session(env, role) as s:
        r, pid, pin = make_fresh(env)
        got = s.run(sql.format(pid=pid, id=r.id))
    assert got.sqlstate == "23514", got.message
    assert "withheld" in got.message
    for secret in (pin, r.phone, r.ssn, r.email):
        assert not leaked(got.raw, secret), f"{role}: {sql} -> {got.message}"


@pytest.mark.parametrize("sql", VIOLATIONS)
def test_a_plaintext_role_gets_the_servers_detail(env: VisEnv, sql: str) -> None:
    # The control: billing sees every governed column in plaintext, so the server's DETAIL reaches it,
    # and with it the values the restricted roles above must not get (the search is not blind).
    with Session(env, "billing") as s:
        r, pid, pin = make_fresh(env)
        got = s.run(sql.format(pid=pid, id=r.id))
    assert got.sqlstate == "23514", got.message
    assert "Failing row contains" in got.message
    assert leaked(got.raw, pin if "vis_plain" in sql else r.phone)
