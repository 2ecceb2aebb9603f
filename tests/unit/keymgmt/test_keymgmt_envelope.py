from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from keymgmt import envelope
from keymgmt.envelope import (
    HEADER_LENGTH,
    MIN_LENGTH,
    DataKey,
    KeyState,
    Opener,
    OpenFailed,
    OpenFailure,
    Subject,
    _seal_with_nonce,
    column_associated_data,
    is_envelope,
    key_id_from_uuid,
    key_id_to_uuid,
    open_envelope,
    peek_key_id,
    seal,
    subject_scope,
)
from keymgmt.errors import DecryptionFailed, KeyDisabled, KeyManagementError, UnknownKey

VECTOR_KEY = bytes(range(32))
VECTOR_KEY_ID = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff").bytes
VECTOR_NONCE = bytes(range(0xA0, 0xAC))
VECTOR_PLAINTEXT = b"pgveil test vector"
VECTOR_COLUMN = "public.users.email"
# Computed once with AESGCM directly over the documented layout; pinned so that neither the module
# nor this file's layout helper can drift silently.
VECTOR_ENVELOPE = bytes.fromhex(
    "5056010100112233445566778899aabbccddeeffa0a1a2a3a4a5a6a7a8a9aaab"
    "967f0a482ca722cb0716f3f3711fa3aa1fde8af5ae706371fe3fa2a823ab7b09fc00"
)
# Subject (customer, "42"): associated data header · 0x00 · column · 0x00 · u16 8 · customer · u32 2 · 42.
VECTOR_SUBJECT_ENVELOPE = bytes.fromhex(
    "5056010100112233445566778899aabbccddeeffa0a1a2a3a4a5a6a7a8a9aaab"
    "967f0a482ca722cb0716f3f3711fa3aa1fdef2a384e4e66934d240a936a9830aa129"
)


def vector_key(state: KeyState = KeyState.ENABLED) -> DataKey:
    return DataKey.from_material(VECTOR_KEY_ID, VECTOR_KEY, state=state, column_id=VECTOR_COLUMN)


def lookup_for(*keys: DataKey) -> dict[bytes, DataKey]:
    return {k.key_id: k for k in keys}


def strict_lookup(*keys: DataKey) -> Callable[[bytes], DataKey]:
    table = lookup_for(*keys)

    def lookup(key_id: bytes) -> DataKey:
        try:
            return table[key_id]
        except KeyError:
            raise UnknownKey() from None

    return lookup


def layout(key: bytes, key_id: bytes, nonce: bytes, plaintext: bytes, associated_tail: bytes) -> bytes:
    """The documented layout, rebuilt independently of the module."""
    header = b"PV" + b"\x01" + b"\x01" + key_id + nonce
    assert len(header) == 32
    return header + AESGCM(key).encrypt(nonce, plaintext, header + associated_tail)


def test_fixed_vector_column_scope() -> None:
    associated = column_associated_data(VECTOR_COLUMN)
    assert associated == b"\x00public.users.email"
    sealed = _seal_with_nonce(vector_key(), VECTOR_PLAINTEXT, associated, VECTOR_NONCE)
    assert sealed == VECTOR_ENVELOPE
    assert sealed == layout(VECTOR_KEY, VECTOR_KEY_ID, VECTOR_NONCE, VECTOR_PLAINTEXT, b"\x00public.users.email")
    assert open_envelope(strict_lookup(vector_key()), sealed, associated) == VECTOR_PLAINTEXT


def test_fixed_vector_subject_scope() -> None:
    associated = column_associated_data(VECTOR_COLUMN, Subject("customer", b"42"))
    assert associated == b"\x00public.users.email\x00\x00\x08customer\x00\x00\x00\x0242"
    sealed = _seal_with_nonce(vector_key(), VECTOR_PLAINTEXT, associated, VECTOR_NONCE)
    assert sealed == VECTOR_SUBJECT_ENVELOPE
    assert sealed == layout(VECTOR_KEY, VECTOR_KEY_ID, VECTOR_NONCE, VECTOR_PLAINTEXT, associated)


