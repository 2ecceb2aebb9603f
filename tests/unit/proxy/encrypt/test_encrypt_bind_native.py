"""The native Bind rewrite (pgveil_accel.seal_bind through proxy/encrypt/bindseal.py) against the Python
path it replaces (SessionCrypto._seal_params and codec.encode_bind_frame), which stays the reference.

On random Binds of statements over text, varchar, varchar(N), char(N) and integer columns (text and
binary values, NULLs, valid and invalid UTF-8, NULs, values too long, every format-list shape, result
columns, declared parameter types, client encodings) the two give the same message apart from the
nonces (the envelopes open to the same plaintexts under the same keys, with the same headers but for the
nonce, and the same lengths), the same refusal, the same key miss and the same count of sealed values.

Also: which statements the native path takes, that it is taken, its keys (looked up for every Bind as
the Python path does, so a key rotated away, disabled or missing since the last Bind is never used; with
a real KeyCache behind the key ring the lookups are spared only while nothing in it changed and no key
reached its TTL), the plan checks of seal_bind itself, and its UTF-8 check against Python's decoder.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import replace

import pytest
from encrypt_support import FakeKeySource
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keymgmt import envelope
from keymgmt.envelope import (
    HEADER_LENGTH,
    MIN_LENGTH,
    DataKey,
    KeyState,
    Subject,
    column_associated_data,
    open_envelope,
)
from keymgmt.keycache import KeyCache, KeyFacts, Scope
from proxy.encrypt import bindseal
from proxy.encrypt.engine import CryptoContext, Outcome, SessionCrypto, StatementCrypto
from proxy.encrypt.keyring import KeyRing
from proxy.errors import ProxyError
from proxy.protocol import codec
from proxy.protocol import messages as m
from proxy.protocol.relay import KeyMiss
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable

pytestmark = pytest.mark.skipif(
    not bindseal.NATIVE_BIND, reason="the accelerator is not loaded (not built, or PGVEIL_IMPL=python)"
)

OID = 16600
INT4, TEXT, VARCHAR, BPCHAR = 23, 25, 1043, 1042
COLUMNS = {
    name: ProtectedColumn("public", "people", name, declared, attnum=attnum, table_oid=OID)
    for name, declared, attnum in [
        ("name", "text", 2),
        ("code", "varchar(4)", 3),
        ("note", "varchar", 4),
        ("tag", "char(2)", 5),
        ("score", "integer", 6),
    ]
}
PEOPLE = ProtectedTable("public", "people", COLUMNS, ("id", "name", "code", "note", "tag", "score"), oid=OID)
KEYS = [
    DataKey.from_material(bytes([i + 1]) * 16, bytes([i + 9]) * 32, column_id=col.column_id)
    for i, col in enumerate(COLUMNS.values())
]
KEYS_BY_ID = {bytes(k.key_id): k for k in KEYS}

NATIVE_STATEMENTS = [
    ("INSERT INTO people (id, name, code, note) VALUES ($1, $2, $3, $4)", ()),
    ("INSERT INTO people (id, name, code, note) VALUES ($1, $2, $3, $4)", (INT4, TEXT, VARCHAR, TEXT)),
    ("INSERT INTO people (id, name) VALUES ($1, $2), ($3, $4)", ()),
    ("INSERT INTO people (note, name, id) VALUES ($3, $1, $2)", (TEXT, VARCHAR)),
    ("UPDATE people SET name = $2, code = $1 WHERE id = $3", ()),
    ("INSERT INTO people (id, name) VALUES ($1, $2) RETURNING name, id", ()),
]
PYTHON_STATEMENTS = [
    ("INSERT INTO people (id, name, tag) VALUES ($1, $2, $3)", ()),  # char(N): padded, Python's
    ("INSERT INTO people (id, name, score) VALUES ($1, $2, $3)", ()),  # integer: Python's codec
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


Result = Outcome | KeyMiss | ProxyError


def run(crypto: SessionCrypto, stmt: StatementCrypto, msg: m.BindFrame, *, native: bool) -> tuple[Result, int]:
    """crypto.bind with the statement's native plan, or without it (the Python path); and the values it
    counted as encrypted."""
    sealer = stmt.sealer
    if not native:
        stmt.sealer = None
    before = crypto.values_encrypted
    try:
        got: Result = crypto.bind(msg, stmt, None)
    except (KeyMiss, ProxyError) as e:
        got = e
    finally:
        stmt.sealer = sealer
    return got, crypto.values_encrypted - before


def opened(stmt: StatementCrypto, data: bytes) -> tuple[m.Bind, list[bytes]]:
    """The Bind in ``data`` with each sealed value replaced by its plaintext (its length checked), and the
    envelope headers apart."""
    t, n = codec.read_header(data)
    assert t == ord("B")
    assert len(data) == 1 + n
    msg = codec.decode_frontend(t, data[5:])
    assert isinstance(msg, m.Bind)
    assert codec.encode_frontend(msg) == data
    params = list(msg.params)
    headers = []
    for i, cc in stmt.params.items():
        value = params[i] if i < len(params) else None
        if value is not None:
            plain = open_envelope(KEYS_BY_ID.__getitem__, value, column_associated_data(cc.column.column_id))
            assert len(value) == len(plain) + MIN_LENGTH
            params[i] = plain
            headers.append(value[:HEADER_LENGTH])
    return replace(msg, params=tuple(params)), headers


def assert_same(stmt: StatementCrypto, got: tuple[Result, int], expected: tuple[Result, int]) -> None:
    (g, g_count), (e, e_count) = got, expected
    assert g_count == e_count
    if isinstance(e, KeyMiss) or isinstance(g, KeyMiss):
        assert isinstance(g, KeyMiss)
        assert isinstance(e, KeyMiss)
        assert (g.column_id, g.key_id) == (e.column_id, e.key_id)
        return
    assert isinstance(g, Outcome)
    assert isinstance(e, Outcome)
    assert g.refusal == e.refusal
    assert g.state == e.state
    if e.replacement is None or e.refusal is not None:
        assert g.replacement == e.replacement
        return
    assert g.replacement is not None
    g_msg, g_headers = opened(stmt, g.replacement)
    e_msg, e_headers = opened(stmt, e.replacement)
    assert g_msg == e_msg
    assert [h[:20] for h in g_headers] == [h[:20] for h in e_headers]  # magic, version, algorithm, key id
    assert all(a[20:] != b[20:] for a, b in zip(g_headers, e_headers, strict=True))  # fresh nonces


# -- random Binds ---------------------------------------------------------------------------------------

text_values = st.one_of(
    st.text(max_size=8).map(lambda s: s.encode("utf-8", "surrogatepass")),  # surrogates: invalid UTF-8
    st.text(st.characters(max_codepoint=127), max_size=8).map(str.encode),  # ASCII, a NUL sometimes
    st.sampled_from(
        [b"abcd", b"abcd ", b"abcde", b"ab  ", "Zoë!".encode(), "Zoë!x".encode(), b"\xc3", b"\xed\xa0\x80"]
    ),
    st.binary(max_size=8),
)
values = st.none() | text_values | st.integers(-(2**31), 2**31 - 1).map(lambda i: i.to_bytes(4, "big", signed=True))


@st.composite
def binds(draw: st.DrawFn) -> tuple[int, str, m.Bind]:
    index = draw(st.integers(0, len(NATIVE_STATEMENTS) + len(PYTHON_STATEMENTS) - 1))
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
    result_formats = draw(st.lists(st.sampled_from([0, 1]), max_size=3).map(tuple))
    encoding = draw(st.sampled_from(["UTF8", "UTF8", "LATIN1", "SJIS"]))  # SJIS: not supported
    return index, encoding, m.Bind(draw(st.sampled_from(["", "p"])), "s", param_formats, params, result_formats)


def _statement(index: int) -> tuple[str, tuple[int, ...]]:
    return (NATIVE_STATEMENTS + PYTHON_STATEMENTS)[index]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(binds())
def test_native_and_python_paths_give_the_same_bind(case: tuple[int, str, m.Bind]) -> None:
    index, encoding, msg = case
    crypto, *_ = make_session()
    crypto.set_parameter("client_encoding", encoding)
    stmt = prepared(crypto, *_statement(index))
    assert (stmt.sealer is not None) == (index < len(NATIVE_STATEMENTS))
    bind = frame(msg)
    assert_same(stmt, run(crypto, stmt, bind, native=True), run(crypto, stmt, bind, native=False))


@settings(max_examples=150, deadline=None)
@given(binds())
def test_native_and_python_paths_miss_the_same_key(case: tuple[int, str, m.Bind]) -> None:
    index, _, msg = case
    crypto, *_ = make_session(cached=False)
    stmt = prepared(crypto, *_statement(index))
    bind = frame(msg)
    assert_same(stmt, run(crypto, stmt, bind, native=True), run(crypto, stmt, bind, native=False))


# -- the native path is taken, and only where it can be ---------------------------------------------------


def _python_path_refused(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = SessionCrypto._seal_params

    def counted(self: SessionCrypto, msg: m.BindFrame, stmt: StatementCrypto) -> object:
        calls.append(1)
        return original(self, msg, stmt)

    monkeypatch.setattr(SessionCrypto, "_seal_params", counted)
    return calls


def test_text_values_take_the_native_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _python_path_refused(monkeypatch)
    crypto, *_ = make_session()
    stmt = prepared(crypto, *NATIVE_STATEMENTS[0])
    values = (b"7", "Zoë €".encode(), "ab€d".encode(), "中文字符串".encode())
    for formats in ((), (0, 1, 1, 1), (1,)):
        out = crypto.bind(frame(m.Bind("", "s", formats, values, ())), stmt, None)
        assert out.refusal is None
        assert out.replacement is not None
        got, _ = opened(stmt, out.replacement)
        assert got.params == values
        assert got.param_formats == (formats[0] if formats else 0, 1, 1, 1)
    assert calls == []
    assert crypto.values_encrypted == 9


@pytest.mark.parametrize(
    ("formats", "value", "sqlstate"),
    [
        ((0,), b"ab\x00", "22021"),
        ((0,), b"\xff", "22021"),
        ((1,), "\xed\xa0\x80".encode("latin-1"), "22021"),  # a surrogate's UTF-8 form
        ((0,), b"abcde", "22001"),  # varchar(4)
        ((0,), b"abcd  ", None),  # trailing spaces past N are cut: Python's canonical form
    ],
)
def test_values_the_native_path_hands_to_python(
    monkeypatch: pytest.MonkeyPatch, formats: tuple[int, ...], value: bytes, sqlstate: str | None
) -> None:
    calls = _python_path_refused(monkeypatch)
    crypto, *_ = make_session()
    stmt = prepared(crypto, *NATIVE_STATEMENTS[0])
    out = crypto.bind(frame(m.Bind("", "s", formats, (b"1", b"ok", value, None), ())), stmt, None)
    assert calls == [1]
    if sqlstate is None:
        assert out.refusal is None
        assert out.replacement is not None
        assert opened(stmt, out.replacement)[0].params[2] == value.rstrip(b" ")
    else:
        assert out.refusal is not None
        error = codec.decode_backend(ord("E"), out.refusal[5:])
        assert isinstance(error, m.ErrorResponse)
        assert error.sqlstate == sqlstate
        assert value not in out.refusal


def test_a_client_not_in_utf8_takes_the_python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _python_path_refused(monkeypatch)
    crypto, *_ = make_session()
    crypto.set_parameter("client_encoding", "LATIN1")
    stmt = prepared(crypto, *NATIVE_STATEMENTS[0])
    out = crypto.bind(frame(m.Bind("", "s", (), (b"1", "Zoë".encode("latin-1"), b"ab", b"n"), ())), stmt, None)
    assert calls == [1]
    assert out.replacement is not None
    assert opened(stmt, out.replacement)[0].params[1] == "Zoë".encode()


def test_which_parameters_the_native_plan_takes() -> None:
    crypto, *_ = make_session()
    stmt = prepared(crypto, *NATIVE_STATEMENTS[1])
    by_index = {t.index: t for t in stmt.targets}
    name, code = by_index[1], by_index[2]
    assert bindseal.native_target(name) == (1, name.key_slot, 1, -1, name.associated)
    assert bindseal.native_target(code) == (2, code.key_slot, 1, 4, code.associated)
    # Declared as another type: binary values are converted by Python, text ones taken as is.
    other = dataclasses.replace(code, client_oid=TEXT)
    assert bindseal.native_target(other) == (2, code.key_slot, 0, 4, code.associated)
    assert bindseal.native_target(dataclasses.replace(name, envelope=True)) is None  # a ciphertext role
    assert bindseal.native_target(dataclasses.replace(name, key_slot=-1)) is None  # per-subject keys
    subject_column = dataclasses.replace(name.column, column=dataclasses.replace(name.column.column, subject_kind="c"))
    assert bindseal.native_target(dataclasses.replace(name, column=subject_column)) is None
    for sql, types in PYTHON_STATEMENTS:
        assert prepared(crypto, sql, types).sealer is None


def test_the_python_implementation_has_no_native_plan() -> None:
    code = (
        "from proxy.encrypt import bindseal;"
        "from keymgmt import native;"
        "print(bindseal.NATIVE_BIND, native.IMPLEMENTATION)"
    )
    env = dict(os.environ, PGVEIL_IMPL="python")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["False", "python"]


# -- keys -------------------------------------------------------------------------------------------------


def _bind_names(crypto: SessionCrypto, stmt: StatementCrypto) -> Outcome:
    return crypto.bind(frame(m.Bind("", "s", (), (b"1", b"Ada", b"2", b"Bob"), ())), stmt, None)


def test_keys_are_looked_up_for_every_bind() -> None:
    crypto, _, ring = make_session()
    stmt = prepared(crypto, *NATIVE_STATEMENTS[2])  # two values of column name: one lookup per Bind
    before = ring.hits
    for _ in range(3):
        assert _bind_names(crypto, stmt).refusal is None
    assert ring.hits - before == 3


class _Generational(dict[bytes, DataKey]):
    """FakeKeySource's cache with a key cache ``generation`` that does not change (as when a refresh drops
    a rotated column's current-key pointer): a validity token built on it would not see the rotation."""

    generation = 7


