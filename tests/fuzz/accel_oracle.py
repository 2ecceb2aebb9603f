"""The oracle the fuzzers hold the accelerator to: for any bytes, the native DataRow kernel, the native
Opener and the native DataRow run scan give exactly what the pure-Python reference gives (the same
bytes, or the same error: malformed, or refused naming the same column with the same reason).

Shared by the bounded hypothesis run in the test suite (test_fuzz_accel.py) and the coverage-guided
atheris harness (fuzz_accel.py, ``make fuzz``). An input is one byte that picks a plan, then the bytes
the server would send: a run of DataRow messages or anything else. Some plans have per-subject keys with
the row's subject column in the result (the subject check: integer, uuid and text ids, in text and binary
format), so mutations reach the kernel's subject ids, key ids and framing there too. A first byte with its
high bit set picks a Bind plan instead, and the rest is a client's Bind body for the native Bind rewrite
(``pgveil_accel.seal_bind``), held to the Python reference :func:`reference_seal_bind`.
"""

from __future__ import annotations

import dataclasses
import struct

from keymgmt import envelope
from keymgmt.envelope import (
    DataKey,
    KeyState,
    Opener,
    _seal_with_nonce,
    column_associated_data,
    subject_scope,
)
from proxy.encrypt import rows
from proxy.encrypt.engine import ColumnCrypto, format_for
from proxy.encrypt.rows import Action, ColumnOutput, RowDecryptError, RowPlan, screen_output
from proxy.errors import ProxyError
from proxy.pgtypes import SessionFormat, codec_for
from proxy.pgtypes.text import TextCodec
from proxy.policy.masks import compile_mask
from proxy.policy.model import Mask, MaskFunction
from proxy.protocol import codec, relay
from proxy.protocol import messages as m
from proxy.protocol.codec import CodecError
from proxy.rewrite.catalog import ProtectedColumn, SubjectColumn

FMT = SessionFormat()
SSN = ProtectedColumn("public", "customers", "ssn", "text", attnum=2, table_oid=16400)
EMAIL = ProtectedColumn("public", "customers", "email", "varchar", attnum=4, table_oid=16400)
KEY = DataKey.from_material(b"\x11" * 16, bytes(range(32)), column_id=SSN.column_id)
DISABLED = DataKey.from_material(b"\x22" * 16, bytes(range(1, 33)), column_id=SSN.column_id).with_state(
    KeyState.DISABLED
)
KEYS: dict[bytes, DataKey] = {KEY.key_id: KEY, DISABLED.key_id: DISABLED}

# Per-subject keys: two subjects of each kind, the subject column of each table in text or binary format.
SUBJECT_IDS: dict[str, tuple[bytes, ...]] = {
    "customer": (b"1", b"-42"),
    "device": (b"0a1b2c3d-4e5f-4061-8293-a4b5c6d7e8f9", b"ffffffff-0000-4000-8000-000000000001"),
    "member": (b"ann", "Zoë".encode()),
}
SUBJECTS = {
    "customer": SubjectColumn("customer", "id", "integer"),
    "device": SubjectColumn("device", "serial", "uuid"),
    "member": SubjectColumn("member", "name", "text"),
}
SUBJECT_KEYS: dict[tuple[str, bytes], DataKey] = {}
for _n, (_kind, _ids) in enumerate(SUBJECT_IDS.items()):
    for _m, _sid in enumerate(_ids):
        _k = DataKey.from_material(
            bytes([0x30 + 2 * _n + _m]) * 16,
            bytes([0x40 + 2 * _n + _m]) * 32,
            column_id=subject_scope(_kind),
            subject=_sid,
        )
        SUBJECT_KEYS[(_kind, _sid)] = _k
        KEYS[_k.key_id] = _k

Outcome = bytes | tuple[object, ...]
SSN_ASSOCIATED = column_associated_data(SSN.column_id)


def _output(col: ProtectedColumn, *, server_binary: bool, client_binary: bool) -> ColumnOutput:
    cc = ColumnCrypto(col, codec_for(col.declared_type), column_associated_data(col.column_id))
    return cc.output(server_binary=server_binary, client_binary=client_binary, fmt=FMT)


def _masked(out: ColumnOutput, function: MaskFunction, text: str | None = None) -> ColumnOutput:
    mask = compile_mask(Mask(function, text), out.column.declared_type, None)
    return dataclasses.replace(out, action=Action.MASK, mask=mask)


