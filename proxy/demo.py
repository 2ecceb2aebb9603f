"""``pgveil demo``: a throwaway PostgreSQL, pgveil in front of it, and a tour of what goes through.

Everything runs on loopback and is removed at the end, after Ctrl-C (SIGINT) or SIGTERM too: the cluster
(its server processes stopped), its temporary directory with the keystore in it, and the demo's master
key, which lives there. The demo is a user of the public pieces (devcluster, schema tooling, server,
drivers); it adds no behaviour. It speaks of people, rows and refusals, not of protocol messages, and
shows a SQLSTATE only beside the sentence it codes.

``--config FILE`` replaces config/demo.yaml: its ``tables:`` (over the demo's ``public.customers``),
``roles:``, ``logging:`` and session settings are used; the connection settings (``listen``,
``upstream``, ``admin``, the keystore's DSN and master key) are the demo's own. A file the demo cannot
honour is refused with the reason (:func:`demo_config_file`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import signal
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg

from proxy.cli_errors import USAGE, CliError
from proxy.config import Config, parse_config, read_yaml
from proxy.devcluster import DevCluster, free_port
from proxy.errors import ConfigError
from proxy.schema import apply_schema, plan_event_trigger, plan_schema
from proxy.server import ProxyServer

APP_PASSWORD = "demo-app-password"  # throwaway cluster credentials, printed on purpose
PEOPLE_PASSWORD = "demo-people-password"  # the people below log in with it (throwaway, printed on purpose)
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"
TABLE = "public.customers"
COLUMNS = ("id", "name", "email", "ssn", "birth_date", "phone")
# What the demo sets itself, whatever a --config file says (it starts its own servers on free ports).
DEMO_OWNED = ("listen", "upstream", "admin", "service")

CUSTOMERS = [
    ("Ada Lovelace", "ada@example.com", "123-45-6789", datetime.date(1815, 12, 10), "+44 20 7946 0018"),
    ("Alan Turing", "alan@example.org", "987-65-4321", datetime.date(1912, 6, 23), "+44 161 496 0734"),
    ("Grace Hopper", "grace@example.net", None, datetime.date(1906, 12, 9), "+1 202 555 0143"),
    # The same person signed up twice: equal values, yet their stored bytes differ (see the tour).
    ("Ada Lovelace", "ada@example.com", "123-45-6789", datetime.date(1815, 12, 10), "+44 20 7946 0018"),
]

# Who looks at the customers: a PostgreSQL login role each, three of them members of a group role the
# policy in config/demo.yaml names; the fourth is in no group the policy knows (it gets `default`).
PEOPLE = [
    ("bill", "billing", "Bill, in billing"),
    ("sue", "support", "Sue, a support agent"),
    ("carl", "contractor", "Carl, a contractor"),
    ("ivan", None, "Ivan, an intern nobody told pgveil about"),
]


def _say(title: str) -> None:
    print(f"\n== {title}")


def _table(rows: list[Any], columns: list[str], width: int = 40) -> None:
    def cell(v: Any) -> str:
        text = "NULL" if v is None else (_stored(v) if isinstance(v, bytes) else str(v))
        return text if len(text) <= width else text[: width - 1] + "…"

    data = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in data]) for i, c in enumerate(columns)]
    print("  " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  " + "-+-".join("-" * w for w in widths))
    for row in data:
        print("  " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def demo_config_file(path: Path | None) -> Path:
    """The configuration the demo runs with: ``path`` (``--config``) when the demo can honour it, else a
    :class:`~proxy.cli_errors.CliError` (exit 2) saying why; config/demo.yaml without one."""
    if path is None:
        return DEMO_CONFIG
    shown = f"demo --config {path}"
    try:
        data = read_yaml(path)
    except ConfigError as e:
        raise CliError("demo --config: " + "; ".join(e.errors), USAGE) from None
    except OSError as e:
        raise CliError(f"{shown}: cannot read it ({e.strerror or type(e).__name__})", USAGE) from None
    if not isinstance(data, dict):
        raise CliError(f"{shown}: not a configuration (a YAML mapping like config/demo.yaml)", USAGE)
    tables = data.get("tables") or {}
    if not isinstance(tables, dict):
        raise CliError(f"{shown}: tables must be a mapping (like config/demo.yaml's)", USAGE)
    others = sorted(str(t) for t in tables if str(t).lower() not in (TABLE, "customers"))
    if others:
        raise CliError(
            f"{shown}: the demo creates only {TABLE} ({', '.join(COLUMNS[1:])}); it cannot govern {', '.join(others)}",
            USAGE,
        )
    for spec in tables.values():
        columns = spec.get("columns") if isinstance(spec, dict) else None
        unknown = sorted(str(c) for c in (columns or {}) if str(c) not in COLUMNS[1:])
        if unknown:
            raise CliError(
                f"{shown}: {TABLE} has the columns {', '.join(COLUMNS[1:])}; it has no {', '.join(unknown)}", USAGE
            )
    try:
        with tempfile.TemporaryDirectory() as scratch:
            _parse_demo_config(data, path, 1, 2, Path(scratch), "postgresql://demo@127.0.0.1:3/app")
    except ConfigError as e:
        raise CliError(f"{shown}: invalid configuration:\n  " + "\n  ".join(e.errors), USAGE) from None
    ignored = [k for k in (*DEMO_OWNED, "keystore") if k in data]
    if ignored:
        print(f"  note: the demo sets {', '.join(ignored)} itself; {path}'s values for them are not used")
    return path


def _demo_config(cluster: DevCluster, port: int, admin_port: int, config_file: Path = DEMO_CONFIG) -> Config:
    assert cluster.base_dir is not None
    keystore_dsn = cluster.dsn(dbname="app")  # the throwaway superuser; use a dedicated role in production
    return _parse_demo_config(
        read_yaml(config_file), config_file, port, admin_port, cluster.base_dir, keystore_dsn, cluster.port
    )


def _parse_demo_config(
    data: dict[str, Any],
    config_file: Path,
    port: int,
    admin_port: int,
    key_dir: Path,
    keystore_dsn: str,
    upstream_port: int = 5432,
) -> Config:
    data = dict(data)
    for key in DEMO_OWNED:
        data.pop(key, None)
    data["listen"] = f"127.0.0.1:{port}"
    data["upstream"] = {"host": "127.0.0.1", "port": upstream_port, "tls": "disable"}
    data["admin"] = {"listen": f"127.0.0.1:{admin_port}"}
    # The master key lives in the cluster's temporary directory, so it goes with it.
    data["keystore"] = {"master_key": {"provider": "local", "path": str(key_dir / "demo-master.key")}}
    return parse_config(data, base_dir=config_file.parent, environ={"PGVEIL_KEYSTORE_DSN": keystore_dsn})


async def run_demo(*, keep_running: bool = False, config_file: Path = DEMO_CONFIG) -> int:
    """The tour; Ctrl-C and SIGTERM end it the same way: everything it started is stopped and removed,
    and the exit code is 130."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stopping: list[str] = []

    def stop(name: str) -> None:
        if not stopping:  # a second signal does not interrupt the clean-up
            stopping.append(name)
            task.cancel()

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, stop, "SIGTERM")
    try:
        return await _run_demo(keep_running=keep_running, config_file=config_file)
    except asyncio.CancelledError:
        why = stopping[0] if stopping else "interrupted"
        print(f"\n== stopped ({why}): the cluster, its keystore and the demo master key are gone")
        return 130
    finally:
        with contextlib.suppress(NotImplementedError):
            loop.remove_signal_handler(signal.SIGTERM)


