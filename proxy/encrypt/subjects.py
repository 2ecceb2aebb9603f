"""Canonical data-subject ids: the bytes that name a subject, whatever table, type or wire format the id
is read from, so that ``customers.id = 5`` (integer, text format) and ``orders.customer_id = 5`` (bigint,
binary format) are one subject with one key.

Per type class (:data:`proxy.rewrite.catalog.SUBJECT_TYPES`): ``integer`` (int2, int4, int8) is the
decimal text without sign for positive numbers or leading zeros (``-7``, ``0``, ``42``); ``uuid`` the
lower-case hyphenated 36 characters; ``text`` the UTF-8 bytes as they are. Pure: no keys, no I/O. An id
that does not read as its type is refused with the type's SQLSTATE (22P02), naming the table and the
subject column, never the value.
"""

from __future__ import annotations

import uuid

from keymgmt.envelope import MAX_SUBJECT_ID_LENGTH, Subject
from proxy.errors import ProxyError
from proxy.rewrite.catalog import SubjectColumn

_INT_LIMIT = 1 << 63


class InvalidSubject(ProxyError):
    """A subject id that is not a value of the subject column's type (or NULL)."""

    sqlstate = "22P02"


def _invalid(table: str, subject: SubjectColumn, why: str) -> InvalidSubject:
    return InvalidSubject(f"pgveil: the subject id for column {subject.column} of {table} {why}")


def subject_from_text(table: str, subject: SubjectColumn, text: bytes) -> Subject:
    """The subject named by an id in text form (a literal's text, a text-format parameter)."""
    cls = subject.type_class
    if cls == "integer":
        try:
            value = int(text.decode("ascii").strip(" \t\n\r\f\v"), 10)
        except (UnicodeDecodeError, ValueError):
            raise _invalid(table, subject, "is not an integer") from None
        if not -_INT_LIMIT <= value < _INT_LIMIT:
            raise _invalid(table, subject, "is out of range for bigint")
        return Subject(subject.kind, str(value).encode("ascii"))
    if cls == "uuid":
        try:
            value_uuid = uuid.UUID(text.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise _invalid(table, subject, "is not a uuid") from None
        return Subject(subject.kind, str(value_uuid).encode("ascii"))
    if cls == "text":
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid(table, subject, "is not valid UTF-8") from None
        if b"\x00" in text:
            raise _invalid(table, subject, "contains a NUL byte")
        if len(text) > MAX_SUBJECT_ID_LENGTH:
            raise _invalid(table, subject, f"is longer than {MAX_SUBJECT_ID_LENGTH} bytes")
        return Subject(subject.kind, bytes(text))
    raise _invalid(table, subject, "has a type pgveil has not read yet (catalog not loaded)")


def subject_from_binary(table: str, subject: SubjectColumn, data: bytes) -> Subject:
    """The subject named by an id in binary form (a binary-format parameter): int2/int4/int8 by length,
    uuid as 16 bytes, text as its bytes."""
    cls = subject.type_class
    if cls == "integer":
        if len(data) not in (2, 4, 8):
            raise _invalid(table, subject, "is not a binary integer")
        return Subject(subject.kind, str(int.from_bytes(data, "big", signed=True)).encode("ascii"))
    if cls == "uuid":
        if len(data) != 16:
            raise _invalid(table, subject, "is not a binary uuid")
        return Subject(subject.kind, str(uuid.UUID(bytes=bytes(data))).encode("ascii"))
    return subject_from_text(table, subject, data)
