"""When a text's reading depends on standard_conforming_strings or on the client encoding (now or after
a request still unanswered), and when it does not; and the version check in the analysis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.pgtypes.base import SessionFormat, statement_bytes, statement_text, wire_text
from proxy.rewrite.analysis import analyze
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable
from proxy.rewrite.reading import ascii_safe, reading_refusal, version_refusal

ATTACK_SCS = "SELECT 'a\\' AS x, '; INSERT INTO secrets (v) VALUES ($$plain$$); --' AS y"


def _refusal(sql: str, *, scs: bool = True, encoding: str = "UTF8", certain: bool = True) -> str | None:
    e = reading_refusal(sql, standard_conforming_strings=scs, client_encoding=encoding, certain=certain)
    if e is None:
        return None
    assert e.sqlstate == "0A000"
    assert "plain" not in e.message
    assert "secrets" not in e.message
    return e.message


def test_scs_on_and_certain_reads_as_the_analysis_does() -> None:
    assert _refusal(ATTACK_SCS) is None


def test_scs_off_refuses_a_text_that_reads_differently() -> None:
    msg = _refusal(ATTACK_SCS, scs=False)
    assert msg is not None
    assert "standard_conforming_strings off" in msg


def test_scs_possibly_off_refuses_while_requests_are_unanswered() -> None:
    msg = _refusal(ATTACK_SCS, certain=False)
    assert msg is not None
    assert "unanswered" in msg


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO secrets (v) VALUES ('plain')",
        "SELECT E'\\n', 'it''s', $$a\\b$$, /* \\ */ 1 -- \\",
        "SELECT 'a\\b'::text WHERE false",  # a backslash that does not move a boundary but changes the value
    ],
)
def test_scs_off_accepts_texts_that_read_the_same(sql: str) -> None:
    expected = None if "'a\\b'" not in sql else "differently"
    got = _refusal(sql, scs=False)
    assert (got is None) == (expected is None)


def test_unicode_string_with_scs_off_is_refused() -> None:
    assert _refusal("SELECT U&'x'", scs=False) is not None
    assert _refusal("SELECT U&'x'") is None


@pytest.mark.parametrize("encoding", ["SJIS", "SHIFT_JIS_2004", "BIG5", "GBK", "UHC", "GB18030", "JOHAB", "NOPE"])
def test_client_only_encodings_refuse_non_ascii_text_but_not_ascii(encoding: str) -> None:
    assert not ascii_safe(encoding)
    msg = _refusal("SELECT E'\u0101\\'; INSERT INTO secrets VALUES ($$plain$$); --'", encoding=encoding)
    assert msg is not None
    assert encoding in msg
    assert _refusal("SET client_encoding = 'UTF8'", encoding=encoding) is None


@pytest.mark.parametrize("encoding", ["UTF8", "SQL_ASCII", "LATIN1", "EUC_JP", "WIN1252", "KOI8R", "utf-8"])
def test_ascii_safe_encodings(encoding: str) -> None:
    assert ascii_safe(encoding)
    assert _refusal("SELECT 'café', E'\u0101\\''", encoding=encoding) is None


def test_possible_encoding_switch_refuses_a_text_whose_backslash_could_be_swallowed() -> None:
    # U+0101 is C4 81 in UTF-8; in SJIS 0x81 starts a two-byte character and takes the backslash.
    attack = "SELECT E'\u0101\\'; INSERT INTO secrets VALUES ($$plain$$); --'"
    assert _refusal(attack) is None
    msg = _refusal(attack, certain=False)
    assert msg is not None
    assert "client_encoding" in msg


def test_possible_encoding_switch_accepts_non_ascii_text_that_cannot_move() -> None:
    assert _refusal("SELECT 'café au lait', \"größe\" FROM t", certain=False) is None
    assert _refusal("SELECT 'ā' , 'x'", certain=False) is None  # 0x81 takes a space: same tokens


# -- the version check -------------------------------------------------------------------------------------

SECRETS = ProtectedTable("public", "secrets", {"n": ProtectedColumn("public", "secrets", "n", "integer")}, ("n",))
CATALOG = Catalog({("public", "secrets"): SECRETS})


@pytest.mark.parametrize("literal", ["0x1F", "1_000", "0b101", "0o17"])
def test_postgresql_16_numbers_are_marked(literal: str) -> None:
    plan = analyze(f"INSERT INTO secrets (n) VALUES ({literal})", CATALOG)
    assert plan.syntax_since == 16
    assert analyze("INSERT INTO secrets (n) VALUES (31)", CATALOG).syntax_since == 0


def test_version_refusal_is_a_syntax_error() -> None:
    e = version_refusal(15)
    assert e.sqlstate == "42601"
    assert "PostgreSQL 15" in e.message


def test_backslash_quote_in_a_client_only_encoding_is_refused() -> None:
    """backslash_quote = safe_encoding: the server rejects \\' there; pgveil must not rewrite it into a
    text the server accepts."""
    assert _refusal("SELECT E'\\''", encoding="SJIS") is not None
    assert _refusal("SELECT E'\\''", encoding="UTF8") is None


def test_cached_comparisons_give_fresh_refusals() -> None:
    first = reading_refusal(ATTACK_SCS, standard_conforming_strings=False, client_encoding="UTF8", certain=True)
    second = reading_refusal(ATTACK_SCS, standard_conforming_strings=False, client_encoding="UTF8", certain=True)
    assert first is not None
    assert second is not None
    assert first is not second
    long_text = ATTACK_SCS + " " * 10000  # above the cached length: compared each time, same answer
    assert _refusal(long_text, scs=False) is not None


# -- the session's settings and the statement text ------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "major"), [("15.4 (Debian 15.4-1.pgdg120+1)", 15), ("16beta1", 16), ("9.6.24", 9), ("", 0)]
)
def test_server_major_from_parameter_status(version: str, major: int) -> None:
    fmt = SessionFormat().with_parameter("server_version", version)
    assert fmt.server_major == major


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.sampled_from(["UTF8", "SQL_ASCII", "LATIN1", "WIN1252", "KOI8R", "SJIS"]))
def test_statement_text_round_trips_the_client_bytes(raw: bytes, encoding: str) -> None:
    """Whatever the bytes, reading them in the client encoding and writing them back changes nothing, so a
    rewritten text differs from the client's only where pgveil replaced a literal."""
    fmt = SessionFormat(client_encoding=encoding)
    wire = raw.decode("utf-8", "surrogateescape")  # what the protocol codec hands over
    text = statement_text(wire, fmt)
    assert wire_text(text, fmt) == wire
    assert statement_bytes(text, fmt) == raw


def test_statement_text_is_read_in_latin1() -> None:
    fmt = SessionFormat(client_encoding="LATIN1")
    wire = b"SELECT 'caf\xe9'".decode("utf-8", "surrogateescape")
    assert statement_text(wire, fmt) == "SELECT 'café'"
