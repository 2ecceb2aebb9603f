"""The Bind of a prepared statement with protected parameters, rewritten in one native call.

The reference is the Python path in :mod:`proxy.encrypt.engine` (``SessionCrypto._seal_params``, then
``codec.encode_bind_frame``): split the Bind's parameters, take each protected value's canonical form,
seal it under its column's current key and splice it in, sent in binary. :class:`BindSealer` is the same
for the statements whose every protected parameter the accelerator can take as it comes
(``pgveil_accel.seal_bind``, native/pgveil_accel.c): a column of text, varchar or varchar(N) (not
char(N), whose canonical form is padded), sealed under the column's key (not per-subject keys), written
by a role that does not bind envelopes, from a UTF-8 client. For those the canonical form is the
client's bytes when they are valid UTF-8 without a NUL and, for varchar(N), at most N characters
(:class:`~proxy.pgtypes.text.TextCodec`), and in binary only when the client declared the column's type
or none. Any other value (invalid text, too long, a binary value of another declared type) makes the
native call return None, and the Bind takes the Python path, which decides and words the error: so the
client gets the same message and the same refusals either way, only the nonces differ.

Keys: a Bind seals under each column's current key as the Python path would find it (one lookup per
column, through the key ring, so a key disabled, destroyed, rotated away or expired from the cache since
the last Bind is never used). The lookups themselves are spared while the key cache's stamp of the keys
found last holds (:meth:`~proxy.encrypt.keyring.KeyRing.stamp_holds`): the cache's ``epoch`` moves on
every put, drop, refresh, flush and current-key pointer change, and the stamp also ends when the
earliest of the keys reaches its TTL, so every lookup would have returned the same key objects. (The
key cache's generation and the current second, the token
:meth:`~proxy.encrypt.engine.CryptoContext.shared_opener` uses for results, would not do for writes: a
refresh drops a rotated column's current-key pointer without changing the generation, and a key used a
second past that keeps values coming under the old version after a rotation job's last pass.) The
native form of the keys is kept while the lookups return the same keys. A lookup that fails (a key to
fetch, a key not ENABLED, a keystore down) hands the Bind to the Python path, which looks up only the
keys its values need and raises exactly what it raises today.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from keymgmt import native
from keymgmt.envelope import DataKey, native_sealer
from proxy.errors import ProxyError
from proxy.pgtypes.base import TypeCodec
from proxy.pgtypes.text import TextCodec
from proxy.protocol.relay import KeyMiss

_accel: Any = native.accel
# The accelerator has the Bind kernel (a build of this source tree; an older one keeps the Python path).
NATIVE_BIND = _accel is not None and hasattr(_accel, "seal_bind")

_U32 = struct.Struct("!I")

# (parameter index, key slot, binary values taken as is, varchar(N)'s N or -1, associated data)
NativeTarget = tuple[int, int, int, int, bytes]


class _Column(Protocol):
    @property
    def subject_kind(self) -> str | None: ...


class _ColumnCrypto(Protocol):
    @property
    def column(self) -> _Column: ...
    @property
    def codec(self) -> TypeCodec: ...


class _Target(Protocol):
    """What :class:`~proxy.encrypt.engine.ParamTarget` holds (read only)."""

    @property
    def index(self) -> int: ...
    @property
    def column(self) -> _ColumnCrypto: ...
    @property
    def column_id(self) -> str: ...
    @property
    def associated(self) -> bytes: ...
    @property
    def client_oid(self) -> int: ...
    @property
    def key_slot(self) -> int: ...
    @property
    def envelope(self) -> bool: ...
    @property
    def subject(self) -> object: ...


def native_target(target: _Target) -> NativeTarget | None:
    """The accelerator's plan for one protected parameter, or None when its values need the Python path."""
    codec = target.column.codec
    if (
        target.envelope
        or target.subject is not None
        or target.key_slot < 0
        or target.column.column.subject_kind is not None
        or not isinstance(codec, TextCodec)
        or codec.pad
    ):
        return None
    binary_as_is = target.client_oid in (0, codec.oid)
    return (target.index, target.key_slot, int(binary_as_is), codec.max_chars, target.associated)


