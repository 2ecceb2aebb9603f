"""Issue 7, items 3-5 against the real server through pgveil, each with the canary check: name
resolution that does not depend on search_path (SET, startup options, ALTER ROLE ... SET, set_config),
temporary tables shadowing a protected name, the protected family (partitions, one attached while pgveil
runs, inheritance children, updatable views), and a catalog that follows DDL made through pgveil and
elsewhere (a dropped column before a protected one, renamed columns and tables).

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
from encfixtures import run_psql
from test_encryption_canary import search, server_files

from proxy.catalog_loader import load_catalog
from proxy.config import parse_config
from proxy.devcluster import DevCluster
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable
from proxy.schema import SchemaRefused, apply_schema, plan_event_trigger, plan_schema

pytestmark = pytest.mark.integration

DB = "veil_names"
T = TypeVar("T")

SETUP = """
CREATE SCHEMA s1;
CREATE SCHEMA s2;
CREATE TABLE s1.secrets (id int PRIMARY KEY, c text, open text);
CREATE TABLE public.lonely (id int PRIMARY KEY, c text, open text);
CREATE TABLE s2.lonely (id int PRIMARY KEY, c text, open text);
CREATE TABLE public.parted (id int, c text, open text) PARTITION BY RANGE (id);
CREATE TABLE public.parted_low PARTITION OF public.parted FOR VALUES FROM (0) TO (1000);
CREATE TABLE public.parent (id int, c text, open text);
CREATE TABLE public.child (extra int) INHERITS (public.parent);
CREATE TABLE public.dropper (id int, gone text, c text, open text);
CREATE TABLE public.renamed (id int, c text, open text);
CREATE TABLE public.moved (id int, c text, open text);
CREATE TABLE public.outside (id int, c text, open text);
"""

TABLES = {
    "s1.secrets": {"c": "text"},
    "public.lonely": {"c": "text"},
    "public.parted": {"c": "text"},
    "public.parent": {"c": "text"},
    "public.dropper": {"c": "text"},
    "public.renamed": {"c": "text"},
    "public.moved": {"c": "text"},
    "public.outside": {"c": "text"},
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

    def dsn(self, **params: str) -> str:
        return self.proxy.dsn(dbname=DB, **params)

    def canary(self, how: str) -> str:
        value = f"CANARY7-{how}-{uuid.uuid4().hex}"
        self.canaries.append(value)
        return value

    def control(self, how: str) -> str:
        value = f"CONTROL7-{how}-{uuid.uuid4().hex}"
        self.controls.append(value)
        return value

    def stored(self, sql: str) -> list[Any]:
        with psycopg.connect(self.direct, autocommit=True) as c:
            return c.execute(sql).fetchall()


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
        assert await plan_event_trigger(service) == []
    finally:
        await service.close()


def _tables_config() -> dict[str, Any]:
    return {
        name: {"columns": {c: {"type": t, "encrypt": True} for c, t in cols.items()}} for name, cols in TABLES.items()
    }


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    asyncio.run(_setup(pg))
    workdir = tmp_path_factory.mktemp("names-proxy")
    cfg = proxy_config(
        pg,
        service={"dsn": pg.dsn(dbname=DB)},
        keystore={"dsn": pg.dsn(dbname=DB), "master_key": {"provider": "local", "path": str(workdir / "mk")}},
        tables=_tables_config(),
        roles={"default": "plaintext"},
        logging={"level": "debug"},
    )
    proxy = ProxyProcess(cfg, workdir)
    proxy.start()
    e = Env(pg, proxy)
    _eventually(lambda: _query(e, "SELECT c FROM s1.secrets WHERE id = -1"))
    yield e
    proxy.stop()


def _query(env: Env, sql: str, *params: Any, **dsn: str) -> list[Any]:
    with psycopg.connect(env.dsn(**dsn), autocommit=True, connect_timeout=10) as c:
        return c.execute(sql, params or None).fetchall() if "%s" in sql else c.execute(sql).fetchall()


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


# -- 3. names ----------------------------------------------------------------------------------------------


PATH_WAYS = ["set", "options", "role", "set_config", "set_local"]


@pytest.mark.parametrize("how", PATH_WAYS)
def test_unqualified_write_is_sealed_whatever_the_search_path(env: Env, how: str) -> None:
    canary = env.canary(f"path-{how}")
    row = 10 + PATH_WAYS.index(how)
    dsn: dict[str, str] = {}
    if how == "options":
        dsn["options"] = "-c%20search_path%3Ds1,public"
    if how == "role":
        run = run_psql(env.direct, "-c", f"ALTER ROLE app IN DATABASE {DB} SET search_path = s1, public")
        assert run.returncode == 0, run.stderr
    try:
        with psycopg.connect(env.dsn(**dsn), autocommit=True) as c:
            if how == "set":
                c.execute("SET search_path = s1, public")
            elif how == "set_config":
                c.execute("SELECT set_config('search_path', 's1, public', false)")
            if how == "set_local":
                with c.transaction():
                    c.execute("SET LOCAL search_path = s1, public")
                    c.execute("INSERT INTO secrets (id, c, open) VALUES (%s, %s, 'x')", [row, canary])
                    assert c.execute("SELECT c FROM secrets WHERE id = %s", [row]).fetchall() == [(canary,)]
                c.execute("BEGIN")
                c.execute("SET LOCAL search_path = s1, public")
                with pytest.raises(psycopg.errors.FeatureNotSupported):
                    c.execute("SELECT length(c) FROM secrets")
                c.execute("ROLLBACK")
            else:
                psycopg.ClientCursor(c).execute("INSERT INTO secrets (id, c, open) VALUES (%s, %s, 'x')", [row, canary])
                with pytest.raises(psycopg.errors.FeatureNotSupported):
                    c.execute("SELECT length(c) FROM secrets")
                assert c.execute("SELECT c FROM secrets WHERE id = %s", [row]).fetchall() == [(canary,)]
    finally:
        if how == "role":
            run_psql(env.direct, "-c", f"ALTER ROLE app IN DATABASE {DB} RESET search_path")
    ((stored,),) = env.stored(f"SELECT c FROM s1.secrets WHERE id = {row}")
    assert isinstance(stored, bytes)
    assert canary.encode() not in stored


def test_a_name_shared_with_an_unprotected_table_must_be_qualified(env: Env) -> None:
    canary = env.canary("ambiguous")
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="qualify"):
            c.execute("INSERT INTO lonely (id, c) VALUES (1, %s)", [canary])
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="qualify"):
            c.execute("SELECT c FROM lonely")
        assert c.execute("SELECT count(*) FROM lonely").fetchone() == (0,)  # nothing sealed or decrypted
        c.execute("INSERT INTO public.lonely (id, c) VALUES (1, %s)", [canary])
        assert c.execute("SELECT c FROM public.lonely WHERE id = 1").fetchall() == [(canary,)]
    assert env.stored("SELECT count(*) FROM s2.lonely") == [(0,)]


def test_temporary_table_shadowing_a_protected_name_is_refused(env: Env) -> None:
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        for ddl in (
            "CREATE TEMP TABLE secrets (id int, c text)",
            "CREATE TABLE pg_temp.secrets (id int, c text)",
            "CREATE TEMPORARY VIEW secrets AS SELECT 1 AS id, 'x'::text AS c",
        ):
            with pytest.raises(psycopg.errors.FeatureNotSupported, match="shadow"):
                c.execute(ddl)
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            c.execute("INSERT INTO pg_temp.secrets (id, c) VALUES (1, %s)", [env.canary("temp")])
        c.execute("CREATE TEMP TABLE scratch (id int, c text)")  # other names are fine
        c.execute("INSERT INTO scratch VALUES (1, 'x')")


# -- 4. the family -----------------------------------------------------------------------------------------


def test_partition_and_child_writes_are_sealed_with_the_root_identity(env: Env) -> None:
    low, child, via_parent = env.canary("partition"), env.canary("child"), env.canary("parent")
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("INSERT INTO parted_low (id, c, open) VALUES (1, %s, %s)", [low, env.control("partition")])
        c.execute("INSERT INTO child (id, c, extra) VALUES (2, %s, 7)", [child])
        c.execute("INSERT INTO public.parent (id, c) VALUES (3, %s)", [via_parent])
        assert c.execute("SELECT c FROM parted WHERE id = 1").fetchall() == [(low,)]
        assert c.execute("SELECT c FROM parted_low WHERE id = 1").fetchall() == [(low,)]
        assert c.execute("SELECT c FROM parent ORDER BY id").fetchall() == [(child,), (via_parent,)]
        assert c.execute("SELECT c FROM child").fetchall() == [(child,)]
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            c.execute("SELECT length(c) FROM child")
    for sql in ("SELECT c FROM parted_low", "SELECT c FROM child"):
        (stored,) = env.stored(sql)[0]
        assert isinstance(stored, bytes)


def test_partition_attached_while_pgveil_runs(env: Env) -> None:
    canary, direct_canary = env.canary("attached"), env.canary("attached-elsewhere")
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("CREATE TABLE parted_high (LIKE parted INCLUDING CONSTRAINTS)")
        c.execute("ALTER TABLE parted ATTACH PARTITION parted_high FOR VALUES FROM (1000) TO (2000)")
        _eventually(lambda: c.execute("INSERT INTO parted_high (id, c) VALUES (1001, %s)", [canary]))
    # ... and one attached directly (the event trigger tells pgveil).
    run = run_psql(
        f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{env.pg.port}/{DB}",
        "-c",
        "CREATE TABLE public.parted_top PARTITION OF public.parted FOR VALUES FROM (2000) TO (3000)",
    )
    assert run.returncode == 0, run.stderr

    def write() -> None:
        with psycopg.connect(env.dsn(), autocommit=True) as c:
            c.execute("INSERT INTO parted_top (id, c) VALUES (2001, %s)", [direct_canary])

    _eventually(write)  # until pgveil knows the new partition, the write is refused (never sent unsealed)

    # A table created first and attached elsewhere: the hint names the parent and its partitions.
    attached = env.canary("attached-later-elsewhere")
    app = f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{env.pg.port}/{DB}"
    run = run_psql(app, "-c", "CREATE TABLE public.loose (LIKE public.parted INCLUDING CONSTRAINTS)")
    assert run.returncode == 0, run.stderr
    run = run_psql(
        app, "-c", "ALTER TABLE public.parted ATTACH PARTITION public.loose FOR VALUES FROM (3000) TO (4000)"
    )
    assert run.returncode == 0, run.stderr

    def write_loose() -> None:
        with psycopg.connect(env.dsn(), autocommit=True) as c:
            c.execute("INSERT INTO loose (id, c) VALUES (3001, %s)", [attached])

    _eventually(write_loose)
    assert _query(env, "SELECT c FROM parted WHERE id > 1000 ORDER BY id") == [(canary,), (direct_canary,), (attached,)]


def test_updatable_view_write_and_read(env: Env) -> None:
    canary = env.canary("view")
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("CREATE VIEW secrets_v AS SELECT id, c AS hidden, open FROM s1.secrets WHERE id >= 50000000")
        c.execute("CREATE VIEW secrets_upper AS SELECT id, upper(open) AS shout FROM s1.secrets")
        _eventually(lambda: c.execute("INSERT INTO secrets_v (id, hidden) VALUES (50000001, %s)", [canary]))
        assert c.execute("SELECT hidden FROM secrets_v WHERE id = 50000001").fetchall() == [(canary,)]
        assert c.execute("SELECT c FROM s1.secrets WHERE id = 50000001").fetchall() == [(canary,)]
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            c.execute("SELECT length(hidden) FROM secrets_v")
    (stored,) = env.stored("SELECT c FROM s1.secrets WHERE id = 50000001")[0:1]
    assert isinstance(stored[0], bytes)


# -- 5. DDL --------------------------------------------------------------------------------------------------


def test_insert_without_column_list_after_a_dropped_column(env: Env) -> None:
    canary, control = env.canary("dropped"), env.control("dropped")
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("ALTER TABLE dropper DROP COLUMN gone")
        _eventually(lambda: c.execute("INSERT INTO dropper VALUES (1, %s, %s)", [canary, control]))
        assert c.execute("SELECT c, open FROM dropper").fetchall() == [(canary, control)]
    ((stored, open_),) = env.stored("SELECT c, open FROM dropper")
    assert isinstance(stored, bytes)
    assert open_ == control


def test_rename_through_pgveil_column_and_table(env: Env) -> None:
    before, column, table = env.canary("before-rename"), env.canary("renamed-col"), env.canary("renamed-table")
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("INSERT INTO renamed (id, c) VALUES (1, %s)", [before])
        c.execute("ALTER TABLE renamed RENAME COLUMN c TO c2")
        _eventually(lambda: c.execute("INSERT INTO renamed (id, c2) VALUES (2, %s)", [column]))
        c.execute("ALTER TABLE renamed RENAME TO renamed2")
        _eventually(lambda: c.execute("INSERT INTO renamed2 (id, c2) VALUES (3, %s)", [table]))
        assert c.execute("SELECT c2 FROM renamed2 ORDER BY id").fetchall() == [(before,), (column,), (table,)]
    assert all(isinstance(v, bytes) for (v,) in env.stored("SELECT c2 FROM renamed2"))


def test_ddl_in_a_transaction_block_holds_that_session(env: Env) -> None:
    canary = env.canary("ddl-txn")
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        with c.transaction():
            c.execute("ALTER TABLE moved RENAME COLUMN c TO c_new")
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
                c.execute("INSERT INTO moved (id, c_new) VALUES (1, %s)", [canary])
            raise psycopg.Rollback()
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            psycopg.ClientCursor(c).execute(
                "ALTER TABLE moved RENAME COLUMN c TO c3; INSERT INTO moved (id, c3) VALUES (2, %s)", [canary]
            )
        _eventually(lambda: c.execute("INSERT INTO moved (id, c) VALUES (3, %s)", [canary]))
    assert env.stored("SELECT id FROM moved") == [(3,)]


def test_rename_elsewhere_is_followed(env: Env) -> None:
    canary = env.canary("renamed-elsewhere")
    run = run_psql(env.direct, "-c", "ALTER TABLE public.outside RENAME COLUMN c TO c_out")
    assert run.returncode == 0, run.stderr

    def write() -> None:
        with psycopg.connect(env.dsn(), autocommit=True) as c:
            c.execute("INSERT INTO outside (id, c_out) VALUES (1, %s)", [canary])

    _eventually(write)
    assert _query(env, "SELECT c_out FROM outside") == [(canary,)]
    ((stored,),) = env.stored("SELECT c_out FROM outside")
    assert isinstance(stored, bytes)

    # The table itself, renamed and moved to another schema elsewhere: followed by its OID.
    moved = env.canary("table-renamed-elsewhere")
    run = run_psql(
        env.direct,
        "-c",
        "ALTER TABLE public.outside RENAME TO outside_new; ALTER TABLE public.outside_new SET SCHEMA s2",
    )

    def write_moved() -> None:
        with psycopg.connect(env.dsn(), autocommit=True) as c:
            c.execute("INSERT INTO s2.outside_new (id, c_out) VALUES (2, %s)", [moved])

    assert run.returncode == 0, run.stderr
    _eventually(write_moved)
    assert _query(env, "SELECT c_out FROM s2.outside_new ORDER BY id") == [(canary,), (moved,)]
    assert all(isinstance(v, bytes) for (v,) in env.stored("SELECT c_out FROM s2.outside_new"))


# -- cursors (issue 8) ------------------------------------------------------------------------------------


def test_cursor_over_a_protected_table_fetches_plaintext(env: Env) -> None:
    """DECLARE ... CURSOR over a protected table is analysed like its SELECT: FETCH is not analysed, and
    its RowDescription names each protected column (table OID, attribute number), which pgveil decrypts
    by. A cursor whose protected column FETCH cannot attribute (UNION ALL) is refused, the session goes on."""
    value = env.control("cursor")  # written through pgveil, so sealed: never plaintext on the server
    with psycopg.connect(env.dsn()) as c:
        c.execute("INSERT INTO s1.secrets (id, c, open) VALUES (60000001, %s, 'o')", [value])
        c.commit()
        c.execute("DECLARE cur SCROLL CURSOR FOR SELECT id, c, open FROM s1.secrets WHERE id = 60000001")
        cur = c.execute("FETCH ALL FROM cur")
        assert cur.fetchall() == [(60000001, value, "o")]
        assert cur.pgresult is not None
        assert cur.pgresult.ftable(1) != 0  # FETCH's RowDescription carries the origin
        c.execute("MOVE ABSOLUTE 0 FROM cur")
        assert c.execute("FETCH 1 FROM cur").fetchall() == [(60000001, value, "o")]
        c.execute("CLOSE cur")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match=r"DECLARE CURSOR u: column s1\.secrets\.c"):
            c.execute("DECLARE u CURSOR FOR SELECT c FROM s1.secrets UNION ALL SELECT c FROM s1.secrets")
        c.rollback()
        assert c.execute("SELECT c FROM s1.secrets WHERE id = 60000001").fetchall() == [(value,)]
    # The simple protocol (psql), a cursor WITH HOLD read after its transaction ended.
    script = (
        "BEGIN;\nDECLARE held CURSOR WITH HOLD FOR SELECT c FROM s1.secrets WHERE id = 60000001;\nCOMMIT;\n"
        "FETCH ALL FROM held;\nCLOSE held;\n"
    )
    run = run_psql(env.dsn(), stdin=script)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [value]
    (stored,) = env.stored("SELECT c FROM s1.secrets WHERE id = 60000001")
    assert isinstance(stored[0], bytes)
    assert value.encode() not in stored[0]


# -- plain governed columns (issue 8) ---------------------------------------------------------------------


def _plainly(**columns: bool) -> Catalog:
    cols = {n: ProtectedColumn("public", "plainly", n, "text", encrypted=e) for n, e in columns.items()}
    return Catalog({("public", "plainly"): ProtectedTable("public", "plainly", cols)})


def test_plain_governed_columns_load_and_an_encrypted_one_configured_plain_is_an_error(env: Env) -> None:
    """The loader reads attribute numbers for plain governed columns (RowDescription attribution), maps
    them through children and views like encrypted ones, and refuses a column configured plain that the
    database holds encrypted (bytea with pgveil's envelope CHECK): a config written for the old default."""

    async def run() -> None:
        conn = await asyncpg.connect(env.pg.dsn(dbname=DB))
        try:
            await conn.execute(
                "CREATE TABLE public.plainly (id int, phone text, was text);"
                "CREATE TABLE public.plainly_kid (extra int) INHERITS (public.plainly);"
                "CREATE VIEW public.plainly_v AS SELECT id, phone AS p FROM public.plainly;"
                "CREATE VIEW public.plainly_o AS SELECT id, lower(phone) AS lp FROM public.plainly;"
            )
            # ``was`` encrypted by pgveil's schema step; ``phone`` plain: schema apply leaves it alone.
            steps = await plan_schema(conn, _plainly(phone=False, was=True))
            assert steps
            assert all(s.column == "was" for s in steps)
            await apply_schema(conn, steps)
            assert await plan_schema(conn, _plainly(phone=False, was=True)) == []
            types = dict(await conn.fetch("SELECT attname, atttypid::regtype::text FROM pg_attribute "
                                          "WHERE attrelid = 'public.plainly'::regclass AND attnum > 0"))  # fmt: skip
            assert types["phone"] == "text"
            assert types["was"] == "bytea"

            catalog, problems = await load_catalog(conn, _plainly(phone=False, was=True))
            assert problems == []
            table = catalog.tables[("public", "plainly")]
            phone = table.columns["phone"]
            assert (phone.attnum, phone.table_oid, phone.encrypted) == (2, table.oid, False)
            assert catalog.column_by_attr(table.oid, 2) == phone
            kid = catalog.tables[("public", "plainly_kid")].columns["phone"]
            assert (kid.column_id, kid.encrypted, kid.attnum) == ("public.plainly.phone", False, 2)
            view = catalog.tables[("public", "plainly_v")]
            assert view.columns["p"].column_id == "public.plainly.phone"
            assert not view.opaque
            # A view over a plain column that computes from it maps no column, but every read of it is
            # a use of the column (the definition reveals something of it).
            derived = catalog.tables[("public", "plainly_o")]
            assert derived.columns == {}
            assert [c.column_id for c in derived.uses] == ["public.plainly.phone"]

            _catalog, problems = await load_catalog(conn, _plainly(phone=False, was=False))
            assert len(problems) == 1
            assert "public.plainly.was" in problems[0]
            assert "configured plain but encrypted in the database" in problems[0]
            assert "set encrypt: true" in problems[0]
            with pytest.raises(SchemaRefused, match=r"public\.plainly\.was is configured plain but encrypted"):
                await plan_schema(conn, _plainly(phone=False, was=False))
        finally:
            await conn.execute("DROP TABLE IF EXISTS public.plainly CASCADE")
            await conn.close()

    asyncio.run(run())


# -- the canary check over everything above ------------------------------------------------------------------


def test_zz_no_canary_reached_the_server(env: Env, pg: DevCluster) -> None:
    assert env.canaries, "run with the other tests of this module"
    with psycopg.connect(pg.dsn(dbname=DB), autocommit=True) as c:
        c.execute("CHECKPOINT")
        c.execute("SELECT pg_switch_wal()")
    found = search(server_files(pg), [*env.canaries, *env.controls])
    leaks = {c: sorted(str(p) for p in found.files(c)) for c in env.canaries if found.files(c)}
    lines = [
        line[:300]
        for line in pg.log_file.read_text(errors="replace").splitlines()
        if any(c in line or c.encode().hex() in line for c in leaks)
    ]
    assert leaks == {}, f"plaintext written through pgveil found on the server: {leaks}; log: {lines}"
    wal = pg.data_dir / "pg_wal"
    assert any(any(wal in p.parents for p in found.files(c)) for c in env.controls), "the search is blind"


def test_cursor_fetched_through_a_described_statement(env: Env) -> None:
    """asyncpg prepares ``FETCH`` (Parse, Describe statement) and then binds and executes it without a
    Describe of the portal: the rows must still be decrypted by the statement's RowDescription."""
    value = env.control("cursor-asyncpg")

    async def run() -> list[Any]:
        conn = await asyncpg.connect(env.dsn())
        try:
            await conn.execute("INSERT INTO s1.secrets (id, c) VALUES (60000002, $1)", value)
            async with conn.transaction():
                await conn.execute("DECLARE cur CURSOR FOR SELECT id, c FROM s1.secrets WHERE id = 60000002")
                return [tuple(r) for r in await conn.fetch("FETCH ALL FROM cur")]
        finally:
            await conn.close()

    assert asyncio.run(run()) == [(60000002, value)]


def test_column_configured_plain_but_encrypted_refuses_its_statements(env: Env, pg: DevCluster, tmp_path: Path) -> None:
    """A config written for the old default (``encrypt`` omitted meant encrypted) names a column that the
    database holds encrypted: pgveil is not ready (55000 for statements on protected tables, the session
    goes on) and its log names the column and the fix; it never serves the envelopes as plain values."""
    cfg = proxy_config(
        pg,
        service={"dsn": pg.dsn(dbname=DB)},
        keystore={"dsn": pg.dsn(dbname=DB), "master_key": {"provider": "local", "path": str(tmp_path / "mk")}},
        # (another encrypted column: the runtime starts only when something is encrypted)
        tables={
            "s1.secrets": {"columns": {"c": {"type": "text"}}},
            "public.lonely": {"columns": {"c": {"type": "text", "encrypt": True}}},
        },
    )
    proxy = ProxyProcess(cfg, tmp_path)
    proxy.start()
    try:
        with psycopg.connect(proxy.dsn(dbname=DB), autocommit=True) as c:
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="not ready"):
                c.execute("SELECT c FROM s1.secrets")
            assert c.execute("SELECT 1").fetchone() == (1,)
        logs = proxy.logs()  # the refusal above came after the catalog was read and found wrong
        assert "column s1.secrets.c is configured plain but encrypted in the database" in logs
        assert "set encrypt: true" in logs
    finally:
        proxy.stop()
