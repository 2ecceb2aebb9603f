"""The relay with encryption active, driven with bytes only: startup and authentication create the
session's crypto; simple and extended queries are sealed on the way in and decrypted on the way out,
byte-exact; a refused statement's stand-in error is replaced by the refusal; a value that fails to
decrypt ends its reply with one ErrorResponse; a missing key holds one side (NeedKey) until resume()
and then nothing is lost, duplicated or reordered; statements without protected columns pass untouched.

Server replies follow the PostgreSQL docs ("Message Flow": "Simple Query", "Extended Query").
"""

from __future__ import annotations

import struct

import pytest
from encrypt_support import (  # noqa: F401
    BYTEA,
    BYTEA_LITERAL,
    CATALOG,
    CUSTOMERS,
    INSERT_LITERALS,
    INSERT_PARAMS,
    INT4,
    INT8,
    OTHER_OID,
    SCORE,
    SCORE_KEY,
    SELECT_ALL,
    SELECT_BY_ID,
    SSN,
    SSN_KEY,
    TABLE_OID,
    TEXT,
    FakeKeySource,
    be,
    fe,
)
from encrypt_support import split_frames as split
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keymgmt.envelope import _seal_with_nonce, column_associated_data, open_envelope
from proxy.encrypt.engine import REFUSED_QUERY, REFUSED_STATEMENT_NAME, CryptoContext, SessionCrypto
from proxy.encrypt.keyring import KeyRing
from proxy.errors import RefusalReason
from proxy.protocol import codec
from proxy.protocol import messages as m
from proxy.protocol.relay import (
    Authenticated,
    CloseConnection,
    NeedKey,
    Phase,
    Relay,
    SessionReady,
    StartupReceived,
)
from proxy.rewrite.catalog import ProtectedColumn

STARTUP = m.StartupMessage(m.PROTOCOL_3_0, (("user", "app"), ("database", "app")))


# -- wire helpers ---------------------------------------------------------------------------------------


def client(relay: Relay, data: bytes) -> bytes:
    relay.receive_client(data)
    out = b"".join(relay.to_server)
    relay.to_server.clear()
    return out


def server(relay: Relay, data: bytes) -> bytes:
    relay.receive_server(data)
    out = b"".join(relay.to_client)
    relay.to_client.clear()
    return out


def types_of(data: bytes) -> bytes:
    return bytes(t for t, _ in split(data))


def data_row(*values: bytes | None) -> bytes:
    parts = [struct.pack("!h", len(values))]
    for v in values:
        parts.append(struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v)
    return codec.frame(b"D", b"".join(parts))


def hex_text(envelope: bytes) -> bytes:
    return b"\\x" + envelope.hex().encode("ascii")


def int4(v: int) -> bytes:
    return v.to_bytes(4, "big", signed=True)


def seal(col: ProtectedColumn, canonical: bytes, nonce_byte: int) -> bytes:
    key = SSN_KEY if col is SSN else SCORE_KEY
    return _seal_with_nonce(key, canonical, column_associated_data(col.column_id), bytes([nonce_byte]) * 12)


def open_as(col: ProtectedColumn, envelope: bytes) -> bytes:
    keys = {bytes(k.key_id): k for k in (SSN_KEY, SCORE_KEY)}
    return open_envelope(keys.__getitem__, envelope, column_associated_data(col.column_id))


def field(name: str, attnum: int, type_oid: int, size: int, fmt: int, table: int = TABLE_OID) -> m.FieldDescription:
    return m.FieldDescription(name, table, attnum if table else 0, type_oid, size, -1, fmt)


def server_description(fmt: int) -> m.RowDescription:
    """What the server describes for SELECT id, ssn, score: the stored columns are bytea."""
    return m.RowDescription(
        (field("id", 1, INT4, 4, fmt), field("ssn", 2, BYTEA, -1, fmt), field("score", 3, BYTEA, -1, fmt))
    )


def client_description(id_fmt: int, ssn_fmt: int, score_fmt: int) -> m.RowDescription:
    """What the client must see instead: the declared types, in the formats it asked for."""
    return m.RowDescription(
        (field("id", 1, INT4, 4, id_fmt), field("ssn", 2, TEXT, -1, ssn_fmt), field("score", 3, INT4, 4, score_fmt))
    )


# Two customers as stored (envelopes with fixed nonces) and as the client must read them.
ROWS = [(7, b"123-45-6789", 42), (8, "Zoë".encode(), -1)]
ENVELOPES = [(seal(SSN, ssn, 2 * i + 1), seal(SCORE, int4(score), 2 * i + 2)) for i, (_, ssn, score) in enumerate(ROWS)]


def text_rows_stored() -> list[bytes]:
    return [data_row(b"%d" % r[0], hex_text(e[0]), hex_text(e[1])) for r, e in zip(ROWS, ENVELOPES, strict=True)]


def text_rows_plain() -> list[bytes]:
    return [data_row(b"%d" % r[0], r[1], b"%d" % r[2]) for r in ROWS]


