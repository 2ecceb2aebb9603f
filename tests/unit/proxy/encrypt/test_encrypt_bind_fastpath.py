"""SessionCrypto.bind, which rewrites a Bind in place (its parameters located in the wire body, protected
ones canonicalised, sealed and spliced in), against the way it used to be done: decode the whole Bind,
canonicalise every protected value through its type codec, build a new Bind and encode it. On random
Binds (text and binary values, NULLs, invalid values, every format-list shape, several columns, declared
parameter types, UTF8, LATIN1 and unsupported client encodings) both give the same message, byte for
byte apart from the nonces (the ciphertexts open to the same plaintexts under the same keys), the same
refusal bytes, and the same key misses.

Also: one key lookup per column per Bind (a second value of the same column reuses it), and the next
Bind looks the key up again, so a key disabled in between is never used.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from encrypt_support import FakeKeySource
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keymgmt.envelope import HEADER_LENGTH, DataKey, KeyState, column_associated_data, open_envelope
from proxy.encrypt.engine import (
    CryptoContext,
    Outcome,
    PortalCrypto,
    SessionCrypto,
    StatementCrypto,
    format_for,
    refusal_bytes,
)
from proxy.encrypt.keyring import KeyRing
from proxy.errors import ProxyError
from proxy.protocol import codec
from proxy.protocol import messages as m
from proxy.protocol.encryption import refused_bind
from proxy.protocol.relay import KeyMiss
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable

OID = 16500
INT4, INT8, TEXT, VARCHAR = 23, 20, 25, 1043
COLUMNS = {
    name: ProtectedColumn("public", "people", name, declared, attnum=attnum, table_oid=OID)
    for name, declared, attnum in [
        ("name", "text", 2),
        ("code", "varchar(4)", 3),
        ("score", "integer", 4),
        ("tag", "char(2)", 5),
    ]
}
PEOPLE = ProtectedTable("public", "people", COLUMNS, ("id", "name", "code", "score", "tag"), oid=OID)
KEYS = [
    DataKey.from_material(bytes([i + 1]) * 16, bytes([i + 7]) * 32, column_id=col.column_id)
    for i, col in enumerate(COLUMNS.values())
]
KEYS_BY_ID = {bytes(k.key_id): k for k in KEYS}

INSERT_ALL = "INSERT INTO people (id, name, code, score, tag) VALUES ($1, $2, $3, $4, $5)"
INSERT_TWO_NAMES = "INSERT INTO people (id, name) VALUES ($1, $2), ($3, $4)"
STATEMENTS = [
    (INSERT_ALL, ()),
    (INSERT_ALL, (INT4, TEXT, VARCHAR, INT8, 0)),
    # Binary values of another declared type are converted through that type's text form.
    (INSERT_ALL, (0, INT4, INT8, 0, INT4)),
    (INSERT_TWO_NAMES, ()),
    ("INSERT INTO people (score, name, id) VALUES ($3, $1, $2)", (TEXT,)),
    ("UPDATE people SET name = $2, tag = $1 WHERE id = $3", ()),
    ("SELECT id, name, score FROM people WHERE id = $1", ()),
]


def make_session(*, cached: bool = True) -> tuple[SessionCrypto, FakeKeySource, KeyRing]:
    source = FakeKeySource(KEYS, cached=cached)
    ring = KeyRing(source)
    return SessionCrypto(CryptoContext(Catalog({("public", "people"): PEOPLE}), ring), "app"), source, ring


def prepared(crypto: SessionCrypto, sql: str, types: tuple[int, ...] = ()) -> StatementCrypto:
    out = crypto.parse(m.Parse("s", sql, types))
    assert out.refusal is None
    assert isinstance(out.state, StatementCrypto)
    return out.state


def frame(msg: m.Bind) -> m.BindFrame:
    return codec.decode_bind_frame(codec.encode_bind_body(msg))


# -- the way it used to be done -------------------------------------------------------------------------


def reference_bind(crypto: SessionCrypto, msg: m.Bind, stmt: StatementCrypto) -> Outcome:
    """Decode, canonicalise each protected value through its codec, build a new Bind, encode it; what
    cannot be done (a parameter, or result columns in a client encoding pgveil cannot produce) refuses
    the Bind."""
    try:
        return _reference_bind(crypto, msg, stmt)
    except ProxyError as e:
        return Outcome(codec.encode_frontend(refused_bind(msg.portal)), None, refusal_bytes(e))


def _reference_bind(crypto: SessionCrypto, msg: m.Bind, stmt: StatementCrypto) -> Outcome:
    params, pformats = reference_params(crypto, msg, stmt)
    hint = stmt.result_hint
    server_formats = msg.result_formats
    row_plan = None
    if hint is not None and any(h is not None for h in hint):
        client = [format_for(msg.result_formats, i) for i in range(len(hint))]
        server_formats = tuple(1 if hint[i] is not None else client[i] for i in range(len(hint)))
        row_plan = tuple(
            None if h is None else h.output(server_binary=True, client_binary=client[i] == 1, fmt=crypto.fmt)
            for i, h in enumerate(hint)
        )
    portal = PortalCrypto(stmt, msg.result_formats, server_formats, row_plan, view=crypto.current_view())
    if params is msg.params and server_formats is msg.result_formats:
        return Outcome(None, portal)
    return Outcome(codec.encode_frontend(m.Bind(msg.portal, msg.statement, pformats, params, server_formats)), portal)


def reference_params(
    crypto: SessionCrypto, msg: m.Bind, stmt: StatementCrypto
) -> tuple[tuple[bytes | None, ...], tuple[int, ...]]:
    if not stmt.params:
        return msg.params, msg.param_formats
    values = list(msg.params)
    formats = [format_for(msg.param_formats, i) for i in range(len(values))]
    for i, cc in stmt.params.items():
        value = values[i] if i < len(values) else None
        if value is None:
            continue
        if formats[i] == 1:
            oid = stmt.client_param_types[i] if i < len(stmt.client_param_types) else 0
            canonical = crypto._canonical_binary(cc, value, oid)
        else:
            canonical = crypto._canonical_text(cc, value)
        values[i] = crypto.ctx.seal(cc, canonical)
        formats[i] = 1
    return tuple(values), tuple(formats)


def opened(stmt: StatementCrypto, data: bytes) -> tuple[m.Bind, list[bytes]]:
    """The Bind in ``data`` with each sealed value replaced by its plaintext, and the envelope headers
    (which carry the random nonces) apart."""
    t, n = codec.read_header(data)
    assert t == ord("B")
    assert len(data) == 1 + n
    msg = codec.decode_frontend(t, data[5:])
    assert isinstance(msg, m.Bind)
    assert codec.encode_frontend(msg) == data  # canonical bytes: nothing but the Bind's own fields
    params = list(msg.params)
    headers = []
    for i, cc in stmt.params.items():
        value = params[i] if i < len(params) else None
        if value is not None:
            params[i] = open_envelope(KEYS_BY_ID.__getitem__, value, column_associated_data(cc.column.column_id))
            headers.append(value[:HEADER_LENGTH])
    return replace(msg, params=tuple(params)), headers


def same_outcome(crypto: SessionCrypto, stmt: StatementCrypto, msg: m.Bind) -> None:
    try:
        expected: Outcome | KeyMiss | ProxyError = reference_bind(crypto, msg, stmt)
    except (KeyMiss, ProxyError) as e:
        expected = e
    try:
        got: Outcome | KeyMiss | ProxyError = crypto.bind(frame(msg), stmt, None)
    except (KeyMiss, ProxyError) as e:
        got = e
    if isinstance(expected, KeyMiss) or isinstance(got, KeyMiss):
        assert isinstance(got, KeyMiss)
        assert isinstance(expected, KeyMiss)
        assert (got.column_id, got.key_id) == (expected.column_id, expected.key_id)
        return
    assert not isinstance(got, ProxyError)  # refused, never raised into the relay
    assert not isinstance(expected, ProxyError)
    assert got.refusal == expected.refusal
    assert got.state == expected.state
    if expected.replacement is None or expected.refusal is not None:
        assert got.replacement == expected.replacement
        return
    assert got.replacement is not None
    got_msg, got_headers = opened(stmt, got.replacement)
    expected_msg, expected_headers = opened(stmt, expected.replacement)
    assert got_msg == expected_msg
    assert [h[:20] for h in got_headers] == [h[:20] for h in expected_headers]  # same keys
    assert all(a != b for a, b in zip(got_headers, expected_headers, strict=True))  # fresh nonces


# -- random Binds ---------------------------------------------------------------------------------------

text_values = st.one_of(
    st.text(max_size=12).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.text(st.characters(max_codepoint=127), max_size=12).map(str.encode),  # ASCII, with NUL sometimes
    st.binary(max_size=12),  # invalid UTF-8 sometimes
)
int_values = st.one_of(
    st.integers(-(2**31), 2**31 - 1).map(lambda i: b"%d" % i),
    st.integers(-(2**31), 2**31 - 1).map(lambda i: i.to_bytes(4, "big", signed=True)),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: i.to_bytes(8, "big", signed=True)),
    st.binary(max_size=9),
)
values = st.none() | text_values | int_values


@st.composite
def binds(draw: st.DrawFn) -> tuple[int, str, m.Bind]:
    index = draw(st.integers(0, len(STATEMENTS) - 1))
    n = draw(st.integers(0, 6))
    params = tuple(draw(values) for _ in range(n))
    param_formats = draw(
        st.one_of(
            st.just(()),
            st.sampled_from([(0,), (1,)]),
            st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n).map(tuple),
            st.lists(st.sampled_from([0, 1]), max_size=7).map(tuple),  # the wrong count
        )
    )
    result_formats = draw(st.lists(st.sampled_from([0, 1]), max_size=4).map(tuple))
    encoding = draw(st.sampled_from(["UTF8", "LATIN1", "SQL_ASCII", "SJIS"]))  # SJIS: not supported
    return index, encoding, m.Bind(draw(st.sampled_from(["", "p"])), "s", param_formats, params, result_formats)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(binds())
def test_in_place_bind_gives_what_decode_and_encode_gave(case: tuple[int, str, m.Bind]) -> None:
    index, encoding, msg = case
    crypto, *_ = make_session()
    crypto.set_parameter("client_encoding", encoding)
    sql, types = STATEMENTS[index]
    same_outcome(crypto, prepared(crypto, sql, types), msg)


@settings(max_examples=100)
@given(binds())
def test_in_place_bind_misses_the_same_key(case: tuple[int, str, m.Bind]) -> None:
    index, _, msg = case
    crypto, *_ = make_session(cached=False)
    sql, types = STATEMENTS[index]
    same_outcome(crypto, prepared(crypto, sql, types), msg)


def test_parameters_listed_out_of_order_are_spliced_in_order() -> None:
    crypto, *_ = make_session()
    cc = crypto.ctx.columns
    st_plan = prepared(crypto, INSERT_ALL).plan
    name, score = cc[COLUMNS["name"].column_id], cc[COLUMNS["score"].column_id]
    stmt = StatementCrypto(st_plan, {3: score, 1: name}, (), None)
    assert not stmt.targets_in_order
    msg = m.Bind("", "s", (), (b"1", b"Ada", b"x", b"42", None), ())
    same_outcome(crypto, stmt, msg)
    out = crypto.bind(frame(msg), stmt, None)
    assert out.replacement is not None
    got, _ = opened(stmt, out.replacement)
    assert got.params == (b"1", b"Ada", b"x", (42).to_bytes(4, "big"), None)
    assert got.param_formats == (0, 1, 0, 1, 0)


@pytest.mark.parametrize(
    ("value", "sqlstate"),
    [(b"ab\x00c", "22021"), (b"\xff\xfe", "22021"), (b"ok", None), ("Zoë".encode(), None)],
)
def test_text_fast_path_keeps_the_codecs_verdict(value: bytes, sqlstate: str | None) -> None:
    crypto, *_ = make_session()
    stmt = prepared(crypto, INSERT_ALL)
    for fmt in ((0,), (1,)):
        out = crypto.bind(frame(m.Bind("", "s", fmt, (None, value, None, None, None), ())), stmt, None)
        if sqlstate is None:
            assert out.refusal is None
            assert out.replacement is not None
            got, _ = opened(stmt, out.replacement)
            assert got.params[1] == value
        else:
            assert out.refusal is not None
            error = codec.decode_backend(ord("E"), out.refusal[5:])
            assert isinstance(error, m.ErrorResponse)
            assert error.sqlstate == sqlstate
            assert "public.people.name" in (error.field(b"M") or "")


# -- keys -----------------------------------------------------------------------------------------------


def test_one_key_lookup_per_column_per_bind() -> None:
    crypto, _, ring = make_session()
    stmt = prepared(crypto, INSERT_TWO_NAMES)  # two values of column name
    before = ring.hits
    crypto.bind(frame(m.Bind("", "s", (), (b"1", b"Ada", b"2", b"Bob"), ())), stmt, None)
    assert ring.hits - before == 1
    crypto.bind(frame(m.Bind("", "s", (), (b"1", b"Ada", b"2", b"Bob"), ())), stmt, None)
    assert ring.hits - before == 2  # looked up again by the next Bind


def test_a_key_disabled_between_two_binds_is_not_used() -> None:
    crypto, source, _ = make_session()
    stmt = prepared(crypto, INSERT_TWO_NAMES)
    msg = frame(m.Bind("", "s", (), (b"1", b"Ada", b"2", b"Bob"), ()))
    assert crypto.bind(msg, stmt, None).refusal is None
    name_key = next(k for k in KEYS if k.column_id == COLUMNS["name"].column_id)
    source.cache[bytes(name_key.key_id)] = name_key.with_state(KeyState.DISABLED)
    out = crypto.bind(msg, stmt, None)
    assert out.replacement == codec.encode_frontend(refused_bind(""))
    assert out.refusal is not None
    assert b"public.people.name" in out.refusal
    assert b"Ada" not in out.refusal


def test_a_missing_key_raises_before_anything_is_returned() -> None:
    crypto, source, _ = make_session(cached=False)
    stmt = prepared(crypto, INSERT_ALL)
    msg = frame(m.Bind("", "s", (), (b"1", b"Ada", b"AB", b"7", b"xy"), ()))
    with pytest.raises(KeyMiss) as info:
        crypto.bind(msg, stmt, None)
    assert info.value.column_id == COLUMNS["name"].column_id
    source.cache = dict(source.stored)
    out = crypto.bind(msg, stmt, None)  # the retry starts from scratch
    assert out.refusal is None
    assert out.replacement is not None
    got, _ = opened(stmt, out.replacement)
    assert got.params == (b"1", b"Ada", b"AB", (7).to_bytes(4, "big"), b"xy")
