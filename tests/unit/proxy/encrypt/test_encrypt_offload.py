"""Plans cross to the analysis worker process and back unchanged (they are pickled both ways)."""

from __future__ import annotations

import pickle

import pytest

from proxy.encrypt.offload import TOO_LARGE, analyze_detached
from proxy.rewrite.analysis import analyze
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable

PEOPLE = ProtectedTable(
    "public", "people", {"email": ProtectedColumn("public", "people", "email", "text")}, ("id", "email")
)
CATALOG = Catalog({("public", "people"): PEOPLE})


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO people (id, email) VALUES ($1, $2)",
        "INSERT INTO people (id, email) VALUES (1, 'a'), (2, 'b')",
        "SELECT email FROM people WHERE id = 1",
        "SELECT lower(email) FROM people",
        "COPY people (id, email) FROM STDIN",
        "SELEC garbage people",
    ],
)
def test_plans_survive_the_trip_to_the_worker(sql: str) -> None:
    args = pickle.loads(pickle.dumps((sql, CATALOG, 1 << 20)))
    plan = pickle.loads(pickle.dumps(analyze_detached(*args)))
    assert plan == analyze(sql, CATALOG)
    assert plan.statements == analyze(sql, CATALOG).statements


def test_a_statement_over_the_limit_that_may_name_a_protected_table_is_too_large() -> None:
    assert analyze_detached("/* people */ SELECT 1" + " " * 100, CATALOG, 100) == TOO_LARGE
    plain = "SELECT 1" + " " * 100
    assert analyze_detached(plain, CATALOG, 100) == analyze(plain, CATALOG)