def binary_rows_stored() -> list[bytes]:
    return [data_row(int4(r[0]), e[0], e[1]) for r, e in zip(ROWS, ENVELOPES, strict=True)]


def binary_rows_plain() -> list[bytes]:
    return [data_row(int4(r[0]), r[1], int4(r[2])) for r in ROWS]


def tampered(row_index: int) -> bytes:
    envelope = bytearray(ENVELOPES[row_index][0])
    envelope[40] ^= 0x01
    r = ROWS[row_index]
    return data_row(b"%d" % r[0], hex_text(bytes(envelope)), hex_text(ENVELOPES[row_index][1]))


def make_relay(*, cached: bool = True) -> tuple[Relay, FakeKeySource, KeyRing]:
    source = FakeKeySource([SSN_KEY, SCORE_KEY], cached=cached)
    ring = KeyRing(source)
    ctx = CryptoContext(CATALOG, ring)
    roles: list[str] = []

    def factory(role: str) -> SessionCrypto:
        roles.append(role)
        return SessionCrypto(ctx, role)

    relay = Relay(crypto_factory=factory)
    client(relay, codec.encode_startup(STARTUP))
    assert [type(e) for e in relay.events] == [StartupReceived]
    relay.events.clear()
    assert relay.crypto is None
    greeting = be(
        m.Authentication(m.AuthCode.OK),
        m.ParameterStatus("client_encoding", "UTF8"),
        m.BackendKeyData(4242, 99),
        m.ReadyForQuery(b"I"),
    )
    assert server(relay, greeting) == greeting
    assert roles == ["app"]
    assert relay.crypto is not None
    assert relay.events == [Authenticated("app"), SessionReady()]
    relay.events.clear()
    return relay, source, ring


DONE = be(m.CommandComplete("SELECT 2"), m.ReadyForQuery(b"I"))


# -- startup --------------------------------------------------------------------------------------------


def test_crypto_follows_the_session_settings_reported_after_authentication() -> None:
    relay, *_ = make_relay()
    assert isinstance(relay.crypto, SessionCrypto)
    server(relay, be(m.ParameterStatus("client_encoding", "LATIN1")))
    assert relay.crypto.fmt.client_encoding == "LATIN1"
    client(relay, fe(m.Query(SELECT_ALL)))
    out = server(relay, be(server_description(0)) + text_rows_stored()[1] + DONE)
    assert split(out)[1] == split(data_row(b"8", b"Zo\xeb", b"-1"))[0]


# -- simple Query ---------------------------------------------------------------------------------------


def test_simple_insert_reaches_the_server_without_plaintext() -> None:
    relay, *_ = make_relay()
    sql = "INSERT INTO customers (id, ssn, score) VALUES (7, '123-45-6789', 42)"
    sent = client(relay, fe(m.Query(sql)))
    assert b"123-45-6789" not in sent
    ((t, body),) = split(sent)
    query = codec.decode_frontend(t, body)
    assert isinstance(query, m.Query)
    assert BYTEA_LITERAL.sub("?", query.query) == "INSERT INTO customers (id, ssn, score) VALUES (7, ?, ?)"
    ssn, score = (bytes.fromhex(h) for h in BYTEA_LITERAL.findall(query.query))
    assert (open_as(SSN, ssn), open_as(SCORE, score)) == (b"123-45-6789", int4(42))
    reply = be(m.CommandComplete("INSERT 0 1"), m.ReadyForQuery(b"I"))
    assert server(relay, reply) == reply


def test_simple_select_returns_plaintext_as_the_declared_types() -> None:
    relay, *_ = make_relay()
    query = fe(m.Query(SELECT_ALL))
    assert client(relay, query) == query
    out = server(relay, be(server_description(0)) + b"".join(text_rows_stored()) + DONE)
    assert out == be(client_description(0, 0, 0)) + b"".join(text_rows_plain()) + DONE


def test_simple_select_fed_one_byte_at_a_time_gives_the_same_bytes() -> None:
    relay, *_ = make_relay()
    client(relay, fe(m.Query(SELECT_ALL)))
    reply = be(server_description(0)) + b"".join(text_rows_stored()) + DONE
    out = b"".join(server(relay, reply[i : i + 1]) for i in range(len(reply)))
    assert out == be(client_description(0, 0, 0)) + b"".join(text_rows_plain()) + DONE


def test_refused_query_is_replaced_and_the_server_error_becomes_the_refusal() -> None:
    relay, *_ = make_relay()
    sent = client(relay, fe(m.Query("SELECT id FROM customers WHERE ssn LIKE '123%'")))
    assert sent == fe(m.Query(REFUSED_QUERY))
    stand_in_error = codec.encode_error("ERROR", "42601", 'syntax error at or near "pgveil_refused_statement"')
    out = split(server(relay, stand_in_error + be(m.ReadyForQuery(b"I"))))
    assert [t for t, _ in out] == [ord("E"), ord("Z")]
    refusal = codec.decode_backend(*out[0])
    assert isinstance(refusal, m.ErrorResponse)
    assert refusal.sqlstate == "0A000"
    assert "public.customers.ssn" in (refusal.field(b"M") or "")
    assert_next_query_works(relay)