def test_a_key_rotated_away_is_not_used_by_the_next_bind() -> None:
    """A rotation makes another version current: the next Bind seals under it."""
    crypto, source, _ = make_session()
    source.cache = _Generational(source.cache)
    stmt = prepared(crypto, *NATIVE_STATEMENTS[2])
    name = COLUMNS["name"].column_id
    out = _bind_names(crypto, stmt)
    assert out.replacement is not None
    old = next(k for k in KEYS if k.column_id == name)
    assert {h[4:20] for h in opened(stmt, out.replacement)[1]} == {old.key_id}
    new = DataKey.from_material(b"\x99" * 16, b"\x42" * 32, column_id=name, version=2)
    KEYS_BY_ID[bytes(new.key_id)] = new
    try:
        source.cache[bytes(new.key_id)] = new
        source.active_ids[name] = bytes(new.key_id)
        out = _bind_names(crypto, stmt)
        assert out.replacement is not None
        assert {h[4:20] for h in opened(stmt, out.replacement)[1]} == {new.key_id}
    finally:
        del KEYS_BY_ID[bytes(new.key_id)]


def test_a_key_disabled_is_not_used() -> None:
    crypto, source, _ = make_session()
    stmt = prepared(crypto, *NATIVE_STATEMENTS[2])
    assert _bind_names(crypto, stmt).refusal is None
    name_key = next(k for k in KEYS if k.column_id == COLUMNS["name"].column_id)
    source.cache[bytes(name_key.key_id)] = name_key.with_state(KeyState.DISABLED)
    out = _bind_names(crypto, stmt)
    assert out.refusal is not None
    assert b"public.people.name" in out.refusal
    assert b"Ada" not in out.refusal


