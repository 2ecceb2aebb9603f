"""Byte-exact captures of real conversations between psycopg 3.2 and PostgreSQL 15, shared by the protocol tests.

Recorded once through a logging TCP forwarder (no TLS) against a throwaway cluster. Each entry is one
``recv()`` on the forwarder, so the chunk boundaries are the ones the network produced; inside an entry, one
line (or run of adjacent literals) is one message. ``"C"`` is client to server, ``"S"`` server to client.
The SCRAM exchange belongs to a cluster that no longer exists.
"""

from __future__ import annotations

from typing import Final, Literal

Chunk = tuple[Literal["C", "S"], bytes]

# connect (SCRAM), BEGIN, execute("SELECT %s::int AS n, %s::text AS t", (42, "hi")), simple
# "SELECT 1 AS one", COMMIT, close.
PSYCOPG_SESSION: Final[tuple[Chunk, ...]] = (
    (
        "C",
        b"\x00\x00\x00>\x00\x03\x00\x00user\x00postgres\x00database\x00postgres\x00application_name\x00cap\x00\x00",
    ),
    (
        "S",
        b"R\x00\x00\x00\x17\x00\x00\x00\nSCRAM-SHA-256\x00\x00",
    ),
    (
        "C",
        b"p\x00\x00\x006SCRAM-SHA-256\x00\x00\x00\x00 n,,n=,r=HEoG19avD+4hO/fkSynGlbJL",
    ),
    (
        "S",
        b"R\x00\x00\x00\\\x00\x00\x00\x0br=HEoG19avD+4hO/fkSynGlbJL9q2S6GQRbpNiVQTNNPvIeUuz,s=fxF6GfFH"
        b"VxbILzjLEieh2g==,i=4096",
    ),
    (
        "C",
        b"p\x00\x00\x00lc=biws,r=HEoG19avD+4hO/fkSynGlbJL9q2S6GQRbpNiVQTNNPvIeUuz,p=MGs4ipLxBUinklBCpW"
        b"cedr5kcRFfy1gVONo4KiXKk8c=",
    ),
    (
        "S",
        b"R\x00\x00\x006\x00\x00\x00\x0cv=plymFTywNcPOkkBUs8UW3GgHuaNXWOwn0TbMXYSBAOg="
        b"R\x00\x00\x00\x08\x00\x00\x00\x00"
        b"S\x00\x00\x00\x19application_name\x00cap\x00"
        b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00"
        b"S\x00\x00\x00\x17DateStyle\x00ISO, MDY\x00"
        b"S\x00\x00\x00&default_transaction_read_only\x00off\x00"
        b"S\x00\x00\x00\x17in_hot_standby\x00off\x00"
        b"S\x00\x00\x00\x19integer_datetimes\x00on\x00"
        b"S\x00\x00\x00\x1bIntervalStyle\x00postgres\x00"
        b"S\x00\x00\x00\x14is_superuser\x00on\x00"
        b"S\x00\x00\x00\x19server_encoding\x00UTF8\x00"
        b"S\x00\x00\x002server_version\x0015.20 (Debian 15.20-0+deb12u1)\x00"
        b"S\x00\x00\x00#session_authorization\x00postgres\x00"
        b"S\x00\x00\x00#standard_conforming_strings\x00on\x00"
        b"S\x00\x00\x00\x15TimeZone\x00Etc/UTC\x00"
        b"K\x00\x00\x00\x0c\x00\x00&\x02\xb1\xb3P\x8b"
        b"Z\x00\x00\x00\x05I",
    ),
    (
        "C",
        b"Q\x00\x00\x00\nBEGIN\x00",
    ),
    (
        "S",
        b"C\x00\x00\x00\nBEGIN\x00Z\x00\x00\x00\x05T",
    ),
    (
        "C",
        b"P\x00\x00\x002\x00SELECT $1::int AS n, $2::text AS t\x00\x00\x02\x00\x00\x00\x15\x00\x00\x00"
        b"\x00"
        b"B\x00\x00\x00\x1e\x00\x00\x00\x02\x00\x01\x00\x00\x00\x02\x00\x00\x00\x02\x00*\x00\x00\x00"
        b"\x02hi\x00\x01\x00\x00"
        b"D\x00\x00\x00\x06P\x00"
        b"E\x00\x00\x00\t\x00\x00\x00\x00\x00"
        b"S\x00\x00\x00\x04",
    ),
    (
        "S",
        b"1\x00\x00\x00\x04"
        b"2\x00\x00\x00\x04"
        b"T\x00\x00\x00.\x00\x02n\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff"
        b"\x00\x00t\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x19\xff\xff\xff\xff\xff\xff\x00\x00"
        b"D\x00\x00\x00\x12\x00\x02\x00\x00\x00\x0242\x00\x00\x00\x02hi"
        b"C\x00\x00\x00\rSELECT 1\x00"
        b"Z\x00\x00\x00\x05T",
    ),
    (
        "C",
        b"Q\x00\x00\x00\x14SELECT 1 AS one\x00",
    ),
    (
        "S",
        b"T\x00\x00\x00\x1c\x00\x01one\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x17\x00\x04\xff\xff\xff"
        b"\xff\x00\x00"
        b"D\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x011"
        b"C\x00\x00\x00\rSELECT 1\x00"
        b"Z\x00\x00\x00\x05T",
    ),
    (
        "C",
        b"Q\x00\x00\x00\x0bCOMMIT\x00",
    ),
    (
        "S",
        b"C\x00\x00\x00\x0bCOMMIT\x00Z\x00\x00\x00\x05I",
    ),
    (
        "C",
        b"X\x00\x00\x00\x04",
    ),
)