def assert_next_query_works(relay: Relay) -> None:
    client(relay, fe(m.Query(SELECT_ALL)))
    out = server(relay, be(server_description(0)) + text_rows_stored()[0] + DONE)
    assert out == be(client_description(0, 0, 0)) + text_rows_plain()[0] + DONE
    assert relay.phase is Phase.READY
    assert not relay.pending


# -- extended protocol ----------------------------------------------------------------------------------


def test_extended_insert_with_binary_parameters() -> None:
    relay, *_ = make_relay()
    bind = m.Bind("", "", (1,), (int4(7), b"123-45-6789", int4(42)), ())
    sent = split(client(relay, fe(m.Parse("", INSERT_PARAMS, (INT4, TEXT, INT4)), bind, m.Execute("", 0), m.Sync())))
    assert [t for t, _ in sent] == list(b"PBES")
    assert codec.decode_frontend(*sent[0]) == m.Parse("", INSERT_PARAMS, (INT4, BYTEA, BYTEA))
    sealed = codec.decode_frontend(*sent[1])
    assert isinstance(sealed, m.Bind)
    assert sealed.param_formats == (1, 1, 1)
    assert sealed.params[0] == int4(7)
    ssn, score = sealed.params[1], sealed.params[2]
    assert ssn is not None
    assert score is not None
    assert (open_as(SSN, ssn), open_as(SCORE, score)) == (b"123-45-6789", int4(42))
    reply = be(m.ParseComplete(), m.BindComplete(), m.CommandComplete("INSERT 0 1"), m.ReadyForQuery(b"I"))
    assert server(relay, reply) == reply


def test_extended_select_with_binary_results() -> None:
    relay, *_ = make_relay()
    sent = split(
        client(
            relay,
            fe(
                m.Parse("", SELECT_BY_ID),
                m.Bind("", "", (), (b"7",), (1,)),
                m.Describe(b"P", ""),
                m.Execute("", 0),
                m.Sync(),
            ),
        )
    )
    assert codec.decode_frontend(*sent[1]) == m.Bind("", "", (), (b"7",), (1, 1, 1))
    reply = be(m.ParseComplete(), m.BindComplete(), server_description(1)) + b"".join(binary_rows_stored()) + DONE
    out = server(relay, reply)
    assert (
        out
        == be(m.ParseComplete(), m.BindComplete(), client_description(1, 1, 1)) + b"".join(binary_rows_plain()) + DONE
    )


def test_extended_select_with_text_results_asks_binary_only_for_protected_columns() -> None:
    relay, *_ = make_relay()
    msgs = fe(
        m.Parse("", SELECT_BY_ID), m.Bind("", "", (), (b"7",), ()), m.Describe(b"P", ""), m.Execute("", 0), m.Sync()
    )
    sent = split(client(relay, msgs))
    assert codec.decode_frontend(*sent[1]) == m.Bind("", "", (), (b"7",), (0, 1, 1))
    stored = [data_row(b"%d" % r[0], e[0], e[1]) for r, e in zip(ROWS, ENVELOPES, strict=True)]
    server_desc = m.RowDescription(
        (field("id", 1, INT4, 4, 0), field("ssn", 2, BYTEA, -1, 1), field("score", 3, BYTEA, -1, 1))
    )
    out = server(relay, be(m.ParseComplete(), m.BindComplete(), server_desc) + b"".join(stored) + DONE)
    assert (
        out == be(m.ParseComplete(), m.BindComplete(), client_description(0, 0, 0)) + b"".join(text_rows_plain()) + DONE
    )


def test_statement_describe_then_execute_without_portal_describe() -> None:
    """asyncpg's order: Parse + Describe statement + Sync, then Bind + Execute + Sync."""
    relay, *_ = make_relay()
    client(relay, fe(m.Parse("s1", INSERT_PARAMS), m.Describe(b"S", "s1"), m.Sync()))
    out = server(
        relay, be(m.ParseComplete(), m.ParameterDescription((INT4, BYTEA, BYTEA)), m.NoData(), m.ReadyForQuery(b"I"))
    )
    assert out == be(m.ParseComplete(), m.ParameterDescription((INT4, TEXT, INT4)), m.NoData(), m.ReadyForQuery(b"I"))

    client(relay, fe(m.Parse("s2", SELECT_BY_ID), m.Describe(b"S", "s2"), m.Sync()))
    out = server(
        relay, be(m.ParseComplete(), m.ParameterDescription((INT4,)), server_description(0), m.ReadyForQuery(b"I"))
    )
    assert out == be(
        m.ParseComplete(), m.ParameterDescription((INT4,)), client_description(0, 0, 0), m.ReadyForQuery(b"I")
    )
    sent = split(client(relay, fe(m.Bind("", "s2", (), (b"7",), (1,)), m.Execute("", 0), m.Sync())))
    assert codec.decode_frontend(*sent[0]) == m.Bind("", "s2", (), (b"7",), (1, 1, 1))
    out = server(relay, be(m.BindComplete()) + b"".join(binary_rows_stored()) + DONE)
    assert out == be(m.BindComplete()) + b"".join(binary_rows_plain()) + DONE