class BindSealer:
    """A prepared statement's compiled plan for ``pgveil_accel.seal_bind`` and the keys it seals with."""

    __slots__ = ("_found", "_keys", "_stamp", "column_ids", "targets")

    def __init__(self, targets: tuple[NativeTarget, ...], column_ids: tuple[str, ...]) -> None:
        self.targets = targets
        self.column_ids = column_ids  # the column of each key slot
        # The keys the last Bind sealed with and their native forms, reused while the lookups give them,
        # and the key ring's stamp of them (reused without the lookups while it holds).
        self._found: tuple[DataKey, ...] = ()
        self._keys: tuple[tuple[Any, bytes], ...] | None = None
        self._stamp: tuple[Any, ...] | None = None

    @classmethod
    def compile(cls, targets: Sequence[_Target]) -> BindSealer | None:
        """The native plan of a statement's protected parameters; None when one of them (or the build)
        needs the Python path."""
        if not NATIVE_BIND or not targets:
            return None
        plan: list[NativeTarget] = []
        columns: dict[int, str] = {}
        for target in targets:
            compiled = native_target(target)
            if compiled is None:
                return None
            plan.append(compiled)
            columns[target.key_slot] = target.column_id
        if sorted(columns) != list(range(len(columns))) or len({t[0] for t in plan}) != len(plan):
            return None
        return cls(tuple(plan), tuple(columns[i] for i in range(len(columns))))

    def keys(
        self, write_key: Callable[[str], DataKey], ring: KeyStamps | None = None
    ) -> tuple[tuple[Any, bytes], ...] | None:
        """The (cipher, prefix) of each slot's current key, looked up for this Bind as the Python path
        does (one lookup per column); None when one cannot be had here.

        With ``ring`` (the key ring behind ``write_key``), the lookups are skipped while its stamp of the
        keys found last holds (see the module docstring for why that stamp and no weaker token)."""
        cached = self._keys
        stamp = self._stamp
        if cached is not None and stamp is not None and ring is not None and ring.stamp_holds(stamp, len(cached)):
            return cached
        self._stamp = None
        found: list[DataKey] = []
        try:
            for column_id in self.column_ids:
                found.append(write_key(column_id))
        except (KeyMiss, ProxyError):
            return None  # the Python path looks up the keys its values need, and raises what it raises
        if cached is None or not all(a is b for a, b in zip(found, self._found, strict=True)):
            sealers: list[tuple[Any, bytes]] = []
            for key in found:
                sealer = native_sealer(key)
                if sealer is None:
                    return None
                sealers.append(sealer)
            self._found, self._keys = tuple(found), tuple(sealers)
        if ring is not None:
            self._stamp = ring.write_stamp(found)
        return self._keys

    def seal(
        self, body: bytes, write_key: Callable[[str], DataKey], ring: KeyStamps | None = None
    ) -> tuple[bytes, int] | None:
        """(the rewritten Bind message, the values sealed), or None: the Bind takes the Python path."""
        keys = self.keys(write_key, ring)
        if keys is None:
            return None
        try:
            done: tuple[bytes, int] | None = _accel.seal_bind(body, self.targets, keys)
        except _accel.Malformed:
            return None  # not a Bind the decoder accepted: the Python path is the reference
        return done


class KeyStamps(Protocol):
    """The part of :class:`proxy.encrypt.keyring.KeyRing` the sealer's key reuse needs."""

    def write_stamp(self, keys: Iterable[DataKey]) -> Any: ...

    def stamp_holds(self, stamp: Any, lookups: int) -> bool: ...


def with_result_formats(message: bytes, tail: int, formats: tuple[int, ...]) -> bytes:
    """``message`` (a whole Bind whose last ``tail`` bytes are its result-format list) with that list
    replaced by ``formats``, as ``codec.encode_bind_frame`` writes it."""
    packed = struct.pack(f"!H{len(formats)}h", len(formats), *formats)
    head = message[5 : len(message) - tail]
    return b"B" + _U32.pack(4 + len(head) + len(packed)) + head + packed
