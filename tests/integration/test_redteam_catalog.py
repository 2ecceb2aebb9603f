"""Red-team tests of issue 7 items 3-6 and COPY against the real server through pgveil, each checked the
canary way: the distinctive plaintext must not be in the table, the server log (as text and as hex), and,
in the last test, the data directory and WAL after a CHECKPOINT.

The module has its own database, tables and pgveil, so its DDL cannot disturb the other modules.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import psycopg
import pytest
from conftest import APP_PASSWORD, ProxyProcess, proxy_config
from test_encryption_canary import search, server_files

from proxy.config import parse_config
from proxy.devcluster import DevCluster
from proxy.schema import ENVELOPE_MIN_LENGTH, ENVELOPE_PREFIX, apply_schema, plan_event_trigger, plan_schema

pytestmark = pytest.mark.integration

DB = "veil_redteam"
T = TypeVar("T")

SETUP = """
CREATE SCHEMA s1;
CREATE TABLE s1.secrets (id int PRIMARY KEY, c text, open text);
CREATE TABLE public.plain (id int, c text, open text);
CREATE TABLE public.attachee (id int NOT NULL, c text, open text);
CREATE TABLE public.heir (id int, c text, open text);
CREATE TABLE public.parted (id int, c text, open text) PARTITION BY RANGE (id);
CREATE TABLE public.parted_low PARTITION OF public.parted FOR VALUES FROM (0) TO (1000);
CREATE TABLE public.swapped (id int, c text, open text);
"""

TABLES = {
    "s1.secrets": {"c": "text"},
    "public.attachee": {"c": "text"},
    "public.heir": {"c": "text"},
    "public.parted": {"c": "text"},
    "public.swapped": {"c": "text"},
}


class Env:
    def __init__(self, pg: DevCluster, proxy: ProxyProcess) -> None:
        self.pg = pg
        self.proxy = proxy
        self.canaries: list[str] = []
        self.controls: list[str] = []

    @property
    def direct(self) -> str:
        return self.pg.dsn(dbname=DB)

    @property
    def app_direct(self) -> str:
        return f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{self.pg.port}/{DB}"

    def dsn(self) -> str:
        return self.proxy.dsn(dbname=DB)

    def canary(self, how: str) -> str:
        value = f"CANARYRT-{how}-{uuid.uuid4().hex}"
        self.canaries.append(value)
        return value

    def control(self, how: str) -> str:
        value = f"CONTROLRT-{how}-{uuid.uuid4().hex}"
        self.controls.append(value)
        return value

    def stored(self, sql: str) -> list[Any]:
        with psycopg.connect(self.direct, autocommit=True) as c:
            return c.execute(sql).fetchall()

    def in_server_log(self, canary: str) -> bool:
        text = self.pg.log_file.read_text(errors="replace")
        return canary in text or canary.encode().hex() in text.lower()


async def _setup(pg: DevCluster) -> None:
    su = await asyncpg.connect(pg.dsn(dbname="postgres"))
    try:
        await su.execute(f"DROP DATABASE IF EXISTS {DB}")
        await su.execute(f"CREATE DATABASE {DB} OWNER app")
    finally:
        await su.close()
    app = await asyncpg.connect(f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{pg.port}/{DB}")
    try:
        await app.execute(SETUP)
    finally:
        await app.close()
    catalog = parse_config({"tables": _tables_config()}, base_dir=Path.cwd(), environ={}).catalog()
    service = await asyncpg.connect(pg.dsn(dbname=DB))
    try:
        await apply_schema(service, await plan_schema(service, catalog) + await plan_event_trigger(service))
    finally:
        await service.close()


def _tables_config() -> dict[str, Any]:
    return {
        name: {"columns": {c: {"type": t, "encrypt": True} for c, t in cols.items()}} for name, cols in TABLES.items()
    }


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    asyncio.run(_setup(pg))
    workdir = tmp_path_factory.mktemp("redteam-proxy")
    cfg = proxy_config(
        pg,
        service={"dsn": pg.dsn(dbname=DB)},
        keystore={"dsn": pg.dsn(dbname=DB), "master_key": {"provider": "local", "path": str(workdir / "mk")}},
        tables=_tables_config(),
        roles={"default": "plaintext"},
    )
    proxy = ProxyProcess(cfg, workdir)
    proxy.start()
    e = Env(pg, proxy)
    _eventually(lambda: _query(e, "SELECT c FROM s1.secrets WHERE id = -1"))
    yield e
    proxy.stop()


def _query(env: Env, sql: str) -> list[Any]:
    with psycopg.connect(env.dsn(), autocommit=True, connect_timeout=10) as c:
        return c.execute(sql).fetchall()


def _eventually(f: Callable[[], T], timeout: float = 20) -> T:
    """Retries while pgveil answers 55000 (its catalog is being read again)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return f()
        except psycopg.errors.ObjectNotInPrerequisiteState:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def envelope_shaped(canary: str) -> bytes:
    """Plaintext that passes the CHECK constraint on an encrypted column (so it would land in the table)."""
    return ENVELOPE_PREFIX + b"A" * ENVELOPE_MIN_LENGTH + canary.encode()