# Plans the accelerator runs (every protected column identity): raw envelopes, bytea hex text, mixed; the
# text masks it applies itself (masks.native_form), on the seeds' values of every shape.
_SSN_RAW = _output(SSN, server_binary=True, client_binary=False)
_SSN_HEX = _output(SSN, server_binary=False, client_binary=False)
_EMAIL_RAW = _output(EMAIL, server_binary=True, client_binary=True)
PLANS: tuple[RowPlan, ...] = (
    (None, _SSN_RAW, _EMAIL_RAW),
    (_SSN_HEX, None),
    (None, _SSN_HEX, None, _output(EMAIL, server_binary=True, client_binary=False)),
    (_SSN_RAW,),
    (_masked(_SSN_RAW, MaskFunction.PARTIAL), None, _masked(_SSN_HEX, MaskFunction.LAST4)),
    (None, _masked(_SSN_HEX, MaskFunction.EMAIL), _masked(_EMAIL_RAW, MaskFunction.PARTIAL)),
    (_masked(_SSN_RAW, MaskFunction.FIXED, "n/a €"), _masked(_SSN_RAW, MaskFunction.NULL), _SSN_RAW),
    (_masked(_SSN_RAW, MaskFunction.EMAIL), _masked(_EMAIL_RAW, MaskFunction.LAST4)),
    # Unattributed columns screened for envelopes, beside decrypted and hidden ones.
    (screen_output(True), _SSN_RAW, screen_output(False)),
    (screen_output(False), dataclasses.replace(_SSN_RAW, action=Action.NULL), None),
    (screen_output(True, whole=True), _SSN_HEX, screen_output(False, whole=True), screen_output(True)),
)


def _subject_output(
    kind: str, name: str, at: int, *, server_binary: bool, subject_binary: bool, checked: bool = True
) -> ColumnOutput:
    col = ProtectedColumn("public", kind + "s", name, "text", attnum=3, table_oid=16600, subject_kind=kind)
    out = _output(col, server_binary=server_binary, client_binary=False)
    if not checked:
        return out
    return dataclasses.replace(
        out, subject_at=at, subject=SUBJECTS[kind], subject_table=f"public.{kind}s", subject_binary=subject_binary
    )


def _hidden_subject(kind: str, binary: bool) -> ColumnOutput:
    col = ProtectedColumn("public", kind + "s", SUBJECTS[kind].column, "text", attnum=1, table_oid=16600)
    return ColumnOutput(col, codec_for("text"), b"", binary, False, action=Action.NULL)


# Plans with subject checks, and where each has its tables' subject columns: position -> (kind, binary).
SUBJECT_PLANS: tuple[tuple[RowPlan, dict[int, tuple[str, bool]]], ...] = (
    (
        (
            None,
            _subject_output("customer", "a", 0, server_binary=True, subject_binary=False),
            _subject_output("customer", "b", 0, server_binary=False, subject_binary=False),
        ),
        {0: ("customer", False)},
    ),
    (
        (
            _subject_output("customer", "a", 2, server_binary=True, subject_binary=True),
            _SSN_RAW,
            None,
            _subject_output("customer", "b", 2, server_binary=True, subject_binary=True, checked=False),
        ),
        {2: ("customer", True)},
    ),
    (
        (
            None,
            _masked(_subject_output("device", "a", 0, server_binary=False, subject_binary=False), MaskFunction.PARTIAL),
            _hidden_subject("member", True),
            _subject_output("member", "b", 2, server_binary=True, subject_binary=True),
        ),
        {0: ("device", False), 2: ("member", True)},
    ),
    (
        (
            _subject_output("device", "a", 1, server_binary=True, subject_binary=True),
            None,
            _subject_output("member", "b", 2, server_binary=False, subject_binary=False, checked=False),
        ),
        {1: ("device", True)},
    ),
)
PLANS += tuple(plan for plan, _ in SUBJECT_PLANS)
# Plaintexts for the seeds: ASCII, multi-byte, 0 to 5 characters, no, one or several '@'.
_VALUES = ("value", "", "é", "a😀", "abcd", "€uro5", "a@b@c.de", "@", "ann@例え.jp", "中文字符串")