def subject_key(kind: str = "customer", subject_id: bytes = b"42") -> DataKey:
    return DataKey.from_material(VECTOR_KEY_ID, VECTOR_KEY, column_id=subject_scope(kind), subject=subject_id)


def test_a_subject_key_adds_its_subject_to_the_associated_data() -> None:
    key = subject_key()
    assert key.data_subject is not None
    assert key.data_subject.kind == "customer"
    # The data path passes the column's part; the key adds the subject's: the same bytes as the vector.
    sealed = _seal_with_nonce(key, VECTOR_PLAINTEXT, column_associated_data(VECTOR_COLUMN), VECTOR_NONCE)
    assert sealed == VECTOR_SUBJECT_ENVELOPE
    assert open_envelope(strict_lookup(key), sealed, column_associated_data(VECTOR_COLUMN)) == VECTOR_PLAINTEXT
    for python in (True, False):  # the accelerator's Opener adds the key's subject part as Python's does
        opener = Opener(strict_lookup(key), python=python)
        assert opener.open(sealed, 0, len(sealed), column_associated_data(VECTOR_COLUMN)) == VECTOR_PLAINTEXT
    # The same material as another subject's (or a column's) key does not open it.
    for other in (subject_key(subject_id=b"43"), subject_key(kind="supplier"), vector_key()):
        with pytest.raises(DecryptionFailed):
            open_envelope(strict_lookup(other), sealed, column_associated_data(VECTOR_COLUMN))
        for python in (True, False):
            with pytest.raises(OpenFailed):
                Opener(strict_lookup(other), python=python).open(
                    sealed, 0, len(sealed), column_associated_data(VECTOR_COLUMN)
                )
    with pytest.raises(DecryptionFailed):
        open_envelope(strict_lookup(key), sealed, column_associated_data("public.users.name"))


@given(
    a=st.tuples(st.text(min_size=1, max_size=4), st.text(min_size=1, max_size=4), st.binary(max_size=4)),
    b=st.tuples(st.text(min_size=1, max_size=4), st.text(min_size=1, max_size=4), st.binary(max_size=4)),
)
def test_distinct_column_subject_pairs_give_distinct_associated_data(
    a: tuple[str, str, bytes], b: tuple[str, str, bytes]
) -> None:
    def data(t: tuple[str, str, bytes]) -> bytes | None:
        column, kind, subject_id = t
        if "\x00" in column or "\x00" in kind:
            return None
        return column_associated_data(column, Subject(kind, subject_id))

    da, db = data(a), data(b)
    if da is not None and db is not None and a != b:
        assert da != db
        assert da != column_associated_data(b[0])
        assert db != column_associated_data(a[0])


def test_subject_repr_shows_lengths_only() -> None:
    assert "42" not in repr(Subject("customer", b"4242"))
    assert "<4 bytes>" in repr(Subject("customer", b"4242"))


def test_layout_fields() -> None:
    sealed = seal(vector_key(), b"abc", column_associated_data("s.t.c"))
    assert sealed[:2] == b"PV"
    assert sealed[2] == 0x01
    assert sealed[3] == 0x01
    assert sealed[4:20] == VECTOR_KEY_ID
    assert len(sealed) == HEADER_LENGTH + 3 + 16
    assert peek_key_id(sealed) == VECTOR_KEY_ID
    assert is_envelope(sealed)


def test_empty_plaintext_gives_minimum_length() -> None:
    sealed = seal(vector_key(), b"", column_associated_data("s.t.c"))
    assert len(sealed) == MIN_LENGTH == 48
    assert open_envelope(strict_lookup(vector_key()), sealed, column_associated_data("s.t.c")) == b""


def test_nonces_are_fresh_per_seal() -> None:
    associated = column_associated_data("s.t.c")
    envelopes = {seal(vector_key(), b"same", associated) for _ in range(64)}
    assert len(envelopes) == 64
    assert len({e[20:32] for e in envelopes}) == 64