# -- 3. names: every spelling the server resolves to the protected table is sealed ------------------------

SPELLINGS = [
    "S1.SECRETS",
    '"s1"."secrets"',
    "s1 . secrets",
    "s1./* a comment */secrets",
    'U&"s1".U&"\\0073ecrets"',
    'U&"s1".U&"!0073ecrets" UESCAPE \'!\'',
    f"{DB}.s1.secrets",
    "s1.secrets AS x",
]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_spelling_of_the_protected_table_is_sealed(env: Env, spelling: str) -> None:
    canary = env.canary("spelling")
    row = 800 + SPELLINGS.index(spelling)
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute(f"INSERT INTO {spelling} (id, c) VALUES (%s, %s)", [row, canary])
        psycopg.ClientCursor(c).execute(f"INSERT INTO {spelling} (id, c) VALUES (%s, %s)", [row + 100, canary])
        assert c.execute("SELECT c FROM s1.secrets WHERE id IN (%s, %s)", [row, row + 100]).fetchall() == [
            (canary,),
            (canary,),
        ]
    assert not env.in_server_log(canary)
    assert not _plaintext_in(env, "s1.secrets", canary)


# -- 4. the family: a protected table under an unprotected parent -------------------------------------------


def test_write_through_an_unprotected_partitioned_parent(env: Env) -> None:
    """The protected table becomes a partition of a new, unprotected partitioned table: an INSERT into
    that parent is routed by the server into the protected table."""
    canary = env.canary("parent-partition")
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("CREATE TABLE public.umbrella (id int NOT NULL, c bytea, open text) PARTITION BY RANGE (id)")
        attach = "ALTER TABLE public.umbrella ATTACH PARTITION public.attachee FOR VALUES FROM (0) TO (100)"
        _eventually(lambda: c.execute(attach))

        def write() -> None:
            c.execute("INSERT INTO public.umbrella (id, c, open) VALUES (1, %s, 'x')", [envelope_shaped(canary)])

        with pytest.raises(psycopg.errors.FeatureNotSupported, match="umbrella"):
            _eventually(write)
        assert c.execute("SELECT count(*) FROM public.umbrella").fetchone() == (0,)
    assert not env.in_server_log(canary), "plaintext reached the server through the parent"
    assert not any(canary.encode() in bytes(v or b"") for (v,) in env.stored("SELECT c FROM public.attachee"))


def test_write_through_a_view_over_the_unprotected_parent(env: Env) -> None:
    """A view over the partitioned table that the protected table was attached to (the test above): an
    INSERT into the view is routed into the protected table."""
    canary = env.canary("parent-view")
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        _eventually(lambda: c.execute("CREATE VIEW public.umbrella_v AS SELECT id, c, open FROM public.umbrella"))

        def write() -> None:
            c.execute("INSERT INTO public.umbrella_v (id, c, open) VALUES (3, %s, 'x')", [envelope_shaped(canary)])

        with pytest.raises(psycopg.errors.FeatureNotSupported, match="umbrella_v"):
            _eventually(write)
    assert not env.in_server_log(canary), "plaintext reached the server through the view"
    assert not _plaintext_in(env, "public.attachee", canary)


