"""``pgveil demo``: a throwaway PostgreSQL, pgveil in front of it, and a tour of what goes through.

Everything runs on loopback and is removed at the end (unless ``--keep-running``): the cluster, the
keystore in it, and the demo's master key, which lives in the cluster's temporary directory. The demo is
a user of the public pieces (devcluster, schema tooling, server, drivers); it adds no behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg

from proxy.config import parse_config, read_yaml
from proxy.devcluster import DevCluster, free_port
from proxy.schema import apply_schema, plan_event_trigger, plan_schema
from proxy.server import ProxyServer

APP_PASSWORD = "demo-app-password"  # throwaway cluster credentials, printed on purpose
PEOPLE_PASSWORD = "demo-people-password"  # the people below log in with it (throwaway, printed on purpose)
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"

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
        text = "NULL" if v is None else (("\\x" + v.hex()) if isinstance(v, bytes) else str(v))
        return text if len(text) <= width else text[: width - 1] + "…"

    data = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in data]) for i, c in enumerate(columns)]
    print("  " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  " + "-+-".join("-" * w for w in widths))
    for row in data:
        print("  " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _demo_config(cluster: DevCluster, port: int, admin_port: int) -> Any:
    data = read_yaml(DEMO_CONFIG)
    data["listen"] = f"127.0.0.1:{port}"
    data["upstream"] = {"host": "127.0.0.1", "port": cluster.port, "tls": "disable"}
    data["admin"] = {"listen": f"127.0.0.1:{admin_port}"}
    assert cluster.base_dir is not None
    data["keystore"]["master_key"]["path"] = str(cluster.base_dir / "demo-master.key")
    keystore_dsn = cluster.dsn(dbname="app")  # the throwaway superuser; use a dedicated role in production
    return parse_config(data, base_dir=DEMO_CONFIG.parent, environ={"PGVEIL_KEYSTORE_DSN": keystore_dsn})


async def run_demo(*, keep_running: bool = False) -> int:
    _say("starting a throwaway PostgreSQL 15 cluster")
    cluster = DevCluster()
    await asyncio.to_thread(cluster.start)
    try:
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
        config = _demo_config(cluster, port, admin_port)

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
        await server.start()
        _say("pgveil is in front of it")
        print(f"  pgveil listens on 127.0.0.1:{port}; admin on http://127.0.0.1:{admin_port}")
        print(f"  the application's DSN: postgresql://app:***@127.0.0.1:{port}/app (only the port changed)")
        dsn = f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{port}/app"
        try:
            await _tour(dsn, direct_dsn)
            await _people_tour(port)
            await _metrics_tour(f"http://127.0.0.1:{admin_port}")
            if keep_running:
                print("\n  running until Ctrl-C; try: psql " + dsn.replace(APP_PASSWORD, "<password>"))
                print(f"  (password: {APP_PASSWORD}; direct, bypassing pgveil: port {cluster.port})")
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()
        finally:
            await server.shutdown()
    finally:
        await asyncio.to_thread(cluster.cleanup)
    _say("done: the cluster, its keystore and the demo master key are gone")
    return 0


async def _tour(dsn: str, direct_dsn: str) -> None:
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
        print(f"  birth_date arrives as {type(rows[0]['birth_date']).__name__} (binary date codec, as declared)")

        _say("what anyone reading PostgreSQL directly sees (a DBA's psql, a backup, a replica): ciphertext")
        direct = await asyncpg.connect(direct_dsn)
        try:
            raw = await direct.fetch("SELECT id, name, email, ssn, birth_date, phone FROM customers ORDER BY id")
            _table(list(raw), ["id", "name", "email", "ssn", "birth_date", "phone"], width=28)
            print("  every stored value starts alike (format, key id); what follows differs in every row,")
            print("  even where the values are equal (rows 1 and 4 are the same person signed up twice):")
            _table([{"id": r["id"], "ssn, stored (its last 12 bytes)": _tail(r["ssn"])} for r in raw],
                   ["id", "ssn, stored (its last 12 bytes)"])  # fmt: skip
            print("  phone is not encrypted: PostgreSQL holds it as it is, and pgveil still decides who sees it")
            try:
                await direct.execute("INSERT INTO customers (name, email) VALUES ('Mallory', 'plain'::bytea)")
            except asyncpg.PostgresError as e:
                print(f"  a plaintext write that bypasses pgveil: {e.sqlstate} {str(e).splitlines()[0]}")
        finally:
            await direct.close()

        _say("what pgveil refuses, because it would compute on ciphertext or leak through a predicate")
        for sql in (
            "SELECT name FROM customers WHERE ssn LIKE '123%'",
            "SELECT name FROM customers ORDER BY birth_date",
        ):
            try:
                await conn.fetch(sql)
            except asyncpg.PostgresError as e:
                print(f"  {sql}\n    -> {e.sqlstate}: {e}")
        count = await conn.fetchval("SELECT count(*) FROM customers")
        print(f"  the session stays usable: {count} customers")
    finally:
        await conn.close()


def _tail(stored: bytes | None) -> str:
    return "NULL" if stored is None else "…" + stored[-12:].hex()


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
            print(f"  refused, {e.sqlstate}: {e}")
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
                print(f"  {question}\n    -> refused, {e.sqlstate}: {e}")
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