def test_a_missing_key_of_a_column_whose_values_are_null_is_not_needed() -> None:
    """The native path looks up every column's key; where one cannot be had it hands the Bind to the
    Python path, which needs no key for NULLs."""
    crypto, source, _ = make_session()
    stmt = prepared(crypto, *NATIVE_STATEMENTS[0])
    code_key = next(k for k in KEYS if k.column_id == COLUMNS["code"].column_id)
    del source.cache[bytes(code_key.key_id)]
    out = crypto.bind(frame(m.Bind("", "s", (), (b"1", b"Ada", None, b"n"), ())), stmt, None)
    assert out.refusal is None
    assert out.replacement is not None
    assert opened(stmt, out.replacement)[0].params == (b"1", b"Ada", None, b"n")
    with pytest.raises(KeyMiss) as info:
        crypto.bind(frame(m.Bind("", "s", (), (b"1", b"Ada", b"AB", b"n"), ())), stmt, None)
    assert info.value.column_id == COLUMNS["code"].column_id


# -- seal_bind itself ---------------------------------------------------------------------------------------

_accel = envelope._accel
NAME_ASSOCIATED = column_associated_data(COLUMNS["name"].column_id)


def _keys() -> tuple[object, ...]:
    return (envelope.native_sealer(KEYS[0]),)


