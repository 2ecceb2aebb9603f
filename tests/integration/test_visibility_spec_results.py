"""What each role receives for the issue's table (issue 8): ``SELECT *`` and named columns through
psycopg in text and binary, asyncpg (binary) and psql (simple protocol, text).

The expected view of each role comes from the independent model in :mod:`visfixtures` (the issue's
policy): plaintext is the value, hidden is NULL with the declared type kept in RowDescription, a mask keeps
what its function keeps (``last4`` the last four characters, ``partial`` the first and last, ``email`` the
domain) and never the canary's core, ciphertext is the stored envelope byte for byte as ``bytea``, and deny
refuses any statement naming the column, ``SELECT *`` included. Masks keep the declared type in both
formats (a masked date is a date) or are NULL.
"""

from __future__ import annotations

import datetime
import decimal
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import psycopg
import pytest
import visfixtures
from visfixtures import (
    ENCRYPTED,
    GOVERNED,
    MASK_FUNCTIONS,
    SUPERUSER_ROLE,
    TABLE,
    TYPED_COLUMNS,
    Customer,
    Expected,
    PsqlError,
    VisEnv,
    check_value,
    expected_grant,
    fetch,
    insert_customers,
    issue_policy,
    leaked,
    make_customer,
    stored,
)

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

TEXT_OID, BYTEA_OID = 25, 17
OIDS = {"date": 1082, "integer": 23, "numeric": 1700, "uuid": 2950, "bool": 16, "text": 25}
PYTYPES: dict[str, type] = {
    "date": datetime.date,
    "integer": int,
    "numeric": decimal.Decimal,
    "uuid": uuid.UUID,
    "bool": bool,
    "text": str,
}
READERS = ["billing", "support", "backup", "outsider", "fin_member", "fin_noinherit", SUPERUSER_ROLE, "mixed"]
READERS.append("matcher")
READERS += [f"m_{f}" for f in (*MASK_FUNCTIONS, "fixed")]
DRIVERS = ["psycopg-text", "psycopg-binary", "asyncpg", "psql"]


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> VisEnv:
    return visfixtures.shared_env(pg, tmp_path_factory, pytestconfig)


@pytest.fixture(scope="module")
def rows(env: VisEnv) -> list[Customer]:
    a, b = make_customer("results"), make_customer("results")
    twin = Customer(visfixtures.next_id(), "twin", a.email, a.ssn, a.phone)  # same values: a stable mask repeats
    out = [a, b, twin]
    insert_customers(env, out)
    return out


def ids_of(rows: list[Customer]) -> str:
    return ", ".join(str(r.id) for r in rows)


@pytest.mark.parametrize("role", READERS)
def test_each_role_receives_its_view(env: VisEnv, rows: list[Customer], role: str) -> None:
    envelopes = {r[0]: r[1:] for r in stored(env, [r.id for r in rows])}
    policy = issue_policy()
    problems: list[str] = []
    for driver in DRIVERS:
        for columns in ("*", "id, name, email, ssn, phone"):
            where = f"{role} via {driver} ({columns})"
            sql = f"SELECT {columns} FROM vis_customers WHERE id IN ({ids_of(rows)}) ORDER BY id"
            try:
                oids, got = fetch(env, driver, role, sql)
            except (psycopg.Error, asyncpg.PostgresError, PsqlError) as e:
                problems.append(f"{where}: refused: {e}")
                continue
            try:
                assert [int(r[0]) for r in got] == [r.id for r in rows]
                for row, values in zip(rows, got, strict=True):
                    assert values[1] == row.name  # not governed: always the value
                    for k, col in enumerate(GOVERNED):
                        exp = expected_grant(policy, role, f"{TABLE}.{col}")
                        envelope = envelopes[row.id][k] if col in ENCRYPTED else None
                        check_value(exp, col, row.value(col), values[2 + k], envelope, where)
                if oids is not None:
                    for k, col in enumerate(GOVERNED):
                        exp = expected_grant(policy, role, f"{TABLE}.{col}")
                        want = BYTEA_OID if exp.visibility == "ciphertext" and col in ENCRYPTED else TEXT_OID
                        assert oids[2 + k] == want, f"{where}: RowDescription type of {col} is {oids[2 + k]}"
            except AssertionError as e:
                problems.append(str(e).split("\n")[0])
    assert problems == [], "\n".join(problems)


