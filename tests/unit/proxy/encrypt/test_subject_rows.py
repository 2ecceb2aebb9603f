"""The DataRow path for columns with per-subject keys: values open with their subject's key in every
kernel, a value whose key is another subject's than its row's subject column fails (RowDecryptError,
authentication), and a run names every key id it needs at once."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import uuid
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keymgmt import envelope
from keymgmt.envelope import (
    DataKey,
    KeyState,
    Opener,
    Subject,
    _seal_with_nonce,
    column_associated_data,
    seal,
    subject_scope,
)
from proxy.encrypt import rows
from proxy.encrypt.engine import ColumnCrypto
from proxy.encrypt.rows import (
    Action,
    ColumnOutput,
    KeyLookup,
    RowDecryptError,
    RowPlan,
    rewrite_data_rows,
    run_key_ids,
)
from proxy.encrypt.subjects import InvalidSubject, subject_from_binary, subject_from_text
from proxy.pgtypes import SessionFormat, codec_for
from proxy.pgtypes.bytea import BYTEA
from proxy.policy.masks import compile_mask
from proxy.policy.model import Mask, MaskFunction
from proxy.protocol.codec import CodecError
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


# -- every kernel makes the same subject checks -------------------------------------------------------
# The subject check runs in the accelerator's kernel (pgveil_accel.c check_row_subjects) and in the Python
# loops (rows._check_subjects, the reference). Plans of checked columns (raw and hex text, decrypted and
# masked), unchecked ones (no subject column in the result) and a subject column that is copied or hidden
# from the client; subject ids of three type classes in both formats and many spellings (canonical, as
# PostgreSQL writes them, and others the canonicaliser must read the same); values under the row's
# subject's key, another subject's (moved), a column's key, a disabled, unknown or not yet fetched key.
# Every kernel must give the bytes the oracle computes, or the same refusal (column and reason), or the
# same key miss; and the same as each other on mutated runs.

KINDS = {
    "customer": SubjectColumn("customer", "id", "integer"),
    "device": SubjectColumn("device", "serial", "uuid"),
    "member": SubjectColumn("member", "name", "text"),
}
_CANONICAL: dict[str, tuple[bytes, ...]] = {
    "customer": (b"1", b"2", b"-7", b"0", b"9223372036854775807", b"-9223372036854775808"),
    "device": tuple(
        str(uuid.UUID(int=n * 0x0123456789ABCDEF0123456789ABCDEF % (1 << 128))).encode() for n in (1, 2, 3)
    ),
    "member": (b"ann", "Zoë".encode(), b"a b", "中".encode() * 40),  # the last one 120 bytes
}


def _subject_key(kind: str, canonical: bytes, salt: bytes = b"") -> DataKey:
    material = hashlib.sha256(kind.encode() + b"\x00" + canonical + salt).digest()
    return DataKey.from_material(material[:16], material, column_id=subject_scope(kind), subject=canonical)


SUBJECT_KEYS = {(kind, c): _subject_key(kind, c) for kind, ids in _CANONICAL.items() for c in ids}
# Sealed with while enabled; the lookup gives them disabled.
DISABLED_KEYS = {kind: _subject_key(kind, ids[0], b"disabled") for kind, ids in _CANONICAL.items()}
COLUMN_KEY = DataKey.from_material(b"\xc0" * 16, b"\xc1" * 32, column_id="public.t.note")
UNKNOWN_KEY = DataKey.from_material(b"\xd0" * 16, b"\xd1" * 32, column_id=subject_scope("customer"), subject=b"1")
MISSING_KEY = DataKey.from_material(b"\xe0" * 16, b"\xe1" * 32, column_id=subject_scope("customer"), subject=b"2")
ALL_KEYS: dict[bytes, DataKey] = {
    k.key_id: k
    for k in (
        *SUBJECT_KEYS.values(),
        *(d.with_state(KeyState.DISABLED) for d in DISABLED_KEYS.values()),
        COLUMN_KEY,
        MISSING_KEY,
    )
}


class Miss(Exception):
    """What the test's lookup raises for a key not in memory (the proxy's KeyMiss)."""


def miss_lookup(key_id: bytes) -> DataKey | None:
    if bytes(key_id) == MISSING_KEY.key_id:
        raise Miss(bytes(key_id))
    return ALL_KEYS.get(bytes(key_id))


def _spellings(kind: str, canonical: bytes, binary: bool) -> list[bytes]:
    """Ways the server (or a hostile one) may send the id ``canonical``: each names it."""
    if kind == "customer":
        n = int(canonical)
        forms = [n.to_bytes(8, "big", signed=True)] if binary else [canonical]
        if binary and -(1 << 31) <= n < (1 << 31):
            forms.append(n.to_bytes(4, "big", signed=True))
        if binary and -(1 << 15) <= n < (1 << 15):
            forms.append(n.to_bytes(2, "big", signed=True))
        if not binary:
            forms += [b" %d\n" % n, b"%+d" % n, (b"-" if n < 0 else b"") + b"00" + str(abs(n)).encode()]
            if n == 0:
                forms.append(b"-0")
            if abs(n) >= 10:
                forms.append(canonical[:-1] + b"_" + canonical[-1:])
        return forms
    if kind == "device":
        u = uuid.UUID(canonical.decode())
        if binary:
            return [u.bytes]
        return [canonical, canonical.upper(), u.hex.encode(), b"{" + canonical + b"}", b"urn:uuid:" + canonical]
    return [canonical]  # text ids are their bytes, in either format


# Ids that name no subject of their column's type (the row's values then match no subject's key).
_INVALID: dict[tuple[str, bool], tuple[bytes, ...]] = {
    ("customer", False): (
        b"",
        b"x",
        b"1.5",
        b"9223372036854775808",
        b"-9223372036854775809",
        "\uff15".encode(),
        b"1 2",
    ),
    ("customer", True): (b"", b"\x01", b"\x00\x00\x01", b"\x00" * 16),
    ("device", False): (b"", b"nope", b"0" * 31, b"g" * 32, b"{" + b"0" * 32, b"0" * 35 + b"g", b"0" * 36),
    ("device", True): (b"\x00" * 15, b"\x00" * 17, b""),
    ("member", False): (b"\xff", b"a\x00b", b"x" * 121, b"\xed\xa0\x80"),
    ("member", True): (b"\xc0\x80", b"\x00", b"y" * 200),
}

_NOTE_MASK = compile_mask(Mask(MaskFunction.PARTIAL), "text", None)


def _column(kind: str, name: str, attnum: int, table: str = "") -> ProtectedColumn:
    return ProtectedColumn("public", table or kind + "s", name, "text", attnum=attnum, table_oid=7, subject_kind=kind)


@dataclasses.dataclass(frozen=True)
class _Table:
    """A table with per-subject keys in a generated result: where its subject column is, of which kind,
    in which format, and whether the client gets it (a hidden one is NULL to the client, checked all the
    same)."""

    name: str
    at: int
    kind: str
    binary: bool
    hidden: bool


def _checked(out: ColumnOutput, table: _Table) -> ColumnOutput:
    return dataclasses.replace(
        out,
        subject_at=table.at,
        subject=KINDS[table.kind],
        subject_table=f"public.{table.name}",
        subject_binary=table.binary,
    )


@st.composite
def subject_runs(draw: st.DrawFn) -> tuple[RowPlan, bytes, Outcome]:
    """A plan, a run of DataRows and what the client must get (or the refusal, or the key miss). One or
    two tables (a join) with subject keys, each with its subject column somewhere in the row."""
    width = draw(st.integers(2, 6))
    positions = draw(st.lists(st.integers(0, width - 1), min_size=1, max_size=2 if width >= 3 else 1, unique=True))
    tables = [
        _Table(f"t{n}", at, draw(st.sampled_from(sorted(KINDS))), draw(st.booleans()), draw(st.integers(0, 3)) == 0)
        for n, at in enumerate(positions)
    ]
    by_position = {t.at: t for t in tables}
    plan: list[ColumnOutput | None] = []
    owner: dict[int, _Table] = {}  # an encrypted column's table
    for i in range(width):
        table = by_position.get(i)
        if table is not None:
            if table.hidden:
                plain = ProtectedColumn("public", table.name, KINDS[table.kind].column, "text", attnum=1, table_oid=7)
                plan.append(ColumnOutput(plain, codec_for("text"), b"", table.binary, False, action=Action.NULL))
            else:
                plan.append(None)
            continue
        if draw(st.integers(0, 3)) == 0:
            plan.append(None)
            continue
        table = draw(st.sampled_from(tables))
        col = _column(table.kind, f"c{i}", i + 2, table.name)
        cc = ColumnCrypto(col, codec_for("text"), column_associated_data(col.column_id))
        out = cc.output(server_binary=draw(st.booleans()), client_binary=draw(st.booleans()), fmt=FMT)
        if draw(st.booleans()):
            out = dataclasses.replace(out, action=Action.MASK, mask=_NOTE_MASK)
        if draw(st.integers(0, 4)) > 0:  # checked (the subject column is in the result); else keys alone
            out = _checked(out, table)
        owner[i] = table
        plan.append(out)
    if not owner:
        table = tables[0]
        col = _column(table.kind, "last", 9, table.name)
        cc = ColumnCrypto(col, codec_for("text"), column_associated_data(col.column_id))
        owner[len(plan)] = table
        plan.append(_checked(cc.output(server_binary=True, client_binary=False, fmt=FMT), table))
    # A third of the runs hold only values that open (under their row's subject's key or a column's), so
    # that runs of several tables and rows get through the checks too.
    clean = draw(st.integers(0, 2)) == 0
    choices = (
        ["own", "own", "column", "null"]
        if clean
        else ["own"] * 3 + ["moved", "kind", "column", "disabled", "unknown", "miss", "null"]
    )
    bodies: list[bytes] = []
    expected: list[bytes] = []
    outcome: Outcome | None = None
    for r in range(draw(st.integers(1, 4))):
        named: dict[str, bytes | None] = {}  # per table: the subject its row names (None: none)
        raws: dict[str, bytes | None] = {}
        for t in tables:
            canonical: bytes | None = draw(st.sampled_from(_CANONICAL[t.kind]))
            if not clean and draw(st.integers(0, 5)) == 0:
                raws[t.name] = None if draw(st.booleans()) else draw(st.sampled_from(_INVALID[(t.kind, t.binary)]))
                canonical = None
            else:
                assert canonical is not None
                raws[t.name] = draw(st.sampled_from(_spellings(t.kind, canonical, t.binary)))
            named[t.name] = canonical
        values: list[bytes | None] = []
        client: list[bytes | None] = []
        refusal: Outcome | None = None  # from the subject checks, made before any value is opened
        opened: Outcome | None = None  # the first value that does not open
        for i, entry in enumerate(plan):
            if i in by_position:
                table = by_position[i]
                values.append(raws[table.name])
                client.append(None if table.hidden else raws[table.name])
                continue
            if entry is None:
                value = draw(st.one_of(st.none(), st.binary(max_size=12)))
                values.append(value)
                client.append(value)
                continue
            out = entry
            table = owner[i]
            kind, subject = table.kind, named[table.name]
            which = draw(st.sampled_from(choices))
            if which == "null":
                values.append(None)
                client.append(None)
                continue
            if which == "own" and subject is None:
                which = "moved"
            if which == "own":
                assert subject is not None
                k = SUBJECT_KEYS[(kind, subject)]
            elif which == "moved":
                k = SUBJECT_KEYS[(kind, draw(st.sampled_from([c for c in _CANONICAL[kind] if c != subject])))]
            elif which == "kind":  # a subject of another kind
                other = draw(st.sampled_from(sorted(k for k in KINDS if k != kind)))
                k = SUBJECT_KEYS[(other, draw(st.sampled_from(_CANONICAL[other])))]
            elif which == "column":
                k = COLUMN_KEY
            elif which == "disabled":
                k = DISABLED_KEYS[kind]
            elif which == "unknown":
                k = UNKNOWN_KEY
            else:
                k = MISSING_KEY
            plaintext = draw(st.text(st.characters(codec="utf-8", blacklist_characters="\x00"), max_size=8)).encode()
            env = _seal_with_nonce(k, plaintext, out.associated, bytes([r, i]) * 6)
            if out.server_binary:
                values.append(env)
            elif draw(st.integers(0, 9)) == 0:
                values.append(BYTEA.to_text(env, dataclasses.replace(FMT, bytea_output="escape")))
            else:
                values.append(b"\\x" + env.hex().encode())
            if refusal is None and out.subject_at >= 0 and which not in ("column", "disabled", "unknown"):
                if which == "miss":
                    refusal = ("miss", MISSING_KEY.key_id)
                elif k.data_subject != (None if subject is None else Subject(kind, subject)):
                    refusal = ("refused", out.column.column_id, "authentication")
            if opened is None and which in ("disabled", "unknown", "miss"):
                reason = {"disabled": "disabled_key", "unknown": "unknown_key"}.get(which)
                opened = ("miss", MISSING_KEY.key_id) if reason is None else ("refused", out.column.column_id, reason)
            client.append(_NOTE_MASK(plaintext) if out.action is Action.MASK else plaintext)
        bodies.append(data_row(*values))
        if outcome is None:
            outcome = refusal or opened
        expected.append(data_row(*client))
    data = frame_bodies(*bodies)
    return tuple(plan), data, outcome if outcome is not None else frame_bodies(*expected)


def data_row(*values: bytes | None) -> bytes:
    return struct.pack("!h", len(values)) + b"".join(
        struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v for v in values
    )


def frame_bodies(*bodies: bytes) -> bytes:
    return b"".join(b"D" + struct.pack("!I", len(b) + 4) + b for b in bodies)


Outcome = bytes | tuple[object, ...]


def kernels(data: bytes, plan: RowPlan, keys: KeyLookup = miss_lookup) -> dict[str, Outcome]:
    """The outcome of every kernel that can run ``plan`` on ``data``: the dispatch the proxy runs, the
    general loop and the fast one with the Python and the accelerator's Opener, the accelerator's kernel."""
    compiled = rows._compile(plan)
    _, steps, fast, native, _unchanged, _subjects, checks, native_checks = compiled
    runs: dict[str, Callable[[], bytes]] = {
        "dispatch": lambda: rewrite_data_rows(data, 0, len(data), plan, keys, FMT, {}),
    }
    openers = {"py": Opener(keys, python=True)}
    if envelope._accel is not None:
        openers["c"] = Opener(keys)
    for name, opener in openers.items():
        check = rows.subject_checker(checks, keys, {})
        runs[f"general-{name}"] = lambda o=opener, c=check: rows._rewrite_general(  # type: ignore[misc]
            data, 0, len(data), plan, steps, o.open, FMT, c
        )
        if fast is not None:
            runs[f"fast-{name}"] = lambda o=opener, c=check: rows._rewrite_fast(
                data, 0, len(data), plan, fast, o.open, c
            )  # type: ignore[misc]
    if native is not None and envelope._accel is not None:
        runs["native"] = lambda: rows._rewrite_native(data, 0, len(data), plan, native, Opener(keys), native_checks)
    outcomes: dict[str, Outcome] = {}
    for name, run in runs.items():
        try:
            outcomes[name] = run()
        except RowDecryptError as e:
            outcomes[name] = ("refused", e.column.column_id, e.reason)
        except (struct.error, CodecError):
            outcomes[name] = ("malformed",)
        except rows._Unsupported:
            outcomes[name] = ("unsupported",)  # the accelerator leaves escape-format bytea to the Python loops
        except Miss as e:
            outcomes[name] = ("miss", e.args[0])
    return outcomes


def test_the_accelerator_runs_subject_checked_plans() -> None:
    plan = (None, output(binary=True, subject_at=0), output(binary=False, subject_at=0))
    compiled = rows._compile(plan)
    assert [c.index for c in compiled[6]] == [1, 2]
    if envelope._accel is not None:
        assert rows._NATIVE_SUBJECT_CHECKS
        assert compiled[3] is not None
        assert compiled[7] is not None
        assert len(compiled[7]) == 2
    assert rows._compile((None, output(binary=True)))[7] is None  # nothing to check


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subject_runs())
def test_every_kernel_makes_the_oracles_subject_checks(case: tuple[RowPlan, bytes, Outcome]) -> None:
    plan, data, expected = case
    outcomes = kernels(data, plan)
    for name, got in outcomes.items():
        if name == "native" and got == ("unsupported",):
            continue  # escape-format bytea text: the dispatch's outcome (checked) is the Python loops'
        assert got == expected, name


@st.composite
def mutated_subject_runs(draw: st.DrawFn) -> tuple[RowPlan, bytes]:
    plan, data, _expected = draw(subject_runs())
    raw = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        edit = draw(st.integers(0, 3))
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        if edit == 0 and at < len(raw):
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == 1:
            del raw[at : at + draw(st.integers(1, 8))]
        elif edit == 2:
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif at + 4 <= len(raw):
            raw[at : at + 4] = draw(st.integers(-(2**31), 2**31 - 1)).to_bytes(4, "big", signed=True)
    return plan, bytes(raw)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_subject_runs())
def test_every_kernel_agrees_on_mutated_subject_checked_runs(case: tuple[RowPlan, bytes]) -> None:
    """Any byte flipped, cut, inserted or overwritten (framing, lengths, ids, envelopes): the same outcome."""
    plan, data = case
    outcomes = kernels(data, plan)
    reference = outcomes["general-py"]
    for name, got in outcomes.items():
        if name == "native" and got == ("unsupported",):
            continue
        assert got == reference, name


def _id_strategy(binary: bool) -> st.SearchStrategy[bytes]:
    spelled = st.sampled_from(sorted(KINDS)).flatmap(
        lambda kind: st.sampled_from([s for c in _CANONICAL[kind] for s in _spellings(kind, c, binary)])
    )
    invalid = st.sampled_from(sorted({v for (_kind, b), values in _INVALID.items() if b == binary for v in values}))
    # Near the limits: 19 and 20 digits, 120 and 121 bytes, a uuid with one character off.
    edges = st.sampled_from(
        [
            b"9223372036854775807",
            b"-9223372036854775808",
            b"9223372036854775808",
            b"-9223372036854775809",
            b"10000000000000000000",
            b"1" * 19,
            b"9" * 19,
            b"-" + b"9" * 19,
            b"-" + b"1" * 18,
            b"x" * 120,
            b"x" * 121,
            "é".encode() * 60,
            b"00000000-0000-0000-0000-00000000000g",
            b"00000000-0000-0000-0000-00000000000A",
            b"00000000-0000-0000-0000-0000000000000",
            b"00000000_0000-0000-0000-000000000000",
        ]
    )
    return st.one_of(st.binary(max_size=40), spelled, invalid, edges, st.text(max_size=40).map(str.encode))


@settings(max_examples=800, deadline=None)
@given(st.sampled_from(sorted(KINDS)), st.booleans(), st.data())
def test_the_accelerator_reads_every_subject_id_as_the_reference_does(
    kind: str, binary: bool, data: st.DataObject
) -> None:
    """Any bytes as the subject id (canonical or not, valid or not): every kernel delivers the value of
    exactly the subject subjects.py reads from them. The value's key names that subject, another one, or
    (for an id that is no id of its type) the raw bytes themselves, which a kernel that took them for a
    canonical id would accept."""
    raw = data.draw(_id_strategy(binary))
    subject = KINDS[kind]
    read = subject_from_binary if binary else subject_from_text
    try:
        named: bytes | None = read("public.t", subject, raw).subject_id
    except InvalidSubject:
        named = None
    choices = [c for c in _CANONICAL[kind] if c != named] + [named if named is not None else raw]
    if len(raw) <= 150:
        choices.append(raw)
    k = _subject_key(kind, data.draw(st.sampled_from(choices)))
    col = _column(kind, "c", 2)
    cc = ColumnCrypto(col, codec_for("text"), column_associated_data(col.column_id))
    out = _checked(cc.output(server_binary=True, client_binary=False, fmt=FMT), _Table("t", 0, kind, binary, False))
    run = frame_bodies(data_row(raw, seal(k, b"v", out.associated)))
    expected: Outcome = (
        frame_bodies(data_row(raw, b"v"))
        if named is not None and k.subject == named
        else ("refused", col.column_id, "authentication")
    )
    keys: dict[bytes, DataKey] = {k.key_id: k}
    outcomes = kernels(run, (None, out), keys.get)
    assert outcomes == dict.fromkeys(outcomes, expected)


def test_a_join_checks_each_value_against_its_own_tables_subject_column() -> None:
    """Two tables with subject keys in one result (a join): each value's key is held to its own table's
    subject column, whatever kind, type and format each has."""
    a, b = _Table("t0", 0, "customer", False, False), _Table("t1", 2, "device", True, False)
    col_a, col_b = _column("customer", "ca", 2, "t0"), _column("device", "cb", 3, "t1")
    outs = [
        _checked(
            ColumnCrypto(c, codec_for("text"), column_associated_data(c.column_id)).output(
                server_binary=binary, client_binary=False, fmt=FMT
            ),
            t,
        )
        for c, t, binary in ((col_a, a, True), (col_b, b, False))
    ]
    plan: RowPlan = (None, outs[0], None, outs[1])
    device = uuid.UUID(_CANONICAL["device"][1].decode())
    for cust, dev, ok in ((b"2", _CANONICAL["device"][1], True), (b"2", _CANONICAL["device"][0], False)):
        ka, kb = SUBJECT_KEYS[("customer", b"2")], SUBJECT_KEYS[("device", dev)]
        va = seal(ka, b"a", outs[0].associated)
        vb = b"\\x" + seal(kb, b"b", outs[1].associated).hex().encode()
        run = frame_bodies(data_row(cust, va, device.bytes, vb))
        expected: Outcome = (
            frame_bodies(data_row(cust, b"a", device.bytes, b"b"))
            if ok
            else ("refused", col_b.column_id, "authentication")
        )
        outcomes = kernels(run, plan)
        assert outcomes == dict.fromkeys(outcomes, expected)


def test_one_tables_subject_column_at_two_positions_is_read_at_each() -> None:
    """Not a plan the engine makes (it checks only against a subject column that appears once), but the
    kernels must not take one position's id for the other's where the checks share a canonicaliser."""
    first, second = _Table("t0", 0, "customer", False, False), _Table("t0", 2, "customer", False, False)
    col = _column("customer", "c", 2, "t0")
    cc = ColumnCrypto(col, codec_for("text"), column_associated_data(col.column_id))
    base = cc.output(server_binary=True, client_binary=False, fmt=FMT)
    plan: RowPlan = (None, _checked(base, first), None, _checked(base, second))
    checks = rows._compile(plan)[6]
    assert checks[0].canonical is checks[1].canonical
    k1, k2 = SUBJECT_KEYS[("customer", b"1")], SUBJECT_KEYS[("customer", b"2")]
    run = frame_bodies(data_row(b"1", seal(k1, b"a", base.associated), b"2", seal(k2, b"b", base.associated)))
    outcomes = kernels(run, plan)
    assert outcomes == dict.fromkeys(outcomes, frame_bodies(data_row(b"1", b"a", b"2", b"b")))


def _near_miss_values() -> list[tuple[str, bytes, str]]:
    """Checked values that do or do not start like an envelope, each under another subject's key: (name,
    stored value, the reason every kernel refuses it with): the subject check's for one it reads, the
    open's for one it leaves alone."""
    env = seal(SUBJECT_KEYS[("customer", b"2")], b"moved", column_associated_data("public.t0.c"))
    hexed = b"\\x" + env.hex().encode()
    return [
        ("hex", hexed, "authentication"),
        ("hex, upper case", b"\\x" + env.hex().upper().encode(), "authentication"),
        ("hex, odd length", hexed + b"0", "not_an_envelope"),
        ("hex, short", b"\\x" + env[:47].hex().encode(), "not_an_envelope"),
        ("hex, bad digit in the key id", hexed[:20] + b"g" + hexed[21:], "not_an_envelope"),
        ("hex, bad digit after the key id", hexed[:50] + b"g" + hexed[51:], "authentication"),
        ("hex, another version", hexed[:6] + b"02" + hexed[8:], "not_an_envelope"),
        ("escape text", BYTEA.to_text(env, dataclasses.replace(FMT, bytea_output="escape")), "authentication"),
        (
            "escape text, short",
            BYTEA.to_text(env[:40], dataclasses.replace(FMT, bytea_output="escape")),
            "not_an_envelope",
        ),
        ("empty", b"", "not_an_envelope"),
    ]