def test_statement_describe_then_execute_of_a_select_star_with_a_join() -> None:
    """``SELECT *`` over a join with a table pgveil has no column list for: the analysis cannot say which
    result columns are protected, the statement's RowDescription can (table OID, attribute number). The
    rows must reach the client decrypted, not as the envelopes' raw bytes."""
    relay, *_ = make_relay()
    sql = "SELECT * FROM customers c JOIN orders o ON o.customer_id = c.id WHERE c.id = $1"
    client(relay, fe(m.Parse("s1", sql), m.Describe(b"S", "s1"), m.Sync()))
    server_desc = m.RowDescription((*server_description(0).fields, field("total", 2, INT4, 4, 0, table=OTHER_OID)))
    out = server(relay, be(m.ParseComplete(), m.ParameterDescription((INT4,)), server_desc, m.ReadyForQuery(b"I")))
    client_desc = m.RowDescription(
        (*client_description(0, 0, 0).fields, field("total", 2, INT4, 4, 0, table=OTHER_OID))
    )
    assert out == be(m.ParseComplete(), m.ParameterDescription((INT4,)), client_desc, m.ReadyForQuery(b"I"))

    client(relay, fe(m.Bind("", "s1", (), (b"7",), (1,)), m.Execute("", 0), m.Sync()))
    (r, e) = (ROWS[0], ENVELOPES[0])
    out = server(relay, be(m.BindComplete()) + data_row(int4(r[0]), e[0], e[1], int4(5)) + DONE)
    assert out == be(m.BindComplete()) + data_row(int4(r[0]), r[1], int4(r[2]), int4(5)) + DONE


def test_refused_parse_error_is_replaced_and_later_replies_still_match() -> None:
    relay, *_ = make_relay()
    refused = m.Parse("", "SELECT id FROM customers WHERE ssn LIKE $1", (TEXT,))
    msgs = fe(refused, m.Bind("", "", (), (b"1%",), ()), m.Execute("", 0), m.Sync())
    ok = fe(m.Parse("", SELECT_BY_ID), m.Bind("", "", (), (b"7",), (1,)), m.Execute("", 0), m.Sync())
    sent = split(client(relay, msgs + ok))
    assert codec.decode_frontend(*sent[0]) == m.Parse("", REFUSED_QUERY, ())
    assert b"".join(codec.frame(bytes([t]), b) for t, b in sent[1:4]) == msgs[len(codec.encode_frontend(refused)) :]
    stand_in_error = codec.encode_error("ERROR", "42601", 'syntax error at or near "pgveil_refused_statement"')
    reply = (
        stand_in_error
        + be(m.ReadyForQuery(b"I"), m.ParseComplete(), m.BindComplete())
        + binary_rows_stored()[0]
        + be(m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))
    )
    out = split(server(relay, reply))
    assert bytes(t for t, _ in out) == b"EZ12DCZ"
    refusal = codec.decode_backend(*out[0])
    assert isinstance(refusal, m.ErrorResponse)
    assert refusal.sqlstate == "0A000"
    assert "public.customers.ssn" in (refusal.field(b"M") or "")
    assert codec.frame(b"D", out[4][1]) == binary_rows_plain()[0]
    assert_next_query_works(relay)


# -- a value that fails to decrypt ------------------------------------------------------------------------


def assert_one_decryption_error(out: bytes, before: bytes) -> None:
    """``out`` is ``before``, then exactly one ErrorResponse XX001 naming the column, then ReadyForQuery."""
    assert out.startswith(before)
    rest = split(out[len(before) :])
    assert [t for t, _ in rest] == [ord("E"), ord("Z")]
    e = codec.decode_backend(*rest[0])
    assert isinstance(e, m.ErrorResponse)
    assert (e.severity, e.sqlstate) == ("ERROR", "XX001")
    assert "public.customers.ssn" in (e.field(b"M") or "")


def test_tampered_row_in_the_middle_of_a_result_ends_it_with_one_error() -> None:
    relay, *_ = make_relay()
    client(relay, fe(m.Query(SELECT_ALL)))
    good = text_rows_stored()
    reply = be(server_description(0)) + good[0] + tampered(1) + good[1] + good[0] + DONE
    out = server(relay, reply)
    assert_one_decryption_error(out, be(client_description(0, 0, 0)) + text_rows_plain()[0])
    assert_next_query_works(relay)


def test_rows_after_a_tampered_row_are_dropped_across_reads() -> None:
    relay, *_ = make_relay()
    client(relay, fe(m.Query(SELECT_ALL)))
    good = text_rows_stored()
    out = server(relay, be(server_description(0)) + good[0])
    out += server(relay, tampered(1) + good[1][:7])
    out += server(relay, good[1][7:] + good[0])
    out += server(relay, DONE)
    assert_one_decryption_error(out, be(client_description(0, 0, 0)) + text_rows_plain()[0])
    assert_next_query_works(relay)