def test_every_single_byte_flip_fails() -> None:
    key = vector_key()
    associated = column_associated_data(VECTOR_COLUMN)
    sealed = seal(key, b"a secret worth protecting", associated)

    # The lookup ignores the key id and always hands back the right key, so a flipped key id is
    # caught by the header being authenticated, not by the lookup.
    def any_id(_: bytes) -> DataKey:
        return key

    for position in range(len(sealed)):
        for mask in (0x01, 0x80, 0xFF):
            tampered = bytearray(sealed)
            tampered[position] ^= mask
            with pytest.raises(DecryptionFailed):
                open_envelope(any_id, bytes(tampered), associated)


def test_truncation_and_extension_fail() -> None:
    key = vector_key()
    associated = column_associated_data(VECTOR_COLUMN)
    sealed = seal(key, b"0123456789", associated)
    for length in range(len(sealed)):
        with pytest.raises(DecryptionFailed):
            open_envelope(strict_lookup(key), sealed[:length], associated)
    with pytest.raises(DecryptionFailed):
        open_envelope(strict_lookup(key), sealed + b"\x00", associated)


def test_column_swap_fails() -> None:
    key = vector_key()
    sealed = seal(key, b"alice@example.com", column_associated_data("public.users.email"))
    with pytest.raises(DecryptionFailed):
        open_envelope(strict_lookup(key), sealed, column_associated_data("public.users.phone"))
    with pytest.raises(DecryptionFailed):
        open_envelope(strict_lookup(key), sealed, column_associated_data("public.customers.email"))


def test_subject_swap_fails() -> None:
    key = vector_key()
    alice = Subject("customer", b"alice")
    sealed = seal(key, b"alice@example.com", column_associated_data("public.users.email", alice))
    for other in (Subject("customer", b"bob"), Subject("customer", b""), None, Subject("customer", b"alice\x00")):
        with pytest.raises(DecryptionFailed):
            open_envelope(strict_lookup(key), sealed, column_associated_data("public.users.email", other))


def test_column_scope_and_empty_subject_differ() -> None:
    assert column_associated_data("s.t.c") != column_associated_data("s.t.c", Subject("k", b""))
    # a subject cannot be smuggled into the column id: NUL is refused there
    with pytest.raises(ValueError, match="NUL"):
        column_associated_data("s.t.c\x00x")
    with pytest.raises(ValueError, match="non-empty"):
        column_associated_data("")


def test_wrong_key_material_fails() -> None:
    sealed = seal(vector_key(), b"x", column_associated_data("s.t.c"))
    impostor = DataKey.from_material(VECTOR_KEY_ID, bytes(32))
    with pytest.raises(DecryptionFailed):
        open_envelope(strict_lookup(impostor), sealed, column_associated_data("s.t.c"))


def test_unknown_key_comes_from_lookup() -> None:
    sealed = seal(vector_key(), b"x", column_associated_data("s.t.c"))
    with pytest.raises(UnknownKey):
        open_envelope(strict_lookup(), sealed, column_associated_data("s.t.c"))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: b"PX" + e[2:],
        lambda e: e[:2] + b"\x02" + e[3:],
        lambda e: e[:3] + b"\x02" + e[4:],
        lambda e: e[:20],
    ],
    ids=["magic", "version", "algorithm", "short"],
)
def test_framing_failures(mutate: Callable[[bytes], bytes]) -> None:
    sealed = seal(vector_key(), b"x", column_associated_data("s.t.c"))
    bad = mutate(sealed)
    assert not is_envelope(bad)
    with pytest.raises(DecryptionFailed):
        peek_key_id(bad)
    with pytest.raises(DecryptionFailed):
        open_envelope(strict_lookup(vector_key()), bad, column_associated_data("s.t.c"))


