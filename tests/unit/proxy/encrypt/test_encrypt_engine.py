"""SessionCrypto, message by message: simple-Query literals sealed in place, Parse/ParameterDescription
types, Bind parameters sealed from text and binary to one canonical plaintext, result formats,
RowDescription, and every refusal (construct, bad value, key missing or unavailable, not ready) with
its SQLSTATE, naming the column and never the value.

Keys come from a fake keystore (:class:`FakeKeySource`) behind the real KeyRing: a fixed set of DataKeys
from fixed material, of which a test chooses which are "in memory"; fetches fill the memory or fail.
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
)

from keymgmt.envelope import KeyState, column_associated_data, open_envelope
from proxy.encrypt.engine import (
    REFUSED_QUERY,
    CryptoContext,
    DecryptionError,
    Outcome,
    PortalCrypto,
    QueryCrypto,
    SessionCrypto,
    StatementCrypto,
)
from proxy.encrypt.keyring import KeyRing, KeyUnavailable
from proxy.encrypt.rows import ColumnOutput
from proxy.errors import RefusalReason
from proxy.protocol import codec
from proxy.protocol import messages as m
from proxy.protocol.encryption import refused_bind
from proxy.protocol.relay import KeyMiss
from proxy.rewrite.catalog import ProtectedColumn


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_session(*, cached: bool = True) -> tuple[SessionCrypto, FakeKeySource, KeyRing, Clock]:
    source = FakeKeySource([SSN_KEY, SCORE_KEY], cached=cached)
    clock = Clock()
    ring = KeyRing(source, negative_ttl=5.0, clock=clock)
    return SessionCrypto(CryptoContext(CATALOG, ring), "app"), source, ring, clock


def open_as(col: ProtectedColumn, envelope: bytes) -> bytes:
    """Decrypts with the fixed keys, independently of the engine (keymgmt's reference open)."""
    keys = {bytes(k.key_id): k for k in (SSN_KEY, SCORE_KEY)}
    return open_envelope(keys.__getitem__, envelope, column_associated_data(col.column_id))


def frame(msg: m.Bind) -> m.BindFrame:
    """A Bind as the relay hands it to the engine: located in its wire body."""
    return codec.decode_bind_frame(codec.encode_bind_body(msg))


def frontend(data: bytes) -> m.FrontendMessage:
    t, n = codec.read_header(data)
    assert len(data) == 1 + n
    return codec.decode_frontend(t, data[5:])


def error(data: bytes | None) -> m.ErrorResponse:
    assert data is not None
    t, n = codec.read_header(data)
    assert len(data) == 1 + n
    msg = codec.decode_backend(t, data[5:])
    assert isinstance(msg, m.ErrorResponse)
    assert msg.severity == "ERROR"
    return msg


def int4(v: int) -> bytes:
    return v.to_bytes(4, "big", signed=True)


def sealed_query(out: Outcome) -> tuple[str, list[bytes]]:
    """The rewritten Query text with each bytea literal replaced by ``?``, and the envelopes in order."""
    assert out.replacement is not None
    assert out.refusal is None
    msg = frontend(out.replacement)
    assert isinstance(msg, m.Query)
    envelopes = [bytes.fromhex(h) for h in BYTEA_LITERAL.findall(msg.query)]
    return BYTEA_LITERAL.sub("?", msg.query), envelopes


# -- simple Query -------------------------------------------------------------------------------------


def test_insert_literals_are_replaced_in_place_by_their_ciphertext() -> None:
    crypto, *_ = make_session()
    out = crypto.query(INSERT_LITERALS)
    template, envelopes = sealed_query(out)
    assert template == "INSERT INTO customers (id, ssn, score) VALUES (1, ?, ?)"
    assert out.replacement is not None
    assert b"123-45-6789" not in out.replacement
    assert [open_as(SSN, envelopes[0]), open_as(SCORE, envelopes[1])] == [b"123-45-6789", int4(42)]
    assert isinstance(out.state, QueryCrypto)
    assert crypto.values_encrypted == 2


def test_literals_are_normalised_before_sealing() -> None:
    """Text input is canonicalised first, so '  0042 ' encrypts as the same value as 42 (and as the
    binary parameter below): the canonical form is what every path agrees on."""
    crypto, *_ = make_session()
    _, envelopes = sealed_query(crypto.query("INSERT INTO customers (score) VALUES ('  0042 ')"))
    assert open_as(SCORE, envelopes[0]) == int4(42)


def test_same_literal_sealed_twice_gives_different_ciphertexts() -> None:
    crypto, *_ = make_session()
    first = sealed_query(crypto.query(INSERT_LITERALS))[1]
    second = sealed_query(crypto.query(INSERT_LITERALS))[1]
    assert first[0] != second[0]
    assert open_as(SSN, first[0]) == open_as(SSN, second[0])


@pytest.mark.parametrize("sql", ["SELECT 1", "INSERT INTO orders (id, note) VALUES (1, '123-45-6789')", "BEGIN"])
def test_statements_without_protected_tables_are_left_alone(sql: str) -> None:
    crypto, *_ = make_session(cached=False)  # no key needed either
    assert crypto.query(sql) == Outcome()
    assert crypto.parse(m.Parse("", sql, ())) == Outcome()


# -- refusals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql", ["SELECT id FROM customers WHERE ssn LIKE '123%'", "SELECT upper(ssn) FROM customers ORDER BY id"]
)
def test_refused_query_gets_a_failing_stand_in_and_a_0A000_naming_the_column(sql: str) -> None:
    crypto, *_ = make_session()
    out = crypto.query(sql)
    assert out.replacement == codec.encode_frontend(m.Query(REFUSED_QUERY))
    assert out.state is None
    e = error(out.refusal)
    assert e.sqlstate == "0A000"
    assert "public.customers.ssn" in (e.field(b"M") or "")
    assert "123" not in (e.field(b"M") or "")