def _body(*params: bytes | None, formats: tuple[int, ...] = ()) -> bytes:
    return codec.encode_bind_body(m.Bind("", "s", formats, params, ()))


def test_seal_bind_refuses_a_plan_that_is_not_one() -> None:
    body = _body(b"a", b"b")
    target = (0, 0, 1, -1, NAME_ASSOCIATED)
    with pytest.raises(ValueError, match="two targets"):
        _accel.seal_bind(body, (target, target), _keys())
    with pytest.raises(ValueError, match="out of range"):
        _accel.seal_bind(body, ((0, 1, 1, -1, NAME_ASSOCIATED),), _keys())
    with pytest.raises(ValueError, match="out of range"):
        _accel.seal_bind(body, ((-1, 0, 1, -1, NAME_ASSOCIATED),), _keys())
    with pytest.raises(TypeError):
        _accel.seal_bind(body, ((0, 0, 1, -1),), _keys())
    with pytest.raises(TypeError):
        _accel.seal_bind(body, (target,), ((object(), b"x" * 20),))
    cipher, prefix = envelope.native_sealer(KEYS[0]) or (None, b"")
    with pytest.raises(ValueError, match="prefix"):
        _accel.seal_bind(body, (target,), ((cipher, b"QV" + prefix[2:]),))
    with pytest.raises(TypeError):
        _accel.seal_bind(bytearray(body), (target,), _keys())


