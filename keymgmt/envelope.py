"""The ciphertext envelope, version 1, and the data key object that seals and opens it.

This module owns the byte format of every encrypted value pgveil stores and the one place where
cryptography's exceptions become :class:`~keymgmt.errors.DecryptionFailed`. It is pure: no I/O besides
the OS random source for nonces, no key storage, no logging of values. Keys come in as :class:`DataKey`
objects (built by the keystore); which key a value needs is the caller's business, through a lookup
callable.

Envelope v1, all integers unsigned, offsets in bytes::

    offset  size  field
    0       2     magic        b"PV": recognises a pgveil value anywhere (also the CHECK constraint's test)
    2       1     version      0x01: this layout
    3       1     algorithm    0x01: AES-256-GCM (96-bit nonce, 128-bit tag)
    4       16    key id       the DEK version's UUID, 16 raw bytes (RFC 9562 byte order)
    20      12    nonce        random per value (os.urandom)
    32      n     ciphertext   same length as the plaintext
    32+n    16    tag          GCM authentication tag

The header is bytes 0..31 (magic through nonce). The associated data authenticated with each value is::

    header · 0x00 · column id (UTF-8 "schema.table.column")
           [· 0x00 · u16 length of kind · kind (UTF-8) · u32 length of subject id · subject id]

The column id binds a value to its column, the subject part (present only for per-subject keys: the
subject's kind and canonical id, see :class:`Subject`) to its data subject, and the header binds the
format, algorithm and key id, so none of them can be edited or moved without the tag failing. The parts
are unambiguous: a column id cannot contain NUL, so the first NUL after it starts the subject part, whose
fields are length-prefixed (big-endian) and end the data; no two distinct (column, subject) pairs give the
same bytes. An envelope is at least 48 bytes (empty plaintext).

Callers pass the column's part (:func:`column_associated_data` of the column id) to :func:`seal` and the
openers; a subject's key adds its subject's part itself (:attr:`DataKey.subject_associated`, from the
keystore record of the key), so a value opens only with the key, column and subject it was sealed for,
and a reader needs no subject column to open it. A subject's keys live in the keystore scope
``pgveil.subject.<kind>`` (:func:`subject_scope`; schema ``pgveil`` is reserved, so no column has such an
id) with the canonical subject id as the scope's subject.

Nonce budget: random 96-bit nonces are safe for about 2**32 encryptions under one key (NIST SP 800-38D
section 8.3); DEKs are per column or per subject and rotate, which keeps each key far below that.

Two implementations sit behind the same functions (see :mod:`keymgmt.native`): the compiled accelerator
(OpenSSL's EVP AES-256-GCM, one cipher context per key and direction) and cryptography's AESGCM. A
DataKey holds a cipher of the kind the process chose; both take (nonce, data, associated data) and give
the same bytes. The accelerator mirrors the layout above in C; it is used only after its constants were
checked against the ones defined here.

Opening is one boundary for every caller: :class:`Opener` (and :func:`open_envelope` for single
values) makes every check and raises :class:`OpenFailed`, whose message is the same whatever failed;
``reason`` (an :class:`OpenFailure`) is for logs and metric labels only, never for the client.
"""

from __future__ import annotations

import enum
import hashlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NewType

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keymgmt import native
from keymgmt.errors import DecryptionFailed, KeyDisabled

KeyId = NewType("KeyId", bytes)
"""A DEK version's id: the 16 raw bytes of its UUID, exactly as they appear in the envelope header.

Raw bytes rather than :class:`uuid.UUID` because the hot path slices them out of an envelope and looks
them up in a dict; building a UUID object per value would cost more than the decryption.
"""

MAGIC = b"PV"
VERSION_1 = 0x01
ALGORITHM_AES256GCM = 0x01

KEY_ID_LENGTH = 16
NONCE_LENGTH = 12
TAG_LENGTH = 16
DEK_LENGTH = 32
HEADER_LENGTH = len(MAGIC) + 1 + 1 + KEY_ID_LENGTH + NONCE_LENGTH
MIN_LENGTH = HEADER_LENGTH + TAG_LENGTH

_PREFIX_V1 = MAGIC + bytes((VERSION_1, ALGORITHM_AES256GCM))
_KEY_ID_START = len(_PREFIX_V1)
_NONCE_START = _KEY_ID_START + KEY_ID_LENGTH
_SEPARATOR = b"\x00"

assert HEADER_LENGTH == 32
assert MIN_LENGTH == 48

_accel: Any = native.accel  # the accelerator module, or None: see keymgmt.native