def test_failure_message_does_not_say_which_check_failed() -> None:
    key = vector_key()
    associated = column_associated_data("s.t.c")
    sealed = seal(key, b"x", associated)
    tag_flip = sealed[:-1] + bytes([sealed[-1] ^ 1])
    messages = set()
    for bad in (b"PX" + sealed[2:], sealed[:10], tag_flip):
        with pytest.raises(DecryptionFailed) as info:
            open_envelope(strict_lookup(key), bad, associated)
        assert type(info.value) is OpenFailed  # the same type whatever failed; the reason is for the log
        assert info.value.__cause__ is None
        # cryptography's InvalidTag is converted once and not shown as the context
        assert info.value.__context__ is None or info.value.__suppress_context__
        messages.add(str(info.value))
    assert len(messages) == 1
    assert DecryptionFailed.sqlstate == "XX001"
    assert UnknownKey.sqlstate == "XX001"


def test_disabled_key_neither_seals_nor_opens() -> None:
    associated = column_associated_data("s.t.c")
    sealed = seal(vector_key(), b"x", associated)
    disabled = vector_key().with_state(KeyState.DISABLED)
    with pytest.raises(KeyDisabled):
        seal(disabled, b"x", associated)
    with pytest.raises(KeyDisabled):
        open_envelope(strict_lookup(disabled), sealed, associated)
    assert issubclass(KeyDisabled, KeyManagementError)


def test_data_key_hides_material() -> None:
    key = DataKey.from_material(VECTOR_KEY_ID, VECTOR_KEY, column_id="s.t.c", subject=b"alice", version=3)
    text = repr(key)
    assert str(uuid.UUID(bytes=VECTOR_KEY_ID)) in text
    assert VECTOR_KEY.hex() not in text
    assert "alice" not in text
    assert "<5 bytes>" in text
    assert not hasattr(key, "__dict__")
    assert not any(getattr(key, name, None) == VECTOR_KEY for name in DataKey.__slots__)


def test_data_key_validation() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        DataKey.from_material(b"short", VECTOR_KEY)
    with pytest.raises(ValueError, match="32 bytes"):
        DataKey.from_material(VECTOR_KEY_ID, VECTOR_KEY[:16])
    with pytest.raises(ValueError, match="destroyed"):
        DataKey.from_material(VECTOR_KEY_ID, VECTOR_KEY, state=KeyState.DESTROYED)


def test_key_id_uuid_round_trip() -> None:
    u = uuid.uuid4()
    assert key_id_to_uuid(key_id_from_uuid(u)) == u
    assert vector_key().key_uuid == uuid.UUID(bytes=VECTOR_KEY_ID)


def test_seal_with_nonce_rejects_bad_nonce() -> None:
    with pytest.raises(ValueError, match="12 bytes"):
        _seal_with_nonce(vector_key(), b"x", b"", b"\x00" * 8)


@given(
    plaintext=st.binary(max_size=2048),
    column=st.text(min_size=1, max_size=80).filter(lambda s: "\x00" not in s),
    subject=st.none() | st.binary(max_size=64),
)
def test_round_trip(plaintext: bytes, column: str, subject: bytes | None) -> None:
    key = vector_key()
    associated = column_associated_data(column, None if subject is None else Subject("customer", subject))
    sealed = seal(key, plaintext, associated)
    assert len(sealed) == MIN_LENGTH + len(plaintext)
    assert is_envelope(sealed)
    assert open_envelope(strict_lookup(key), sealed, associated) == plaintext


# -- Opener: the data path's decrypt boundary, in both implementations -----------------------------------

OPENER_KINDS = [
    "python",
    pytest.param(
        "native",
        marks=pytest.mark.skipif(
            envelope._accel is None, reason="the accelerator is not loaded (not built, or PGVEIL_IMPL=python)"
        ),
    ),
]


def opener_for(kind: str, lookup: Callable[[bytes], DataKey | None]) -> Opener:
    opener = Opener(lookup, python=kind == "python")
    assert (opener.native is None) == (kind == "python")
    return opener