def test_refused_parse_gets_a_failing_stand_in_under_the_same_name() -> None:
    crypto, *_ = make_session()
    out = crypto.parse(m.Parse("s1", "SELECT id FROM customers WHERE ssn LIKE $1", (TEXT,)))
    assert out.replacement == codec.encode_frontend(m.Parse("s1", REFUSED_QUERY, ()))
    e = error(out.refusal)
    assert e.sqlstate == "0A000"
    assert "public.customers.ssn" in (e.field(b"M") or "")


def test_parse_of_several_statements_touching_protected_columns_is_refused() -> None:
    crypto, *_ = make_session()
    out = crypto.parse(m.Parse("", "SELECT 1; SELECT ssn FROM customers", ()))
    assert error(out.refusal).sqlstate == "0A000"


@pytest.mark.parametrize("value", ["abc", "zq-secret-9", "4.5"])
def test_invalid_literal_for_the_declared_type_is_refused_without_the_value(value: str) -> None:
    crypto, *_ = make_session()
    out = crypto.query(f"INSERT INTO customers (id, score) VALUES (1, '{value}')")
    assert out.replacement == codec.encode_frontend(m.Query(REFUSED_QUERY))
    e = error(out.refusal)
    assert e.sqlstate == "22P02"
    assert "public.customers.score" in (e.field(b"M") or "")
    assert all(value not in text for _, text in e.fields)


def test_invalid_text_parameter_is_refused_without_the_value() -> None:
    crypto, *_ = make_session()
    stmt = prepared(crypto, INSERT_PARAMS)
    out = crypto.bind(frame(m.Bind("p", "", (), (b"1", b"123-45-6789", b"zq-secret-9"), ())), stmt, None)
    assert out.replacement == codec.encode_frontend(refused_bind("p"))
    assert out.state is None
    e = error(out.refusal)
    assert e.sqlstate == "22P02"
    assert "public.customers.score" in (e.field(b"M") or "")
    assert all("zq-secret-9" not in text for _, text in e.fields)


def test_invalid_binary_parameter_is_refused() -> None:
    crypto, *_ = make_session()
    stmt = prepared(crypto, INSERT_PARAMS)
    out = crypto.bind(frame(m.Bind("", "", (1,), (int4(1), b"x", b"\x00\x2a"), ())), stmt, None)
    e = error(out.refusal)
    assert e.sqlstate == "22P03"
    assert "public.customers.score" in (e.field(b"M") or "")