if _accel is not None and (
    _accel.PREFIX_V1 != _PREFIX_V1
    or (_accel.KEY_ID_LENGTH, _accel.NONCE_LENGTH, _accel.TAG_LENGTH, _accel.HEADER_LENGTH)
    != (KEY_ID_LENGTH, NONCE_LENGTH, TAG_LENGTH, HEADER_LENGTH)
):
    raise ImportError("pgveil_accel was built for another envelope layout: rebuild it from this source tree")

# The accelerator's Opener adds a subject key's part of the associated data itself (from its build 4 on);
# with an older build, results of subject-keyed columns open with the Python Opener.
NATIVE_SUBJECT_KEYS = _accel is not None and getattr(_accel, "SUBJECT_KEYS", 0) >= 192
# The longest subject id a key may have: its subject part (with a kind of up to 63 bytes) fits the
# accelerator's Key.
MAX_SUBJECT_ID_LENGTH = 120

# What a cipher raises when a tag does not verify, in either implementation.
_INVALID_TAG: tuple[type[Exception], ...] = (InvalidTag,) if _accel is None else (InvalidTag, _accel.InvalidTag)
# Opened keys an Opener remembers before it starts again (per-subject keys make one result use many).
_OPENER_KEYS = 4096


class OpenFailure(enum.StrEnum):
    """Why a stored value did not open: a bounded set, for logs and metric labels, never for the client."""

    NOT_AN_ENVELOPE = "not_an_envelope"  # too short, or another magic, version or algorithm
    UNKNOWN_KEY = "unknown_key"  # no usable key with that id: never created here, or destroyed
    DISABLED_KEY = "disabled_key"
    AUTHENTICATION = "authentication"  # the tag does not verify: tampered, moved, or another key's value


class OpenFailed(DecryptionFailed):
    """A stored value did not open. The message is :class:`DecryptionFailed`'s, whatever the check."""

    def __init__(self, reason: OpenFailure | str) -> None:
        super().__init__()
        self.reason = OpenFailure(reason)


class KeyState(enum.Enum):
    """A key version's lifecycle state, in Tink's vocabulary.

    ENABLED keys encrypt (when they are their scope's current version) and decrypt. DISABLED keys do
    neither but keep their material, so disabling is reversible. DESTROYED keys have no material left;
    only a tombstone row remains. The values are what the keystore stores.
    """

    ENABLED = "ENABLED"
    DISABLED = "DISABLED"
    DESTROYED = "DESTROYED"


# Enum member access goes through the class each time; the hot path compares against a module global.
_ENABLED = KeyState.ENABLED


SUBJECT_SCOPE_PREFIX = "pgveil.subject."


@dataclass(frozen=True, slots=True, repr=False)
class Subject:
    """A data subject: its kind (``customer``) and its canonical id (the bytes that name it whatever table
    or type it is read from; the proxy canonicalises). Personal data: ``repr`` shows lengths only."""

    kind: str
    subject_id: bytes

    def __post_init__(self) -> None:
        if not self.kind or "\x00" in self.kind or len(self.kind.encode("utf-8")) > 0xFFFF:
            raise ValueError("a subject kind must be non-empty, without NUL, at most 65535 bytes")
        if len(self.subject_id) > 0xFFFFFFFF:
            raise ValueError("a subject id is at most 2**32 - 1 bytes")

    @property
    def scope(self) -> str:
        return subject_scope(self.kind)

    def __repr__(self) -> str:
        return f"Subject(kind={self.kind!r}, subject_id=<{len(self.subject_id)} bytes>)"


def subject_scope(kind: str) -> str:
    """The keystore scope (``column_id`` of ``pgveil.deks``) of every key of subjects of ``kind``."""
    return SUBJECT_SCOPE_PREFIX + kind


def subject_kind_of_scope(scope: str) -> str | None:
    """The subject kind a keystore scope is for, or None for a column's scope."""
    return scope[len(SUBJECT_SCOPE_PREFIX) :] if scope.startswith(SUBJECT_SCOPE_PREFIX) else None


def subject_associated_data(subject: Subject) -> bytes:
    """The subject's part of the associated data: 0x00 · u16 len · kind · u32 len · subject id."""
    kind = subject.kind.encode("utf-8")
    return (
        _SEPARATOR
        + len(kind).to_bytes(2, "big")
        + kind
        + len(subject.subject_id).to_bytes(4, "big")
        + bytes(subject.subject_id)
    )


def key_id_from_uuid(value: uuid.UUID) -> KeyId:
    return KeyId(value.bytes)


