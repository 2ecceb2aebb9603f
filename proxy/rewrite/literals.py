"""Values written into protected columns: which parse-tree shapes are plain values, what their plaintext
is, and where they stand in the statement text.

A value for a protected column must be something the proxy can encrypt before the server sees it: a
constant (possibly signed, possibly with one cast or type prefix), a ``$n`` parameter (possibly cast),
NULL or DEFAULT. Anything else is an expression the server would evaluate on plaintext.

libpg_query reports node locations as byte offsets into the UTF-8 text and only start positions. The
end of a literal expression is found on the token stream: a value in a VALUES list, a SET list or a
SELECT list ends at the first ``,`` ``)`` ``;`` or clause keyword at its own parenthesis depth, and
none of those can occur inside a constant, a cast or a type name at that depth.

Must not: decide whether a column is protected, or put literal text in exceptions or logs.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from pglast import parser as pg_parser

from proxy.errors import FeatureNotSupported
from proxy.rewrite.nodes import Node, last_name, node_type


@dataclass(frozen=True, slots=True, repr=False)
class Constant:
    """A literal value; ``plaintext`` as the type input function receives it."""

    plaintext: str
    cast_type: str | None = None
    numeric: bool = False

    def __repr__(self) -> str:
        return f"Constant(<{len(self.plaintext)} chars>, cast_type={self.cast_type!r})"


@dataclass(frozen=True, slots=True)
class NullValue:
    cast: bool  # NULL::type: the cast must go, the column is bytea on the server


@dataclass(frozen=True, slots=True)
class ParamValue:
    number: int
    cast: bool  # $n::type: the cast must go so that the server infers bytea for $n


@dataclass(frozen=True, slots=True)
class DefaultValue:
    pass


@dataclass(frozen=True, slots=True)
class NotAValue:
    """Not a plain value; ``what`` names the construct for the refusal message."""

    what: str


Value = Constant | NullValue | ParamValue | DefaultValue | NotAValue


def classify_value(node: Node) -> Value:
    """What a value expression is, as far as writing it into an encrypted column goes."""
    kind, body = node_type(node)
    if kind == "A_Const":
        return _constant(body)
    if kind == "ParamRef":
        return ParamValue(int(body.get("number", 0)), cast=False)
    if kind == "SetToDefault":
        return DefaultValue()
    if kind == "TypeCast":
        inner = classify_value(body["arg"])
        if isinstance(inner, Constant) and inner.cast_type is None:
            return Constant(inner.plaintext, type_name_text(body.get("typeName", {})), inner.numeric)
        if isinstance(inner, NullValue) and not inner.cast:
            return NullValue(cast=True)
        if isinstance(inner, ParamValue) and not inner.cast:
            return ParamValue(inner.number, cast=True)
        if isinstance(inner, NotAValue) and inner.what != "expression":
            return inner
        return NotAValue("nested cast" if not isinstance(inner, NotAValue) else "expression")
    if kind == "A_Expr" and "lexpr" not in body and body.get("kind") == "AEXPR_OP":
        op = last_name(body.get("name", []))
        inner = classify_value(body.get("rexpr", {}))
        if op in ("-", "+") and isinstance(inner, Constant) and inner.numeric:
            text = inner.plaintext
            if op == "-":
                text = text[1:] if text.startswith("-") else "-" + text
            return Constant(text, inner.cast_type, numeric=True)
    return NotAValue("expression")


def _constant(body: Node) -> Value:
    if body.get("isnull"):
        return NullValue(cast=False)
    if "sval" in body:
        return Constant(str(body["sval"].get("sval", "")))
    if "ival" in body:
        return Constant(str(int(body["ival"].get("ival", 0))), numeric=True)
    if "fval" in body:
        return Constant(_numeric_text(str(body["fval"].get("fval", "0"))), numeric=True)
    if "boolval" in body:
        return Constant("true" if body["boolval"].get("boolval") else "false")
    if "bsval" in body:
        return NotAValue("bit-string literal")
    return NotAValue("expression")


def _numeric_text(text: str) -> str:
    """Decimal digits without PostgreSQL 16's ``_`` separators; ``0x``/``0o``/``0b`` integers in decimal."""
    unsigned = text.lstrip("+-")
    if unsigned[:2].lower() in ("0x", "0o", "0b"):
        return str(int(text, 0))
    return text.replace("_", "")


def type_name_text(type_name: Node) -> str:
    """A TypeName in PostgreSQL's internal spelling: ``varchar(10)``, ``timestamptz``, ``int4[]``."""
    names = [str(n.get("String", {}).get("sval", "")) for n in type_name.get("names", [])]
    if len(names) > 1 and names[0] == "pg_catalog":
        names = names[1:]
    text = ".".join(names)
    mods: list[str] = []
    for m in type_name.get("typmods", []):
        kind, body = node_type(m)
        if kind == "A_Const" and "ival" in body:
            mods.append(str(body["ival"].get("ival", 0)))
        elif kind == "A_Const" and "sval" in body:
            mods.append(str(body["sval"].get("sval", "")))
        else:
            mods.append("?")
    if mods:
        text += "(" + ",".join(mods) + ")"
    text += "[]" * len(type_name.get("arrayBounds", []))
    return text


# -- positions ------------------------------------------------------------------------------------------

_COMMENTS = frozenset({"C_COMMENT", "SQL_COMMENT"})
_OPEN = frozenset({"ASCII_40", "ASCII_91"})  # ( [
_CLOSE = frozenset({"ASCII_41", "ASCII_93"})  # ) ]
_SEPARATORS = frozenset({"ASCII_44", "ASCII_59"})  # , ;