def test_tampered_row_in_an_extended_result() -> None:
    relay, *_ = make_relay()
    client(relay, fe(m.Parse("", SELECT_ALL), m.Bind("", "", (), (), ()), m.Execute("", 0), m.Sync()))
    stored = [data_row(b"%d" % r[0], e[0], e[1]) for r, e in zip(ROWS, ENVELOPES, strict=True)]
    bad = bytearray(ENVELOPES[1][0])
    bad[-1] ^= 0x80
    reply = (
        be(m.ParseComplete(), m.BindComplete())
        + stored[0]
        + data_row(b"8", bytes(bad), ENVELOPES[1][1])
        + stored[1]
        + DONE
    )
    out = server(relay, reply)
    assert_one_decryption_error(out, be(m.ParseComplete(), m.BindComplete()) + text_rows_plain()[0])
    assert_next_query_works(relay)


def test_nothing_of_a_later_statement_follows_the_decryption_error() -> None:
    """A multi-statement Query: once the client has an ErrorResponse, the rest of the reply up to
    ReadyForQuery is dropped, including the next statement's RowDescription and its rows."""
    relay, *_ = make_relay()
    client(relay, fe(m.Query(f"{SELECT_ALL}; {SELECT_ALL}")))
    select_done = be(m.CommandComplete("SELECT 1"))
    reply = (
        be(server_description(0))
        + tampered(0)
        + select_done
        + be(server_description(0))
        + text_rows_stored()[1]
        + select_done
        + be(m.ReadyForQuery(b"I"))
    )
    out = server(relay, reply)
    assert_one_decryption_error(out, be(client_description(0, 0, 0)))


def test_nothing_of_a_later_portal_follows_the_decryption_error() -> None:
    relay, *_ = make_relay()
    msgs = fe(
        m.Parse("s", SELECT_ALL),
        m.Bind("a", "s", (), (), ()),
        m.Execute("a", 0),
        m.Bind("b", "s", (), (), ()),
        m.Describe(b"P", "b"),
        m.Execute("b", 0),
        m.Sync(),
    )
    client(relay, msgs)
    stored = [data_row(b"%d" % r[0], e[0], e[1]) for r, e in zip(ROWS, ENVELOPES, strict=True)]
    bad = bytearray(ENVELOPES[0][0])
    bad[0] ^= 0x01
    described = m.RowDescription(
        (field("id", 1, INT4, 4, 0), field("ssn", 2, BYTEA, -1, 1), field("score", 3, BYTEA, -1, 1))
    )
    reply = (
        be(m.ParseComplete(), m.BindComplete())
        + data_row(b"7", bytes(bad), ENVELOPES[0][1])
        + be(m.CommandComplete("SELECT 1"), m.BindComplete(), described)
        + stored[1]
        + be(m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))
    )
    out = server(relay, reply)
    assert_one_decryption_error(out, be(m.ParseComplete(), m.BindComplete()))


# -- keys not in memory ---------------------------------------------------------------------------------


async def fetch_until_done(relay: Relay, ring: KeyRing, side: str) -> list[NeedKey]:
    """Plays the session: fetches each key the relay asks for and resumes that side."""
    asked: list[NeedKey] = []
    while relay.events:
        (event,) = relay.events
        relay.events.clear()
        assert isinstance(event, NeedKey)
        assert event.side == side
        asked.append(event)
        assert await ring.fetch(key_id=event.key_id, column_id=event.column_id, key_ids=event.key_ids)
        relay.resume(side)
    return asked


async def test_key_miss_on_a_data_row_holds_the_server_side_until_resumed() -> None:
    relay, source, ring = make_relay(cached=False)
    client(relay, fe(m.Query(SELECT_ALL)))
    stored = text_rows_stored()
    out = server(relay, be(server_description(0)) + stored[0] + stored[1][:9])
    assert out == be(client_description(0, 0, 0))
    # Every key the held run needs is asked for at once (one keystore query), not one per round trip.
    both = (bytes(SSN_KEY.key_id), bytes(SCORE_KEY.key_id))
    assert relay.events == [NeedKey("server", key_id=bytes(SSN_KEY.key_id), key_ids=both)]
    assert server(relay, stored[1][9:] + DONE) == b""  # still held: arrives, is kept, in order
    assert source.cache == {}

    asked = await fetch_until_done(relay, ring, "server")
    assert asked == [NeedKey("server", key_id=bytes(SSN_KEY.key_id), key_ids=both)]
    assert source.batches == 1
    out = b"".join(relay.to_client)
    relay.to_client.clear()
    assert out == b"".join(text_rows_plain()) + DONE
    assert_next_query_works(relay)


