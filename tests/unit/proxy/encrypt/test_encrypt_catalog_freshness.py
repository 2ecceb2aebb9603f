"""The catalog is never stale (issue 7, item 5), at the session level: DDL on protected relations holds
the session that sent it until its transaction ends, then everyone until a catalog read after it is
installed (55000 meanwhile); names DDL may have made protected wait too; a RowDescription that
disagrees with the catalog asks for a reload and is not delivered."""

from __future__ import annotations

import dataclasses

import pytest
from encrypt_support import CATALOG, CUSTOMERS, INSERT_LITERALS, SCORE_KEY, SSN_KEY, TABLE_OID, FakeKeySource

from proxy.encrypt.engine import CryptoContext, Outcome, SessionCrypto
from proxy.encrypt.keyring import KeyRing
from proxy.errors import ProxyError
from proxy.protocol import codec
from proxy.protocol import messages as m
from proxy.protocol.relay import Relay
from proxy.rewrite.catalog import Catalog

BYTEA, INT4, TEXT = 17, 23, 25
FRESH = Catalog({("public", "customers"): dataclasses.replace(CUSTOMERS, attnums=(1, 2, 3, 4))})


class Reloads:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def _session(catalog: Catalog = FRESH) -> tuple[CryptoContext, SessionCrypto, Reloads]:
    ctx = CryptoContext(catalog, KeyRing(FakeKeySource([SSN_KEY, SCORE_KEY])))
    reloads = Reloads()
    ctx.on_reload = reloads
    return ctx, SessionCrypto(ctx, "app"), reloads


def _state(out: Outcome) -> str | None:
    """The SQLSTATE of the refusal, or None if the message was not refused."""
    if out.refusal is None:
        return None
    msg = codec.decode_backend(ord("E"), out.refusal[5:])
    assert isinstance(msg, m.ErrorResponse)
    return msg.field(b"C")


def test_ddl_holds_its_session_until_the_transaction_ends_then_everyone_until_the_reload() -> None:
    ctx, session, reloads = _session()
    other = SessionCrypto(ctx, "app")
    assert _state(session.query("ALTER TABLE customers RENAME COLUMN ssn TO ssn2")) is None  # DDL passes
    assert _state(session.query(INSERT_LITERALS)) == "55000"  # its own transaction changed the table
    assert _state(other.query(INSERT_LITERALS)) is None  # the others see the old table, as the server does
    session.ready_for_query(b"T")
    assert _state(session.query(INSERT_LITERALS)) == "55000"
    assert reloads.count == 0
    session.ready_for_query(b"I")  # committed (or rolled back): read the catalog again
    assert reloads.count == 1
    assert ctx.stale
    assert _state(other.query(INSERT_LITERALS)) == "55000"
    assert _state(other.query("SELECT 1")) is None
    third = SessionCrypto(ctx, "app")
    assert _state(third.query("ALTER TABLE customers ADD COLUMN x int")) is None  # DDL itself passes
    assert _state(third.query(INSERT_LITERALS)) == "55000"
    ctx.install(FRESH, ctx.reload_epoch)
    assert not ctx.stale
    assert _state(other.query(INSERT_LITERALS)) is None


def test_a_reload_that_started_before_the_last_request_does_not_clear_staleness() -> None:
    ctx, session, reloads = _session()
    epoch = ctx.reload_epoch
    ctx.request_reload(["customers"])
    ctx.install(FRESH, epoch)
    assert ctx.stale
    assert _state(session.query(INSERT_LITERALS)) == "55000"
    ctx.install(FRESH, ctx.reload_epoch)
    assert _state(session.query(INSERT_LITERALS)) is None
    assert reloads.count == 1


def test_names_ddl_may_have_made_protected_wait_for_the_reload() -> None:
    ctx, session, _reloads = _session()
    assert _state(session.query("ALTER TABLE customers RENAME TO clients")) is None
    session.ready_for_query(b"I")
    assert _state(session.query("INSERT INTO clients (id, ssn) VALUES (1, 'x')")) == "55000"
    assert _state(session.parse(m.Parse("", "INSERT INTO Clients (id) VALUES ($1)", ()))) == "55000"
    assert _state(session.query("INSERT INTO clients_archive (id) VALUES (1)")) is None  # another name
    ctx.install(FRESH, ctx.reload_epoch)
    assert _state(session.query("INSERT INTO clients (id) VALUES (1)")) is None


def test_a_notification_hint_makes_only_the_named_relations_wait() -> None:
    ctx, session, reloads = _session()
    ctx.suspect(["parted_new"])
    assert reloads.count == 1
    assert not ctx.stale
    assert _state(session.query("INSERT INTO parted_new (id, c) VALUES (1, 'x')")) == "55000"
    assert _state(session.query(INSERT_LITERALS)) is None
    ctx.install(FRESH, ctx.reload_epoch)
    assert _state(session.query("INSERT INTO parted_new (id, c) VALUES (1, 'x')")) is None