def test_not_ready_context_refuses_protected_statements_with_55000() -> None:
    crypto, *_ = make_session()
    crypto.ctx.unavailable = "pgveil is still loading the catalog and keys"
    for out in (crypto.query(INSERT_LITERALS), crypto.parse(m.Parse("", SELECT_BY_ID, ()))):
        assert out.replacement is not None
        assert b"123-45-6789" not in out.replacement
        e = error(out.refusal)
        assert (e.sqlstate, e.field(b"M")) == ("55000", "pgveil is still loading the catalog and keys")
    assert crypto.query("SELECT 1") == Outcome()


def test_every_refusal_is_counted_by_reason_and_sqlstate() -> None:
    crypto, source, *_ = make_session()
    crypto.query("SELECT upper(ssn) FROM customers")
    crypto.parse(m.Parse("", "SELECT id FROM customers WHERE ssn LIKE $1", (TEXT,)))
    crypto.query("INSERT INTO customers (id, score) VALUES (1, 'abc')")
    stmt = prepared(crypto, INSERT_PARAMS)
    crypto.bind(frame(m.Bind("p", "", (), (b"1", b"x", b"zq"), ())), stmt, None)
    crypto.query("SELECT 1")  # not refused, not counted
    crypto.ctx.unavailable = "pgveil is still loading the catalog and keys"
    crypto.query(INSERT_LITERALS)
    crypto.ctx.unavailable = None
    source.cache[bytes(SSN_KEY.key_id)] = SSN_KEY.with_state(KeyState.DISABLED)
    crypto.query(INSERT_LITERALS)
    assert crypto.refused == {
        (RefusalReason.CONSTRUCT, "0A000"): 2,
        (RefusalReason.VALUE, "22P02"): 2,
        (RefusalReason.NOT_READY, "55000"): 1,
        (RefusalReason.KEY_UNAVAILABLE, "58000"): 1,
    }


# -- keys -----------------------------------------------------------------------------------------------


def test_key_not_in_memory_raises_key_miss_for_the_column() -> None:
    crypto, _source, _, _ = make_session(cached=False)
    with pytest.raises(KeyMiss) as info:
        crypto.query(INSERT_LITERALS)
    assert info.value.column_id == SSN.column_id
    assert info.value.key_id is None
    stmt = prepared(crypto, INSERT_PARAMS)
    with pytest.raises(KeyMiss):
        crypto.bind(frame(m.Bind("", "", (), (b"1", b"x", b"2"), ())), stmt, None)


async def test_key_miss_is_resolved_by_a_fetch() -> None:
    crypto, _source, ring, _ = make_session(cached=False)
    assert await ring.fetch(column_id=SSN.column_id)
    assert await ring.fetch(column_id=SCORE.column_id)
    _, envelopes = sealed_query(crypto.query(INSERT_LITERALS))
    assert open_as(SSN, envelopes[0]) == b"123-45-6789"


async def test_failed_fetch_makes_the_key_unavailable_with_58000_until_the_negative_ttl_ends() -> None:
    crypto, source, ring, clock = make_session(cached=False)
    source.down = True
    assert not await ring.fetch(column_id=SSN.column_id)
    out = crypto.query(INSERT_LITERALS)
    assert out.replacement == codec.encode_frontend(m.Query(REFUSED_QUERY))
    e = error(out.refusal)
    assert e.sqlstate == KeyUnavailable.sqlstate == "58000"
    assert "public.customers.ssn" in (e.field(b"M") or "")
    clock.now += 5.5
    with pytest.raises(KeyMiss):
        crypto.query(INSERT_LITERALS)


def test_disabled_active_key_refuses_the_write() -> None:
    crypto, source, _, _ = make_session()
    source.cache[bytes(SSN_KEY.key_id)] = SSN_KEY.with_state(KeyState.DISABLED)
    e = error(crypto.query(INSERT_LITERALS).refusal)
    assert e.sqlstate == "58000"
    assert "public.customers.ssn" in (e.field(b"M") or "")