# autocommit: CREATE TABLE, LISTEN/NOTIFY/RAISE NOTICE in one Query, a prepared (named)
# statement, COPY FROM STDIN, COPY TO STDOUT, a pipeline whose first statement fails, "SELECT 3; SELECT 4".
PSYCOPG_FEATURES: Final[tuple[Chunk, ...]] = (
    (
        "C",
        b"\x00\x00\x00>\x00\x03\x00\x00user\x00postgres\x00database\x00postgres\x00application_name\x00cap\x00\x00",
    ),
    (
        "S",
        b"R\x00\x00\x00\x17\x00\x00\x00\nSCRAM-SHA-256\x00\x00",
    ),
    (
        "C",
        b"p\x00\x00\x006SCRAM-SHA-256\x00\x00\x00\x00 n,,n=,r=8TwKMPfZfPdtR3f89uLNw6pB",
    ),
    (
        "S",
        b"R\x00\x00\x00\\\x00\x00\x00\x0br=8TwKMPfZfPdtR3f89uLNw6pBZllLkIImlFcHx9ykMk+9X0be,s=4yNsUH7y"
        b"fYbBCaQaOf2aTw==,i=4096",
    ),
    (
        "C",
        b"p\x00\x00\x00lc=biws,r=8TwKMPfZfPdtR3f89uLNw6pBZllLkIImlFcHx9ykMk+9X0be,p=D4kHA+5lIKBWGHjDRP"
        b"qRrTPNhYmXH2ideNh+6IREOsE=",
    ),
    (
        "S",
        b"R\x00\x00\x006\x00\x00\x00\x0cv=CD9JhsoL5Vz55JuDz4+deto+mAmo3/BpD9eBFVJEffU="
        b"R\x00\x00\x00\x08\x00\x00\x00\x00"
        b"S\x00\x00\x00\x19application_name\x00cap\x00"
        b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00"
        b"S\x00\x00\x00\x17DateStyle\x00ISO, MDY\x00"
        b"S\x00\x00\x00&default_transaction_read_only\x00off\x00"
        b"S\x00\x00\x00\x17in_hot_standby\x00off\x00"
        b"S\x00\x00\x00\x19integer_datetimes\x00on\x00"
        b"S\x00\x00\x00\x1bIntervalStyle\x00postgres\x00"
        b"S\x00\x00\x00\x14is_superuser\x00on\x00"
        b"S\x00\x00\x00\x19server_encoding\x00UTF8\x00"
        b"S\x00\x00\x002server_version\x0015.20 (Debian 15.20-0+deb12u1)\x00"
        b"S\x00\x00\x00#session_authorization\x00postgres\x00"
        b"S\x00\x00\x00#standard_conforming_strings\x00on\x00"
        b"S\x00\x00\x00\x15TimeZone\x00Etc/UTC\x00"
        b"K\x00\x00\x00\x0c\x00\x00($\xa5\xe6#o"
        b"Z\x00\x00\x00\x05I",
    ),
    (
        "C",
        b"Q\x00\x00\x000CREATE TABLE t (id int PRIMARY KEY, v text)\x00",
    ),
    (
        "S",
        b"C\x00\x00\x00\x11CREATE TABLE\x00Z\x00\x00\x00\x05I",
    ),
    (
        "C",
        b"Q\x00\x00\x00ILISTEN ch; NOTIFY ch, 'hello'; DO $$BEGIN RAISE NOTICE 'note'; END$$\x00",
    ),
    (
        "S",
        b"C\x00\x00\x00\x0bLISTEN\x00"
        b"C\x00\x00\x00\x0bNOTIFY\x00"
        b"N\x00\x00\x00ySNOTICE\x00VNOTICE\x00C00000\x00Mnote\x00WPL/pgSQL function inline_code_block "
        b"line 1 at RAISE\x00Fpl_exec.c\x00L3907\x00Rexec_stmt_raise\x00\x00",
    ),
    (
        "S",
        b"C\x00\x00\x00\x07DO\x00A\x00\x00\x00\x11\x00\x00($ch\x00hello\x00Z\x00\x00\x00\x05I",
    ),
    (
        "C",
        b"P\x00\x00\x003_pg3_0\x00SELECT id, v FROM t WHERE id = $1\x00\x00\x01\x00\x00\x00\x15S\x00\x00\x00\x04",
    ),
    (
        "S",
        b"1\x00\x00\x00\x04Z\x00\x00\x00\x05I",
    ),
    (
        "C",
        b"B\x00\x00\x00\x1c\x00_pg3_0\x00\x00\x01\x00\x01\x00\x01\x00\x00\x00\x02\x00\x01\x00\x01\x00"
        b"\x00"
        b"D\x00\x00\x00\x06P\x00"
        b"E\x00\x00\x00\t\x00\x00\x00\x00\x00"
        b"S\x00\x00\x00\x04",
    ),
    (
        "S",
        b"2\x00\x00\x00\x04"
        b"T\x00\x00\x00/\x00\x02id\x00\x00\x00@\x00\x00\x01\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff"
        b"\x00\x00v\x00\x00\x00@\x00\x00\x02\x00\x00\x00\x19\xff\xff\xff\xff\xff\xff\x00\x00"
        b"C\x00\x00\x00\rSELECT 0\x00"
        b"Z\x00\x00\x00\x05I",
    ),
    (
        "C",
        b"Q\x00\x00\x00\x16COPY t FROM STDIN\x00",
    ),
    (
        "S",
        b"G\x00\x00\x00\x0b\x00\x00\x02\x00\x00\x00\x00",
    ),
    (
        "C",
        b"d\x00\x00\x00\x0c1\ta\n2\tb\nc\x00\x00\x00\x04",
    ),
    (
        "S",
        b"C\x00\x00\x00\x0bCOPY 2\x00Z\x00\x00\x00\x05I",
    ),
    (
        "C",
        b"Q\x00\x00\x00\x15COPY t TO STDOUT\x00",
    ),
    (
        "S",
        b"H\x00\x00\x00\x0b\x00\x00\x02\x00\x00\x00\x00"
        b"d\x00\x00\x00\x081\ta\n"
        b"d\x00\x00\x00\x082\tb\n"
        b"c\x00\x00\x00\x04"
        b"C\x00\x00\x00\x0bCOPY 2\x00"
        b"Z\x00\x00\x00\x05I",
    ),
    (
        "C",
        b"P\x00\x00\x00\x17\x00SELECT 1/$1\x00\x00\x01\x00\x00\x00\x15"
        b"B\x00\x00\x00\x16\x00\x00\x00\x01\x00\x01\x00\x01\x00\x00\x00\x02\x00\x00\x00\x01\x00\x00"
        b"D\x00\x00\x00\x06P\x00"
        b"E\x00\x00\x00\t\x00\x00\x00\x00\x00",
    ),
    (
        "C",
        b"P\x00\x00\x00\x10\x00SELECT 2\x00\x00\x00"
        b"B\x00\x00\x00\x0e\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00"
        b"D\x00\x00\x00\x06P\x00"
        b"E\x00\x00\x00\t\x00\x00\x00\x00\x00",
    ),
    (
        "C",
        b"S\x00\x00\x00\x04",
    ),
    (
        "C",
        b"H\x00\x00\x00\x04",
    ),
    (
        "S",
        b"1\x00\x00\x00\x04"
        b"E\x00\x00\x00CSERROR\x00VERROR\x00C22012\x00Mdivision by zero\x00Fint.c\x00L1127\x00Rint42di"
        b"v\x00\x00"
        b"Z\x00\x00\x00\x05I",
    ),
    (
        "C",
        b"Q\x00\x00\x00\x17SELECT 3; SELECT 4\x00",
    ),
    (
        "S",
        b"T\x00\x00\x00!\x00\x01?column?\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x17\x00\x04\xff\xff"
        b"\xff\xff\x00\x00"
        b"D\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x013"
        b"C\x00\x00\x00\rSELECT 1\x00"
        b"T\x00\x00\x00!\x00\x01?column?\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x17\x00\x04\xff\xff"
        b"\xff\xff\x00\x00"
        b"D\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x014"
        b"C\x00\x00\x00\rSELECT 1\x00"
        b"Z\x00\x00\x00\x05I",
    ),
    (
        "C",
        b"X\x00\x00\x00\x04",
    ),
)


def chunk_containing(capture: tuple[Chunk, ...], direction: Literal["C", "S"], needle: bytes) -> bytes:
    """The one chunk sent in ``direction`` that contains ``needle``."""
    found = [data for tag, data in capture if tag == direction and needle in data]
    assert len(found) == 1, f"{len(found)} chunks match"
    return found[0]