async def test_key_miss_on_a_bind_holds_the_client_side_until_resumed() -> None:
    relay, _, ring = make_relay(cached=False)
    parse = fe(m.Parse("", INSERT_PARAMS, ()))
    rest = fe(m.Bind("", "", (), (b"7", b"123-45-6789", b"42"), ()), m.Execute("", 0), m.Sync())
    sent = split(client(relay, parse + rest))
    assert codec.decode_frontend(*sent[0]) == m.Parse("", INSERT_PARAMS, (0, BYTEA, BYTEA))
    assert len(sent) == 1
    assert relay.events == [NeedKey("client", column_id=SSN.column_id)]
    later = fe(m.Query("SELECT 1"))
    assert client(relay, later) == b""

    asked = await fetch_until_done(relay, ring, "client")
    assert [e.column_id for e in asked] == [SSN.column_id, SCORE.column_id]
    sent = split(b"".join(relay.to_server))
    relay.to_server.clear()
    assert bytes(t for t, _ in sent) == b"BESQ"
    sealed = codec.decode_frontend(*sent[0])
    assert isinstance(sealed, m.Bind)
    ssn, score = sealed.params[1], sealed.params[2]
    assert ssn is not None
    assert score is not None
    assert (open_as(SSN, ssn), open_as(SCORE, score)) == (b"123-45-6789", int4(42))
    assert b"".join(codec.frame(bytes([t]), b) for t, b in sent[1:]) == fe(m.Execute("", 0), m.Sync()) + later

    select_one = (
        be(
            m.RowDescription((field("?column?", 0, INT4, 4, 0, table=0),)),
        )
        + data_row(b"1")
        + be(m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))
    )
    reply = be(m.ParseComplete(), m.BindComplete(), m.CommandComplete("INSERT 0 1"), m.ReadyForQuery(b"I")) + select_one
    assert server(relay, reply) == reply
    assert relay.phase is Phase.READY
    assert not relay.pending


async def test_key_miss_on_a_simple_insert_holds_the_query() -> None:
    relay, _, ring = make_relay(cached=False)
    sql = "INSERT INTO customers (id, ssn) VALUES (7, '123-45-6789')"
    assert client(relay, fe(m.Query(sql))) == b""
    await fetch_until_done(relay, ring, "client")
    sent = split(b"".join(relay.to_server))
    assert len(sent) == 1
    query = codec.decode_frontend(*sent[0])
    assert isinstance(query, m.Query)
    (hexed,) = BYTEA_LITERAL.findall(query.query)
    assert open_as(SSN, bytes.fromhex(hexed)) == b"123-45-6789"


async def test_key_that_cannot_be_fetched_fails_the_row_and_the_session_goes_on() -> None:
    relay, source, ring = make_relay(cached=False)
    source.down = True
    client(relay, fe(m.Query(SELECT_ALL)))
    out = server(relay, be(server_description(0)) + text_rows_stored()[0] + DONE)
    assert out == be(client_description(0, 0, 0))
    (event,) = relay.events
    relay.events.clear()
    assert isinstance(event, NeedKey)
    assert not await ring.fetch(key_id=event.key_id)
    relay.resume("server")
    out = b"".join(relay.to_client)
    relay.to_client.clear()
    assert_one_decryption_error(out, b"")
    assert relay.events == []


# -- nothing protected ----------------------------------------------------------------------------------


def test_select_without_protected_columns_passes_byte_identical() -> None:
    relay, *_ = make_relay(cached=False)  # and needs no key
    for sql, table in (("SELECT id, note FROM orders", OTHER_OID), ("SELECT id, name FROM customers", TABLE_OID)):
        query = fe(m.Query(sql))
        assert client(relay, query) == query
        desc = m.RowDescription((field("id", 1, INT4, 4, 0, table=table), field("name", 4, TEXT, -1, 0, table=table)))
        # Even a value that looks like an envelope is not touched in a column that is not protected.
        reply = be(desc) + data_row(b"1", hex_text(ENVELOPES[0][0])) + data_row(b"2", None) + DONE
        assert server(relay, reply) == reply
        assert relay.events == []


def test_extended_statement_without_protected_columns_passes_byte_identical() -> None:
    relay, *_ = make_relay(cached=False)
    msgs = fe(
        m.Parse("", "SELECT id, note FROM orders WHERE id = $1", (INT4,)),
        m.Bind("", "", (1,), (int4(1),), (1,)),
        m.Describe(b"P", ""),
        m.Execute("", 0),
        m.Sync(),
    )
    assert client(relay, msgs) == msgs
    desc = m.RowDescription(
        (field("id", 1, INT4, 4, 1, table=OTHER_OID), field("note", 2, TEXT, -1, 1, table=OTHER_OID))
    )
    reply = be(m.ParseComplete(), m.BindComplete(), desc) + data_row(int4(1), ENVELOPES[0][0]) + DONE
    assert server(relay, reply) == reply


# -- the prepared statement's hot path ------------------------------------------------------------------
# Bind, Describe, Execute, Close and Sync are read in place, without message objects; the checks are the
# decoder's, and so is the error a malformed one gets.


