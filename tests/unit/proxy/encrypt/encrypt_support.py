"""Shared fixtures of the encryption-layer unit tests: a hand-built catalog, fixed DataKeys, a fake
keystore behind the KeySource seam, and the wire helpers that build and split protocol messages."""

from __future__ import annotations

import re
from collections.abc import Iterable

from keymgmt.envelope import DataKey, Subject
from keymgmt.errors import KeyProviderUnavailable, UnknownKey
from proxy.protocol import codec
from proxy.protocol import messages as m
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable

TABLE_OID = 16400
INT4, INT8, TEXT, BYTEA = 23, 20, 25, 17
OTHER_OID = 16999

SSN = ProtectedColumn("public", "customers", "ssn", "text", attnum=2, table_oid=TABLE_OID)
SCORE = ProtectedColumn("public", "customers", "score", "integer", attnum=3, table_oid=TABLE_OID)
CUSTOMERS = ProtectedTable(
    "public", "customers", {"ssn": SSN, "score": SCORE}, ("id", "ssn", "score", "name"), oid=TABLE_OID
)
CATALOG = Catalog({("public", "customers"): CUSTOMERS})

SSN_KEY = DataKey.from_material(b"\x11" * 16, bytes(range(32)), column_id=SSN.column_id)
SCORE_KEY = DataKey.from_material(b"\x22" * 16, bytes(range(32, 64)), column_id=SCORE.column_id)

INSERT_LITERALS = "INSERT INTO customers (id, ssn, score) VALUES (1, '123-45-6789', 42)"
SELECT_ALL = "SELECT id, ssn, score FROM customers"
INSERT_PARAMS = "INSERT INTO customers (id, ssn, score) VALUES ($1, $2, $3)"
SELECT_BY_ID = "SELECT id, ssn, score FROM customers WHERE id = $1"
BYTEA_LITERAL = re.compile(r"E'\\\\x([0-9a-f]*)'::bytea")


class FakeKeySource:
    """The KeySource seam: ``stored`` is the keystore, ``cache`` what it holds in memory."""

    def __init__(self, keys: Iterable[DataKey], *, cached: bool = True) -> None:
        self.stored = {bytes(k.key_id): k for k in keys}
        self.active_ids = {k.column_id: bytes(k.key_id) for k in self.stored.values()}
        self.cache = dict(self.stored) if cached else {}
        self.down = False
        self.subject_ids: dict[Subject, bytes] = {}

    def cached_key(self, key_id: bytes) -> DataKey | None:
        return self.cache.get(bytes(key_id))

    def cached_active_key(self, column_id: str, subject: bytes | None = None) -> DataKey | None:
        key_id = self.active_ids.get(column_id)
        return None if key_id is None else self.cache.get(key_id)

    async def key_by_id(self, key_id: bytes) -> DataKey:
        if self.down:
            raise KeyProviderUnavailable("keystore unreachable")
        key = self.stored.get(bytes(key_id))
        if key is None:
            raise UnknownKey()
        self.cache[bytes(key_id)] = key
        return key

    async def active_key(self, column_id: str, subject: bytes | None = None) -> DataKey:
        key_id = self.active_ids.get(column_id)
        if key_id is None:
            raise UnknownKey()
        return await self.key_by_id(key_id)

    def cached_subject_key(self, subject: Subject) -> DataKey | None:
        key_id = self.subject_ids.get(subject)
        return None if key_id is None else self.cache.get(key_id)

    async def subject_key(self, subject: Subject) -> DataKey:
        """Creates the subject's key on first use, as the keystore does."""
        key_id = self.subject_ids.get(subject)
        if key_id is None:
            if self.down:
                raise KeyProviderUnavailable("keystore unreachable")
            n = len(self.subject_ids) + 1
            key = DataKey.from_material(
                n.to_bytes(16, "big"), bytes([n % 256]) * 32, column_id=subject.scope, subject=subject.subject_id
            )
            key_id = self.subject_ids[subject] = bytes(key.key_id)
            self.stored[key_id] = key
        return await self.key_by_id(key_id)

    async def keys_by_ids(self, key_ids: Iterable[bytes]) -> int:
        if self.down:
            raise KeyProviderUnavailable("keystore unreachable")
        self.batches = getattr(self, "batches", 0) + 1
        n = 0
        for k in key_ids:
            key = self.stored.get(bytes(k))
            if key is not None:
                self.cache[bytes(k)] = key
                n += 1
        return n

    async def preload(self, column_ids: Iterable[str]) -> int:
        n = 0
        for column_id in column_ids:
            await self.active_key(column_id)
            n += 1
        return n


# -- wire helpers ---------------------------------------------------------------------------------------


def fe(*msgs: m.FrontendMessage) -> bytes:
    return b"".join(codec.encode_frontend(x) for x in msgs)


def be(*msgs: m.BackendMessage) -> bytes:
    return b"".join(codec.encode_backend(x) for x in msgs)


def split_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The (type, body) of each whole message in ``data``."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        t, n = codec.read_header(data, pos)
        out.append((t, data[pos + 5 : pos + 1 + n]))
        pos += 1 + n
    assert pos == len(data)
    return out