def _python_outcome(data: bytes, plan: RowPlan) -> Outcome:
    compiled = rows._compile(plan)
    steps, check = compiled[1], rows.subject_checker(compiled[6], KEYS.get, {})
    try:
        return rows._rewrite_general(data, 0, len(data), plan, steps, Opener(KEYS.get, python=True).open, FMT, check)
    except RowDecryptError as e:
        return ("refused", e.column.column_id, e.reason)
    except struct.error:
        return ("malformed",)


def _dispatched_outcome(data: bytes, plan: RowPlan) -> Outcome:
    """What the proxy runs: rows.rewrite_data_rows, which picks the accelerator for these plans."""
    try:
        return rows.rewrite_data_rows(data, 0, len(data), plan, KEYS.get, FMT, {})
    except RowDecryptError as e:
        return ("refused", e.column.column_id, e.reason)
    except CodecError:
        return ("malformed",)


def _open_outcome(opener: Opener, data: bytes, start: int, end: int, associated: bytes) -> Outcome:
    try:
        return opener.open(data, start, end, associated)
    except envelope.OpenFailed as e:
        return ("refused", e.reason.value)


def check(raw: bytes) -> None:
    """Raises AssertionError where the accelerator and the reference disagree on ``raw``."""
    assert envelope._accel is not None, "the accelerator is not built"
    if not raw:
        return
    if raw[0] & 0x80:
        check_bind(BIND_PLANS[(raw[0] & 0x7F) % len(BIND_PLANS)], raw[1:])
        return
    plan = PLANS[raw[0] % len(PLANS)]
    data = raw[1:]
    compiled = rows._compile(plan)
    assert compiled[3] is not None  # the accelerator's kernel runs this plan
    expected = _python_outcome(data, plan)
    got = _dispatched_outcome(data, plan)
    assert got == expected, (got, expected)
    # The run scan, from every message boundary the reference scan finds and from a few odd offsets.
    starts = {0, 1, 5, len(data) // 2, len(data)}
    for end in sorted(starts):
        if end <= len(data):
            assert envelope._accel.data_row_run(data, end, len(data)) == relay.data_row_run_py(data, end, len(data))
    # The Opener on every window the first bytes name.
    associated = column_associated_data(SSN.column_id)
    if len(data) >= 2:
        start, end = data[0] % 64, len(data) - data[1] % 64
        native = _open_outcome(Opener(KEYS.get), data, start, end, associated)
        python = _open_outcome(Opener(KEYS.get, python=True), data, start, end, associated)
        assert native == python, (native, python)


def _frame(*bodies: bytes) -> bytes:
    return b"".join(b"D" + struct.pack("!I", len(b) + 4) + b for b in bodies)


def _row(*values: bytes | None) -> bytes:
    parts = [struct.pack("!h", len(values))]
    for v in values:
        parts.append(struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v)
    return b"".join(parts)


def seeds() -> list[bytes]:
    """Valid runs for every plan (and a few faults), for the fuzzers to mutate: random bytes alone
    seldom make an envelope that authenticates."""
    out: list[bytes] = []
    for index, plan in enumerate(PLANS):
        if index >= len(PLANS) - len(SUBJECT_PLANS):
            out += _subject_seeds(index, *SUBJECT_PLANS[index - len(PLANS) + len(SUBJECT_PLANS)])
            continue
        bodies = []
        for i in range(3):
            values: list[bytes | None] = []
            for c, col in enumerate(plan):
                if col is None:
                    values.append(b"%d" % i if (i + c) % 3 else None)
                    continue
                if col.action is Action.SCREEN:  # an envelope's forms inside other bytes, or none
                    sealed = _seal_with_nonce(KEY, b"v%d" % i, SSN_ASSOCIATED, bytes([i, c]) * 6)
                    forms = (
                        sealed,
                        b"\\x" + sealed.hex().encode(),
                        b'{"PV\\\\001\\\\001"}',
                        b"PV\\\\\\\\001\\\\\\\\001",
                        b"plain",
                    )
                    # At the start (where a bytea's envelope is) or inside other bytes.
                    values.append((b"<" if i % 2 else b"") + forms[(i + c) % len(forms)] + b">")
                    continue
                nonce = bytes([i, c]) * 6
                plain = (_VALUES[(index + i + c) % len(_VALUES)] + str(i)[: (i + c) % 2]).encode()
                sealed = _seal_with_nonce(KEY, plain, col.associated, nonce)
                values.append(sealed if col.server_binary else b"\\x" + sealed.hex().encode())
            bodies.append(_row(*values))
        run = _frame(*bodies)
        out.append(bytes([index]) + run)
        out.append(bytes([index]) + run[: len(run) - 3])
        out.append(bytes([index]) + _frame(bodies[0]) + b"C\x00\x00\x00\x04")
        out.append(bytes([index]) + run.replace(KEY.key_id, DISABLED.key_id, 1))  # a disabled key's value
    return out + bind_seeds()


# -- the Bind rewrite -------------------------------------------------------------------------------------

NAME = ProtectedColumn("public", "customers", "name", "text", attnum=3, table_oid=16400)
CODE = ProtectedColumn("public", "customers", "code", "varchar(4)", attnum=5, table_oid=16400)
NAME_KEY = DataKey.from_material(b"\x33" * 16, bytes(range(2, 34)), column_id=NAME.column_id)
CODE_KEY = DataKey.from_material(b"\x44" * 16, bytes(range(3, 35)), column_id=CODE.column_id)
BIND_KEYS: dict[bytes, DataKey] = {k.key_id: k for k in (NAME_KEY, CODE_KEY)}
# A Bind plan: (parameter index, column, key slot, binary values taken as is) per protected parameter.
BindPlan = tuple[tuple[int, ProtectedColumn, int, bool], ...]
BIND_PLANS: tuple[BindPlan, ...] = (
    ((0, NAME, 0, True),),
    ((1, NAME, 0, True), (3, NAME, 0, False)),
    ((0, CODE, 0, True), (1, NAME, 1, True), (2, CODE, 0, False)),
    ((4, NAME, 0, True), (2, CODE, 1, True)),  # listed out of order
    ((0, NAME, 0, True), (40, NAME, 0, True)),  # past the parameters of most Binds
    (),
)


def _bind_native_args(plan: BindPlan) -> tuple[tuple[object, ...], tuple[object, ...]]:
    slots: dict[int, DataKey] = {}
    targets = []
    for index, col, slot, binary_ok in plan:
        codec = codec_for(col.declared_type)
        assert isinstance(codec, TextCodec)
        targets.append((index, slot, int(binary_ok), codec.max_chars, column_associated_data(col.column_id)))
        slots[slot] = NAME_KEY if col is NAME else CODE_KEY
    keys = tuple(envelope.native_sealer(slots[i]) for i in range(len(slots)))
    return tuple(targets), keys


def reference_seal_bind(plan: BindPlan, body: bytes) -> Outcome:
    """What the Python path does with a Bind of this plan (SessionCrypto._seal_params and
    codec.encode_bind_frame, for a UTF-8 client): ("malformed",) for a body the decoder refuses,
    ("python",) where a value's canonical form is not its bytes or fails (the native path hands those to
    Python), else the Bind with each sealed value opened: (message with the plaintexts, key id prefixes,
    count)."""
    try:
        frame = codec.decode_bind_frame(body)
    except CodecError:
        return ("malformed",)
    n = frame.param_count
    formats = [format_for(frame.param_formats, i) for i in range(n)]
    replaced: list[tuple[int, bytes]] = []
    prefixes = []
    for index, col, _slot, binary_ok in sorted(plan, key=lambda t: t[0]):
        if index >= n:
            continue
        value = frame.param(index)
        if value is None:
            continue
        if formats[index] == 1 and not binary_ok:
            return ("python",)
        try:
            canonical = codec_for(col.declared_type).canonical_from_text(value, FMT)
        except ProxyError:
            return ("python",)
        if canonical != value:
            return ("python",)
        replaced.append((index, value))
        prefixes.append((NAME_KEY if col is NAME else CODE_KEY).key_id)
        formats[index] = 1
    message = codec.encode_bind_frame(frame, tuple(formats), tuple(replaced))
    return (message, tuple(prefixes), len(replaced))


def native_seal_bind(plan: BindPlan, body: bytes) -> Outcome:
    """pgveil_accel.seal_bind's answer in the form of :func:`reference_seal_bind` (its envelopes opened
    with the column's key and associated data)."""
    targets, keys = _bind_native_args(plan)
    try:
        done = envelope._accel.seal_bind(body, targets, keys)
    except envelope._accel.Malformed:
        return ("malformed",)
    if done is None:
        return ("python",)
    message, count = done
    assert isinstance(message, bytes)
    t, length = codec.read_header(message)
    assert t == ord("B")
    assert length == len(message) - 1
    frame = codec.decode_bind_frame(message[5:])
    by_index = {index: col for index, col, _slot, _b in plan}
    replaced: list[tuple[int, bytes]] = []
    prefixes = []
    for i in range(frame.param_count):
        col = by_index.get(i)
        value = frame.param(i)
        if col is None or value is None:
            continue
        assert frame.param_formats[i] == 1
        plain = envelope.open_envelope(BIND_KEYS.__getitem__, value, column_associated_data(col.column_id))
        assert len(value) == len(plain) + envelope.MIN_LENGTH
        replaced.append((i, plain))
        prefixes.append(value[4:20])
    return (codec.encode_bind_frame(frame, None, tuple(replaced)), tuple(prefixes), count)


def check_bind(plan: BindPlan, body: bytes) -> None:
    expected = reference_seal_bind(plan, body)
    got = native_seal_bind(plan, body)
    assert got == expected, (got, expected)


def bind_seeds() -> list[bytes]:
    """Valid Bind bodies for every Bind plan: text and binary, NULLs, every format-list shape, values
    the native path takes and values it hands to Python."""
    values = (b"Ada", b"", "Zoë".encode(), b"abcd", b"abcde", b"ab\x00", b"\xff", None, "中文".encode())
    out: list[bytes] = []
    for p, _plan in enumerate(BIND_PLANS):
        for k in range(4):
            n = 2 + (p + k) % 4
            params = tuple(values[(p + k + i) % len(values)] for i in range(n))
            shapes: tuple[tuple[int, ...], ...] = ((), (0,), (1,), tuple((i + k) % 2 for i in range(n)))
            body = codec.encode_bind_body(m.Bind("p" * (k % 2), "s", shapes[k], params, (k % 2,) * (k // 2)))
            out.append(bytes([0x80 | p]) + body)
    return out


def _subject_id(kind: str, sid: bytes, binary: bool) -> bytes:
    """The id as the server sends it: text as written, binary as the type's send function."""
    if not binary or kind == "member":
        return sid
    if kind == "customer":
        return int(sid).to_bytes(8, "big", signed=True)
    return bytes.fromhex(sid.decode().replace("-", ""))


def _subject_seeds(index: int, plan: RowPlan, subjects: dict[int, tuple[str, bool]]) -> list[bytes]:
    """Valid runs of a subject-checked plan (each row's values under its subject's key, unchecked ones
    under a subject's key too), one with a value moved into another subject's row, and framing faults."""
    runs: list[list[bytes]] = [[], []]
    for i in range(3):
        ids = {at: SUBJECT_IDS[kind][i % 2] for at, (kind, _binary) in subjects.items()}
        for moved, bodies in enumerate(runs):
            values: list[bytes | None] = []
            for c, col in enumerate(plan):
                if c in subjects:
                    kind, binary = subjects[c]
                    values.append(_subject_id(kind, ids[c], binary))
                elif col is None:
                    values.append(b"%d" % i if (i + c) % 3 else None)
                elif col.column.subject_kind is None:
                    sealed = _seal_with_nonce(KEY, b"v%d" % i, col.associated, bytes([i, c]) * 6)
                    values.append(sealed if col.server_binary else b"\\x" + sealed.hex().encode())
                else:
                    kind = col.column.subject_kind
                    # The row's subject of that kind (an unchecked column of a table whose subject
                    # column is not in the result: any subject's key opens it).
                    same = [a for a, (k, _binary) in subjects.items() if k == kind]
                    at = col.subject_at if col.subject_at >= 0 else same[0] if same else -1
                    sid = ids[at] if at >= 0 else SUBJECT_IDS[kind][0]
                    if moved and i == 2:
                        sid = SUBJECT_IDS[kind][(i + 1) % 2]
                    plain = _VALUES[(index + i + c) % len(_VALUES)].encode()
                    sealed = _seal_with_nonce(SUBJECT_KEYS[(kind, sid)], plain, col.associated, bytes([i, c]) * 6)
                    values.append(sealed if col.server_binary else b"\\x" + sealed.hex().encode())
            bodies.append(_row(*values))
    run, moved_run = _frame(*runs[0]), _frame(*runs[1])
    return [
        bytes([index]) + run,
        bytes([index]) + moved_run,
        bytes([index]) + run[: len(run) - 3],
        bytes([index]) + _frame(runs[0][0]) + b"C\x00\x00\x00\x04",
    ]