def key_id_to_uuid(key_id: bytes) -> uuid.UUID:
    return uuid.UUID(bytes=bytes(key_id))


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class DataKey:
    """One DEK version, ready to use. Holds the cipher object, never exposes the key bytes.

    Build it with :meth:`from_material`; the raw key is handed to the AEAD object and not kept here.
    ``column_id`` and ``subject`` say which scope the key belongs to (the keystore's cache uses them to
    invalidate); the envelope itself binds the scope through the associated data, not through the key.
    """

    key_id: KeyId
    state: KeyState
    column_id: str
    subject: bytes | None
    version: int
    # AESGCM, or the accelerator's Key (same encrypt/decrypt signature); the key bytes live only in it.
    _cipher: Any = field(compare=False)
    # magic · version · algorithm · key id: the constant part of every header this key writes.
    _prefix: bytes = field(compare=False)
    # The subject's part of the associated data (subject_associated_data) for a subject's key, else b"".
    subject_associated: bytes = field(default=b"", compare=False)
    # The data subject this key belongs to (from its keystore record), None for a column's key.
    data_subject: Subject | None = field(default=None, compare=False)

    @classmethod
    def from_material(
        cls,
        key_id: bytes,
        material: bytes,
        *,
        state: KeyState = KeyState.ENABLED,
        column_id: str = "",
        subject: bytes | None = None,
        version: int = 1,
    ) -> DataKey:
        if len(key_id) != KEY_ID_LENGTH:
            raise ValueError(f"key id must be {KEY_ID_LENGTH} bytes, got {len(key_id)}")
        if len(material) != DEK_LENGTH:
            raise ValueError(f"data key material must be {DEK_LENGTH} bytes, got {len(material)}")
        if state is KeyState.DESTROYED:
            raise ValueError("a destroyed key has no material")
        kid = KeyId(bytes(key_id))
        kind = subject_kind_of_scope(column_id)
        data_subject = Subject(kind, bytes(subject)) if kind is not None and subject is not None else None
        suffix = subject_associated_data(data_subject) if data_subject is not None else b""
        if _accel is None:
            cipher: Any = AESGCM(bytes(material))
        elif NATIVE_SUBJECT_KEYS and len(suffix) <= _accel.SUBJECT_KEYS:
            cipher = _accel.Key(material, suffix)
        else:
            cipher = _accel.Key(material)
        return cls(
            key_id=kid,
            state=state,
            column_id=column_id,
            subject=subject,
            version=version,
            _cipher=cipher,
            _prefix=_PREFIX_V1 + kid,
            subject_associated=suffix,
            data_subject=data_subject,
        )

    def with_state(self, state: KeyState) -> DataKey:
        """The same key material in another state (the keystore uses this on enable/disable)."""
        if state is KeyState.DESTROYED:
            raise ValueError("a destroyed key has no material")
        return DataKey(
            key_id=self.key_id,
            state=state,
            column_id=self.column_id,
            subject=self.subject,
            version=self.version,
            _cipher=self._cipher,
            _prefix=self._prefix,
            subject_associated=self.subject_associated,
            data_subject=self.data_subject,
        )

    @property
    def key_uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes=self.key_id)

    def __repr__(self) -> str:
        subject = "None" if self.subject is None else f"<{len(self.subject)} bytes>"
        return (
            f"DataKey(key_id={self.key_uuid}, state={self.state.name}, column_id={self.column_id!r}, "
            f"subject={subject}, version={self.version})"
        )


def column_associated_data(column_id: str, subject: Subject | None = None) -> bytes:
    """The associated data that follows the header: 0x00 · column id [· the subject's part].

    The data path passes the column's part only (a subject's key adds its subject's part, see the module
    docstring); ``subject`` gives the whole for a caller that seals without such a key (test vectors).
    """
    if not column_id or "\x00" in column_id:
        raise ValueError("column id must be non-empty and contain no NUL")
    associated = _SEPARATOR + column_id.encode("utf-8")
    if subject is not None:
        associated += subject_associated_data(subject)
    return associated