def test_write_through_a_view_over_an_opaque_view(env: Env) -> None:
    """A view pgveil cannot map (its WHERE uses the protected column) is opaque; a view over it read as
    one over an unprotected relation let writes through, into the protected table."""
    canary = env.canary("opaque-view")
    with psycopg.connect(env.app_direct, autocommit=True) as d:  # pgveil refuses length(c) in a view
        d.execute("CREATE VIEW public.vq AS SELECT id, c, open FROM s1.secrets WHERE length(c) > 0")
        d.execute("CREATE VIEW public.vq2 AS SELECT id, c FROM public.vq")
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("COMMENT ON TABLE s1.secrets IS 'read the catalog again'")  # the views are known after this

        def write() -> None:
            c.execute("INSERT INTO public.vq2 (id, c) VALUES (700, %s)", [envelope_shaped(canary)])

        with pytest.raises(psycopg.errors.FeatureNotSupported, match="vq2"):
            _eventually(write)
    assert not env.in_server_log(canary), "plaintext reached the server through the view"
    assert not _plaintext_in(env, "s1.secrets", canary)


def test_update_through_an_unprotected_inheritance_parent(env: Env) -> None:
    """The protected table inherits from a new, unprotected table: an UPDATE of the parent recurses
    into the protected child."""
    canary = env.canary("parent-inherit")
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("INSERT INTO public.heir (id, c, open) VALUES (1, 'sealed', 'x')")
        c.execute("CREATE TABLE public.ancestor (id int, c bytea)")
        _eventually(lambda: c.execute("ALTER TABLE public.heir INHERIT public.ancestor"))

        def write() -> None:
            c.execute("UPDATE public.ancestor SET c = %s WHERE id = 1", [envelope_shaped(canary)])

        with pytest.raises(psycopg.errors.FeatureNotSupported, match="ancestor"):
            _eventually(write)
        assert c.execute("SELECT c FROM public.heir").fetchall() == [("sealed",)]
    assert not env.in_server_log(canary), "plaintext reached the server through the parent"


# -- 5. DDL that pgveil's reading does not see --------------------------------------------------------------


def test_columns_swapped_by_dynamic_sql_in_the_same_transaction(env: Env) -> None:
    """DDL through pgveil that names no protected table in its text (dynamic SQL in a DO block) swaps a
    protected column's name with an unprotected one's; a write in the same transaction names the
    protected column by its new name. The DO block counts as DDL on every protected table: statements on
    them are refused (55000) until the transaction ends, and the catalog is read again then."""
    canary = f"CANARYRT-swapped-{uuid.uuid4().hex}"
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("BEGIN")
        c.execute(
            "DO $$ BEGIN "
            "EXECUTE 'ALTER TABLE public.swap' || 'ped RENAME COLUMN c TO tmp'; "
            "EXECUTE 'ALTER TABLE public.swap' || 'ped RENAME COLUMN open TO c'; "
            "EXECUTE 'ALTER TABLE public.swap' || 'ped RENAME COLUMN tmp TO open'; END $$"
        )
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="until it ends"):
            c.execute("INSERT INTO public.swapped (id, open) VALUES (1, %s)", [canary])
        c.execute("ROLLBACK")
    assert not env.in_server_log(canary), "plaintext reached the server for the renamed protected column"


def test_a_dynamic_do_block_outside_a_transaction_is_followed_by_a_catalog_read(env: Env) -> None:
    """The same swap, committed at once: pgveil reads its catalog again after the block, finds the
    encrypted column no longer where the config says (public.swapped.c is text now), and keeps refusing
    statements on the table (55000) rather than send the value for ``open``, which is the envelope column
    now, in plaintext. The swap is undone directly; pgveil then serves the table again."""
    canary = f"CANARYRT-swapped-autocommit-{uuid.uuid4().hex}"
    swap = (
        "DO $$ BEGIN "
        "EXECUTE 'ALTER TABLE public.swap' || 'ped RENAME COLUMN c TO tmp'; "
        "EXECUTE 'ALTER TABLE public.swap' || 'ped RENAME COLUMN open TO c'; "
        "EXECUTE 'ALTER TABLE public.swap' || 'ped RENAME COLUMN tmp TO open'; END $$"
    )
    swapped = False
    try:
        with psycopg.connect(env.dsn(), autocommit=True) as c:
            _eventually(lambda: c.execute(swap))  # after the catalog read an earlier test's DDL started
            swapped = True
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match=r"not ready|being read again"):
                _eventually(
                    lambda: c.execute("INSERT INTO public.swapped (id, open) VALUES (2, %s)", [canary]), timeout=3
                )
    finally:
        if swapped:
            with psycopg.connect(env.direct, autocommit=True) as d:
                d.execute(swap)
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        _eventually(lambda: c.execute("SELECT c, open FROM public.swapped LIMIT 0"))
    assert not env.in_server_log(canary), "plaintext reached the server for the renamed protected column"