def test_row_key_not_in_memory_raises_key_miss_with_its_id() -> None:
    writer, *_ = make_session()
    reader, _, _, _ = make_session(cached=False)
    envelope = sealed_query(writer.query(INSERT_LITERALS))[1][0]
    plan = (ColumnOutput(SSN, reader.ctx.columns[SSN.column_id].codec, b"\x00public.customers.ssn", True, False),)
    with pytest.raises(KeyMiss) as info:
        reader.data_row(row(envelope), plan)
    assert info.value.key_id == bytes(SSN_KEY.key_id)


async def test_row_key_that_cannot_be_fetched_is_a_decryption_error_naming_the_column() -> None:
    writer, *_ = make_session()
    reader, source, ring, _ = make_session(cached=False)
    del source.stored[bytes(SSN_KEY.key_id)]  # gone from the keystore (shredded, or another keystore)
    envelope = sealed_query(writer.query(INSERT_LITERALS))[1][0]
    assert not await ring.fetch(key_id=bytes(SSN_KEY.key_id))
    plan = (ColumnOutput(SSN, reader.ctx.columns[SSN.column_id].codec, b"\x00public.customers.ssn", True, False),)
    with pytest.raises(DecryptionError) as info:
        reader.data_row(row(envelope), plan)
    assert info.value.sqlstate == "XX001"
    assert "public.customers.ssn" in info.value.message
    assert reader.decrypt_failures == 1


def row(*values: bytes | None) -> bytes:
    parts = [struct.pack("!h", len(values))]
    for v in values:
        parts.append(struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v)
    return b"".join(parts)


# -- Parse and ParameterDescription -----------------------------------------------------------------------


def prepared(crypto: SessionCrypto, sql: str, types: tuple[int, ...] = ()) -> StatementCrypto:
    out = crypto.parse(m.Parse("", sql, types))
    assert out.refusal is None
    assert isinstance(out.state, StatementCrypto)
    return out.state


@pytest.mark.parametrize(
    ("client_types", "server_types"),
    [((), (0, BYTEA, BYTEA)), ((INT4,), (INT4, BYTEA, BYTEA)), ((INT4, TEXT, INT4), (INT4, BYTEA, BYTEA))],
)
def test_parse_declares_bytea_for_protected_parameters(
    client_types: tuple[int, ...], server_types: tuple[int, ...]
) -> None:
    crypto, *_ = make_session()
    out = crypto.parse(m.Parse("ins", INSERT_PARAMS, client_types))
    assert out.replacement == codec.encode_frontend(m.Parse("ins", INSERT_PARAMS, server_types))
    assert isinstance(out.state, StatementCrypto)
    assert {i: cc.column for i, cc in out.state.params.items()} == {1: SSN, 2: SCORE}
    assert out.state.client_param_types == client_types


def test_parse_with_a_literal_seals_it_and_declares_the_parameters() -> None:
    crypto, *_ = make_session()
    out = crypto.parse(m.Parse("", "INSERT INTO customers (id, ssn, score) VALUES ($1, '123-45-6789', $2)", ()))
    assert out.replacement is not None
    assert b"123-45-6789" not in out.replacement
    msg = frontend(out.replacement)
    assert isinstance(msg, m.Parse)
    assert msg.param_types == (0, BYTEA)
    (hexed,) = BYTEA_LITERAL.findall(msg.query)
    assert open_as(SSN, bytes.fromhex(hexed)) == b"123-45-6789"


def test_parse_of_a_select_is_forwarded_unchanged_with_its_result_hint() -> None:
    crypto, *_ = make_session()
    out = crypto.parse(m.Parse("", SELECT_BY_ID, ()))
    assert out.replacement is None
    assert out.refusal is None
    assert isinstance(out.state, StatementCrypto)
    assert out.state.result_hint is not None
    assert [None if h is None else h.column for h in out.state.result_hint] == [None, SSN, SCORE]


@pytest.mark.parametrize("server_oids", [(INT4, BYTEA, BYTEA), (INT4, BYTEA, BYTEA, TEXT)])
def test_parameter_description_shows_the_declared_types(server_oids: tuple[int, ...]) -> None:
    crypto, *_ = make_session()
    stmt = prepared(crypto, INSERT_PARAMS)
    body = codec.encode_backend(m.ParameterDescription(server_oids))[5:]
    client_oids = (INT4, TEXT, INT4, *server_oids[3:])
    assert crypto.parameter_description(body, stmt) == codec.encode_backend(m.ParameterDescription(client_oids))