@pytest.mark.parametrize(("name", "value", "reason"), _near_miss_values(), ids=[v[0] for v in _near_miss_values()])
def test_what_the_subject_check_reads_as_an_envelope(name: str, value: bytes, reason: str) -> None:
    col = _column("customer", "c", 2, "t0")
    cc = ColumnCrypto(col, codec_for("text"), column_associated_data(col.column_id))
    out = _checked(
        cc.output(server_binary=False, client_binary=False, fmt=FMT), _Table("t0", 0, "customer", False, False)
    )
    outcomes = kernels(frame_bodies(data_row(b"1", value)), (None, out))
    if outcomes.get("native") == ("unsupported",):
        assert value[:2] != b"\\x"  # escape text is the Python loops' (the dispatch gives their outcome)
        del outcomes["native"]
    assert outcomes == dict.fromkeys(outcomes, ("refused", col.column_id, reason))


@pytest.mark.parametrize("binary", [True, False])
def test_what_the_subject_check_reads_as_a_raw_envelope(binary: bool) -> None:
    env = seal(SUBJECT_KEYS[("customer", b"2")], b"moved", column_associated_data("public.t0.c"))
    col = _column("customer", "c", 2, "t0")
    cc = ColumnCrypto(col, codec_for("text"), column_associated_data(col.column_id))
    out = _checked(
        cc.output(server_binary=True, client_binary=False, fmt=FMT), _Table("t0", 0, "customer", binary, False)
    )
    subject = struct.pack("!i", 1) if binary else b"1"
    for value, reason in (
        (env, "authentication"),
        (env[:47], "not_an_envelope"),
        (env[:2] + b"\x02" + env[3:], "not_an_envelope"),
        (env[:48], "authentication"),  # framed like an envelope (of no plaintext): checked, and moved
    ):
        outcomes = kernels(frame_bodies(data_row(subject, value)), (None, out))
        assert outcomes == dict.fromkeys(outcomes, ("refused", col.column_id, reason))