def test_the_model_is_the_issue_policy() -> None:
    """The oracle itself, against the issue's words (so a wrong model cannot make every test pass)."""
    p = issue_policy()

    def g(role: str, col: str) -> Expected:
        return expected_grant(p, role, f"{TABLE}.{col}")

    assert g("billing", "ssn") == Expected("plaintext")
    assert g("support", "email") == Expected("plaintext")
    assert g("support", "ssn") == Expected("masked", "last4")
    assert g("support", "phone") == Expected("masked", "partial")
    assert g("contractor", "email") == Expected("deny")
    assert g("outsider", "email") == Expected("hidden")
    assert g(SUPERUSER_ROLE, "ssn") == Expected("hidden")
    assert g("fin_member", "ssn") == Expected("plaintext")  # through the group role
    assert g("fin_noinherit", "ssn") == Expected("hidden")  # NOINHERIT: nothing through the group
    assert g("mixed", "ssn") == Expected("masked", "last4")  # support grants more than contractor denies
    assert g("mixed", "email") == Expected("plaintext")


def _refused(run: Callable[[], object]) -> str:
    """Runs ``run``, which must be refused with 42501 (psql: "permission denied"); returns the message."""
    with pytest.raises((psycopg.Error, asyncpg.PostgresError, PsqlError)) as e:
        run()
    err = e.value
    if isinstance(err, PsqlError):
        assert "permission denied" in str(err), str(err)
    else:
        assert getattr(err, "sqlstate", None) == "42501", f"{getattr(err, 'sqlstate', None)}: {err}"
    return str(err)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize(
    "sql", ["SELECT * FROM vis_customers", "SELECT id, ssn FROM vis_customers", "SELECT phone FROM vis_customers"]
)
def test_deny_refuses_any_statement_naming_the_column(env: VisEnv, rows: list[Customer], driver: str, sql: str) -> None:
    message = _refused(lambda: fetch(env, driver, "contractor", f"{sql} WHERE id = {rows[0].id}"))
    assert "public.vis_customers." in message, message
    assert "contractor" in message, message
    for r in rows:
        for col in GOVERNED:
            assert r.value(col) not in message
    # The statement is refused, not the role: columns outside the policy still read.
    _, got = fetch(env, driver, "contractor", f"SELECT id, name FROM vis_customers WHERE id = {rows[0].id}")
    assert [tuple(str(v) for v in r) for r in got] == [(str(rows[0].id), rows[0].name)]


