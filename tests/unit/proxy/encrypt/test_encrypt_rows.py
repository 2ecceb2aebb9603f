"""DataRow decryption (``rewrite_data_row``), bytes in, bytes out: fixed-key vectors for every pair of
server format (bytea hex text or raw envelope) and client format (declared type's text or binary), NULLs
and unprotected columns left alone, and every tamper, move or framing fault ending in RowDecryptError
that names the column rather than in a value the client would take for data.
"""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keymgmt.envelope import DataKey, KeyState, _seal_with_nonce, column_associated_data
from proxy.encrypt.rows import ColumnOutput, RowDecryptError, RowPlan, rewrite_data_row, rewrite_value_text
from proxy.pgtypes import SessionFormat, codec_for
from proxy.protocol.codec import CodecError
from proxy.rewrite.catalog import ProtectedColumn

FMT = SessionFormat()
TABLE_OID = 16400

SSN = ProtectedColumn("public", "customers", "ssn", "text", attnum=2, table_oid=TABLE_OID)
SCORE = ProtectedColumn("public", "customers", "score", "integer", attnum=3, table_oid=TABLE_OID)
EMAIL = ProtectedColumn("public", "customers", "email", "text", attnum=4, table_oid=TABLE_OID)
# Same table name and column name in another schema: its associated data differs only in the schema.
OTHER_SSN = ProtectedColumn("archive", "customers", "ssn", "text", attnum=2, table_oid=16500)

SSN_KEY_ID = bytes.fromhex("5d1d0f1e8a3c4b7f9e2a6c0d4b8f1a37")
SCORE_KEY_ID = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")
SSN_MATERIAL = bytes(range(32))
SCORE_MATERIAL = bytes(range(32, 64))
NONCE = bytes.fromhex("000102030405060708090a0b")

SSN_KEY = DataKey.from_material(SSN_KEY_ID, SSN_MATERIAL, column_id=SSN.column_id)
SCORE_KEY = DataKey.from_material(SCORE_KEY_ID, SCORE_MATERIAL, column_id=SCORE.column_id)
KEYS = {SSN_KEY_ID: SSN_KEY, SCORE_KEY_ID: SCORE_KEY}

SSN_PLAINTEXT = b"123-45-6789"
SCORE_PLAINTEXT = 42
# The envelope of SSN_PLAINTEXT under SSN_KEY with NONCE, pinned: a change in the layout, the associated
# data or the cipher changes these bytes.
SSN_VECTOR = bytes.fromhex(
    "505601015d1d0f1e8a3c4b7f9e2a6c0d4b8f1a37000102030405060708090a0b"
    "7630e536f1d0ef2dba79aeb25e844a6ce2fc9548899bf9ec776c95"
)


def lookup(key_id: bytes) -> DataKey | None:
    return KEYS.get(key_id)


def output(col: ProtectedColumn, *, server_binary: bool, client_binary: bool) -> ColumnOutput:
    return ColumnOutput(
        col, codec_for(col.declared_type), column_associated_data(col.column_id), server_binary, client_binary
    )


def sealed(col: ProtectedColumn, key: DataKey, canonical: bytes, nonce: bytes = NONCE) -> bytes:
    return _seal_with_nonce(key, canonical, column_associated_data(col.column_id), nonce)


def stored(envelope: bytes, *, server_binary: bool) -> bytes:
    """How the server sends a bytea value: the raw bytes in binary, ``\\x`` hex in text (bytea_output hex)."""
    return envelope if server_binary else b"\\x" + envelope.hex().encode("ascii")


def data_row(*values: bytes | None) -> bytes:
    """A DataRow body ("Message Formats": Int16 count, then Int32 length (-1 for NULL) and bytes each)."""
    parts = [struct.pack("!h", len(values))]
    for v in values:
        parts.append(struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v)
    return b"".join(parts)


def ssn_envelope() -> bytes:
    return sealed(SSN, SSN_KEY, SSN_PLAINTEXT)


def score_envelope() -> bytes:
    return sealed(SCORE, SCORE_KEY, SCORE_PLAINTEXT.to_bytes(4, "big", signed=True))


# -- the fixed-key vector ---------------------------------------------------------------------------------


def test_vector_is_the_documented_layout_built_independently() -> None:
    """The envelope built by hand from the documented layout (magic, version, algorithm, key id, nonce,
    ciphertext, tag; associated data = header · 0x00 · column id) with the library's AES-GCM."""
    header = b"PV\x01\x01" + SSN_KEY_ID + NONCE
    by_hand = header + AESGCM(SSN_MATERIAL).encrypt(NONCE, SSN_PLAINTEXT, header + b"\x00public.customers.ssn")
    assert by_hand == SSN_VECTOR
    assert ssn_envelope() == SSN_VECTOR


