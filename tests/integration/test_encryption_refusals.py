"""What pgveil refuses on protected columns, and how: SQLSTATE 0A000, a message naming
``schema.table.column`` and the construct (never a value from the statement), and a session that goes
on exactly as after any PostgreSQL error: the next statement works, an explicit transaction is aborted
(25P02 until ROLLBACK or ROLLBACK TO SAVEPOINT), and in a pipeline the earlier results arrive, the
refused statement raises and the later ones are skipped up to the next Sync.

Every construct goes through psycopg (extended protocol), psycopg's ClientCursor (simple protocol with
literals), psql (simple) and asyncpg (extended, prepared). Then what is allowed on a protected column
(``IS NULL``, ``count(col)``), and a proxy whose keystore is unreachable: statements on protected
tables fail closed with 55000 naming the reason (but no DSN or password), the others work, and
``/readyz`` says 503.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import encfixtures
import psycopg
import pytest
from conftest import ProxyProcess
from encfixtures import EncEnv, direct_fetch, next_id, next_ids, run_psql
from psycopg import pq

from proxy.devcluster import DevCluster, free_port

pytestmark = pytest.mark.integration

# A literal no refusal message may echo.
SECRET_LITERAL = "lit-9f3ac2-never-echoed"


@dataclass(frozen=True)
class Refused:
    """A statement pgveil must refuse: ``%s`` placeholders (psycopg style) bound to ``params``."""

    name: str
    sql: str
    params: tuple[Any, ...]
    column: str  # schema.table.column the message must name
    construct: str  # words the message must contain
    copy_in: bool = False  # COPY ... FROM STDIN: psql reads data lines up to "\." after it

    @property
    def dollar_sql(self) -> str:
        """The statement with ``$n`` placeholders (asyncpg)."""
        counter = iter(range(1, len(self.params) + 1))
        return re.sub(r"%s", lambda _m: f"${next(counter)}", self.sql)


S, N = "public.enc_refuse.s", "public.enc_refuse.n"
SL = SECRET_LITERAL

REFUSED: list[Refused] = [
    Refused("where_eq", "SELECT id FROM enc_refuse WHERE s = %s", (SL,), S, "= comparison"),
    Refused("where_like", "SELECT id FROM enc_refuse WHERE s LIKE %s", (SL + "%",), S, "LIKE"),
    Refused("where_lt", "SELECT id FROM enc_refuse WHERE n < %s", (3,), N, "< comparison"),
    Refused("where_between", "SELECT id FROM enc_refuse WHERE n BETWEEN %s AND %s", (1, 3), N, "BETWEEN"),
    Refused("where_in", "SELECT id FROM enc_refuse WHERE s IN (%s, %s)", (SL, "b"), S, "IN"),
    Refused("function", "SELECT lower(s) FROM enc_refuse WHERE grp = %s", (1,), S, "function lower()"),
    Refused("operator", "SELECT s || %s FROM enc_refuse", (SL,), S, "operator ||"),
    Refused("order_by", "SELECT id FROM enc_refuse WHERE grp = %s ORDER BY s", (1,), S, "ORDER BY"),
    Refused("group_by", "SELECT s, count(*) FROM enc_refuse WHERE grp = %s GROUP BY s", (1,), S, "GROUP BY"),
    Refused("distinct", "SELECT DISTINCT s FROM enc_refuse WHERE grp = %s", (1,), S, "DISTINCT"),
    Refused(
        "join_on",
        "SELECT r.id FROM enc_refuse r JOIN enc_plain p ON p.v = r.s WHERE r.grp = %s",
        (1,),
        S,
        "JOIN ON",
    ),
    Refused("case", "SELECT CASE s WHEN %s THEN 1 ELSE 0 END FROM enc_refuse", (SL,), S, "CASE"),
    Refused("cast_text", "SELECT s::text FROM enc_refuse WHERE grp = %s", (1,), S, "cast to text"),
    Refused("cast_int8", "SELECT CAST(n AS bigint) FROM enc_refuse WHERE grp = %s", (1,), N, "cast to"),
    Refused("aggregate_max", "SELECT max(s) FROM enc_refuse WHERE grp = %s", (1,), S, "aggregate max()"),
    Refused("aggregate_sum", "SELECT sum(n) FROM enc_refuse WHERE grp = %s", (1,), N, "aggregate sum()"),
    Refused("count_distinct", "SELECT count(DISTINCT s) FROM enc_refuse WHERE grp = %s", (1,), S, "DISTINCT"),
    Refused(
        "window_function",
        "SELECT lag(s) OVER (ORDER BY id) FROM enc_refuse WHERE grp = %s",
        (1,),
        S,
        "window function lag()",
    ),
    Refused(
        "window_order_by", "SELECT rank() OVER (ORDER BY n) FROM enc_refuse WHERE grp = %s", (1,), N, "window ORDER BY"
    ),
    Refused(
        "window_partition",
        "SELECT count(*) OVER (PARTITION BY s) FROM enc_refuse WHERE grp = %s",
        (1,),
        S,
        "PARTITION BY",
    ),
    Refused("union", "SELECT s FROM enc_refuse WHERE grp = %s UNION SELECT v FROM enc_plain", (1,), S, "UNION"),
    Refused(
        "insert_select_other_column",
        "INSERT INTO enc_people (id, email) SELECT id + 1000000000, note FROM enc_people WHERE id = %s",
        (-1,),
        "public.enc_people.email",
        "INSERT ... SELECT",
    ),
    Refused(
        "update_set_expression",
        "UPDATE enc_refuse SET s = s || %s WHERE id = %s",
        (SL, -1),
        S,
        "expression",
    ),
    Refused(
        "update_set_other_column",
        "UPDATE enc_people SET email = note WHERE id = %s",
        (-1,),
        "public.enc_people.email",
        "column reference note",
    ),
    Refused("copy_binary_out", "COPY enc_refuse (id, s) TO STDOUT (FORMAT binary)", (), S, "binary"),
    Refused("copy_binary_in", "COPY enc_refuse (id, s) FROM STDIN (FORMAT binary)", (), S, "binary", copy_in=True),
    Refused("copy_to_file", "COPY enc_refuse (id, s) TO '/tmp/pgveil-refused-copy'", (), S, "server file"),
    Refused("copy_from_file", "COPY enc_refuse (id, s) FROM '/tmp/pgveil-refused-copy'", (), S, "server file"),
    Refused("copy_to_program", "COPY enc_refuse (id, s) TO PROGRAM 'cat'", (), S, "program"),
]
REFUSED_IDS = [r.name for r in REFUSED]


@dataclass(frozen=True)
class Seed:
    group: int
    rows: tuple[tuple[int, str | None, int | None], ...]  # (id, s, n)


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> EncEnv:
    return encfixtures.shared_env(pg, tmp_path_factory, pytestconfig)


@pytest.fixture(scope="module")
def seed(env: EncEnv) -> Iterator[Seed]:
    """A few rows of enc_refuse in a group of their own; at the end, nothing refused has changed them."""
    group = next_id()
    ids = next_ids(4)
    rows = ((ids[0], "alpha", 1), (ids[1], None, 2), (ids[2], "", None), (ids[3], "gamma é", 4))
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True) as c:
        c.cursor().executemany(
            "INSERT INTO enc_refuse (id, grp, s, n) VALUES (%s, %s, %s, %s)", [(i, group, s, n) for i, s, n in rows]
        )
    yield Seed(group, rows)
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True) as c:
        got = c.execute("SELECT id, s, n FROM enc_refuse WHERE grp = %s ORDER BY id", [group]).fetchall()
    assert got == list(rows), "a refused statement changed enc_refuse"


def check_refusal(r: Refused, sqlstate: str | None, message: str) -> None:
    assert sqlstate == "0A000", (r.name, sqlstate, message)
    assert r.column in message, (r.name, message)
    assert r.construct in message, (r.name, message)
    assert message.startswith("pgveil:"), message
    assert SECRET_LITERAL not in message


def plain_row(c: psycopg.Connection[Any], i: int) -> list[tuple[Any, ...]]:
    return c.execute("SELECT id, v FROM enc_plain WHERE id = %s", [i]).fetchall()


# -- psycopg, extended protocol ---------------------------------------------------------------------------


def psycopg_extended(cur: psycopg.Cursor[Any], r: Refused) -> None:
    if r.copy_in or r.sql.startswith("COPY"):
        cur.execute(r.sql, binary=True)  # binary results force the extended protocol without parameters
    else:
        cur.execute(r.sql, r.params)
    assert cur.pgresult is not None


@pytest.mark.parametrize("r", REFUSED, ids=REFUSED_IDS)
def test_psycopg_extended(env: EncEnv, seed: Seed, r: Refused) -> None:
    k = next_id()
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True) as c:
        with pytest.raises(psycopg.Error) as info:
            psycopg_extended(c.cursor(), r)
        check_refusal(r, info.value.sqlstate, info.value.diag.message_primary or "")
        assert c.info.transaction_status == pq.TransactionStatus.IDLE
        assert c.execute("SELECT s FROM enc_refuse WHERE id = %s", [seed.rows[0][0]]).fetchone() == ("alpha",)

    with psycopg.connect(env.dsn(connect_timeout="10")) as c:  # a transaction opens implicitly
        c.execute("INSERT INTO enc_plain (id, v) VALUES (%s, 'in the aborted transaction')", [k])
        with pytest.raises(psycopg.Error) as info:
            psycopg_extended(c.cursor(), r)
        check_refusal(r, info.value.sqlstate, info.value.diag.message_primary or "")
        assert c.info.transaction_status == pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            c.execute("SELECT 1 WHERE 1 = %s", [1])
        c.rollback()
        assert plain_row(c, k) == []
        assert c.execute("SELECT count(s) FROM enc_refuse WHERE grp = %s", [seed.group]).fetchone() == (3,)
        c.rollback()


# -- psycopg ClientCursor, simple protocol ------------------------------------------------------------------


def psycopg_simple(cur: psycopg.ClientCursor[Any], r: Refused) -> None:
    if r.sql.startswith("COPY") and "STDIN" in r.sql:
        with cur.copy(r.sql) as copy:
            copy.write(b"PGCOPY\n\xff\r\n\x00")
    elif r.sql.startswith("COPY") and "STDOUT" in r.sql:
        with cur.copy(r.sql) as copy:
            for _ in copy:
                pass
    else:
        cur.execute(r.sql, r.params)


@pytest.mark.parametrize("r", REFUSED, ids=REFUSED_IDS)
def test_psycopg_simple(env: EncEnv, seed: Seed, r: Refused) -> None:
    k = next_id()
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True, cursor_factory=psycopg.ClientCursor) as c:
        with pytest.raises(psycopg.Error) as info:
            psycopg_simple(psycopg.ClientCursor(c), r)
        check_refusal(r, info.value.sqlstate, info.value.diag.message_primary or "")
        assert c.execute("SELECT n FROM enc_refuse WHERE id = %s", [seed.rows[3][0]]).fetchone() == (4,)

        c.execute("BEGIN")
        c.execute("INSERT INTO enc_plain (id, v) VALUES (%s, 'in the aborted transaction')", [k])
        with pytest.raises(psycopg.Error) as info:
            psycopg_simple(psycopg.ClientCursor(c), r)
        check_refusal(r, info.value.sqlstate, info.value.diag.message_primary or "")
        assert c.info.transaction_status == pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            c.execute("SELECT 1")
        c.execute("ROLLBACK")
        assert plain_row(c, k) == []
        assert c.execute("SELECT 1").fetchone() == (1,)


# -- psql ------------------------------------------------------------------------------------------------

_PSQL_ERROR = re.compile(r"^ERROR:  ([0-9A-Z]{5}): (.*)$", re.MULTILINE)


def literal_sql(env: EncEnv, r: Refused) -> str:
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True) as c:
        return psycopg.ClientCursor(c).mogrify(r.sql, r.params) if r.params else r.sql


@pytest.mark.parametrize("r", REFUSED, ids=REFUSED_IDS)
def test_psql(env: EncEnv, seed: Seed, r: Refused) -> None:
    k = next_id()
    stmt = literal_sql(env, r) + ";\n" + ("\\.\n" if r.copy_in else "")
    script = (
        stmt
        + "SELECT 'after-autocommit';\n"
        + f"BEGIN;\nINSERT INTO enc_plain (id, v) VALUES ({k}, 'in the aborted transaction');\n"
        + stmt
        + "SELECT 'inside-the-aborted-transaction';\n"
        + "ROLLBACK;\n"
        + f"SELECT 'after-rollback', count(*) FROM enc_plain WHERE id = {k};\n"
        + f"SELECT s FROM enc_refuse WHERE id = {seed.rows[0][0]};\n"
    )
    p = run_psql(env.dsn(), "-v", "VERBOSITY=verbose", stdin=script, stop_on_error=False)
    errors = _PSQL_ERROR.findall(p.stderr)
    assert [e[0] for e in errors] == ["0A000", "0A000", "25P02"], p.stderr
    for sqlstate, message in errors[:2]:
        check_refusal(r, sqlstate, message)
    assert p.stdout.split() == ["after-autocommit", "after-rollback|0", "alpha"], (p.stdout, p.stderr)


# -- asyncpg ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", REFUSED, ids=REFUSED_IDS)
async def test_asyncpg(env: EncEnv, seed: Seed, r: Refused) -> None:
    k = next_id()
    conn = await asyncpg.connect(env.dsn())
    try:
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetch(r.dollar_sql, *r.params)
        check_refusal(r, info.value.sqlstate, info.value.args[0] if info.value.args else "")
        assert await conn.fetchval("SELECT s FROM enc_refuse WHERE id = $1", seed.rows[3][0]) == "gamma é"

        tr = conn.transaction()
        await tr.start()
        await conn.execute("INSERT INTO enc_plain (id, v) VALUES ($1, 'in the aborted transaction')", k)
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetch(r.dollar_sql, *r.params)
        check_refusal(r, info.value.sqlstate, info.value.args[0] if info.value.args else "")
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await conn.fetchval("SELECT 1")
        await tr.rollback()
        assert await conn.fetch("SELECT id FROM enc_plain WHERE id = $1", k) == []
        assert await conn.fetchval("SELECT count(n) FROM enc_refuse WHERE grp = $1", seed.group) == 3
    finally:
        await conn.close()


# -- savepoints, pipelines ------------------------------------------------------------------------------------


@pytest.mark.parametrize("simple", [False, True], ids=["extended", "simple"])
def test_rollback_to_savepoint_recovers_the_transaction(env: EncEnv, seed: Seed, simple: bool) -> None:
    """The refusal aborts only the subtransaction: ROLLBACK TO SAVEPOINT and the work before it commits."""
    k = next_id()
    factory = psycopg.ClientCursor if simple else psycopg.Cursor
    with psycopg.connect(env.dsn(connect_timeout="10"), cursor_factory=factory) as c:
        c.execute("INSERT INTO enc_plain (id, v) VALUES (%s, 'kept')", [k])
        c.execute("SAVEPOINT before_refusal")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            c.execute("SELECT id FROM enc_refuse WHERE s LIKE %s", ["a%"])
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            c.execute("SELECT %s::int", [1])
        c.execute("ROLLBACK TO SAVEPOINT before_refusal")
        assert c.execute("SELECT s FROM enc_refuse WHERE id = %s", [seed.rows[0][0]]).fetchone() == ("alpha",)
        c.commit()
        assert plain_row(c, k) == [(k, "kept")]


@dataclass
class PipelineOutcome:
    error: str | None
    results: list[Any]
    committed: list[int]


def run_pipeline(dsn: str, failing: str, ids: list[int], *, sync_after_first: bool) -> PipelineOutcome:
    """INSERT, SELECT, [Sync], a failing statement, INSERT, SELECT, then a statement after the next Sync."""
    a, b, c_ = ids
    results: list[Any] = []
    error: str | None = None
    with psycopg.connect(dsn, autocommit=True) as c:
        cursors: list[psycopg.Cursor[Any]] = []
        with c.pipeline() as p:
            try:
                cursors.append(c.execute("INSERT INTO enc_plain (id, v) VALUES (%s, %s)", [a, "first"]))
                cursors.append(c.execute("SELECT id, v FROM enc_plain WHERE id = %s", [a]))
                if sync_after_first:
                    p.sync()
                cursors.append(c.execute(failing, ["a%"]))
                cursors.append(c.execute("INSERT INTO enc_plain (id, v) VALUES (%s, %s)", [b, "skipped"]))
                cursors.append(c.execute("SELECT %s::int", [42]))
                p.sync()
            except psycopg.Error as e:
                error = type(e).__name__
            # Wait for the server's ReadyForQuery of that Sync: until psycopg has read it, the pipeline
            # stays aborted client-side, and how soon it arrives depends on timing, not on the proxy.
            for _ in range(50):
                try:
                    p.sync()
                    break
                except psycopg.errors.PipelineAborted:
                    time.sleep(0.01)
            cursors.append(c.execute("INSERT INTO enc_plain (id, v) VALUES (%s, %s)", [c_, "after the sync"]))
        for cur in cursors:
            if cur.pgresult is None:
                results.append("skipped")
            elif cur.description is not None:
                results.append(cur.fetchall())
            else:
                results.append(cur.statusmessage)
        assert c.info.transaction_status == pq.TransactionStatus.IDLE
        committed = [r[0] for r in c.execute("SELECT id FROM enc_plain WHERE id = ANY(%s) ORDER BY id", [ids])]
    return PipelineOutcome(error, results, [ids.index(i) for i in committed])


@pytest.mark.parametrize("sync_after_first", [False, True], ids=["one-sync", "two-syncs"])
def test_pipeline_refusal_behaves_like_a_server_error(env: EncEnv, sync_after_first: bool) -> None:
    """The same pipeline through pgveil (refused: a function of a protected column) and directly (the
    server fails the same statement at Parse: lower(bytea) does not exist) gives the same results, the
    same skipped statements and the same committed rows."""
    failing = "SELECT id FROM enc_refuse WHERE lower(s) LIKE %s"
    proxied = run_pipeline(env.dsn(connect_timeout="10"), failing, next_ids(3), sync_after_first=sync_after_first)
    direct = run_pipeline(env.app_direct_dsn, failing, next_ids(3), sync_after_first=sync_after_first)
    assert proxied.error == "FeatureNotSupported"
    assert direct.error is not None
    # Which later execute() psycopg raises from depends on when it reads the results, for both runs
    # alike; what the server did (which rows are committed) does not.
    assert proxied.committed == direct.committed
    assert proxied.results[1] != "skipped"  # the earlier SELECT's rows arrived
    assert proxied.results[-1] == "INSERT 0 1"  # the statement after the next Sync ran
    assert 1 not in proxied.committed  # the statement after the refused one was skipped


def test_pipeline_results_before_the_refusal_are_decrypted(env: EncEnv, seed: Seed) -> None:
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True) as c:
        before: list[psycopg.Cursor[Any]] = []
        after: list[psycopg.Cursor[Any]] = []
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info, c.pipeline():  # noqa: PT012 - raised at Sync
            for i, _s, _n in seed.rows:
                before.append(c.execute("SELECT s, n FROM enc_refuse WHERE id = %s", [i]))
            c.execute("SELECT id FROM enc_refuse WHERE grp = %s ORDER BY s", [seed.group])
            after.append(c.execute("SELECT s FROM enc_refuse WHERE id = %s", [seed.rows[0][0]]))
        assert S in str(info.value)
        assert [cur.fetchall() for cur in before] == [[(s, n)] for _i, s, n in seed.rows]
        # psycopg raises the refusal at Sync, or at the next execute() if it has already read the error
        # by then (it reads results whenever the socket is readable): either way nothing ran after it.
        assert [cur.pgresult for cur in after] in ([None], [])
        assert c.execute("SELECT s FROM enc_refuse WHERE id = %s", [seed.rows[0][0]]).fetchone() == ("alpha",)


# -- allowed ---------------------------------------------------------------------------------------------------


async def test_is_null_and_count_are_allowed(env: EncEnv, seed: Seed) -> None:
    null_ids = [i for i, s, _n in seed.rows if s is None]
    not_null_n = sum(1 for _i, _s, n in seed.rows if n is not None)
    q_null = "SELECT id FROM enc_refuse WHERE grp = %s AND s IS NULL ORDER BY id"
    q_count = "SELECT count(s), count(n), count(*) FROM enc_refuse WHERE grp = %s AND n IS NOT NULL"
    want_count = (sum(1 for _i, s, n in seed.rows if s is not None and n is not None), not_null_n, not_null_n)
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True) as c:
        assert [r[0] for r in c.execute(q_null, [seed.group])] == null_ids
        assert c.execute(q_count, [seed.group]).fetchone() == want_count
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True, cursor_factory=psycopg.ClientCursor) as c:
        assert [r[0] for r in c.execute(q_null, [seed.group])] == null_ids
        assert c.execute(q_count, [seed.group]).fetchone() == want_count
    conn = await asyncpg.connect(env.dsn())
    try:
        assert [r[0] for r in await conn.fetch(q_null.replace("%s", "$1"), seed.group)] == null_ids
        assert tuple(await conn.fetchrow(q_count.replace("%s", "$1"), seed.group)) == want_count
    finally:
        await conn.close()
    p = run_psql(env.dsn(), "-c", q_count.replace("%s", str(seed.group)))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "|".join(map(str, want_count))


# -- keystore unreachable -----------------------------------------------------------------------------------


KEYSTORE_PASSWORD = "ks-password-5d1e"


def readyz(proxy: ProxyProcess) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(proxy.admin_url + "/readyz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("service", ["keystore-dsn", "own-dsn"], ids=["catalog-via-keystore", "catalog-reachable"])
def test_keystore_unreachable_fails_closed(
    env: EncEnv, seed: Seed, pg: DevCluster, tmp_path: Path, service: str
) -> None:
    """``service`` = where the proxy reads the catalog: by default through the keystore DSN (dead too),
    or through its own, reachable DSN (then only the keys are missing)."""
    dead = free_port()
    dead_dsn = f"postgresql://keystore_owner:{KEYSTORE_PASSWORD}@127.0.0.1:{dead}/pgveil_keys"
    cfg = encfixtures.encryption_config(pg, tmp_path / "master.key", dead_dsn)
    if service == "own-dsn":
        cfg["service"] = {"dsn": env.direct_dsn}
    proxy = ProxyProcess(cfg, tmp_path / "proxy")
    proxy.start()
    try:
        with psycopg.connect(proxy.dsn(connect_timeout="10"), autocommit=True) as c:
            failures: list[psycopg.Error] = []
            for factory in (psycopg.Cursor, psycopg.ClientCursor):
                cur = factory(c)
                statements: list[tuple[str, list[Any]]] = [
                    ("SELECT s FROM enc_refuse WHERE id = %s", [seed.rows[0][0]]),
                    ("INSERT INTO enc_refuse (id, s) VALUES (%s, %s)", [next_id(), "must not be stored"]),
                ]
                for sql, params in statements:
                    with pytest.raises(psycopg.Error) as info:
                        cur.execute(sql, params)
                    failures.append(info.value)
                    # Unprotected tables go on working in the same session.
                    k = next_id()
                    cur.execute("INSERT INTO enc_plain (id, v) VALUES (%s, %s)", [k, "plain"])
                    assert cur.execute("SELECT v FROM enc_plain WHERE id = %s", [k]).fetchone() == ("plain",)
            with pytest.raises(psycopg.Error) as info, c.cursor().copy("COPY enc_refuse (id, s) FROM STDIN") as cp:
                cp.write_row((next_id(), "must not be stored"))
            failures.append(info.value)
            for e in failures:
                message = e.diag.message_primary or ""
                assert e.sqlstate in ("55000", "58000"), (e.sqlstate, message)
                assert message.startswith("pgveil:"), message
                assert any(w in message for w in ("keystore", "catalog", "service")), message
                for leak in (KEYSTORE_PASSWORD, "postgresql://", "keystore_owner", "pgveil_keys", str(dead)):
                    assert leak not in message, f"the client is told {leak!r}: {message}"
            status, body = readyz(proxy)
            assert status == 503, body
            assert KEYSTORE_PASSWORD not in json.dumps(body)
        rows = asyncio.run(direct_fetch(env, "SELECT count(*) AS n FROM enc_refuse WHERE grp IS NULL"))
        assert rows[0]["n"] == 0  # nothing was stored, not even as ciphertext
    finally:
        proxy.stop()
    assert KEYSTORE_PASSWORD not in proxy.logs()


def test_results_in_an_unsupported_client_encoding_are_refused_and_the_session_goes_on(env: EncEnv) -> None:
    """pgveil cannot encode decrypted text in SJIS: both protocols get 0A000 naming the encoding, before
    (extended) or instead of (simple) any row, and the session continues."""
    rid = next_id()
    with psycopg.connect(env.proxy.dsn(), autocommit=True) as c:
        c.execute("INSERT INTO enc_rt_text (id, v) VALUES (%s, %s)", [rid, "kept"])
        c.execute("SET client_encoding = 'SJIS'")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match='client_encoding "SJIS"'):
            c.execute("SELECT v FROM enc_rt_text WHERE id = %s", [rid])
        with pytest.raises(psycopg.errors.FeatureNotSupported, match='client_encoding "SJIS"'):
            psycopg.ClientCursor(c).execute("SELECT v FROM enc_rt_text WHERE id = %s", [rid])
        assert c.execute("SELECT 1").fetchone() == (1,)
        c.execute("SET client_encoding = 'UTF8'")
        assert c.execute("SELECT v FROM enc_rt_text WHERE id = %s", [rid]).fetchone() == ("kept",)