def test_deny_with_star_names_the_denying_column_and_star(env: VisEnv, rows: list[Customer]) -> None:
    with psycopg.connect(env.dsn("contractor"), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute("SELECT * FROM vis_customers WHERE id = %s", [rows[0].id])
        assert any(f"public.vis_customers.{col}" in str(e.value) for col in GOVERNED), str(e.value)
        assert "SELECT *" in str(e.value), str(e.value)
        assert c.execute("SELECT 1").fetchone() == (1,)  # the session goes on


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_a_hash_mask_is_stable_per_value_and_keyed(env: VisEnv, rows: list[Customer], binary: bool) -> None:
    a, b, twin = rows
    with psycopg.connect(env.dsn("m_hash"), autocommit=True) as c:
        got: dict[int, Any] = dict(
            c.cursor(binary=binary)
            .execute(f"SELECT id, ssn FROM vis_customers WHERE id IN ({ids_of(rows)})")
            .fetchall()
        )
    assert isinstance(got[a.id], str)
    assert not leaked(got[a.id].encode(), a.ssn)
    assert got[a.id] == got[twin.id], "the same value hashes the same"
    assert got[a.id] != got[b.id], "different values hash differently"


def test_masks_agree_between_text_and_binary(env: VisEnv, rows: list[Customer]) -> None:
    sql = f"SELECT id, email, ssn, phone FROM vis_customers WHERE id IN ({ids_of(rows)}) ORDER BY id"
    for role in ("support", *(f"m_{f}" for f in MASK_FUNCTIONS), "m_fixed"):
        _, text = fetch(env, "psycopg-text", role, sql)
        _, binary = fetch(env, "psycopg-binary", role, sql)
        _, apg = fetch(env, "asyncpg", role, sql)
        assert text == binary == apg, role
        assert all(not leaked(repr(r).encode(), row.ssn) for r, row in zip(text, rows, strict=True)), role


# -- masks by declared type --------------------------------------------------------------------------------

TYPED_ROW: dict[str, Any] = {
    "d": datetime.date(1987, 6, 15),
    "n": 12345678,
    "num": decimal.Decimal("98765432.125"),
    "u": uuid.UUID("7f1c9a2e-55b3-4d8e-9c01-3a6b2d4e8f90"),
    "b": True,
    "t": "typed-text-canary-1f2e3d4c5b6a",
    "pd": datetime.date(1979, 3, 21),
    "pn": 87654321,
    "pt": "plain-text-canary-6a5b4c3d2e1f",
}


@pytest.fixture(scope="module")
def typed_id(env: VisEnv) -> int:
    i = visfixtures.next_id()
    cols = list(TYPED_ROW)
    with psycopg.connect(env.dsn("fin_member"), autocommit=True) as c:
        c.execute(
            f"INSERT INTO vis_typed (id, {', '.join(cols)}) VALUES (%s{', %s' * len(cols)})",
            [i, *TYPED_ROW.values()],
        )
        # The writer sees plaintext (through its group role): the row went in as written.
        got = c.execute(f"SELECT {', '.join(cols)} FROM vis_typed WHERE id = %s", [i]).fetchone()
    assert got == tuple(TYPED_ROW.values())
    return i


@pytest.mark.parametrize("driver", ["psycopg-text", "psycopg-binary", "asyncpg"])
@pytest.mark.parametrize("function", [*MASK_FUNCTIONS, "fixed"])
def test_a_masked_value_keeps_its_declared_type(env: VisEnv, typed_id: int, function: str, driver: str) -> None:
    cols = list(TYPED_ROW)
    oids, got = fetch(env, driver, f"m_{function}", f"SELECT {', '.join(cols)} FROM vis_typed WHERE id = {typed_id}")
    assert oids is not None
    assert len(got) == 1
    for k, col in enumerate(cols):
        declared = TYPED_COLUMNS[col]["type"]
        v, original = got[0][k], TYPED_ROW[col]
        where = f"masked:{function} on {col} ({declared}) via {driver}: {v!r}"
        assert oids[k] == OIDS[declared], where
        if function == "null":
            assert v is None, where
            continue
        if function == "fixed":
            assert v is not None, where
            assert str(v).lower() == visfixtures.FIXED_VALUES[col].lower(), where
            continue
        assert v is None or isinstance(v, PYTYPES[declared]), where
        if v is not None and declared != "bool":
            assert v != original, where  # a mask that returns the value reveals it
            if declared == "text":
                assert not leaked(str(v).encode(), str(original)), where


@pytest.mark.parametrize("driver", ["psycopg-text", "psycopg-binary", "asyncpg"])
def test_ciphertext_role_gets_bytea_envelopes(env: VisEnv, typed_id: int, driver: str) -> None:
    cols = [c for c, spec in TYPED_COLUMNS.items() if spec["encrypt"]]
    oids, got = fetch(env, driver, "backup", f"SELECT {', '.join(cols)} FROM vis_typed WHERE id = {typed_id}")
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        raw = c.execute(f"SELECT {', '.join(cols)} FROM vis_typed WHERE id = %s", [typed_id]).fetchone()
    assert raw is not None
    assert oids == [BYTEA_OID] * len(cols)
    assert got == [tuple(raw)]
    assert all(isinstance(v, bytes) and len(v) > 20 for v in got[0])


@pytest.mark.parametrize("role", ["outsider", "fin_noinherit", SUPERUSER_ROLE])
def test_hidden_keeps_the_declared_type(env: VisEnv, typed_id: int, role: str) -> None:
    cols = list(TYPED_ROW)
    for driver in ("psycopg-binary", "asyncpg"):
        oids, got = fetch(env, driver, role, f"SELECT {', '.join(cols)} FROM vis_typed WHERE id = {typed_id}")
        assert oids == [OIDS[TYPED_COLUMNS[c]["type"]] for c in cols], (role, driver)
        assert got == [(None,) * len(cols)], (role, driver)


def test_a_hash_is_keyed_per_column(env: VisEnv) -> None:
    """The same value in two columns hashes differently (the column is part of the keyed message)."""
    r = make_customer("hash-columns")
    same = Customer(r.id, r.name, r.ssn, r.ssn, r.ssn)  # one value in email, ssn and phone
    insert_customers(env, [same])
    with psycopg.connect(env.dsn("m_hash"), autocommit=True) as c:
        got = c.execute("SELECT email, ssn, phone FROM vis_customers WHERE id = %s", [r.id]).fetchone()
    assert got is not None
    assert None not in got
    assert len(set(got)) == 3, got