@pytest.mark.parametrize("server_binary", [False, True], ids=["server-text", "server-binary"])
@pytest.mark.parametrize("client_binary", [False, True], ids=["client-text", "client-binary"])
def test_fixed_vector_row_rewritten_exactly(server_binary: bool, client_binary: bool) -> None:
    plan: RowPlan = (
        None,
        output(SSN, server_binary=server_binary, client_binary=client_binary),
        output(SCORE, server_binary=server_binary, client_binary=client_binary),
        None,
    )
    body = data_row(
        b"7",
        stored(SSN_VECTOR, server_binary=server_binary),
        stored(score_envelope(), server_binary=server_binary),
        b"Ada",
    )
    # text: text in both formats (UTF-8 client); integer: decimal text or Int32 big-endian.
    score = b"\x00\x00\x00\x2a" if client_binary else b"42"
    expected = (
        b"\x00\x04"
        + b"\x00\x00\x00\x01" + b"7"
        + b"\x00\x00\x00\x0b" + b"123-45-6789"
        + struct.pack("!i", len(score)) + score
        + b"\x00\x00\x00\x03" + b"Ada"
    )  # fmt: skip
    assert rewrite_data_row(body, plan, lookup, FMT) == expected


def test_text_is_converted_to_the_client_encoding() -> None:
    canonical = "Zoë".encode()
    plan: RowPlan = (output(SSN, server_binary=True, client_binary=False),)
    body = data_row(sealed(SSN, SSN_KEY, canonical))
    latin1 = SessionFormat(client_encoding="LATIN1")
    assert rewrite_data_row(body, plan, lookup, latin1) == data_row(b"Zo\xeb")
    assert rewrite_data_row(body, plan, lookup, FMT) == data_row(canonical)


def test_copy_field_in_bytea_text_is_opened_to_declared_text() -> None:
    out = output(SCORE, server_binary=False, client_binary=False)
    assert rewrite_value_text(stored(score_envelope(), server_binary=False), out, lookup, FMT) == b"42"


# -- what is left alone -----------------------------------------------------------------------------------


@pytest.mark.parametrize("server_binary", [False, True], ids=["server-text", "server-binary"])
def test_nulls_stay_null(server_binary: bool) -> None:
    plan: RowPlan = (
        None,
        output(SSN, server_binary=server_binary, client_binary=False),
        output(SCORE, server_binary=server_binary, client_binary=True),
    )
    all_null = data_row(b"1", None, None)
    assert rewrite_data_row(all_null, plan, lookup, FMT) == all_null
    mixed = data_row(None, None, stored(score_envelope(), server_binary=server_binary))
    assert rewrite_data_row(mixed, plan, lookup, FMT) == data_row(None, None, b"\x00\x00\x00\x2a")


def test_unprotected_columns_are_byte_identical_even_if_they_hold_envelopes() -> None:
    """A column the plan does not mark is never opened, whatever it holds: an envelope, bytes that are
    no envelope, an empty string, binary junk."""
    plan: RowPlan = (None, output(SSN, server_binary=True, client_binary=False), None, None, None)
    unprotected = [stored(SSN_VECTOR, server_binary=False), b"", b"\xff\x00\xfe" * 100, SSN_VECTOR]
    body = data_row(unprotected[0], SSN_VECTOR, *unprotected[1:])
    assert rewrite_data_row(body, plan, lookup, FMT) == data_row(unprotected[0], SSN_PLAINTEXT, *unprotected[1:])


# -- every fault is an error naming the column ---------------------------------------------------------


def assert_refused(body: bytes, plan: RowPlan, column: ProtectedColumn) -> RowDecryptError:
    with pytest.raises(RowDecryptError) as info:
        rewrite_data_row(body, plan, lookup, FMT)
    assert info.value.column == column
    return info.value


@pytest.mark.parametrize("server_binary", [False, True], ids=["server-text", "server-binary"])
def test_every_single_byte_flip_of_the_envelope_is_refused(server_binary: bool) -> None:
    plan: RowPlan = (
        None,
        output(SSN, server_binary=server_binary, client_binary=False),
        output(SCORE, server_binary=server_binary, client_binary=True),
    )
    score = stored(score_envelope(), server_binary=server_binary)
    wrong: list[tuple[int, int]] = []
    for position in range(len(SSN_VECTOR)):
        for mask in (0x01, 0x80, 0xFF):
            tampered = bytearray(SSN_VECTOR)
            tampered[position] ^= mask
            body = data_row(b"1", stored(bytes(tampered), server_binary=server_binary), score)
            try:
                rewrite_data_row(body, plan, lookup, FMT)
            except RowDecryptError as e:
                if e.column != SSN:
                    wrong.append((position, mask))
            else:
                wrong.append((position, mask))
    assert wrong == []