def test_parameter_description_of_a_statement_without_protected_parameters_is_unchanged() -> None:
    crypto, *_ = make_session()
    stmt = prepared(crypto, SELECT_BY_ID)
    assert crypto.parameter_description(codec.encode_backend(m.ParameterDescription((INT4,)))[5:], stmt) is None


# -- Bind -----------------------------------------------------------------------------------------------


def bound(out: Outcome) -> m.Bind:
    assert out.refusal is None
    assert out.replacement is not None
    msg = frontend(out.replacement)
    assert isinstance(msg, m.Bind)
    return msg


def test_text_and_binary_parameters_seal_the_same_canonical_plaintext() -> None:
    crypto, *_ = make_session()
    stmt = prepared(crypto, INSERT_PARAMS)
    as_text = bound(crypto.bind(frame(m.Bind("", "", (), (b"1", b"123-45-6789", b" 42"), ())), stmt, None))
    as_binary = bound(crypto.bind(frame(m.Bind("", "", (1,), (int4(1), b"123-45-6789", int4(42)), ())), stmt, None))
    assert as_text.param_formats == (0, 1, 1)
    assert as_binary.param_formats == (1, 1, 1)
    assert as_text.params[0] == b"1"
    assert as_binary.params[0] == int4(1)
    for msg in (as_text, as_binary):
        ssn, score = msg.params[1], msg.params[2]
        assert ssn is not None
        assert score is not None
        assert (open_as(SSN, ssn), open_as(SCORE, score)) == (b"123-45-6789", int4(42))
    assert as_text.params[1] != as_binary.params[1]  # a fresh nonce each time
    assert b"123-45-6789" not in codec.encode_frontend(as_text)


def test_binary_parameter_of_another_declared_type_is_converted_to_the_column_type() -> None:
    """The client declared int8 and sent 8 bytes for an integer column: the canonical form is still int4."""
    crypto, *_ = make_session()
    stmt = prepared(crypto, INSERT_PARAMS, (INT4, TEXT, INT8))
    msg = bound(crypto.bind(frame(m.Bind("", "", (1,), (int4(1), b"x", (42).to_bytes(8, "big")), ())), stmt, None))
    score = msg.params[2]
    assert score is not None
    assert open_as(SCORE, score) == int4(42)


def test_null_parameters_stay_null_and_need_no_key() -> None:
    crypto, *_ = make_session(cached=False)
    stmt = prepared(crypto, INSERT_PARAMS)
    msg = bound(crypto.bind(frame(m.Bind("", "", (), (b"1", None, None), ())), stmt, None))
    assert msg.params == (b"1", None, None)
    assert set(msg.param_formats) <= {0}


@pytest.mark.parametrize(
    ("client", "server", "client_binary"),
    [((), (0, 1, 1), (False, False)), ((1,), (1, 1, 1), (True, True)), ((0, 1, 0), (0, 1, 1), (True, False))],
)
def test_bind_asks_binary_results_for_protected_columns(
    client: tuple[int, ...], server: tuple[int, ...], client_binary: tuple[bool, bool]
) -> None:
    crypto, *_ = make_session()
    stmt = prepared(crypto, SELECT_BY_ID)
    out = crypto.bind(frame(m.Bind("p", "", (), (b"7",), client)), stmt, None)
    assert bound(out) == m.Bind("p", "", (), (b"7",), server)
    portal = out.state
    assert isinstance(portal, PortalCrypto)
    assert portal.client_formats == client
    assert portal.row_plan is not None
    id_out, ssn_out, score_out = portal.row_plan
    assert id_out is None
    assert ssn_out is not None
    assert score_out is not None
    assert (ssn_out.column, ssn_out.server_binary, ssn_out.client_binary) == (SSN, True, client_binary[0])
    assert (score_out.column, score_out.server_binary, score_out.client_binary) == (SCORE, True, client_binary[1])


def test_bind_of_a_statement_without_protected_columns_is_unchanged() -> None:
    crypto, *_ = make_session()
    out = crypto.bind(frame(m.Bind("", "", (), (b"1",), (1,))), None, None)
    assert out.replacement is None
    assert out.refusal is None