@pytest.mark.xfail(
    strict=True,
    reason="documented as not covered (server-side code): CREATE FUNCTION whose body names a protected table "
    "passes (a DO block naming one is refused), and a call of it carries plaintext in its arguments",
)
def test_function_that_writes_into_a_protected_table(env: Env) -> None:
    canary = f"CANARYRT-function-{uuid.uuid4().hex}"  # not in env.canaries: the xfail leaks it
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        try:
            c.execute(
                "CREATE FUNCTION public.stash(i int, v bytea) RETURNS void LANGUAGE sql "
                "AS $$ INSERT INTO s1.secrets (id, c) VALUES (i, v) $$"
            )
            c.execute("SELECT public.stash(1100, %s)", [envelope_shaped(canary)])
        except psycopg.errors.FeatureNotSupported:
            pass
    assert not _plaintext_in(env, "s1.secrets", canary)


# -- writes that reach a protected table another way ----------------------------------------------------------


def test_cte_insert_and_insert_select(env: Env) -> None:
    cte, sel = env.canary("cte"), env.canary("insert-select")
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("WITH x AS (INSERT INTO s1.secrets (id, c) VALUES (100, %s) RETURNING id) SELECT id FROM x", [cte])
        assert c.execute("SELECT c FROM s1.secrets WHERE id = 100").fetchall() == [(cte,)]
    run = psycopg.connect(env.app_direct, autocommit=True)
    with run:
        run.execute("INSERT INTO public.plain (id, c) VALUES (1, %s)", [sel])
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            c.execute("INSERT INTO s1.secrets (id, c) SELECT id + 200, c FROM public.plain")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            c.execute("UPDATE s1.secrets s SET c = p.c FROM public.plain p WHERE s.id = p.id")
    ((stored,),) = env.stored("SELECT c FROM s1.secrets WHERE id = 100")
    assert cte.encode() not in stored
    env.canaries.remove(sel)  # it was written directly into an unprotected table


def test_copy_with_odd_quoting_and_into_a_partition(env: Env) -> None:
    upper, part, qual = env.canary("copy-upper"), env.canary("copy-partition"), env.canary("copy-qualified")
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        with c.cursor().copy("COPY S1.SECRETS (ID, C) FROM STDIN") as cp:
            cp.write_row((300, upper))
        with c.cursor().copy('COPY "public"."parted_low" ("id", "c") FROM STDIN') as cp:
            cp.write_row((301, part))
        with c.cursor().copy(f'COPY "{DB}".s1."secrets" (id, c) FROM STDIN') as cp:
            cp.write_row((302, qual))
        assert c.execute("SELECT c FROM s1.secrets WHERE id IN (300, 302) ORDER BY id").fetchall() == [
            (upper,),
            (qual,),
        ]
    for canary in (upper, part, qual):
        assert not env.in_server_log(canary)


def _plaintext_in(env: Env, table: str, needle: str) -> bool:
    return any(needle.encode() in bytes(v or b"") for (v,) in env.stored(f"SELECT c FROM {table}"))


COPY_INTO_PROTECTED = [
    "INSERT INTO s1.secrets (id, c, open) VALUES (400, NULL, %s) ON CONFLICT (id) DO UPDATE SET c = EXCLUDED.open",
    "UPDATE s1.secrets SET c = open WHERE id = 400",
    "UPDATE s1.secrets SET (c, open) = (SELECT open, open) WHERE id = 400",
    "UPDATE s1.secrets SET (c) = ROW(open) WHERE id = 400",
    "INSERT INTO s1.secrets (id, c) VALUES (401, (SELECT open FROM s1.secrets WHERE id = 400))",
    "INSERT INTO s1.secrets SELECT 402, open, open FROM s1.secrets WHERE id = 400",
    "WITH x AS (SELECT open AS c FROM s1.secrets WHERE id = 400) INSERT INTO s1.secrets (id, c) SELECT 403, c FROM x",
    "INSERT INTO s1.secrets (id, c) SELECT 404, open FROM s1.secrets WHERE id = 400 ON CONFLICT DO NOTHING",
]