def test_native_sealer_only_for_an_enabled_column_key() -> None:
    assert envelope.native_sealer(KEYS[0]) is not None
    assert envelope.native_sealer(KEYS[0].with_state(KeyState.DISABLED)) is None
    subject_key = DataKey.from_material(b"\x77" * 16, bytes(32), column_id="pgveil.subject.customer", subject=b"42")
    assert envelope.native_sealer(subject_key) is None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=12), st.integers(-1, 6), st.sampled_from([0, 1]))
def test_seal_bind_takes_exactly_the_values_python_takes_as_they_are(value: bytes, limit: int, fmt: int) -> None:
    """A value is sealed as it came iff Python's decoder accepts it as UTF-8 without a NUL and it has at
    most ``limit`` characters; otherwise None (the Python path)."""
    done = _accel.seal_bind(_body(value, formats=(fmt,)), ((0, 0, 1, limit, NAME_ASSOCIATED),), _keys())
    try:
        text: str | None = value.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    takes = text is not None and "\x00" not in text and (limit < 0 or len(text) <= limit)
    assert (done is not None) == takes
    if done is not None:
        message, count = done
        assert count == 1
        sealed = codec.decode_bind_frame(message[5:]).param(0)
        assert sealed is not None
        assert open_envelope(KEYS_BY_ID.__getitem__, sealed, NAME_ASSOCIATED) == value