def test_a_key_not_in_memory_raises_before_anything_is_written_and_the_retry_delivers() -> None:
    """The subject check looks keys up as the open does: a key to fetch is the lookup's signal (the proxy's
    KeyMiss, which fetches the run's keys and retries it), whichever row needs it, and nothing is returned."""
    fetched: dict[bytes, DataKey] = {}

    def lookup_(key_id: bytes) -> DataKey | None:
        if bytes(key_id) not in fetched:
            raise Miss(bytes(key_id))
        return fetched[bytes(key_id)]

    out = output(binary=True, subject_at=0)
    run = frame(*((str(n).encode(), stored(key(n), b"v%d" % n, binary=True)) for n in (1, 2, 3)))
    for n in (1, 2, 3):
        outcomes = kernels(run, (None, out), lookup_)
        assert set(outcomes.values()) == {("miss", key(n).key_id)}
        fetched[key(n).key_id] = key(n)
    assert set(kernels(run, (None, out), lookup_).values()) == {frame((b"1", b"v1"), (b"2", b"v2"), (b"3", b"v3"))}


@pytest.mark.skipif(envelope._accel is None, reason="the accelerator is not loaded (not built, or PGVEIL_IMPL=python)")
@pytest.mark.parametrize("subjects", [1, 40, 1000, 5000])
def test_the_accelerators_opener_keeps_many_subjects_keys(subjects: int) -> None:
    """The native Opener's key table grows with the keys a result uses: a thousand data subjects' keys are
    found by one callback each, not evicting each other pass after pass (some 280 callbacks a pass with
    the fixed 1,024 slots it had); beyond its largest table, keys replace each other and still open."""
    ks = [
        DataKey.from_material(
            hashlib.sha256(b"id%d" % n).digest()[:16],
            hashlib.sha256(b"key%d" % n).digest(),
            column_id=subject_scope("customer"),
            subject=str(n).encode(),
        )
        for n in range(subjects)
    ]
    table: dict[bytes, DataKey] = {k.key_id: k for k in ks}
    calls: list[bytes] = []

    def find(prefix: bytes) -> object:
        calls.append(prefix)
        return table[prefix[4:]]._cipher

    associated = column_associated_data(EMAIL.column_id)
    envelopes = [seal(k, b"v%d" % n, associated) for n, k in enumerate(ks)]
    opener = envelope._accel.Opener(find, envelope.OpenFailed)
    for _ in range(3):
        for n, env in enumerate(envelopes):
            assert opener.open(env, 0, len(env), associated) == b"v%d" % n
    assert len(set(calls)) == subjects
    if subjects <= 1000:
        assert len(calls) <= subjects * 1.01


