"""The property of issue 8: for random policies, random login roles and random queries from a grammar of
supported constructs, no value a role may not see appears in what it receives (checked byte-wise on every
byte pgveil sent, against the plaintext), every refusal carries 42501 or 0A000, a statement that names a
denied column is refused, and everything else comes back exactly as the independent model
(:func:`visfixtures.expected_grant`) says: plaintext, the mask, NULL or the stored envelope.

One pgveil of its own; each example installs its policy by SIGHUP and waits for the reload to be counted.
The grammar: a select list of columns (repeats and aliases allowed) or ``*``, from the table, a view, a CTE
or a subquery passing the columns through, optionally a UNION ALL of two such selects, with ``WHERE id``
predicates only; or the same query in ``COPY (...) TO STDOUT`` (text or CSV).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import visfixtures
from conftest import ProxyProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from visfixtures import (
    ENCRYPTED,
    GOVERNED,
    SUPERUSER_ROLE,
    TABLE,
    Customer,
    Tap,
    VisEnv,
    check_value,
    expected_grant,
    insert_customers,
    issue_policy,
    leaked,
    make_customer,
    reload_policy,
    stored,
)

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

POLICY_ROLES = ["billing", "support", "contractor", "finance", "backup"]
LOGINS = ["billing", "support", "contractor", "backup", "outsider", "fin_member", "fin_noinherit", "mixed"]
LOGINS.append(SUPERUSER_ROLE)
FUNCTIONS = ["last4", "partial", "email", "hash", "null"]
SIMPLE = ["plaintext", "hidden", "ciphertext", "deny", "match"]
VISIBILITIES = st.sampled_from(SIMPLE + [f"masked:{f}" for f in FUNCTIONS] + [f"match:{f}" for f in FUNCTIONS])
WIDE_PATTERNS = ["*", "public.*", f"{TABLE}.*"]
COLUMN_PATTERNS = [f"{TABLE}.{c}" for c in GOVERNED]


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    policy: dict[str, Any] = {"default": draw(VISIBILITIES)}
    for role in POLICY_ROLES:
        kind = draw(st.sampled_from(["absent", "string", "mapping"]))
        if kind == "string":
            policy[role] = draw(VISIBILITIES)
        elif kind == "mapping":
            patterns = draw(st.lists(st.sampled_from(WIDE_PATTERNS + COLUMN_PATTERNS), min_size=1, unique=True))
            mapping = {p: draw(VISIBILITIES) for p in patterns}
            if role == "support" and any(p in COLUMN_PATTERNS for p in patterns) and draw(st.booleans()):
                # fixed: only on a text column (a fixed text must be a value of the type), one role only
                p = draw(st.sampled_from([p for p in patterns if p in COLUMN_PATTERNS]))
                mapping[p] = "masked:fixed:XXXX"
            policy[role] = mapping
    return policy


@dataclass(frozen=True)
class Query:
    sql: str
    cols: tuple[str | None, ...]  # the governed column behind each result column (None: id or name)
    via_view: bool
    copy: str | None  # None, "text" or "csv"

    @property
    def referenced(self) -> set[str]:
        return {c for c in self.cols if c is not None}


ALL_COLUMNS = ("id", "name", "email", "ssn", "phone")


@st.composite
def queries(draw: st.DrawFn, ids: list[int]) -> Query:
    star = draw(st.booleans())
    if star:
        select, cols = "*", list(ALL_COLUMNS)
    else:
        cols = draw(st.lists(st.sampled_from(ALL_COLUMNS), min_size=1, max_size=5))
        aliased = draw(st.booleans())
        select = ", ".join(f"{c} AS a{k}" if aliased else c for k, c in enumerate(cols))
    source = draw(st.sampled_from(["table", "view", "cte", "subquery"]))
    chosen = draw(st.lists(st.sampled_from(ids), min_size=1, max_size=len(ids), unique=True))
    where = f"id IN ({', '.join(map(str, chosen))})" if len(chosen) > 1 else f"id = {chosen[0]}"

    def one(where: str) -> str:
        if source == "table":
            return f"SELECT {select} FROM vis_customers WHERE {where}"
        if source == "view":
            return f"SELECT {select} FROM vis_view WHERE {where}"
        if source == "cte":
            return f"WITH c AS (SELECT * FROM vis_customers WHERE {where}) SELECT {select} FROM c"
        return f"SELECT {select} FROM (SELECT id, name, email, ssn, phone FROM vis_customers) s WHERE {where}"

    sql = one(where)
    if draw(st.booleans()):
        sql = f"({sql}) UNION ALL ({one('id = -1')})"
    copy = draw(st.sampled_from([None, None, "text", "csv"]))
    if copy == "text":
        sql = f"COPY ({sql}) TO STDOUT"
    elif copy == "csv":
        sql = f"COPY ({sql}) TO STDOUT (FORMAT csv)"
    governed = tuple(c if c in GOVERNED else None for c in cols)
    return Query(sql, governed, source == "view", copy)


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> VisEnv:
    return visfixtures.shared_env(pg, tmp_path_factory, pytestconfig)


@pytest.fixture(scope="module")
def rows(env: VisEnv) -> list[Customer]:
    out = [make_customer("property") for _ in range(2)]
    insert_customers(env, out)
    return out


@pytest.fixture(scope="module")
def envelopes(env: VisEnv, rows: list[Customer]) -> dict[int, dict[str, bytes]]:
    return {r[0]: {"email": bytes(r[1]), "ssn": bytes(r[2])} for r in stored(env, [r.id for r in rows])}


@pytest.fixture(scope="module")
def proxy(env: VisEnv) -> Iterator[ProxyProcess]:
    with visfixtures.own_proxy(env, issue_policy(), "property") as p:
        yield p


def _copy_rows(data: str, fmt: str) -> list[tuple[Any, ...]]:
    if fmt == "csv":
        return [tuple(f if f != "" else None for f in r) for r in csv.reader(io.StringIO(data))]
    return [
        tuple(None if f == "\\N" else f.replace("\\\\", "\\") for f in line.split("\t")) for line in data.splitlines()
    ]


def run(
    proxy: ProxyProcess, role: str, q: Query, binary: bool
) -> tuple[list[tuple[Any, ...]] | None, str | None, bytes]:
    with Tap((proxy.host, proxy.port)) as tap:
        with psycopg.connect(tap.dsn(role), autocommit=True) as c:
            rows: list[tuple[Any, ...]] | None = None
            state: str | None = None
            try:
                if q.copy:
                    with c.cursor().copy(q.sql) as cp:
                        data = b"".join(bytes(b) for b in cp).decode()
                    rows = _copy_rows(data, q.copy)
                else:
                    rows = c.cursor(binary=binary).execute(q.sql).fetchall()
            except psycopg.Error as e:
                state = e.sqlstate or "?"
            assert c.execute("SELECT 1").fetchone() == (1,), "the session is usable after the statement"
        return rows, state, tap.data()


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_role_ever_receives_more_than_its_policy(
    data: st.DataObject,
    proxy: ProxyProcess,
    rows: list[Customer],
    envelopes: dict[int, dict[str, bytes]],
) -> None:
    policy = data.draw(policies(), label="policy")
    role = data.draw(st.sampled_from(LOGINS), label="role")
    q = data.draw(queries([r.id for r in rows]), label="query")
    binary = data.draw(st.booleans(), label="binary")
    reload_policy(proxy, policy)
    got, state, raw = run(proxy, role, q, binary)

    grants = {c: expected_grant(policy, role, f"{TABLE}.{c}") for c in GOVERNED}
    # 1. Nothing the role may not see, anywhere in the bytes it received.
    for r in rows:
        for col in GOVERNED:
            g = grants[col]
            if not (g.plaintext or (g.visibility == "ciphertext" and col not in ENCRYPTED)):
                assert not leaked(raw, r.value(col)), f"{role} received {col} ({g}) via {q.sql}"
    # 2. Refusals carry 42501 or 0A000; a denied column is refused.
    denied = {c for c in q.referenced if grants[c].visibility == "deny"}
    if state is not None:
        assert state in ("42501", "0A000"), f"{role}: {q.sql} failed with {state}"
    if denied:
        assert state == "42501", f"{role}: {q.sql} names denied {denied} but gave {state}"
        return
    if state is not None:
        assert q.via_view, f"{role}: {q.sql} refused ({state}) though only pass-through outputs"
        return
    # 3. Each value as the model says.
    assert got is not None
    for values in got:
        assert len(values) == len(q.cols), (q.sql, values)
        for k, column in enumerate(q.cols):
            if column is None:
                continue
            errors = []
            for r in rows:  # the rows' values differ, so at most one of them matches what came back
                try:
                    check_value(
                        grants[column],
                        column,
                        r.value(column),
                        values[k],
                        envelopes[r.id].get(column),
                        f"{role} {q.sql}",
                    )
                    break
                except AssertionError as e:
                    errors.append(str(e))
            else:
                raise AssertionError("; ".join(errors))