def test_tampered_hex_text_is_refused() -> None:
    plan: RowPlan = (output(SSN, server_binary=False, client_binary=False),)
    text = stored(SSN_VECTOR, server_binary=False)
    for bad in (text[2:], b"\\X" + text[2:], text + b"0", text[:-1] + b"g", text.replace(b"5", b"\xd5", 1), b""):
        assert_refused(data_row(bad), plan, SSN)


def test_truncated_or_extended_envelope_is_refused() -> None:
    plan: RowPlan = (output(SSN, server_binary=True, client_binary=False),)
    for bad in (SSN_VECTOR[:-1], SSN_VECTOR[:47], SSN_VECTOR + b"\x00", b"PV\x01\x01", b""):
        assert_refused(data_row(bad), plan, SSN)


def test_value_moved_to_another_column_is_refused() -> None:
    """Same key, same type, same table: only the associated data (the column id) tells them apart."""
    shared_key = {SSN_KEY_ID: SSN_KEY}.get
    plan: RowPlan = (
        output(SSN, server_binary=True, client_binary=False),
        output(EMAIL, server_binary=True, client_binary=False),
    )
    body = data_row(SSN_VECTOR, SSN_VECTOR)
    with pytest.raises(RowDecryptError) as info:
        rewrite_data_row(body, plan, shared_key, FMT)
    assert info.value.column == EMAIL
    assert rewrite_data_row(data_row(SSN_VECTOR, None), plan, shared_key, FMT) == data_row(SSN_PLAINTEXT, None)


def test_value_moved_to_the_same_column_of_another_schema_is_refused() -> None:
    plan: RowPlan = (output(OTHER_SSN, server_binary=True, client_binary=False),)
    assert_refused(data_row(SSN_VECTOR), plan, OTHER_SSN)


def test_unknown_key_id_is_refused() -> None:
    plan: RowPlan = (None, output(SCORE, server_binary=True, client_binary=False))
    with pytest.raises(RowDecryptError) as info:
        rewrite_data_row(data_row(b"1", score_envelope()), plan, {SSN_KEY_ID: SSN_KEY}.get, FMT)
    assert info.value.column == SCORE


def test_disabled_key_is_refused() -> None:
    disabled = {SSN_KEY_ID: SSN_KEY.with_state(KeyState.DISABLED)}.get
    plan: RowPlan = (output(SSN, server_binary=True, client_binary=False),)
    with pytest.raises(RowDecryptError) as info:
        rewrite_data_row(data_row(SSN_VECTOR), plan, disabled, FMT)
    assert info.value.column == SSN


@pytest.mark.parametrize("client_binary", [False, True], ids=["client-text", "client-binary"])
def test_decrypted_value_invalid_for_the_declared_type_is_refused(client_binary: bool) -> None:
    """An authentic envelope whose plaintext is not a canonical int4 (written while the column was
    declared bigint, or by a buggy writer) must be refused, not sent as a value of the wrong width."""
    plan: RowPlan = (output(SCORE, server_binary=True, client_binary=client_binary),)
    as_int8 = sealed(SCORE, SCORE_KEY, (1 << 40).to_bytes(8, "big", signed=True))
    assert_refused(data_row(as_int8), plan, SCORE)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_row_with_another_column_count_than_the_plan_is_refused(count: int) -> None:
    plan: RowPlan = (None, output(SSN, server_binary=True, client_binary=False), None)
    values = [b"1", SSN_VECTOR, b"x", b"y"][:count]
    assert_refused(data_row(*values), plan, SSN)


def test_row_with_trailing_bytes_or_a_value_cut_short_is_refused() -> None:
    plan: RowPlan = (None, output(SSN, server_binary=True, client_binary=False))
    assert_refused(data_row(b"1", SSN_VECTOR) + b"\x00", plan, SSN)
    plan = (output(SSN, server_binary=True, client_binary=False), None)
    assert_refused(data_row(SSN_VECTOR, b"abc")[:-1], plan, SSN)


def test_row_shorter_than_its_column_count_is_refused() -> None:
    """The count matches the plan but the body ends early: a malformed DataRow is the server breaking the
    protocol (CodecError, which ends the session with 08P01), never a struct.error from the hot path."""
    plan: RowPlan = (output(SSN, server_binary=True, client_binary=False), None)
    for body in (data_row(SSN_VECTOR, b"abc")[:-5], b"\x00"):  # last length cut short; not even a count
        with pytest.raises(CodecError, match="malformed DataRow"):
            rewrite_data_row(body, plan, KEYS.get, FMT)
