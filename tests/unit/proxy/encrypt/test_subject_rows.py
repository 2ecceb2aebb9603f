"""The DataRow path for columns with per-subject keys: values open with their subject's key in every
kernel, a value whose key is another subject's than its row's subject column fails (RowDecryptError,
authentication), and a run names every key id it needs at once."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from keymgmt.envelope import DataKey, column_associated_data, seal, subject_scope
from proxy.encrypt.engine import ColumnCrypto
from proxy.encrypt.rows import ColumnOutput, RowDecryptError, rewrite_data_rows, run_key_ids
from proxy.pgtypes import SessionFormat, codec_for
from proxy.rewrite.catalog import ProtectedColumn, SubjectColumn

FMT = SessionFormat()
EMAIL = ProtectedColumn("public", "customers", "email", "text", attnum=2, table_oid=1, subject_kind="customer")
SUBJECT = SubjectColumn("customer", "id", "integer")


def key(n: int) -> DataKey:
    return DataKey.from_material(
        n.to_bytes(16, "big"), bytes([n]) * 32, column_id=subject_scope("customer"), subject=str(n).encode()
    )


KEYS: dict[bytes, DataKey] = {k.key_id: k for k in (key(1), key(2), key(3))}


def lookup(key_id: bytes) -> DataKey | None:
    return KEYS.get(bytes(key_id))


def stored(k: DataKey, plaintext: bytes, *, binary: bool) -> bytes:
    env = seal(k, plaintext, column_associated_data(EMAIL.column_id))
    return env if binary else b"\\x" + env.hex().encode()


def frame(*rows: tuple[bytes | None, ...]) -> bytes:
    out = []
    for values in rows:
        body = struct.pack("!h", len(values)) + b"".join(
            struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v for v in values
        )
        out.append(b"D" + struct.pack("!I", len(body) + 4) + body)
    return b"".join(out)


def output(*, binary: bool, subject_at: int = -1) -> ColumnOutput:
    cc = ColumnCrypto(EMAIL, codec_for("text"), column_associated_data(EMAIL.column_id))
    out = cc.output(server_binary=binary, client_binary=False, fmt=FMT)
    if subject_at >= 0:
        out = dataclasses.replace(out, subject_at=subject_at, subject=SUBJECT, subject_table="public.customers")
    return out


@pytest.mark.parametrize("binary", [True, False])
def test_values_of_many_subjects_open_without_the_subject_column(binary: bool) -> None:
    data = frame(*((stored(k, f"v{i}".encode(), binary=binary),) for i, k in enumerate(KEYS.values())))
    out = rewrite_data_rows(data, 0, len(data), (output(binary=binary),), lookup, FMT, {})
    assert out == frame((b"v0",), (b"v1",), (b"v2",))


@pytest.mark.parametrize("binary", [True, False])
def test_the_rows_subject_column_must_name_the_values_subject(binary: bool) -> None:
    plan = (None, output(binary=binary, subject_at=0))
    good = frame((b"1", stored(key(1), b"a", binary=binary)), (b"2", stored(key(2), b"b", binary=binary)))
    assert rewrite_data_rows(good, 0, len(good), plan, lookup, FMT, {}) == frame((b"1", b"a"), (b"2", b"b"))
    moved = frame((b"1", stored(key(1), b"a", binary=binary)), (b"2", stored(key(1), b"a", binary=binary)))
    with pytest.raises(RowDecryptError) as e:
        rewrite_data_rows(moved, 0, len(moved), plan, lookup, FMT, {})
    assert e.value.reason == "authentication"
    for subject in (None, b"x", b"01x"):
        row = frame((subject, stored(key(1), b"a", binary=binary)))
        with pytest.raises(RowDecryptError):
            rewrite_data_rows(row, 0, len(row), plan, lookup, FMT, {})
    # The same id spelled otherwise is the same subject; a NULL value needs none.
    ok = frame((b"001", stored(key(1), b"a", binary=binary)), (b"3", None))
    assert rewrite_data_rows(ok, 0, len(ok), plan, lookup, FMT, {}) == frame((b"001", b"a"), (b"3", None))


def test_a_binary_subject_column_is_read_in_binary() -> None:
    plan = (None, dataclasses.replace(output(binary=True, subject_at=0), subject_binary=True))
    row = frame((struct.pack("!q", 2), stored(key(2), b"b", binary=True)))
    assert rewrite_data_rows(row, 0, len(row), plan, lookup, FMT, {}) == frame((struct.pack("!q", 2), b"b"))
    moved = frame((struct.pack("!i", 3), stored(key(2), b"b", binary=True)))
    with pytest.raises(RowDecryptError):
        rewrite_data_rows(moved, 0, len(moved), plan, lookup, FMT, {})


@pytest.mark.parametrize("binary", [True, False])
def test_a_run_names_every_key_id_it_needs_once(binary: bool) -> None:
    ks = list(KEYS.values())
    data = frame(*((b"x", stored(k, b"v", binary=binary)) for k in (ks[0], ks[1], ks[0], ks[2])), (b"y", None))
    assert run_key_ids(data, 0, len(data), (None, output(binary=binary))) == [k.key_id for k in ks]
    assert run_key_ids(data, 0, len(data), (None, None)) == []