# -- RowDescription -------------------------------------------------------------------------------------


def field(name: str, attnum: int, type_oid: int, size: int, fmt: int, table: int = TABLE_OID) -> m.FieldDescription:
    return m.FieldDescription(name, table, attnum if table else 0, type_oid, size, -1, fmt)


def row_description_body(*fields: m.FieldDescription) -> bytes:
    return codec.encode_row_description_body(m.RowDescription(fields))


def test_row_description_shows_declared_types_for_protected_fields_only() -> None:
    crypto, *_ = make_session()
    fields = (
        field("id", 1, INT4, 4, 0),
        field("ssn", 2, BYTEA, -1, 1),
        field("score", 3, BYTEA, -1, 1),
        field("name", 4, TEXT, -1, 0),
        field("n", 0, INT8, 8, 0, table=0),
    )
    replacement, plan = crypto.row_description(row_description_body(*fields), None, (0, 0, 1, 0, 0))
    assert replacement == codec.encode_backend(
        m.RowDescription(
            (
                fields[0],
                m.FieldDescription("ssn", TABLE_OID, 2, TEXT, -1, -1, 0),
                m.FieldDescription("score", TABLE_OID, 3, INT4, 4, -1, 1),
                fields[3],
                fields[4],
            )
        )
    )
    assert plan is not None
    assert plan[0] is None
    assert plan[3] is None
    assert plan[4] is None
    assert plan[1] is not None
    assert (plan[1].column, plan[1].server_binary, plan[1].client_binary) == (SSN, True, False)
    assert plan[2] is not None
    assert (plan[2].column, plan[2].server_binary, plan[2].client_binary) == (SCORE, True, True)


def test_row_description_of_a_text_result_reads_hex_and_reports_text() -> None:
    crypto, *_ = make_session()
    body = row_description_body(field("ssn", 2, BYTEA, -1, 0))
    replacement, plan = crypto.row_description(body, None, None)
    assert replacement == codec.encode_backend(
        m.RowDescription((m.FieldDescription("ssn", TABLE_OID, 2, TEXT, -1, -1, 0),))
    )
    assert plan is not None
    assert plan[0] is not None
    assert not plan[0].server_binary
    assert not plan[0].client_binary


def test_row_description_without_protected_fields_is_unchanged() -> None:
    crypto, *_ = make_session()
    body = row_description_body(field("id", 1, INT4, 4, 0), field("x", 2, BYTEA, -1, 0, table=16999))
    assert crypto.row_description(body, None, None) == (None, None)


def test_row_description_uses_the_analysis_hint_for_bytea_fields_without_a_table() -> None:
    """``SELECT s FROM (SELECT ssn AS s FROM customers) q``: the field has no table OID; the analysis
    says it carries ssn. A hinted field that is not bytea (a count, say) is not touched."""
    crypto, *_ = make_session()
    hint = (crypto.ctx.columns[SSN.column_id], crypto.ctx.columns[SCORE.column_id])
    body = row_description_body(field("s", 0, BYTEA, -1, 0, table=0), field("c", 0, INT8, 8, 0, table=0))
    replacement, plan = crypto.row_description(body, hint, None)
    assert replacement == codec.encode_backend(
        m.RowDescription(
            (m.FieldDescription("s", 0, 0, TEXT, -1, -1, 0), m.FieldDescription("c", 0, 0, INT8, 8, -1, 0))
        )
    )
    assert plan is not None
    assert plan[0] is not None
    assert plan[0].column == SSN
    assert plan[1] is None


def test_data_row_decryption_error_names_the_column_not_the_value() -> None:
    crypto, *_ = make_session()
    envelope = bytearray(sealed_query(crypto.query(INSERT_LITERALS))[1][0])
    envelope[-1] ^= 1
    _, plan = crypto.row_description(row_description_body(field("ssn", 2, BYTEA, -1, 1)), None, (0,))
    assert plan is not None
    with pytest.raises(DecryptionError) as info:
        crypto.data_row(row(bytes(envelope)), plan)
    assert info.value.sqlstate == "XX001"
    assert "public.customers.ssn" in info.value.message
    assert "123" not in info.value.message
    assert crypto.data_row(row(None), plan) == row(None)