@pytest.mark.parametrize("sql", COPY_INTO_PROTECTED)
def test_unprotected_values_copied_into_a_protected_column(env: Env, sql: str) -> None:
    value = envelope_shaped(f"OPEN-{uuid.uuid4().hex}").hex()
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("INSERT INTO s1.secrets (id, c, open) VALUES (400, 'x', %s) ON CONFLICT (id) DO UPDATE SET open = %s",
                  [value, value])  # fmt: skip
        try:
            c.execute(sql, [value] if "%s" in sql else None)
        except psycopg.Error:
            pass
    assert not _plaintext_in(env, "s1.secrets", value[8:])


def test_view_over_a_view_found_before_it(env: Env) -> None:
    """A view found in the first round (it also names the protected table in a subquery) over a view found
    only in the second round (it is over a view over the table)."""
    canary = env.canary("view-order")
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("CREATE VIEW public.va AS SELECT id, c, open FROM s1.secrets")
        _eventually(lambda: c.execute("CREATE VIEW public.vi AS SELECT id, c AS x, open FROM public.va"))
        _eventually(
            lambda: c.execute(
                "CREATE VIEW public.vo AS SELECT id, x FROM public.vi WHERE id IN (SELECT id FROM s1.secrets) OR true"
            )
        )

        def write() -> None:
            c.execute("INSERT INTO public.vo (id, x) VALUES (500, %s)", [envelope_shaped(canary)])

        try:
            _eventually(write)
        except psycopg.Error:
            pass
        text = env.canary("view-order-text")
        c.execute("INSERT INTO public.vo (id, x) VALUES (501, %s)", [text])
        assert c.execute("SELECT x FROM public.vo WHERE id = 501").fetchall() == [(text,)]
        assert c.execute("SELECT c FROM s1.secrets WHERE id = 501").fetchall() == [(text,)]
    assert not env.in_server_log(canary)
    assert not _plaintext_in(env, "s1.secrets", canary)
    assert not _plaintext_in(env, "s1.secrets", text)


# -- rules: pgveil finds a relation whose rule writes into a protected table, and must not write through it -----

RULE_DECOYS = {
    "table": "CREATE TABLE public.decoy_t (id int, c text)",
    "view": "CREATE VIEW public.decoy_v AS SELECT 1 AS id, 'x'::text AS c",
    "mapped": "CREATE VIEW public.decoy_m AS SELECT id, open AS c FROM s1.secrets",  # c is an open column
}


@pytest.mark.parametrize("kind", sorted(RULE_DECOYS))
def test_rule_that_writes_into_a_protected_table(env: Env, kind: str) -> None:
    canary = env.canary(f"rule-{kind}")
    decoy = f"public.decoy_{kind[0]}"
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute(RULE_DECOYS[kind])
        rule = (
            f"CREATE RULE decoy_{kind[0]}_ins AS ON INSERT TO {decoy} DO INSTEAD "
            "INSERT INTO s1.secrets (id, c) VALUES (NEW.id, decode(NEW.c, 'hex'))"
        )
        _eventually(lambda: c.execute(rule))

        def write() -> None:
            c.execute(f"INSERT INTO {decoy} (id, c) VALUES (%s, %s)", [600 + len(kind), envelope_shaped(canary).hex()])

        with pytest.raises(psycopg.errors.FeatureNotSupported, match=decoy.split(".")[1]):
            _eventually(write)
    assert not env.in_server_log(canary)
    assert not env.in_server_log(envelope_shaped(canary).hex())
    assert not _plaintext_in(env, "s1.secrets", canary)