def test_seal_bind_refuses_what_the_decoder_refuses() -> None:
    good = _body(b"a", None, formats=(0, 1))
    for cut in range(len(good)):
        with pytest.raises(_accel.Malformed):
            _accel.seal_bind(good[:cut], ((0, 0, 1, -1, NAME_ASSOCIATED),), _keys())
    with pytest.raises(_accel.Malformed):
        _accel.seal_bind(good + b"\x00", ((0, 0, 1, -1, NAME_ASSOCIATED),), _keys())
    bad_format = good.replace(b"\x00\x02\x00\x00\x00\x01", b"\x00\x02\x00\x00\x00\x02", 1)
    assert bad_format != good
    with pytest.raises(_accel.Malformed):
        _accel.seal_bind(bad_format, ((0, 0, 1, -1, NAME_ASSOCIATED),), _keys())


def test_the_native_plan_is_not_part_of_a_statement_state() -> None:
    """Two versions of one prepared statement with the same plan are the same state (the relay compares
    them), whatever their native plans' identities."""
    crypto, *_ = make_session()
    one, two = prepared(crypto, *NATIVE_STATEMENTS[0]), prepared(crypto, *NATIVE_STATEMENTS[0])
    assert one.sealer is not None
    assert one.sealer is not two.sealer
    assert one == two
    assert "sealer" not in repr(one)


# -- key reuse under a KeyCache's stamp ------------------------------------------------------------------------


class KeyCacheSource:
    """The keystore's hot path as it is (its ``cache`` a real KeyCache, the current keys its pointers), with a
    clock the test moves; the loads a KeyMiss would lead to are not needed here."""

    def __init__(self, keys: list[DataKey], ttl: float = 60.0) -> None:
        self.now = 1000.0
        self.cache = KeyCache(max_keys=100, ttl_seconds=ttl, clock=lambda: self.now)
        self.lookups = 0
        for key in keys:
            self.cache.put(key, current=True)

    def cached_key(self, key_id: bytes) -> DataKey | None:
        return self.cache.get(key_id)

    def cached_active_key(self, column_id: str, subject: bytes | None = None) -> DataKey | None:
        self.lookups += 1
        return self.cache.get_current(column_id, subject)

    async def key_by_id(self, key_id: bytes) -> DataKey:
        raise AssertionError("not loaded here")

    async def active_key(self, column_id: str, subject: bytes | None = None) -> DataKey:
        raise AssertionError("not loaded here")

    async def preload(self, column_ids: Iterable[str]) -> int:
        return 0

    def cached_subject_key(self, subject: Subject) -> DataKey | None:
        return None

    async def subject_key(self, subject: Subject) -> DataKey:
        raise AssertionError("not loaded here")

    async def keys_by_ids(self, key_ids: Iterable[bytes]) -> int:
        return 0


def _stamped_session(ttl: float = 60.0) -> tuple[SessionCrypto, KeyCacheSource, KeyRing, StatementCrypto]:
    source = KeyCacheSource(KEYS, ttl)
    ring = KeyRing(source)
    crypto = SessionCrypto(CryptoContext(Catalog({("public", "people"): PEOPLE}), ring), "app")
    return crypto, source, ring, prepared(crypto, *NATIVE_STATEMENTS[2])


def _sealed_with(crypto: SessionCrypto, stmt: StatementCrypto) -> set[bytes]:
    out = _bind_names(crypto, stmt)
    assert out.refusal is None
    assert out.replacement is not None
    return {h[4:20] for h in opened(stmt, out.replacement)[1]}


NAME_KEY = next(k for k in KEYS if k.column_id == COLUMNS["name"].column_id)


def _version_2() -> DataKey:
    return DataKey.from_material(b"\x98" * 16, b"\x43" * 32, column_id=NAME_KEY.column_id, version=2)