def plain_relay() -> Relay:
    """The full statement model without an encryption layer."""
    relay = Relay()
    client(relay, codec.encode_startup(STARTUP))
    server(relay, be(m.Authentication(m.AuthCode.OK), m.BackendKeyData(4242, 99), m.ReadyForQuery(b"I")))
    relay.events.clear()
    return relay


def prepared_insert(relay: Relay) -> None:
    client(relay, fe(m.Parse("ins", INSERT_PARAMS, ()), m.Sync()))
    server(relay, be(m.ParseComplete(), m.ReadyForQuery(b"I")))


def decoder_error(t: int, body: bytes) -> codec.CodecError:
    try:
        codec.decode_frontend(t, body)
    except codec.CodecError as e:
        return e
    raise AssertionError("the decoder accepts these bytes")


HOT_MALFORMED = [
    (b"B", b"\x00ins\x00\x00\x00\x00\x01\x00\x00\x00\x05ab\x00\x00"),  # a value runs past the end
    (b"B", b"\x00ins\x00\x00\x01\x00\x02\x00\x00\x00\x00"),  # format code 2
    (b"B", b"\x00ins\x00\x00\x00\x00\x00\x00\x00\x00"),  # trailing bytes
    (b"B", b"\x00ins"),  # unterminated statement name
    (b"D", b"Q\x00"),
    (b"D", b"P"),
    (b"C", b"S\x00\x00"),
    (b"E", b"abcd"),
    (b"E", b"\x00\x00\x00"),
    (b"S", b"\x00"),
    (b"H", b"x"),
    (b"X", b"\x00\x00"),
    (b"c", b"x"),  # CopyDone and CopyFail outside a COPY: checked the same way
    (b"f", b"no terminator"),
]


@pytest.mark.parametrize("encrypting", [True, False])
@pytest.mark.parametrize(("type_byte", "body"), HOT_MALFORMED)
def test_malformed_hot_message_is_refused_with_the_decoders_error(
    encrypting: bool, type_byte: bytes, body: bytes
) -> None:
    relay = make_relay()[0] if encrypting else plain_relay()
    prepared_insert(relay)
    good = fe(m.Bind("", "ins", (), (b"1", b"123-45-6789", b"42"), ()), m.Describe(b"P", ""), m.Execute("", 0))
    sent = client(relay, good + codec.frame(type_byte, body) + fe(m.Sync()))
    assert b"123-45-6789" not in sent
    closes = [e for e in relay.events if isinstance(e, CloseConnection)]
    assert len(closes) == 1
    assert relay.phase is Phase.CLOSED
    expected = decoder_error(type_byte[0], body)
    assert closes[0].error is not None
    assert (closes[0].error.peer, closes[0].error.message) == ("client", expected.message)
    assert b"".join(relay.to_client) == codec.encode_error("FATAL", "08P01", expected.message)


hot_types = st.sampled_from([b"B", b"D", b"C", b"E", b"S", b"H"])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), hot_types, st.binary(max_size=24), st.data())
def test_hot_messages_are_accepted_exactly_when_the_decoder_accepts_them(
    encrypting: bool, type_byte: bytes, noise: bytes, data: st.DataObject
) -> None:
    valid = {
        b"B": codec.encode_bind_body(m.Bind("", "ins", (), (b"1", b"2", b"3"), ())),
        b"D": b"Pp\x00",
        b"C": b"Sins\x00",
        b"E": b"p\x00\x00\x00\x00\x00",
        b"S": b"",
        b"H": b"",
    }[type_byte]
    cut = data.draw(st.integers(0, len(valid)))
    body = data.draw(st.sampled_from([valid, noise, valid[:cut] + noise, valid + noise[:2]]))
    relay = make_relay()[0] if encrypting else plain_relay()
    prepared_insert(relay)
    client(relay, codec.frame(type_byte, body))
    try:
        codec.decode_frontend(type_byte[0], body)
        refused = None
    except codec.CodecError as e:
        refused = e.message
    if refused is None:
        assert relay.phase is Phase.READY
        assert relay.events == []
    else:
        (close,) = relay.events
        assert isinstance(close, CloseConnection)
        assert close.error is not None
        assert close.error.message == refused


def test_prepared_insert_goes_out_in_one_buffer_and_its_replies_pass_untouched() -> None:
    relay, *_ = make_relay()
    prepared_insert(relay)
    for _ in range(3):
        relay.receive_client(
            fe(
                m.Bind("", "ins", (), (b"7", b"123-45-6789", b"42"), ()),
                m.Describe(b"P", ""),
                m.Execute("", 0),
                m.Sync(),
            )
        )
        assert len(relay.to_server) == 1  # the rewritten Bind and the untouched rest, joined: one write
        sent = split(relay.to_server.pop())
        assert bytes(t for t, _ in sent) == b"BDES"
        sealed = codec.decode_frontend(*sent[0])
        assert isinstance(sealed, m.Bind)
        ssn, score = sealed.params[1], sealed.params[2]
        assert ssn is not None
        assert score is not None
        assert (open_as(SSN, ssn), open_as(SCORE, score)) == (b"123-45-6789", int4(42))
        reply = be(m.BindComplete(), m.NoData(), m.CommandComplete("INSERT 0 1"), m.ReadyForQuery(b"I"))
        assert server(relay, reply) == reply
        assert not relay.pending
        assert relay.portals == {}  # the unnamed portal ended with its transaction


