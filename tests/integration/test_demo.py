"""``pgveil demo`` end to end, as a newcomer runs it: it starts its own PostgreSQL, puts pgveil in front,
and its tour shows what the issue promises. The assertions read the tour's output: four people get four
different answers to the same ``SELECT *``, a support agent's search by SSN is refused with the reason,
and the stored ciphertext differs row by row even for equal values."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SSNS = ("123-45-6789", "987-65-4321", "555-12-3456")


@pytest.fixture(scope="module")
def tour(tmp_path_factory: pytest.TempPathFactory) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path_factory.mktemp("demo"),
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return done.stdout


def section(tour: str, login: str) -> str:
    """The part of the tour that shows what ``login`` got for ``SELECT * FROM customers``."""
    m = re.search(rf"\(logs in as {login}\):\n(.*?)(?:\n\n|\Z)", tour, re.S)
    assert m is not None, tour
    return m.group(1)


def ssn_cells(table: str) -> list[str]:
    lines = [line for line in table.splitlines() if "|" in line]
    header = [c.strip() for c in lines[0].split("|")]
    i = header.index("ssn")
    return [[c.strip() for c in line.split("|")][i] for line in lines[2:]]


def test_four_people_get_four_different_answers(tour: str) -> None:
    answers = {login: section(tour, login) for login in ("bill", "sue", "carl", "ivan")}
    assert len(set(answers.values())) == 4
    billing = ssn_cells(answers["bill"])
    assert set(SSNS) <= set(billing)
    support = ssn_cells(answers["sue"])
    assert len(support) == len(billing)
    assert not any(s in answers["sue"] for s in SSNS)
    # last4: the last four digits of each SSN survive; nothing before them does.
    assert [s[-4:] for s in support if s != "NULL"] == [s[-4:] for s in billing if s != "NULL"]
    assert "refused, 42501" in answers["carl"]
    assert "denied" in answers["carl"]
    assert not any(s in answers["carl"] for s in SSNS)
    intern = ssn_cells(answers["ivan"])
    assert intern
    assert set(intern) == {"NULL"}
    assert "Ada Lovelace" in answers["ivan"]  # not governed: the rows themselves still come


def test_a_support_agents_search_by_ssn_is_refused_with_the_reason(tour: str) -> None:
    m = re.search(r"SELECT name FROM customers WHERE ssn LIKE '1%'\n\s+-> (.*)", tour)
    assert m is not None, tour
    assert m.group(1).startswith("refused, ")
    assert "public.customers.ssn" in m.group(1)
    m = re.search(r"SELECT name FROM customers ORDER BY phone\n\s+-> (.*)", tour)
    assert m is not None, tour
    assert m.group(1).startswith("refused, 42501")
    assert "billing may sort by phone" in tour


def test_the_stored_ciphertext_differs_row_by_row(tour: str) -> None:
    tails = re.findall(r"^\s+\d+\s+\|\s+…([0-9a-f]{24})\s*$", tour, re.M)
    assert len(tails) >= 4, tour
    assert len(set(tails)) == len(tails)  # rows 1 and 4 hold the same SSN
    assert not any(s in tour.split("what anyone reading PostgreSQL directly sees")[1].split("== ")[0] for s in SSNS)