async def _run_demo(*, keep_running: bool, config_file: Path) -> int:
    _say("starting a throwaway PostgreSQL 15 cluster")
    cluster: DevCluster | None = None
    try:
        # Started and stopped without awaiting, so that a signal during either waits for it to finish:
        # a cluster half started in a thread could outlive the clean-up.
        cluster = DevCluster()
        cluster.start()
        cluster.psql(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
        cluster.psql("CREATE DATABASE app OWNER app")
        print(f"  PostgreSQL listens on 127.0.0.1:{cluster.port}")
        direct_dsn = f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{cluster.port}/app"

        _say("the application's own schema, created the usual way")
        app = await asyncpg.connect(direct_dsn)
        try:
            await app.execute(
                "CREATE TABLE customers (id serial PRIMARY KEY, name text, email text, ssn text, birth_date date, "
                "phone text)"
            )
        finally:
            await app.close()
        print("  CREATE TABLE customers (id serial, name text, email text, ssn text, birth_date date, phone text)")

        _say("the people who look at it: ordinary PostgreSQL roles and groups")
        groups = sorted({g for _, g, _ in PEOPLE if g is not None})
        cluster.psql("".join(f"CREATE ROLE {g} NOLOGIN;" for g in groups))
        for login, group, who in PEOPLE:
            member = f" IN ROLE {group}" if group else ""
            cluster.psql(f"CREATE ROLE {login} LOGIN PASSWORD '{PEOPLE_PASSWORD}'{member}")
            print(f"  {login:<5} {who}" + (f" (member of group {group})" if group else ""))
        grantees = ", ".join([*groups, *(login for login, group, _ in PEOPLE if group is None)])
        cluster.psql(f"GRANT SELECT ON customers TO {grantees}", dbname="app")

        port, admin_port = free_port(), free_port()
        config = _demo_config(cluster, port, admin_port, config_file)

        _say("pgveil schema apply: protected columns become bytea with an envelope CHECK")
        service = await asyncpg.connect(cluster.dsn(dbname="app"))
        try:
            steps = await plan_schema(service, config.catalog()) + await plan_event_trigger(service)
            for step in steps:
                print(f"  {step.description}")
            await apply_schema(service, steps)
        finally:
            await service.close()

        server = ProxyServer(config)
        try:
            await server.start()
            _say("pgveil is in front of it")
            print(f"  pgveil listens on 127.0.0.1:{port}; admin on http://127.0.0.1:{admin_port}")
            if config_file != DEMO_CONFIG:
                print(f"  with the tables and roles of {config_file}")
            print(f"  the application's DSN: postgresql://app:***@127.0.0.1:{port}/app (only the port changed)")
            dsn = f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{port}/app"
            encrypted = [c.name for t in config.tables for c in t.columns if c.encrypt]
            await _tour(dsn, direct_dsn, encrypted)
            await _people_tour(port)
            await _metrics_tour(f"http://127.0.0.1:{admin_port}")
            if keep_running:
                print("\n  running until Ctrl-C; try: psql " + dsn.replace(APP_PASSWORD, "<password>"))
                print(f"  (password: {APP_PASSWORD}; direct, bypassing pgveil: port {cluster.port})")
                await asyncio.Event().wait()  # Ctrl-C or SIGTERM cancel it: the clean-up below runs
        finally:
            await asyncio.shield(server.shutdown())
    finally:
        if cluster is not None:
            cluster.cleanup()
    _say("done: the cluster, its keystore and the demo master key are gone")
    return 0


def _refused(e: asyncpg.PostgresError) -> str:
    """A refusal as the person reads it: the sentence, then its SQLSTATE (and the server's hint)."""
    message = str(getattr(e, "message", None) or str(e).splitlines()[0]).removeprefix("pgveil: ")
    hint = getattr(e, "hint", None)
    return f"refused: {message} (SQLSTATE {e.sqlstate})" + (f"\n       ({hint})" if hint else "")


async def _tour(dsn: str, direct_dsn: str, encrypted: list[str]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        _say("an unchanged application (asyncpg, prepared statements) writes customers through pgveil")
        await conn.executemany(
            "INSERT INTO customers (name, email, ssn, birth_date, phone) VALUES ($1, $2, $3, $4, $5)", CUSTOMERS
        )
        await conn.execute(
            "INSERT INTO customers (name, email, ssn, birth_date, phone) "
            "VALUES ('Edsger Dijkstra', 'ewd@example.nl', '555-12-3456', '1930-05-11', '+31 20 555 0199')"
        )
        print(f"  {len(CUSTOMERS)} rows with parameters, 1 row with literals in a simple query")

        _say("what the application reads through pgveil: plaintext, with the declared types")
        rows = await conn.fetch("SELECT id, name, email, ssn, birth_date, phone FROM customers ORDER BY id")
        _table(list(rows), ["id", "name", "email", "ssn", "birth_date", "phone"])
        born = rows[0]["birth_date"]
        print(f"  birth_date comes back as a {type(born).__name__} ({born}), as the application declared it")

        _say("what anyone reading PostgreSQL directly sees (a DBA's psql, a backup, a replica)")
        direct = await asyncpg.connect(direct_dsn)
        try:
            raw = await direct.fetch("SELECT id, name, email, ssn, birth_date, phone FROM customers ORDER BY id")
            _table(list(raw), list(COLUMNS), width=32)
            if encrypted:
                print(f"  {', '.join(encrypted)}: ciphertext. Each stored value is shown by its size and its last")
                print("  bytes, which differ in every row, even where the values are equal (rows 1 and 4 are the")
                print("  same person, signed up twice); they all begin alike (format and key id), so that part")
                print("  is left out")
            else:
                print("  nothing is encrypted in this configuration: PostgreSQL holds every value as it is")
            plain = [c for c in ("email", "ssn", "birth_date", "phone") if c not in encrypted]
            if plain:
                them = "them" if len(plain) > 1 else "it"
                print(f"  {', '.join(plain)}: not encrypted; PostgreSQL holds {them} as written, and pgveil still")
                print(f"  decides who sees {them}")
            if "email" in encrypted:
                try:
                    await direct.execute("INSERT INTO customers (name, email) VALUES ('Mallory', 'plain'::bytea)")
                except asyncpg.PostgresError as e:
                    print("  a plaintext e-mail written around pgveil is refused by PostgreSQL itself:")
                    print(f"    {str(e).splitlines()[0]} (SQLSTATE {e.sqlstate})")
        finally:
            await direct.close()

        _say("what pgveil refuses, because it would compute on ciphertext or leak through a predicate")
        for sql in (
            "SELECT name FROM customers WHERE ssn LIKE '123%'",
            "SELECT name FROM customers ORDER BY birth_date",
        ):
            try:
                await conn.fetch(sql)
                print(f"  {sql}\n    -> answered")
            except asyncpg.PostgresError as e:
                print(f"  {sql}\n    -> {_refused(e)}")
        count = await conn.fetchval("SELECT count(*) FROM customers")
        print(f"  the session stays usable: {count} customers")
    finally:
        await conn.close()


def _stored(value: bytes) -> str:
    """A stored value as the tour shows it: its size and its last 8 bytes, where envelopes differ (their
    first 20 bytes, format and key id, are the same for every value of a column)."""
    return f"{len(value)} bytes …{value[-8:].hex()}"


async def _as(port: int, login: str) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(f"postgresql://{login}:{PEOPLE_PASSWORD}@127.0.0.1:{port}/app")
    return conn


async def _people_tour(port: int) -> None:
    sql = "SELECT * FROM customers ORDER BY id"
    _say(f"the same question from four people: {sql}")
    print("  pgveil answers each according to config/demo.yaml (roles:), by the groups they belong to in PostgreSQL")
    for login, _group, who in PEOPLE:
        print(f"\n  {who} (logs in as {login}):")
        conn = await _as(port, login)
        try:
            rows = await conn.fetch(sql)
            _table(list(rows), ["id", "name", "email", "ssn", "birth_date", "phone"])
        except asyncpg.PostgresError as e:
            print(f"  {_refused(e)}")
        finally:
            await conn.close()
    print("\n  billing sees everything; support sees e-mails, the last four SSN digits and a partial phone;")
    print("  the contractor may not read these columns at all; the intern, whom the policy does not name,")
    print("  gets the default: the rows, with every protected field empty (NULL)")

    _say("a support agent may read a masked SSN, but not search by it")
    conn = await _as(port, "sue")
    try:
        for question in ("SELECT name FROM customers WHERE ssn LIKE '1%'", "SELECT name FROM customers ORDER BY phone"):
            try:
                await conn.fetch(question)
                print(f"  {question}\n    -> answered")
            except asyncpg.PostgresError as e:
                print(f"  {question}\n    -> {_refused(e)}")
        print("  (answering either would reveal the hidden digits one guess at a time)")
        name = await conn.fetchval("SELECT name FROM customers WHERE id = 1")
        print(f"  her session goes on: customer 1 is {name}")
    finally:
        await conn.close()
    conn = await _as(port, "bill")
    try:
        first = await conn.fetchval("SELECT name FROM customers ORDER BY phone LIMIT 1")
        print(f"  billing may sort by phone: first is {first}")
    finally:
        await conn.close()


async def _metrics_tour(admin_url: str) -> None:
    _say("what operators scrape from /metrics (excerpt)")
    body = await asyncio.to_thread(_get, admin_url + "/metrics")
    for line in body.splitlines():
        if line.startswith(
            ("pgveil_sessions_total", "pgveil_values_", "pgveil_relayed_messages_total", "pgveil_statements_refused")
        ) and ("_created" not in line):
            print("  " + line)
    ready = await asyncio.to_thread(_get, admin_url + "/readyz")
    print(f"  /readyz: {ready.strip()}")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback URL we built
        body: bytes = resp.read()
        return body.decode()