def _is_name(token: Any) -> bool:
    """An identifier or a keyword (a column may be named by an unreserved one), not punctuation,
    an operator, a constant or a comment."""
    return token.name in ("IDENT", "UIDENT") or token.kind != "NO_KEYWORD"


# Keywords that end a value at its own depth in a SET list, VALUES list or SELECT list. None of them can
# appear in a type name (``timestamp with time zone``, ``character varying``, ``interval day to second``).
_CLAUSE_KEYWORDS = frozenset(
    {
        "AS",
        "FROM",
        "WHERE",
        "RETURNING",
        "ON",
        "GROUP_P",
        "HAVING",
        "WINDOW",
        "ORDER",
        "LIMIT",
        "OFFSET",
        "FETCH",
        "FOR",
        "UNION",
        "INTERSECT",
        "EXCEPT",
        "INTO",
    }
)


def _locations(node: Any, out: list[int]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "location" and isinstance(v, int):
                if v >= 0:
                    out.append(v)
            elif isinstance(v, dict | list):
                _locations(v, out)
    elif isinstance(node, list):
        for v in node:
            _locations(v, out)


class SourceText:
    """The statement text with lazily built helpers to turn parse-tree locations into ``str`` spans.

    One per ``analyze`` call: the token scan runs only if a statement has something to rewrite.
    """

    def __init__(self, sql: str) -> None:
        self.sql = sql
        self._ascii = sql.isascii()
        self._byte_to_char: list[int] | None = None
        self._tokens: list[Any] | None = None
        self._starts: list[int] = []

    def char_offset(self, byte_offset: int) -> int:
        if self._ascii:
            return byte_offset
        if self._byte_to_char is None:
            table: list[int] = []
            for i, ch in enumerate(self.sql):
                table.extend([i] * len(ch.encode("utf-8")))
            table.append(len(self.sql))
            self._byte_to_char = table
        return self._byte_to_char[min(byte_offset, len(self._byte_to_char) - 1)]

    def _token_list(self) -> list[Any]:
        if self._tokens is None:
            self._tokens = list(pg_parser.scan(self.sql))
            self._starts = [t.start for t in self._tokens]
        return self._tokens

    def value_span(self, node: Node, *, bare_alias: bool = False) -> tuple[int, int]:
        """``(start, end)`` of a value expression in ``str`` indices.

        ``bare_alias`` says the value is a SELECT-list entry with an output name, which may be written
        without AS (``SELECT 'x' label``) and then is the last token before the delimiter.
        """
        found: list[int] = []
        _locations(node, found)
        if not found:
            raise _span_error()
        start = self.char_offset(min(found))
        last_location = self.char_offset(max(found))
        tokens = self._token_list()
        i = bisect.bisect_left(self._starts, start)
        if i >= len(tokens) or tokens[i].start != start:
            raise _span_error()
        depth = 0
        last = i
        stopped_by_as = False
        for j in range(i, len(tokens)):
            name = tokens[j].name
            if name in _COMMENTS:
                continue
            if depth == 0 and (name in _SEPARATORS or name in _CLOSE or name in _CLAUSE_KEYWORDS):
                stopped_by_as = name == "AS"
                break
            if name in _OPEN:
                depth += 1
            elif name in _CLOSE:
                depth -= 1
            last = j
        if bare_alias and not stopped_by_as:
            last = self._previous_code_token(last, i)
        end = tokens[last].end + 1
        if not start <= last_location < end:
            raise _span_error()
        return start, end

    def reference_span(self, node: Node) -> tuple[int, int]:
        """``(start, end)`` of a column reference (a ColumnRef: names joined by dots) in ``str`` indices,
        with every pair of parentheses that wraps nothing but it: ``((t.ssn))`` whole. The alias of a
        SELECT-list entry, with AS or without, is never part of it. Anything else between the names (a
        star) is a span error: the caller then leaves the text alone."""
        found: list[int] = []
        _locations(node, found)
        if len(found) != 1:
            raise _span_error()
        start = self.char_offset(found[0])
        tokens = self._token_list()
        i = bisect.bisect_left(self._starts, start)
        if i >= len(tokens) or tokens[i].start != start or not _is_name(tokens[i]):
            raise _span_error()
        last = i
        while (dot := self._code_token(last, 1)) is not None and tokens[dot].name == "ASCII_46":
            name = self._code_token(dot, 1)
            if name is None or not _is_name(tokens[name]):
                raise _span_error()  # a dot followed by something that is not a name (a star)
            last = name
        first = i
        while True:
            before, after = self._code_token(first, -1), self._code_token(last, 1)
            if before is None or after is None:
                break
            if tokens[before].name != "ASCII_40" or tokens[after].name != "ASCII_41":
                break
            first, last = before, after
        return tokens[first].start, tokens[last].end + 1

    def _code_token(self, j: int, step: int) -> int | None:
        """The index of the first non-comment token from ``j`` in direction ``step``, or None."""
        tokens = self._token_list()
        k = j + step
        while 0 <= k < len(tokens) and tokens[k].name in _COMMENTS:
            k += step
        return k if 0 <= k < len(tokens) else None

    def _previous_code_token(self, j: int, floor: int) -> int:
        tokens = self._token_list()
        k = j - 1
        while k > floor and tokens[k].name in _COMMENTS:
            k -= 1
        if k < floor:
            raise _span_error()
        return k


def _span_error() -> FeatureNotSupported:
    return FeatureNotSupported(
        "pgveil: could not locate a value for an encrypted column in the statement text",
        hint="pass the value as a $n parameter",
    )
