"""SessionCrypto under a login role's view: every grant on each result path (simple Query, Bind and its
portal, COPY TO), the RowDescription each one shows, what a ciphertext role writes, the hash mask's key,
re-decision when the view's epoch changes between Parse, Bind and Execute, and the served-values
counters. The views are :class:`UniformView` or a per-column one built here (the policy's own RoleView
is tested with the policy); keys come from the fake keystore of ``encrypt_support``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from encrypt_support import BYTEA, CATALOG, INT4, SCORE, SCORE_KEY, SSN, SSN_KEY, TABLE_OID, TEXT, FakeKeySource

from keymgmt.envelope import DataKey, column_associated_data, seal
from proxy.encrypt.engine import CryptoContext, PortalCrypto, QueryCrypto, SessionCrypto, StatementCrypto
from proxy.encrypt.keyring import MASK_KEY_SCOPE, KeyRing
from proxy.encrypt.rows import Action
from proxy.encrypt.visibility import UniformView, decide
from proxy.errors import ProxyError
from proxy.policy.model import Grant, Mask, MaskFunction, Reference, ReferenceKind, RoleView, Visibility
from proxy.protocol import codec
from proxy.protocol import messages as m
from proxy.protocol.relay import KeyMiss
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable

PLAIN = Grant(Visibility.PLAINTEXT)
HIDDEN = Grant(Visibility.HIDDEN)
CIPHER = Grant(Visibility.CIPHERTEXT)
DENY = Grant(Visibility.DENY)
PARTIAL = Grant(Visibility.MASKED, Mask(MaskFunction.PARTIAL))
LAST4 = Grant(Visibility.MASKED, Mask(MaskFunction.LAST4))
HASH = Grant(Visibility.MASKED, Mask(MaskFunction.HASH))

SSN_TEXT = b"123-45-6789"
MASK_KEY = DataKey.from_material(b"\x33" * 16, bytes(range(64, 96)), column_id=MASK_KEY_SCOPE)


@dataclass
class Switchable:
    """A view source whose grants and epoch a test changes (as a policy reload would)."""

    grants: dict[str, Grant] = field(default_factory=dict)
    default: Grant = PLAIN
    epoch: int = 0
    label: str = "support"

    def __call__(self) -> RoleView:
        return _View(dict(self.grants), self.default, self.epoch, self.label)


@dataclass(frozen=True)
class _View:
    grants: dict[str, Grant]
    default: Grant
    epoch: int
    label: str
    login_role: str = "agent"

    def grant(self, column: ProtectedColumn) -> Grant:
        return self.grants.get(column.column_id, self.default)


def session(
    source: Switchable | None = None, *, keys: tuple[DataKey, ...] = (SSN_KEY, SCORE_KEY), keystore: bool = True
) -> tuple[SessionCrypto, Switchable]:
    src = source or Switchable()
    ring = KeyRing(FakeKeySource(keys) if keystore else None)
    return SessionCrypto(CryptoContext(CATALOG, ring), "agent", src), src


def fd(name: str, attnum: int, type_oid: int, size: int, fmt: int) -> m.FieldDescription:
    return m.FieldDescription(name, TABLE_OID, attnum, type_oid, size, -1, fmt)


STORED_FIELDS = (fd("id", 1, INT4, 4, 0), fd("ssn", 2, BYTEA, -1, 0), fd("score", 3, BYTEA, -1, 0))


def rd_body(*fields: m.FieldDescription) -> bytes:
    return codec.encode_row_description_body(m.RowDescription(fields))


def data_rows(*rows: tuple[bytes | None, ...]) -> bytes:
    out = []
    for values in rows:
        body = struct.pack("!h", len(values)) + b"".join(
            struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v for v in values
        )
        out.append(codec.frame(b"D", body))
    return b"".join(out)


def hex_text(envelope: bytes) -> bytes:
    return b"\\x" + envelope.hex().encode("ascii")


def stored_row(ssn: bytes = SSN_TEXT, score: int = 42) -> tuple[bytes, bytes, bytes]:
    ssn_env = seal(SSN_KEY, ssn, column_associated_data(SSN.column_id))
    score_env = seal(SCORE_KEY, score.to_bytes(4, "big", signed=True), column_associated_data(SCORE.column_id))
    return b"7", hex_text(ssn_env), hex_text(score_env)


def simple_select(crypto: SessionCrypto, *rows: tuple[bytes | None, ...]) -> tuple[bytes | None, bytes]:
    """A simple Query of every column, the server's text-format answer rewritten: (RowDescription
    replacement, the DataRows the client gets)."""
    out = crypto.query("SELECT id, ssn, score FROM customers")
    assert out.refusal is None
    assert isinstance(out.state, QueryCrypto)
    replacement, rewritten = crypto.result_row_description(rd_body(*STORED_FIELDS), out.state)
    data = data_rows(*rows)
    if not rewritten:
        return replacement, data
    return replacement, crypto.data_rows_current(data, 0, len(data), len(rows))


def fields_of(replacement: bytes | None) -> tuple[m.FieldDescription, ...]:
    assert replacement is not None
    msg = codec.decode_backend(replacement[0], replacement[5:])
    assert isinstance(msg, m.RowDescription)
    return msg.fields


def sqlstate(refusal: bytes | None) -> str:
    assert refusal is not None
    msg = codec.decode_backend(refusal[0], refusal[5:])
    assert isinstance(msg, m.ErrorResponse)
    return msg.field(b"C") or ""


# -- each grant on a simple Query's rows ----------------------------------------------------------------


def test_plaintext_role_gets_the_values() -> None:
    crypto, _ = session()
    replacement, rows = simple_select(crypto, stored_row())
    assert [f.type_oid for f in fields_of(replacement)] == [INT4, TEXT, INT4]
    assert rows == data_rows((b"7", SSN_TEXT, b"42"))
    assert crypto.values_served == {("support", "plaintext"): 2}


def test_hidden_role_gets_null_of_the_declared_type_and_nothing_is_decrypted() -> None:
    """No key is available at all: a hidden column never asks for one."""
    crypto, _ = session(Switchable(default=HIDDEN), keys=())
    replacement, rows = simple_select(crypto, stored_row(), (b"8", None, None))
    assert [f.type_oid for f in fields_of(replacement)] == [INT4, TEXT, INT4]
    assert rows == data_rows((b"7", None, None), (b"8", None, None))
    assert crypto.values_decrypted == 0
    assert crypto.values_served == {("support", "hidden"): 4}


def test_masked_role_gets_the_mask_in_the_declared_type() -> None:
    crypto, _ = session(Switchable(grants={SSN.column_id: LAST4, SCORE.column_id: LAST4}))
    replacement, rows = simple_select(crypto, stored_row(score=123456))
    assert [f.type_oid for f in fields_of(replacement)] == [INT4, TEXT, INT4]
    assert _values(rows)[1:] == [b"*******6789", b"3456"]
    assert crypto.values_served == {("support", "masked"): 2}
    binary = bind(crypto, parse_select(crypto), (1,))
    assert isinstance(binary, PortalCrypto)
    assert binary.row_plan is not None
    env = bytes.fromhex(stored_row(score=123456)[2][2:].decode())
    data = data_rows((b"\x00\x00\x00\x07", None, env))
    crypto.execute_rows(binary)
    assert _values(crypto.data_rows_current(data, 0, len(data), 1))[2] == (3456).to_bytes(4, "big")


def test_ciphertext_role_gets_the_stored_envelope_as_bytea() -> None:
    crypto, _ = session(Switchable(default=CIPHER), keys=())
    row = stored_row()
    replacement, rows = simple_select(crypto, row)
    assert replacement is None  # the server's RowDescription: bytea
    assert rows == data_rows(row)
    assert crypto.values_served == {("support", "ciphertext"): 2}


def test_a_denied_column_refuses_the_statement_and_is_not_served_where_only_a_description_names_it() -> None:
    crypto, _ = session(Switchable(grants={SSN.column_id: DENY}))
    out = crypto.query("SELECT id, ssn, score FROM customers")
    assert sqlstate(out.refusal) == "42501"
    assert b"public.customers.ssn" in (out.refusal or b"")
    assert crypto.query("SELECT id, score FROM customers").refusal is None
    # FETCH from a cursor: nothing to analyse, the RowDescription names the column
    assert crypto.query("FETCH 1 FROM c").state is None
    with pytest.raises(ProxyError, match=r"public\.customers\.ssn") as info:
        crypto.result_row_description(rd_body(*STORED_FIELDS), None)
    assert info.value.sqlstate == "42501"


def _values(rows: bytes) -> list[bytes | None]:
    (n,) = struct.unpack_from("!h", rows, 5)
    pos, values = 7, []
    for _ in range(n):
        (ln,) = struct.unpack_from("!i", rows, pos)
        pos += 4
        values.append(None if ln < 0 else rows[pos : pos + ln])
        pos += max(ln, 0)
    return values


# -- the decision (until proxy.policy.decide replaces the engine's) ---------------------------------------


@pytest.mark.parametrize(
    ("grant", "kind", "refused"),
    [
        (PLAIN, ReferenceKind.EXPRESSION, False),
        (LAST4, ReferenceKind.OUTPUT, False),
        (LAST4, ReferenceKind.EXPRESSION, True),
        (LAST4, ReferenceKind.EQUALITY, True),
        (Grant(Visibility.MATCH, Mask(MaskFunction.PARTIAL)), ReferenceKind.EQUALITY, True),
        (HIDDEN, ReferenceKind.WRITE, False),
        (DENY, ReferenceKind.OUTPUT, True),
        (DENY, ReferenceKind.WRITE, True),
    ],
)
def test_decide(grant: Grant, kind: ReferenceKind, refused: bool) -> None:
    e = decide([Reference(SSN, kind, "WHERE")], UniformView(grant, login_role="agent"))
    assert (e is not None) == refused
    if e is not None:
        assert e.sqlstate == "42501"
        assert "public.customers.ssn" in e.message
        assert "agent" in e.message


# -- extended protocol: the view at Parse, Bind and Execute ------------------------------------------------


def parse_select(crypto: SessionCrypto) -> StatementCrypto:
    out = crypto.parse(m.Parse("s", "SELECT id, ssn, score FROM customers WHERE id = $1", ()))
    assert out.refusal is None
    assert isinstance(out.state, StatementCrypto)
    return out.state


def bind(crypto: SessionCrypto, stmt: StatementCrypto, formats: tuple[int, ...] = (0,)) -> PortalCrypto | bytes:
    msg = codec.decode_bind_frame(codec.encode_bind_body(m.Bind("", "s", (), (b"7",), formats)))
    out = crypto.bind(msg, stmt, None)
    if out.refusal is not None:
        return out.refusal
    assert isinstance(out.state, PortalCrypto)
    return out.state


def actions(portal: PortalCrypto | bytes) -> list[Action | None]:
    assert isinstance(portal, PortalCrypto)
    assert portal.row_plan is not None
    return [None if out is None else out.action for out in portal.row_plan]


def test_a_bind_under_a_new_epoch_is_served_under_the_new_view() -> None:
    crypto, src = session()
    stmt = parse_select(crypto)
    assert actions(bind(crypto, stmt)) == [None, Action.DECRYPT, Action.DECRYPT]
    src.default, src.epoch = HIDDEN, 1
    assert actions(bind(crypto, stmt)) == [None, Action.NULL, Action.NULL]
    assert stmt.view is not None
    assert stmt.view.epoch == 1


def test_a_bind_under_a_new_epoch_that_denies_is_refused_and_the_session_goes_on() -> None:
    crypto, src = session()
    stmt = parse_select(crypto)
    src.grants, src.epoch = {SSN.column_id: DENY}, 1
    assert sqlstate(bind(crypto, stmt)) == "42501"  # type: ignore[arg-type]
    src.grants, src.epoch = {}, 2
    assert actions(bind(crypto, stmt)) == [None, Action.DECRYPT, Action.DECRYPT]


def test_an_execute_under_a_new_epoch_replans_the_portal_or_refuses_it() -> None:
    crypto, src = session()
    portal = bind(crypto, parse_select(crypto), (1,))
    assert isinstance(portal, PortalCrypto)
    src.default, src.epoch = LAST4, 1
    out = crypto.handle_execute("", [portal])
    assert out.refusal is None
    assert actions(portal) == [None, Action.MASK, Action.MASK]
    # hidden keeps the declared type: still the same portal
    src.default, src.epoch = HIDDEN, 2
    assert crypto.handle_execute("", [portal]).refusal is None
    assert actions(portal) == [None, Action.NULL, Action.NULL]
    # ciphertext would be bytea, which the client was not told: bind again
    src.default, src.epoch = CIPHER, 3
    assert sqlstate(crypto.handle_execute("", [portal]).refusal) == "0A000"


def test_ciphertext_role_asks_the_server_for_the_clients_format_and_other_roles_for_binary() -> None:
    crypto, _ = session(Switchable(grants={SSN.column_id: CIPHER}))
    stmt = parse_select(crypto)
    portal = bind(crypto, stmt, (0,))
    assert isinstance(portal, PortalCrypto)
    assert actions(portal) == [None, Action.STORED, Action.DECRYPT]
    assert portal.server_formats == (0, 0, 1)


# -- a ciphertext role writes envelopes ----------------------------------------------------------------


def test_ciphertext_role_literal_envelope_is_passed_on_unchanged() -> None:
    crypto, _ = session(Switchable(default=CIPHER))
    envelope = seal(SSN_KEY, SSN_TEXT, column_associated_data(SSN.column_id))
    out = crypto.query(f"INSERT INTO customers (id, ssn) VALUES (1, '\\x{envelope.hex()}')")
    assert out.refusal is None
    assert out.replacement is not None
    assert envelope.hex().encode() in out.replacement
    assert crypto.values_encrypted == 0


@pytest.mark.parametrize(
    "value",
    [
        "'123-45-6789'",  # plaintext
        "'\\x" + seal(SCORE_KEY, b"\x00\x00\x00\x01", column_associated_data(SCORE.column_id)).hex() + "'",
        "'\\x5056'",  # a truncated envelope
    ],
    ids=["plaintext", "another-columns-envelope", "truncated"],
)
def test_ciphertext_role_literal_that_is_no_envelope_of_the_column_is_refused(value: str) -> None:
    crypto, _ = session(Switchable(default=CIPHER))
    out = crypto.query(f"INSERT INTO customers (id, ssn) VALUES (1, {value})")
    assert sqlstate(out.refusal) == "22023"
    assert out.replacement is not None
    assert b"123-45" not in out.replacement


def test_ciphertext_role_bind_passes_the_envelope_and_describes_bytea() -> None:
    crypto, _ = session(Switchable(default=CIPHER))
    out = crypto.parse(m.Parse("i", "INSERT INTO customers (id, ssn) VALUES ($1, $2)", ()))
    stmt = out.state
    assert isinstance(stmt, StatementCrypto)
    pd = crypto.parameter_description(codec.encode_backend(m.ParameterDescription((INT4, BYTEA)))[5:], stmt)
    assert pd == codec.encode_backend(m.ParameterDescription((INT4, BYTEA)))
    envelope = seal(SSN_KEY, SSN_TEXT, column_associated_data(SSN.column_id))
    for fmt, value in ((1, envelope), (0, hex_text(envelope))):
        msg = codec.decode_bind_frame(codec.encode_bind_body(m.Bind("", "i", (0, fmt), (b"1", value), ())))
        result = crypto.bind(msg, stmt, None)
        assert result.refusal is None
        assert result.replacement is not None
        assert envelope in result.replacement
    bad = codec.decode_bind_frame(codec.encode_bind_body(m.Bind("", "i", (0, 0), (b"1", SSN_TEXT), ())))
    assert sqlstate(crypto.bind(bad, stmt, None).refusal) == "22023"


# -- the hash mask's key ---------------------------------------------------------------------------------


def test_hash_mask_without_a_keystore_is_refused_with_55000_naming_the_column() -> None:
    crypto, _ = session(Switchable(grants={SSN.column_id: HASH}), keystore=False)
    out = crypto.query("SELECT id, ssn FROM customers")
    assert sqlstate(out.refusal) == "55000"
    assert b"public.customers.ssn" in (out.refusal or b"")


def test_hash_mask_key_is_fetched_like_a_column_key_and_stable_across_sessions() -> None:
    grants = {SSN.column_id: HASH}
    first, _ = session(Switchable(grants=grants), keys=(SSN_KEY, SCORE_KEY, MASK_KEY))
    second, _ = session(Switchable(grants=grants), keys=(SSN_KEY, SCORE_KEY, MASK_KEY))
    a = _values(simple_select(first, stored_row())[1])[1]
    b = _values(simple_select(second, stored_row())[1])[1]
    assert a == b
    assert a is not None
    assert a != SSN_TEXT
    other = _values(simple_select(first, stored_row(ssn=b"987-65-4321"))[1])[1]
    assert other != a
    missing, _ = session(Switchable(grants=grants), keys=(SSN_KEY, SCORE_KEY, MASK_KEY))
    source = missing.ctx.keys.source
    assert isinstance(source, FakeKeySource)
    source.cache.pop(bytes(MASK_KEY.key_id))
    with pytest.raises(KeyMiss) as info:
        missing.query("SELECT id, ssn FROM customers")
    assert info.value.column_id == MASK_KEY_SCOPE


# -- COPY TO ---------------------------------------------------------------------------------------------


def copy_out(crypto: SessionCrypto, sql: str, data: bytes) -> bytes:
    out = crypto.query(sql)
    assert out.refusal is None, out.refusal
    body = codec.encode_backend(m.CopyOutResponse(0, (0, 0, 0)))[5:]
    assert crypto.copy_out_response(out.state, body)
    sent = crypto.copy_out_data(data)
    tail = crypto.copy_out_done()
    got = b""
    for chunk in (sent, tail or b""):
        pos = 0
        while pos < len(chunk):
            (n,) = struct.unpack_from("!I", chunk, pos + 1)
            if chunk[pos : pos + 1] == b"d":
                got += chunk[pos + 5 : pos + 1 + n]
            pos += 1 + n
    return got


@pytest.mark.parametrize("fmt", ["text", "csv"])
def test_copy_to_serves_each_grant(fmt: str) -> None:
    _, ssn, score = stored_row()
    sep = b"\t" if fmt == "text" else b","
    esc = b"\\" if fmt == "text" else b""  # text COPY doubles the backslash of bytea's \x
    line = b"7" + sep + esc + ssn + sep + esc + score + b"\n"
    null = b"\\N" if fmt == "text" else b""
    opt = "" if fmt == "text" else " (FORMAT csv)"
    sql = f"COPY customers (id, ssn, score) TO STDOUT{opt}"
    plain, _ = session()
    assert copy_out(plain, sql, line) == b"7" + sep + SSN_TEXT + sep + b"42\n"
    hidden, _ = session(Switchable(default=HIDDEN), keys=())
    assert copy_out(hidden, sql, line) == b"7" + sep + null + sep + null + b"\n"
    assert hidden.values_served == {("support", "hidden"): 2}
    masked, _ = session(Switchable(grants={SSN.column_id: LAST4, SCORE.column_id: CIPHER}))
    got = copy_out(masked, sql, line)
    assert SSN_TEXT not in got
    assert b"6789" in got
    assert got.endswith(esc + score + b"\n")
    cipher, _ = session(Switchable(default=CIPHER), keys=())
    assert copy_out(cipher, sql, line) == line
    assert cipher.values_served == {("support", "ciphertext"): 2}


def test_binary_copy_to_by_a_role_without_plaintext_is_refused() -> None:
    crypto, _ = session(Switchable(grants={SSN.column_id: HIDDEN}))
    out = crypto.query("COPY customers (id, ssn) TO STDOUT (FORMAT binary)")
    assert out.refusal is not None
    assert sqlstate(out.refusal) in ("42501", "0A000")


# -- plain governed columns --------------------------------------------------------------------------------

PHONE = ProtectedColumn("public", "people", "phone", "text", attnum=2, table_oid=17000, encrypted=False)
PEOPLE = ProtectedTable("public", "people", {"phone": PHONE}, ("id", "phone"), oid=17000, attnums=(1, 2))
PLAIN_FIELDS = (
    m.FieldDescription("id", 17000, 1, INT4, 4, -1, 0),
    m.FieldDescription("phone", 17000, 2, TEXT, -1, -1, 0),
)


@pytest.mark.parametrize(
    ("grant", "expected"),
    [(PLAIN, b"555-0100"), (CIPHER, b"555-0100"), (HIDDEN, None), (PARTIAL, "masked")],
    ids=["plaintext", "ciphertext", "hidden", "masked"],
)
def test_a_plain_column_is_copied_masked_or_null(grant: Grant, expected: bytes | str | None) -> None:
    ring = KeyRing(None)
    crypto = SessionCrypto(CryptoContext(Catalog({("public", "people"): PEOPLE}), ring), "a", Switchable(default=grant))
    replacement, plan = crypto.row_description(rd_body(*PLAIN_FIELDS), None, None)
    assert replacement is None  # a plain column keeps the server's own description
    assert plan is not None
    data = data_rows((b"1", b"555-0100"))
    got = _values(crypto.data_rows(data, 0, len(data), plan, 1))[1]
    if expected == "masked":
        assert got is not None
        assert got != b"555-0100"
        assert got[:1] == b"5"
    else:
        assert got == expected
    if grant.visibility in (Visibility.PLAINTEXT, Visibility.CIPHERTEXT):
        assert (
            crypto.data_rows(data, 0, len(data), plan, 1) is data
            or crypto.data_rows(data, 0, len(data), plan, 1) == data
        )


# -- FETCH from a cursor: a statement with nothing to analyse, described by the server -----------------


@pytest.mark.parametrize(("grant", "action"), [(PLAIN, Action.DECRYPT), (HIDDEN, Action.NULL), (LAST4, Action.MASK)])
def test_a_bind_of_a_described_unanalysed_statement_serves_its_governed_columns(grant: Grant, action: Action) -> None:
    """asyncpg Describes the statement (``FETCH 10 FROM c``) and Binds without a portal Describe: the
    statement's RowDescription names the columns, and the rows follow the role's view."""
    crypto, _ = session(Switchable(default=grant))
    desc = rd_body(fd("id", 1, INT4, 4, 0), fd("ssn", 2, BYTEA, -1, 0))
    msg = codec.decode_bind_frame(codec.encode_bind_body(m.Bind("", "f", (), (), (1,))))
    out = crypto.handle_bind(msg, [(None, desc)])
    assert out.refusal is None
    portal = out.state
    assert isinstance(portal, PortalCrypto)
    assert actions(portal) == [None, action]
    envelope = seal(SSN_KEY, SSN_TEXT, column_associated_data(SSN.column_id))
    assert crypto.execute_rows(portal)
    data = data_rows((b"\x00\x00\x00\x07", envelope))
    got = _values(crypto.data_rows_current(data, 0, len(data), 1))[1]
    assert got == {Action.DECRYPT: SSN_TEXT, Action.NULL: None, Action.MASK: b"*******6789"}[action]


def test_sql_execute_of_a_statement_prepared_under_another_epoch_is_decided_again() -> None:
    """The relay keeps no crypto state for SQL PREPARE: the engine remembers what the PREPARE was
    decided for, so a predicate on a column the role no longer sees is not run by EXECUTE."""
    crypto, src = session()
    out = crypto.query("PREPARE q AS SELECT id FROM customers WHERE ssn IS NULL")
    assert out.refusal is None
    assert crypto.execute_refusal("q", [(None, None)], deferred=False) is None
    src.default, src.epoch = HIDDEN, 1
    assert sqlstate(crypto.execute_refusal("q", [(None, None)], deferred=False)) == "42501"
    src.default, src.epoch = PLAIN, 2
    assert crypto.execute_refusal("q", [(None, None)], deferred=False) is None
    src.default, src.epoch = HIDDEN, 3
    crypto.close(b"S", "q")  # DEALLOCATE q: forgotten
    assert crypto.execute_refusal("q", [(None, None)], deferred=False) is None
