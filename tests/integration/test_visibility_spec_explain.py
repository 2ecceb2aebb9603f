"""``pgveil policy explain`` (issue 8, item 6): for a role and a statement, what each result column comes
back as and why, or why the statement is refused and with which SQLSTATE; here online, through the
service connection of the visibility environment's configuration (so group membership is resolved)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import visfixtures
from visfixtures import SUPERUSER_ROLE, VisEnv

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration
PGVEIL = [sys.executable, "-m", "proxy.cli"]


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> VisEnv:
    return visfixtures.shared_env(pg, tmp_path_factory, pytestconfig)


def explain(env: VisEnv, role: str, sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PGVEIL, "policy", "explain", "--config", str(env.proxy.config_path), "--role", role, sql],
        capture_output=True,
        text=True,
        cwd=env.workdir,  # as an operator runs it (and so that PYTHONPATH decides which pgveil)
        timeout=60,
        check=False,
    )


def line_of(out: str, column: str) -> str:
    lines = [line for line in out.splitlines() if re.search(rf"\b{column}\b", line)]
    assert lines, f"no line names {column}:\n{out}"
    return " ".join(lines)


def test_explain_says_what_each_column_comes_back_as(env: VisEnv) -> None:
    p = explain(env, "support", "SELECT * FROM vis_customers")
    assert p.returncode == 0, p.stderr + p.stdout
    assert "plaintext" in line_of(p.stdout, "email")
    assert "last4" in line_of(p.stdout, "ssn")
    assert "partial" in line_of(p.stdout, "phone")
    hidden = explain(env, "outsider", "SELECT ssn, phone FROM vis_customers")
    assert hidden.returncode == 0, hidden.stderr + hidden.stdout
    for col in ("ssn", "phone"):
        assert re.search(r"NULL|hidden", line_of(hidden.stdout, col)), hidden.stdout
    backup = explain(env, "backup", "SELECT ssn FROM vis_customers")
    assert "ciphertext" in line_of(backup.stdout, "ssn") or "bytea" in line_of(backup.stdout, "ssn")


@pytest.mark.parametrize("role", ["fin_member", "fin_noinherit", SUPERUSER_ROLE])
def test_explain_resolves_membership(env: VisEnv, role: str) -> None:
    p = explain(env, role, "SELECT ssn FROM vis_customers")
    assert p.returncode == 0, p.stderr + p.stdout
    line = line_of(p.stdout, "ssn")
    if role == "fin_member":
        assert "plaintext" in line, p.stdout
    else:
        assert re.search(r"NULL|hidden", line), p.stdout


@pytest.mark.parametrize(
    ("role", "sql", "state", "words"),
    [
        ("support", "SELECT id FROM vis_customers ORDER BY phone", "42501", ("phone", "ORDER BY")),
        ("support", "SELECT id FROM vis_customers WHERE ssn IS NULL", "42501", ("ssn",)),
        ("contractor", "SELECT * FROM vis_customers", "42501", ("contractor",)),
        ("billing", "SELECT id FROM vis_customers WHERE ssn LIKE '1%'", "0A000", ("ssn", "LIKE")),
    ],
)
def test_explain_says_why_a_statement_is_refused(
    env: VisEnv, role: str, sql: str, state: str, words: tuple[str, ...]
) -> None:
    p = explain(env, role, sql)
    out = p.stdout + p.stderr
    assert state in out, out
    for w in words:
        assert w in out, out
    assert "Traceback" not in out


def test_explain_of_an_allowed_use_for_billing(env: VisEnv) -> None:
    p = explain(env, "billing", "SELECT id FROM vis_customers ORDER BY phone")
    assert p.returncode == 0, p.stderr + p.stdout
    assert "42501" not in p.stdout + p.stderr