@pytest.mark.parametrize("kind", OPENER_KINDS)
def test_opener_opens_the_fixed_vector_inside_a_larger_buffer(kind: str) -> None:
    opener = opener_for(kind, lookup_for(vector_key()).get)
    data = b"before" + VECTOR_ENVELOPE + b"after"
    start, end = 6, 6 + len(VECTOR_ENVELOPE)
    assert opener.open(data, start, end, column_associated_data(VECTOR_COLUMN)) == VECTOR_PLAINTEXT
    assert opener.open(VECTOR_ENVELOPE, 0, len(VECTOR_ENVELOPE), column_associated_data(VECTOR_COLUMN)) == (
        VECTOR_PLAINTEXT
    )


@pytest.mark.parametrize("kind", OPENER_KINDS)
def test_opener_names_each_failed_check_in_its_reason_only(kind: str) -> None:
    key = vector_key()
    associated = column_associated_data(VECTOR_COLUMN)
    e = VECTOR_ENVELOPE
    cases = {
        OpenFailure.NOT_AN_ENVELOPE: [b"PX" + e[2:], e[:2] + b"\x02" + e[3:], e[:47], b""],
        OpenFailure.UNKNOWN_KEY: [e[:5] + bytes([e[5] ^ 1]) + e[6:]],
        OpenFailure.AUTHENTICATION: [e[:-1] + bytes([e[-1] ^ 1]), e[:40] + bytes([e[40] ^ 0x80]) + e[41:], e + b"x"],
    }
    messages = set()
    for reason, bad_values in cases.items():
        for bad in bad_values:
            with pytest.raises(OpenFailed) as info:
                opener_for(kind, lookup_for(key).get).open(bad, 0, len(bad), associated)
            assert info.value.reason is reason, (reason, bad)
            assert info.value.sqlstate == "XX001"
            messages.add(str(info.value))
    with pytest.raises(OpenFailed) as info:
        opener_for(kind, lookup_for(key).get).open(e, 0, len(e), column_associated_data("s.t.other"))
    assert info.value.reason is OpenFailure.AUTHENTICATION
    disabled = lookup_for(key.with_state(KeyState.DISABLED)).get
    with pytest.raises(OpenFailed) as info:
        opener_for(kind, disabled).open(e, 0, len(e), associated)
    assert info.value.reason is OpenFailure.DISABLED_KEY
    messages.add(str(info.value))
    assert messages == {"a protected value could not be decrypted"}


@pytest.mark.parametrize("kind", OPENER_KINDS)
def test_opener_rejects_bounds_outside_the_buffer(kind: str) -> None:
    opener = opener_for(kind, lookup_for(vector_key()).get)
    associated = column_associated_data(VECTOR_COLUMN)
    n = len(VECTOR_ENVELOPE)
    for start, end in ((0, n + 1), (-1, n), (1, 0), (n, n + 48), (2**40, 2**40 + 60)):
        with pytest.raises(OpenFailed):
            opener.open(VECTOR_ENVELOPE, start, end, associated)


@pytest.mark.parametrize("kind", OPENER_KINDS)
def test_opener_lets_the_lookups_exception_through_and_remembers_enabled_keys_only(kind: str) -> None:
    class Miss(Exception):
        pass

    table: dict[bytes, DataKey] = {}
    calls: list[bytes] = []

    def lookup(key_id: bytes) -> DataKey | None:
        calls.append(key_id)
        if not table:
            raise Miss()
        return table.get(key_id)

    opener = opener_for(kind, lookup)
    associated = column_associated_data(VECTOR_COLUMN)
    n = len(VECTOR_ENVELOPE)
    with pytest.raises(Miss):
        opener.open(VECTOR_ENVELOPE, 0, n, associated)
    table[b"other key id 16b"] = vector_key()
    with pytest.raises(OpenFailed):  # unknown: not remembered
        opener.open(VECTOR_ENVELOPE, 0, n, associated)
    table[VECTOR_KEY_ID] = vector_key()
    for _ in range(3):
        assert opener.open(VECTOR_ENVELOPE, 0, n, associated) == VECTOR_PLAINTEXT
    assert calls == [VECTOR_KEY_ID] * 3