def test_an_unchanged_key_cache_spares_the_lookups_and_counts_them_as_hits() -> None:
    crypto, source, ring, stmt = _stamped_session()
    assert _sealed_with(crypto, stmt) == {NAME_KEY.key_id}
    looked_up, hits, cache_hits = source.lookups, ring.hits, source.cache.hits
    for _ in range(5):
        assert _sealed_with(crypto, stmt) == {NAME_KEY.key_id}
    assert source.lookups == looked_up  # not one lookup while nothing changed
    assert ring.hits - hits == 5  # and the hits they stand for are still counted
    assert source.cache.hits - cache_hits == 5


def _after(change: str, crypto: SessionCrypto, source: KeyCacheSource, stmt: StatementCrypto) -> str:
    """What the Bind after ``change`` does ("v2": sealed under version 2 only; "miss": wants the key
    loaded; "refused"), checking that it looked its key up again."""
    v2 = _version_2()
    KEYS_BY_ID[bytes(v2.key_id)] = v2
    cache = source.cache
    if change == "put":  # a rotation loaded here: version 2 current
        cache.put(v2, current=True)
    elif change == "refresh":  # another instance rotated: the refresh drops the pointer, keeps the key
        snapshot = cache.begin_refresh()
        current: dict[Scope, bytes | None] = {(k.column_id, None): bytes(k.key_id) for k in KEYS}
        current[(NAME_KEY.column_id, None)] = bytes(v2.key_id)
        cache.apply_refresh(snapshot, {bytes(k.key_id): KeyFacts.of(k) for k in KEYS}, current)
        assert cache.get(NAME_KEY.key_id) is NAME_KEY
    elif change == "invalidate":
        cache.invalidate_column(NAME_KEY.column_id)
    elif change == "disabled":
        cache.put(NAME_KEY.with_state(KeyState.DISABLED), current=True)
    elif change == "expired":
        source.now += 60
    elif change == "ttl tightened":
        source.now += 2
        cache.ttl_seconds = 1.0
    elif change == "flush":
        cache.clear()
    before = source.lookups
    outcome: Result
    try:
        try:
            outcome = _bind_names(crypto, stmt)
        except KeyMiss as miss:
            outcome = miss
        assert source.lookups > before
        if isinstance(outcome, KeyMiss):  # nothing sealed with the old key: it is to be loaded again
            return "miss" if outcome.column_id == NAME_KEY.column_id else repr(outcome)
        assert isinstance(outcome, Outcome)
        if outcome.refusal is not None:
            return "refused"
        assert outcome.replacement is not None
        ids = {h[4:20] for h in opened(stmt, outcome.replacement)[1]}
        return "v2" if ids == {v2.key_id} else repr(ids)
    finally:
        del KEYS_BY_ID[bytes(v2.key_id)]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("put", "v2"),
        ("refresh", "miss"),
        ("invalidate", "miss"),
        ("disabled", "miss"),  # a disabled key is never current: its pointer went with the put
        ("expired", "miss"),
        ("ttl tightened", "miss"),
        ("flush", "miss"),
    ],
)
def test_every_change_of_the_key_cache_makes_the_next_bind_look_up(change: str, expected: str) -> None:
    """A key rotated, dropped, disabled or past its TTL since the last Bind is never sealed with: the reuse
    ends and the Bind looks its key up (and seals under the new version, or wants it loaded)."""
    crypto, source, _, stmt = _stamped_session()
    for _ in range(2):
        assert _sealed_with(crypto, stmt) == {NAME_KEY.key_id}
    assert _after(change, crypto, source, stmt) == expected


def test_a_stamp_of_another_cache_does_not_hold() -> None:
    crypto, source, ring, stmt = _stamped_session()
    assert _sealed_with(crypto, stmt) == {NAME_KEY.key_id}
    stamp = ring.write_stamp([NAME_KEY])
    assert stamp is not None
    assert ring.stamp_holds(stamp, 1)
    source.cache = KeyCache(max_keys=100, ttl_seconds=60.0, clock=lambda: source.now)
    assert not ring.stamp_holds(stamp, 1)
    assert KeyRing(FakeKeySource(KEYS)).write_stamp([NAME_KEY]) is None  # no KeyCache: no stamp, lookups