# -- statement state follows the server's replies ------------------------------------------------------


def test_a_describe_after_a_failed_reparse_describes_the_statement_the_server_kept() -> None:
    relay, *_ = make_relay()
    client(relay, fe(m.Parse("s1", INSERT_PARAMS, ()), m.Sync()))
    server(relay, be(m.ParseComplete(), m.ReadyForQuery(b"I")))
    # The server keeps s1 (42P05): the Describe that follows describes the protected INSERT.
    client(
        relay, fe(m.Parse("s1", "SELECT $1::text, $2::text, $3::text", ()), m.Sync(), m.Describe(b"S", "s1"), m.Sync())
    )
    duplicate = codec.encode_error("ERROR", "42P05", 'prepared statement "s1" already exists')
    out = server(
        relay,
        duplicate
        + be(m.ReadyForQuery(b"I"), m.ParameterDescription((INT4, BYTEA, BYTEA)), m.NoData(), m.ReadyForQuery(b"I")),
    )
    assert out == duplicate + be(
        m.ReadyForQuery(b"I"), m.ParameterDescription((INT4, TEXT, INT4)), m.NoData(), m.ReadyForQuery(b"I")
    )


def test_a_bind_that_may_meet_two_versions_is_refused_and_one_after_its_parse_is_sealed() -> None:
    relay, *_ = make_relay()
    values = (b"7", b"123-45-6789", b"42")
    # Parse s1 (protected) and a re-Parse as a plain SELECT, both unanswered: s1 may be either.
    sent = split(
        client(
            relay,
            fe(
                m.Parse("s1", INSERT_PARAMS, ()),
                m.Sync(),
                m.Parse("s1", "SELECT $1::text, $2::text, $3::text", ()),
                m.Sync(),
                m.Bind("", "s1", (), values, ()),
                m.Execute("", 0),
                m.Sync(),
                # In one segment with its Parse, a Bind meets that statement or does not run.
                m.Parse("", INSERT_PARAMS, ()),
                m.Bind("", "", (), values, ()),
                m.Sync(),
            ),
        )
    )
    refused = codec.decode_frontend(*sent[4])
    assert isinstance(refused, m.Bind)
    assert refused.statement == REFUSED_STATEMENT_NAME
    assert refused.params == ()
    sealed = codec.decode_frontend(*sent[8])
    assert isinstance(sealed, m.Bind)
    assert sealed.params[1] is not None
    assert open_as(SSN, sealed.params[1]) == b"123-45-6789"
    replies = server(
        relay,
        be(m.ParseComplete(), m.ReadyForQuery(b"I"))
        + codec.encode_error("ERROR", "42P05", 'prepared statement "s1" already exists')
        + be(m.ReadyForQuery(b"I"))
        + codec.encode_error("ERROR", "26000", "prepared statement does not exist")
        + be(m.ReadyForQuery(b"I"), m.ParseComplete(), m.BindComplete(), m.ReadyForQuery(b"I")),
    )
    errors = [codec.decode_backend(t, b) for t, b in split(replies) if t == ord("E")]
    assert [e.sqlstate for e in errors if isinstance(e, m.ErrorResponse)] == ["42P05", "0A000"]
    assert "not confirmed" in str(errors[1])
    assert not relay.pending
    assert isinstance(relay.crypto, SessionCrypto)
    assert relay.crypto.refused == {(RefusalReason.STATEMENT_STATE, "0A000"): 1}


def test_the_encryption_layer_is_told_whether_requests_are_in_flight() -> None:
    relay, *_ = make_relay()
    crypto = relay.crypto
    assert isinstance(crypto, SessionCrypto)
    client(relay, fe(m.Query(SELECT_ALL)))
    assert crypto.in_flight is False
    client(relay, fe(m.Parse("", SELECT_BY_ID, ())))
    assert crypto.in_flight is True  # the Query is unanswered


def test_an_execute_in_a_text_too_long_to_read_again_is_refused() -> None:
    relay, *_ = make_relay()
    text = "/*" + "x" * 70000 + "*/ EXECUTE s1(1, '123-45-6789', 42)"
    sent = client(relay, fe(m.Query(text)))
    assert sent == fe(m.Query(REFUSED_QUERY))
    out = server(relay, codec.encode_error("ERROR", "42601", "syntax error") + be(m.ReadyForQuery(b"I")))
    error = codec.decode_backend(*split(out)[0])
    assert isinstance(error, m.ErrorResponse)
    assert error.sqlstate == "0A000"
    assert "too long" in str(error)