@pytest.mark.parametrize("kind", OPENER_KINDS)
def test_opener_with_many_keys_stays_correct(kind: str) -> None:
    """More keys than the Opener remembers (per-subject keys): each value still opens under its own."""
    keys = [DataKey.from_material(i.to_bytes(16, "big"), i.to_bytes(32, "big"), column_id="s.t.c") for i in range(300)]
    associated = column_associated_data("s.t.c")
    sealed = [seal(k, b"v%d" % i, associated) for i, k in enumerate(keys)]
    opener = opener_for(kind, lookup_for(*keys).get)
    for _ in range(2):
        for i, e in enumerate(sealed):
            assert opener.open(e, 0, len(e), associated) == b"v%d" % i


@pytest.mark.skipif(envelope._accel is None, reason="the accelerator is not loaded (not built, or PGVEIL_IMPL=python)")
def test_native_and_python_ciphers_agree_on_the_vectors() -> None:
    """The accelerator's cipher gives cryptography's bytes, and seals envelopes cryptography opens."""
    native = envelope._accel.Key(VECTOR_KEY)
    header = VECTOR_ENVELOPE[:HEADER_LENGTH]
    aad = header + column_associated_data(VECTOR_COLUMN)
    nonce = header[20:]
    assert header + native.encrypt(nonce, VECTOR_PLAINTEXT, aad) == VECTOR_ENVELOPE
    assert native.decrypt(nonce, VECTOR_ENVELOPE[HEADER_LENGTH:], aad) == VECTOR_PLAINTEXT
    sealed = native.seal(header[:20], VECTOR_PLAINTEXT, column_associated_data(VECTOR_COLUMN))
    assert sealed[:20] == header[:20]
    assert sealed[20:32] != nonce
    aad = sealed[:HEADER_LENGTH] + column_associated_data(VECTOR_COLUMN)
    assert AESGCM(VECTOR_KEY).decrypt(sealed[20:32], sealed[32:], aad) == VECTOR_PLAINTEXT
    with pytest.raises(envelope._accel.InvalidTag):
        native.decrypt(nonce, VECTOR_ENVELOPE[HEADER_LENGTH:-1] + b"\x00", aad)
    for bad_key in (b"", b"k" * 16, b"k" * 33):
        with pytest.raises(ValueError, match="32 bytes"):
            envelope._accel.Key(bad_key)
    with pytest.raises(ValueError, match="12 bytes"):
        native.encrypt(b"short", b"x", b"")


@pytest.mark.parametrize("kind", OPENER_KINDS)
def test_an_opener_is_freed_without_the_cycle_collector(kind: str) -> None:
    """One Opener per result (and per COPY field): it, its native half and the keys it holds must go
    when the last reference does, not when the cycle collector next runs."""
    import gc
    import weakref

    class Lookup:
        def __init__(self, key: DataKey) -> None:
            self.key = key

        def __call__(self, key_id: bytes) -> DataKey | None:
            return self.key if key_id == self.key.key_id else None

    gc.disable()
    try:
        lookup = Lookup(vector_key())
        opener = opener_for(kind, lookup)
        assert opener.open(VECTOR_ENVELOPE, 0, len(VECTOR_ENVELOPE), column_associated_data(VECTOR_COLUMN))
        opener_ref, lookup_ref = weakref.ref(opener), weakref.ref(lookup)
        del opener, lookup
        assert opener_ref() is None
        assert lookup_ref() is None
    finally:
        gc.enable()


@pytest.mark.skipif(envelope._accel is None, reason="the accelerator is not loaded (not built, or PGVEIL_IMPL=python)")
def test_native_opener_holds_the_callers_buffer() -> None:
    """The accelerator takes any buffer and holds it for the call (a bytearray cannot be resized under
    it by the key lookup's callback); the Python Opener's signature says bytes."""
    opener = opener_for("native", lookup_for(vector_key()).get)
    associated = column_associated_data(VECTOR_COLUMN)
    n = len(VECTOR_ENVELOPE)
    for data in (bytearray(VECTOR_ENVELOPE), memoryview(VECTOR_ENVELOPE)):
        assert opener.open(data, 0, n, associated) == VECTOR_PLAINTEXT  # type: ignore[arg-type]