LITERAL_PATHS = [
    "WITH v AS (SELECT 'CANARY'::text AS x) INSERT INTO s1.secrets (id, c) SELECT {id}, x FROM v",
    "WITH v(x) AS (VALUES ('CANARY')) INSERT INTO s1.secrets (id, c) SELECT {id}, x FROM v",
    "INSERT INTO s1.secrets (id, c) SELECT {id}, x FROM (VALUES ('CANARY')) AS v(x)",
    "INSERT INTO s1.secrets (id, c) SELECT * FROM (SELECT {id}, 'CANARY') AS v",
    "INSERT INTO s1.secrets (id, c) SELECT v.* FROM (SELECT {id}, 'CANARY'::bytea) AS v",
    "INSERT INTO s1.secrets SELECT * FROM (SELECT {id}, 'CANARY'::bytea, 'x') AS v",
    "INSERT INTO s1.secrets (id, c, open) SELECT {id}, v.* FROM (SELECT 'CANARY'::bytea, 'x') AS v",
    "WITH v AS (SELECT {id}, 'CANARY'::bytea) INSERT INTO s1.secrets (id, c) SELECT * FROM v",
    "INSERT INTO s1.secrets (id, c) SELECT (v).* FROM (SELECT {id} AS a, 'CANARY'::bytea AS b) AS v",
    "INSERT INTO s1.secrets (id, c) SELECT (v.*).* FROM (SELECT {id} AS a, 'CANARY'::bytea AS b) AS v",
    "INSERT INTO s1.secrets SELECT (v).* FROM (SELECT {id} AS a, 'CANARY'::bytea AS b, 'x' AS o) AS v",
    "INSERT INTO s1.secrets (id, c) SELECT {id}, (SELECT 'CANARY')",
    "INSERT INTO s1.secrets (id, c) VALUES ({id}, (VALUES ('CANARY')))",
    "INSERT INTO s1.secrets (id, c) SELECT DISTINCT {id}, 'CANARY'",
    "INSERT INTO s1.secrets (id, c) SELECT {id}, 'CANARY' GROUP BY 1, 2",
    "INSERT INTO s1.secrets (id, c) SELECT {id}, x FROM unnest(ARRAY['CANARY']) AS x",
    "INSERT INTO s1.secrets (id, c) SELECT {id}, x FROM unnest(ARRAY['CANARY'::bytea]) AS u(x)",
    "INSERT INTO s1.secrets (id, c) SELECT * FROM unnest(ARRAY[{id}], ARRAY['CANARY'::bytea])",
    "INSERT INTO s1.secrets (id, c) SELECT * FROM ROWS FROM (unnest(ARRAY[{id}]), unnest(ARRAY['CANARY'::bytea]))",
    "INSERT INTO s1.secrets (id, c) SELECT {id}, x FROM (SELECT 'CANARY'::bytea) AS v(x) LIMIT 1",
    "INSERT INTO s1.secrets (id, c) SELECT a, b "
    'FROM json_to_record(\'{"a": {id}, "b": "CANARY"}\') AS r(a int, b bytea)',
    "INSERT INTO s1.secrets (id, c) SELECT {id}, convert_to('CANARY', 'UTF8')",
    "INSERT INTO s1.secrets (id, c) SELECT {id}, x FROM (SELECT 'CANARY'::bytea UNION ALL SELECT NULL) AS v(x)",
    "INSERT INTO s1.secrets (id, c) VALUES ({id}, 'CANARY' || '')",
    "INSERT INTO s1.secrets (id, c) VALUES ({id}, ('CANARY'))",
    "INSERT INTO s1.secrets (id, c) VALUES ({id}, CAST('CANARY' AS text))",
    "INSERT INTO s1.secrets (id, c) VALUES ({id}, text 'CANARY')",
    "INSERT INTO s1.secrets (id, c) VALUES ({id}, E'CANARY')",
    "INSERT INTO s1.secrets (id, c) VALUES ({id}, $$CANARY$$)",
    "INSERT INTO s1.secrets (id, c) VALUES ({id}, $q$CANARY$q$)",
    "INSERT INTO s1.secrets (id, c) VALUES ({id}, (SELECT 'CANARY'))",
    "INSERT INTO s1.secrets (id, c) VALUES ({id}, COALESCE('CANARY'))",
    "INSERT INTO s1.secrets (id, c) VALUES ({id}, U&'CANARY')",
    "INSERT INTO s1.secrets (c, id) SELECT 'CANARY', {id}",
    "INSERT INTO s1.secrets AS t (id, c) VALUES ({id}, 'x') ON CONFLICT (id) DO UPDATE SET c = 'CANARY'",
    "INSERT INTO s1.secrets (id, c) VALUES ({id}, 'x') ON CONFLICT (id) DO UPDATE SET (c) = (SELECT 'CANARY')",
    "UPDATE s1.secrets SET (id, c) = ({id}, 'CANARY') WHERE id = {id}",
    "UPDATE s1.secrets SET c = (SELECT 'CANARY') WHERE id = {id}",
    "UPDATE s1.secrets SET c = x FROM (VALUES ('CANARY')) AS v(x) WHERE id = {id}",
    "WITH u AS (UPDATE s1.secrets SET c = 'CANARY' WHERE id = {id} RETURNING id) SELECT * FROM u",
    "INSERT INTO public.parted (id, c) VALUES ({id}, 'CANARY')",
    "MERGE INTO s1.secrets t USING (SELECT {id} AS i) s ON t.id = s.i "
    "WHEN NOT MATCHED THEN INSERT (id, c) VALUES (s.i, 'CANARY')",
    "MERGE INTO public.parted_low t USING (SELECT {id} AS i) s ON t.id = s.i "
    "WHEN NOT MATCHED THEN INSERT (id, c) VALUES (s.i, 'CANARY')",
    "WITH secrets AS (SELECT 1) INSERT INTO s1.secrets (id, c) SELECT {id}, 'CANARY' FROM secrets",
    "INSERT INTO public.parted_low AS p (id, c) VALUES ({id}, 'CANARY')",
]