@pytest.mark.skipif(envelope._accel is None, reason="the accelerator is not loaded (not built, or PGVEIL_IMPL=python)")
def test_the_accelerator_refuses_checks_it_cannot_make_and_lets_the_canonicalisers_errors_through() -> None:
    """rewrite_rows' checks argument is held to its shape before any row is read: a check of a column it
    does not decrypt, a subject column outside the row, an unknown type class, a kind too long, a
    canonicaliser that is not callable or returns something else than bytes or None."""
    out = output(binary=True, subject_at=0)
    compiled = rows._compile((None, out))
    columns, checks = compiled[3], compiled[7]
    assert columns is not None
    assert checks is not None
    (check,) = checks
    opener = Opener(lookup)
    run = frame((b" 1", stored(key(1), b"a", binary=True)))  # " 1" is no canonical form: the canonicaliser reads it
    assert envelope._accel.rewrite_rows(run, 0, len(run), columns, opener.native, (check,)) == frame((b" 1", b"a"))
    bad = [
        ((0, *check[1:]), ValueError),  # column 0 is copied, not decrypted
        ((2, *check[1:]), ValueError),
        ((check[0], 2, *check[2:]), ValueError),
        ((check[0], -1, *check[2:]), ValueError),
        ((*check[:2], 4, *check[3:]), ValueError),
        ((*check[:4], b"\x00" * 189, check[5]), ValueError),
        ((*check[:5], None), TypeError),
        (check[:5], TypeError),
        ((*check[:5], lambda raw: "1"), TypeError),
        ((1 << 70, *check[1:]), OverflowError),
    ]
    for item, error in bad:
        with pytest.raises(error):
            envelope._accel.rewrite_rows(run, 0, len(run), columns, opener.native, (item,))

    def fails(raw: bytes) -> bytes | None:
        raise LookupError("the canonicaliser's own error")

    with pytest.raises(LookupError):
        envelope._accel.rewrite_rows(run, 0, len(run), columns, opener.native, ((*check[:5], fails),))