def seal(key: DataKey, plaintext: bytes, associated: bytes) -> bytes:
    """Encrypts ``plaintext`` under ``key`` into a v1 envelope.

    ``associated`` is :func:`column_associated_data` for the value's column; a subject's key appends
    its subject's part.
    """
    if key.state is not _ENABLED:
        raise KeyDisabled("a data key that is not ENABLED cannot encrypt")
    if key.subject_associated:
        associated += key.subject_associated
    # Python: one getrandom() call per value (os.urandom). The accelerator reads nonces a batch at a time,
    # each handed out once, in a page a forked child gets wiped (see random_nonce in pgveil_accel.c): a
    # repeated GCM nonce under one key is catastrophic.
    if _accel is not None:
        return key._cipher.seal(key._prefix, plaintext, associated)  # type: ignore[no-any-return]
    nonce = os.urandom(NONCE_LENGTH)
    header = key._prefix + nonce
    return header + key._cipher.encrypt(nonce, plaintext, header + associated)  # type: ignore[no-any-return]


def native_sealer(key: DataKey) -> tuple[Any, bytes] | None:
    """(the accelerator's cipher, the 20-byte prefix of every header it writes) for a column's ENABLED
    key, what ``pgveil_accel.seal_bind`` seals with; None where that cannot seal as :func:`seal` does
    (Python runs, the key is not ENABLED, or a subject's key, whose part of the associated data the
    caller's would lack)."""
    if _accel is None or key.state is not _ENABLED or key.subject_associated:
        return None
    return key._cipher, key._prefix


def _seal_with_nonce(key: DataKey, plaintext: bytes, associated: bytes, nonce: bytes) -> bytes:
    """:func:`seal` with a caller-chosen nonce, for test vectors only: reusing a nonce breaks GCM."""
    if len(nonce) != NONCE_LENGTH:
        raise ValueError("nonce must be 12 bytes")
    if key.state is not _ENABLED:
        raise KeyDisabled("a data key that is not ENABLED cannot encrypt")
    associated += key.subject_associated
    header = key._prefix + nonce
    return header + key._cipher.encrypt(nonce, plaintext, header + associated)  # type: ignore[no-any-return]


def derive_key(key: DataKey, label: bytes) -> bytes:
    """32 bytes derived from ``key`` for a use other than envelopes (the ``hash`` mask's HMAC key): the
    AES-256-GCM keystream at a nonce reserved for ``label`` (the first 12 bytes of its SHA-256), which is
    a pseudo-random function of the key. The key must belong to a scope that never seals envelopes (a
    reserved column id), so that no envelope's nonce is chosen by anything but the CSPRNG."""
    if key.state is not _ENABLED:
        raise KeyDisabled("a data key that is not ENABLED cannot derive keys")
    nonce = hashlib.sha256(b"pgveil/derive/v1\x00" + label).digest()[:NONCE_LENGTH]
    return key._cipher.encrypt(nonce, bytes(32), b"")[:32]  # type: ignore[no-any-return]


def open_envelope(key_lookup: Callable[[bytes], DataKey], envelope: bytes, associated: bytes) -> bytes:
    """Authenticates and decrypts a v1 envelope; returns the plaintext.

    ``key_lookup`` receives the 16-byte key id from the header and returns the key or raises
    :class:`~keymgmt.errors.UnknownKey`. Every framing or authentication failure raises the same
    :class:`~keymgmt.errors.DecryptionFailed`, whichever check it was.
    """
    if len(envelope) < MIN_LENGTH or envelope[:_KEY_ID_START] != _PREFIX_V1:
        raise OpenFailed(OpenFailure.NOT_AN_ENVELOPE)
    key = key_lookup(envelope[_KEY_ID_START:_NONCE_START])
    if key.state is not _ENABLED:
        raise KeyDisabled("the data key of a protected value is disabled")
    try:
        return key._cipher.decrypt(  # type: ignore[no-any-return]
            envelope[_NONCE_START:HEADER_LENGTH],
            envelope[HEADER_LENGTH:],
            envelope[:HEADER_LENGTH] + associated + key.subject_associated,
        )
    except _INVALID_TAG:
        raise OpenFailed(OpenFailure.AUTHENTICATION) from None


def peek_key_id(envelope: bytes) -> KeyId:
    """The key id of an envelope, after checking magic, version, algorithm and minimum length.

    Lets the caller find (and if need be fetch) the key before calling :func:`open_envelope`. The
    envelope is not authenticated yet: the key id is only a hint until the tag verifies.
    """
    if len(envelope) < MIN_LENGTH or envelope[:_KEY_ID_START] != _PREFIX_V1:
        raise DecryptionFailed()
    return KeyId(envelope[_KEY_ID_START:_NONCE_START])


def is_envelope(value: bytes) -> bool:
    """Whether ``value`` is framed like a v1 envelope (it may still fail to authenticate)."""
    return len(value) >= MIN_LENGTH and value[:_KEY_ID_START] == _PREFIX_V1