@pytest.mark.parametrize("template", LITERAL_PATHS)
def test_literals_on_every_path_into_a_protected_column(env: Env, template: str) -> None:
    canary = env.canary("literal")
    row = 1000 - 50 + LITERAL_PATHS.index(template)
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        if template.startswith("UPDATE"):
            c.execute("INSERT INTO s1.secrets (id, c) VALUES (%s, 'x') ON CONFLICT DO NOTHING", [row])
        try:
            c.execute(template.replace("{id}", str(row)).replace("CANARY", canary))
        except psycopg.errors.FeatureNotSupported:
            pass
    assert not env.in_server_log(canary)
    assert not _plaintext_in(env, "s1.secrets", canary)
    assert not _plaintext_in(env, "public.parted", canary)


COPY_STREAMS = {
    "after-end-marker": ("", b"910\tsealed\n\\.\n911\t{canary}\n"),
    "end-marker-crlf": ("", b"912\tsealed\r\n\\.\r\n913\t{canary}\r\n"),
    "end-marker-in-field": ("", b"914\ta\\.\n915\t{canary}\n"),
    "csv-quoted-end-marker": ("(FORMAT csv)", b'916,"x\n\\.\n"\n917,{canary}\n'),
    "csv-end-marker": ("(FORMAT csv)", b"918,x\n\\.\n919,{canary}\n"),
    "csv-escape-quote": ("(FORMAT csv, ESCAPE '\\')", b'920,"a\\",{canary}"\n'),
    "csv-quote-is-delimiter-like": ("(FORMAT csv, QUOTE '|')", b"921,|a,b|\n922,|{canary}|\n"),
}


@pytest.mark.parametrize("case", sorted(COPY_STREAMS))
def test_copy_streams_that_may_be_cut_differently(env: Env, case: str) -> None:
    options, template = COPY_STREAMS[case]
    canary = env.canary(f"copy-{case}")
    data = template.replace(b"{canary}", canary.encode())
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        try:
            with c.cursor().copy(f"COPY s1.secrets (id, c) FROM STDIN {options}") as cp:
                cp.write(data)
        except psycopg.Error:
            pass
    assert not _plaintext_in(env, "s1.secrets", canary)
    assert not env.in_server_log(canary)


# -- the canary check over everything above ------------------------------------------------------------------


def test_zz_no_canary_reached_the_server(env: Env, pg: DevCluster) -> None:
    assert env.canaries, "run with the other tests of this module"
    with psycopg.connect(pg.dsn(dbname=DB), autocommit=True) as c:
        c.execute("CHECKPOINT")
        c.execute("SELECT pg_switch_wal()")
    found = search(server_files(pg), [*env.canaries])
    leaks = {c: sorted(str(p) for p in found.files(c)) for c in env.canaries if found.files(c)}
    lines = [
        line[:400]
        for line in pg.log_file.read_text(errors="replace").splitlines()
        if any(c in line or c.encode().hex() in line for c in leaks)
    ]
    assert leaks == {}, f"plaintext written through pgveil found on the server: {leaks}; log: {lines}"