def test_statements_after_ddl_in_one_query_string_are_refused() -> None:
    _ctx, session, _reloads = _session()
    out = session.query("ALTER TABLE customers RENAME COLUMN ssn TO s2; INSERT INTO customers (id, s2) VALUES (1, 'x')")
    assert _state(out) == "55000"
    out = session.query("ALTER TABLE customers RENAME TO c9; INSERT INTO c9 (id) VALUES (1)")
    assert _state(out) == "55000"
    assert _state(session.query("BEGIN; ALTER TABLE customers ADD COLUMN y int; SELECT 1 FROM t2; COMMIT")) is None
    out = session.query("ALTER TABLE customers RENAME TO c8; EXPLAIN ANALYZE INSERT INTO c8 VALUES (1)")
    assert _state(out) == "55000"


def test_the_relay_reports_ready_for_query_to_the_session() -> None:
    ctx, _session_unused, reloads = _session()
    relay = Relay(crypto_factory=lambda role: SessionCrypto(ctx, role))
    relay.receive_client(codec.encode_startup(m.StartupMessage(m.PROTOCOL_3_0, (("user", "app"),))))
    relay.receive_server(
        b"".join(codec.encode_backend(x) for x in (m.Authentication(m.AuthCode.OK), m.ReadyForQuery(b"I")))
    )
    relay.to_server.clear()
    relay.receive_client(codec.encode_frontend(m.Query("ALTER TABLE customers DROP COLUMN name")))
    assert reloads.count == 0
    relay.receive_server(
        b"".join(codec.encode_backend(x) for x in (m.CommandComplete("ALTER TABLE"), m.ReadyForQuery(b"I")))
    )
    assert reloads.count == 1
    assert ctx.stale


def _description(*fields: tuple[int, int, int]) -> bytes:
    desc = m.RowDescription(
        tuple(m.FieldDescription(f"f{i}", oid, n, t, -1, -1, 0) for i, (oid, n, t) in enumerate(fields))
    )
    return codec.encode_backend(desc)[5:]


@pytest.mark.parametrize(
    "fields",
    [
        ((TABLE_OID, 9, INT4),),  # an attribute the catalog never read: a column added behind pgveil
        ((TABLE_OID, 2, TEXT),),  # a protected attribute that is not bytea any more
    ],
)
def test_a_row_description_that_disagrees_with_the_catalog_is_stale(fields: tuple[tuple[int, int, int], ...]) -> None:
    ctx, session, reloads = _session()
    with pytest.raises(ProxyError) as info:
        session.row_description(_description(*fields), None, None)
    assert info.value.sqlstate == "55000"
    assert reloads.count == 1
    assert ctx.stale


def test_a_row_description_that_agrees_passes() -> None:
    _ctx, session, reloads = _session()
    replacement, plan = session.row_description(
        _description((TABLE_OID, 1, INT4), (TABLE_OID, 2, BYTEA), (TABLE_OID, -1, 27)), None, None
    )
    assert plan is not None
    assert plan[1] is not None
    assert replacement is not None
    assert reloads.count == 0
    _ctx, old, _r = _session(CATALOG)  # a catalog without attribute numbers checks nothing
    old.row_description(_description((TABLE_OID, 9, INT4)), None, None)


def test_a_stream_of_hints_never_keeps_an_older_name_or_the_catalog_stale() -> None:
    ctx, session, reloads = _session()
    ctx.suspect(["alpha"])
    started = ctx.reload_epoch  # a reload starts reading here
    ctx.request_reload()
    ctx.suspect(["beta"])  # more hints while it reads
    ctx.install(FRESH, started)
    assert ctx.stale  # the request came after the reading started
    assert set(ctx.stale_names) == {"beta"}
    started = ctx.reload_epoch
    ctx.suspect(["gamma"])
    ctx.install(FRESH, started)
    assert not ctx.stale
    assert set(ctx.stale_names) == {"gamma"}
    assert _state(session.query("INSERT INTO alpha (id) VALUES (1)")) is None
    assert _state(session.query("INSERT INTO gamma (id) VALUES (1)")) == "55000"
    assert reloads.count == 4


def test_more_hinted_names_than_can_be_remembered_stale_everything() -> None:
    ctx, session, _reloads = _session()
    for i in range(70):
        ctx.suspect([f"t{i}_{j}" for j in range(64)])
    assert ctx.stale
    assert len(ctx.stale_names) <= 4096
    assert _state(session.query(INSERT_LITERALS)) == "55000"
    ctx.install(FRESH, ctx.reload_epoch)
    assert not ctx.stale
    assert not ctx.stale_names