KeyLookup = Callable[[bytes], DataKey | None]
"""Finds the key of a 16-byte key id, or None when there is none to use. It may raise (the proxy raises
its key-miss signal there, to fetch the key and retry): an Opener lets that exception through as it is."""


class Opener:
    """Opens stored values for one result or stream: the one decrypt boundary of the data path.

    ``open(data, start, end, associated)`` authenticates and decrypts the envelope ``data[start:end]``
    (``associated`` is :func:`column_associated_data` of its column) and returns the plaintext. The checks,
    in this order, each failing with :class:`OpenFailed`: at least :data:`MIN_LENGTH` bytes; magic,
    version and algorithm; a key for the key id (``key_lookup``); the key ENABLED; the tag over header ·
    associated. A key found and enabled is remembered for the Opener's life (bounded), a refused one is
    not, so build one Opener per result: a key disabled or destroyed meanwhile is seen by the next one.

    ``native`` is the accelerator's opener (what its DataRow kernel takes), or None under Python.
    """

    __slots__ = ("__weakref__", "_decrypts", "_lookup", "native")

    def __new__(cls, key_lookup: KeyLookup, *, python: bool = False) -> Opener:
        """``python`` forces the reference implementation (tests and benchmarks compare the two)."""
        if cls is Opener and _accel is not None and not python:
            cls = _NativeOpener
        return object.__new__(cls)

    def __init__(self, key_lookup: KeyLookup, *, python: bool = False) -> None:
        self._lookup = key_lookup
        self._decrypts: dict[bytes, Any] = {}
        self.native: Any = None

    def open(self, data: bytes, start: int, end: int, associated: bytes) -> bytes:
        """The plaintext of the envelope ``data[start:end]``; raises :class:`OpenFailed`."""
        if end - start < MIN_LENGTH or start < 0 or end > len(data):
            raise OpenFailed(OpenFailure.NOT_AN_ENVELOPE)
        k = start + _NONCE_START
        h = start + HEADER_LENGTH
        decrypt = self._decrypts.get(data[start:k])
        if decrypt is None:
            decrypt = self._remember(data[start:k])
        try:
            return decrypt(data[k:h], data[h:end], data[start:h] + associated)  # type: ignore[no-any-return]
        except _INVALID_TAG:
            raise OpenFailed(OpenFailure.AUTHENTICATION) from None

    def _remember(self, prefix: bytes) -> Any:
        key = _enabled_key(self._lookup, prefix)
        decrypt = key._cipher.decrypt
        suffix = key.subject_associated
        if suffix:
            cipher_decrypt = decrypt

            def decrypt(nonce: bytes, data: bytes, associated: bytes) -> Any:
                return cipher_decrypt(nonce, data, associated + suffix)

        if len(self._decrypts) >= _OPENER_KEYS:
            self._decrypts.clear()
        self._decrypts[prefix] = decrypt
        return decrypt

    def __repr__(self) -> str:
        return f"Opener({'native' if self.native is not None else 'python'})"


class _NativeOpener(Opener):
    """The accelerator's Opener behind the same interface; ``open`` is its method, without a Python frame."""

    __slots__ = ("open",)  # an instance attribute in place of the method

    def __init__(self, key_lookup: KeyLookup, *, python: bool = False) -> None:
        super().__init__(key_lookup)
        # The callback closes over the lookup only: no reference cycle through this Opener.
        self.native = _accel.Opener(_native_finder(key_lookup), OpenFailed)
        self.open = self.native.open  # type: ignore[method-assign]


def _enabled_key(lookup: KeyLookup, prefix: bytes) -> DataKey:
    """The enabled key for an envelope's first 20 bytes (magic · version · algorithm · key id)."""
    if prefix[:_KEY_ID_START] != _PREFIX_V1:
        raise OpenFailed(OpenFailure.NOT_AN_ENVELOPE)
    key = lookup(prefix[_KEY_ID_START:])
    if key is None:
        raise OpenFailed(OpenFailure.UNKNOWN_KEY)
    if key.state is not _ENABLED:
        raise OpenFailed(OpenFailure.DISABLED_KEY)
    return key


def _native_finder(lookup: KeyLookup) -> Callable[[bytes], Any]:
    """The accelerator's callback, which keeps the ciphers it is given: the key's cipher, or the reason
    (a str) it may not be used. The lookup's own exceptions go through as they are."""

    def find(prefix: bytes) -> Any:
        try:
            return _enabled_key(lookup, prefix)._cipher
        except OpenFailed as e:
            return e.reason.value

    return find
