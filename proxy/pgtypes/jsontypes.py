"""json and jsonb.

json: canonical form is the text exactly as given (UTF-8), once PostgreSQL's JSON grammar accepts
it (RFC 8259 strictly: no NaN, no leading zeros, no trailing commas, no control characters in
strings; whitespace is space, tab, CR, LF). Like PostgreSQL's json, ``\\u`` escapes are checked
for syntax only, so lone surrogates and ``\\u0000`` are kept as written. The binary format is the
same text.

jsonb: canonical form is PostgreSQL's jsonb text output: escapes decoded (a lone surrogate is
22P02, ``\\u0000`` 22P05), numbers as numeric prints them (``1E2`` -> ``100``, ``-0`` -> ``0``,
``1.50`` stays), object keys de-duplicated with the last value winning and ordered shorter first,
then bytewise, and PostgreSQL's spacing (``{"a": 1, "b": [1, 2]}``). As with numeric, ``1.5``
and ``1.50`` are different canonical values. The binary format is a version byte (1) and the
text.

Parsing and printing are iterative, so nesting depth costs memory, not Python stack.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeAlias

from proxy.pgtypes.base import DEFAULT_FORMAT, SessionFormat, decode_client, utf8_to_client
from proxy.pgtypes.errors import InvalidBinaryRepresentation, InvalidTextRepresentation, UntranslatableCharacter
from proxy.pgtypes.numeric import canonical_numeric_text

_ALNUM = r"A-Za-z0-9_\u0080-\U0010ffff"
_TOKEN = re.compile(
    r"[ \t\n\r]*+(?:"
    r'(?P<s>"(?:[^"\\\x00-\x1f]++|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*+")'
    rf"|(?P<n>-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?(?:[eE][+-]?[0-9]++)?)(?![{_ALNUM}])"
    r"|(?P<p>[{}\[\]:,])"
    rf"|(?P<w>[{_ALNUM}]++))"
)
_TRAILING_SPACE = re.compile(r"[ \t\n\r]*+")
_ESCAPE = re.compile(
    r"\\u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})"
    r"|\\u([0-9a-fA-F]{4})"
    r'|\\(["\\/bfnrt])'
)
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_KEYWORDS = frozenset(("true", "false", "null"))

# escape_json: the short escapes, \u00XX for other control characters, everything else verbatim.
_ESCAPE_OUT = {i: f"\\u{i:04x}" for i in range(0x20)}
_ESCAPE_OUT.update({0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x22: '\\"', 0x5C: "\\\\"})

# A jsonb value while it is normalised: an object, an array, or a scalar already in output form.
_Node: TypeAlias = dict[str, "_Node"] | list["_Node"] | str

_VALUE, _AFTER_VALUE, _FIRST_KEY, _KEY, _COLON, _FIRST_ELEMENT = range(6)


def _invalid() -> InvalidTextRepresentation:
    return InvalidTextRepresentation("invalid input syntax for type json")


def _decode_string(body: str) -> str:
    """The characters a JSON string literal (without its quotes) stands for, as jsonb reads it."""
    if "\\" not in body:
        return body

    def replace(m: re.Match[str]) -> str:
        high, low, single, simple = m.groups()
        if high is not None:
            return chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + (int(low, 16) - 0xDC00))
        if single is not None:
            code = int(single, 16)
            if 0xD800 <= code <= 0xDFFF:
                raise _invalid()
            if code == 0:
                raise UntranslatableCharacter(
                    "unsupported Unicode escape sequence", detail="\\u0000 cannot be converted to text."
                )
            return chr(code)
        return _SIMPLE_ESCAPES[simple]

    return _ESCAPE.sub(replace, body)


def _quote(text: str) -> str:
    return '"' + text.translate(_ESCAPE_OUT) + '"'


def _parse(text: str, build: bool) -> _Node | None:
    """Checks ``text`` against PostgreSQL's JSON grammar; with ``build``, returns the jsonb tree."""
    containers: list[dict[str, _Node] | list[_Node]] = []
    keys: list[str] = []
    root: _Node | None = None
    state = _VALUE
    pos = 0
    end = len(text)
    while True:
        m = _TOKEN.match(text, pos)
        if m is None:
            tail = _TRAILING_SPACE.match(text, pos)
            if tail is not None and tail.end() == end and state == _AFTER_VALUE and not containers:
                return root
            raise _invalid()
        pos = m.end()
        kind = m.lastgroup
        token = m.group(kind or "p")
        if state == _AFTER_VALUE:
            if not containers or kind != "p":
                raise _invalid()
            top = containers[-1]
            is_object = isinstance(top, dict)
            if token == ",":
                state = _KEY if is_object else _VALUE
                continue
            if token != ("}" if is_object else "]"):
                raise _invalid()
            finished = containers.pop()
            if build:
                _attach(finished, containers, keys)
                if not containers:
                    root = finished
            continue
        if state in (_FIRST_KEY, _KEY):
            if state == _FIRST_KEY and token == "}" and kind == "p":
                finished = containers.pop()
                if build:
                    _attach(finished, containers, keys)
                    if not containers:
                        root = finished
                state = _AFTER_VALUE
                continue
            if kind != "s":
                raise _invalid()
            if build:
                keys.append(_decode_string(token[1:-1]))
            state = _COLON
            continue
        if state == _COLON:
            if token != ":" or kind != "p":
                raise _invalid()
            state = _VALUE
            continue
        if state == _FIRST_ELEMENT and token == "]" and kind == "p":
            finished = containers.pop()
            if build:
                _attach(finished, containers, keys)
                if not containers:
                    root = finished
            state = _AFTER_VALUE
            continue
        # A value is expected.
        if kind == "p":
            if token == "{":
                containers.append({})
                state = _FIRST_KEY
            elif token == "[":
                containers.append([])
                state = _FIRST_ELEMENT
            else:
                raise _invalid()
            continue
        if kind == "w" and token not in _KEYWORDS:
            raise _invalid()
        if build:
            if kind == "s":
                scalar = _quote(_decode_string(token[1:-1]))
            elif kind == "n":
                scalar = canonical_numeric_text(token.encode("ascii")).decode("ascii")
            else:
                scalar = token
            if containers:
                _attach(scalar, containers, keys)
            else:
                root = scalar
        state = _AFTER_VALUE


def _attach(node: _Node, containers: list[dict[str, _Node] | list[_Node]], keys: list[str]) -> None:
    """Adds a finished value to the enclosing container (an object's last key wins)."""
    if not containers:
        return
    parent = containers[-1]
    if isinstance(parent, dict):
        parent[keys.pop()] = node
    else:
        parent.append(node)


def _key_order(key: str) -> tuple[int, bytes]:
    encoded = key.encode("utf-8")
    return len(encoded), encoded


def _items(node: dict[str, _Node] | list[_Node]) -> Iterator[tuple[str | None, _Node]]:
    if isinstance(node, dict):
        for key in sorted(node, key=_key_order):
            yield key, node[key]
    else:
        for element in node:
            yield None, element


def _serialize(root: _Node) -> str:
    """JsonbToCString without indentation: ", " between members, ": " after keys."""
    parts: list[str] = []
    stack: list[tuple[Iterator[tuple[str | None, _Node]], str]] = []
    firsts: list[bool] = []
    node: _Node | None = root
    while True:
        if node is not None:
            if isinstance(node, str):
                parts.append(node)
            else:
                opener, closer = ("{", "}") if isinstance(node, dict) else ("[", "]")
                parts.append(opener)
                stack.append((_items(node), closer))
                firsts.append(True)
            node = None
        if not stack:
            return "".join(parts)
        iterator, closer = stack[-1]
        item = next(iterator, None)
        if item is None:
            parts.append(closer)
            stack.pop()
            firsts.pop()
            continue
        if not firsts[-1]:
            parts.append(", ")
        firsts[-1] = False
        key, node = item
        if key is not None:
            parts.append(_quote(key))
            parts.append(": ")


@dataclass(frozen=True, slots=True)
class JsonCodec:
    name: str = "json"
    oid: int = 114
    typlen: int = -1
    typmod: int = -1
    array_oid: int = 199

    def _canonical(self, data: bytes, fmt: SessionFormat) -> bytes:
        text = decode_client(data, fmt)
        _parse(text, build=False)
        return text.encode("utf-8")

    def canonical_from_text(self, data: bytes, fmt: SessionFormat) -> bytes:
        return self._canonical(data, fmt)

    def canonical_from_binary(self, data: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        return self._canonical(data, fmt)

    def to_text(self, canonical: bytes, fmt: SessionFormat) -> bytes:
        return utf8_to_client(canonical, fmt)

    def to_binary(self, canonical: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        return utf8_to_client(canonical, fmt)


@dataclass(frozen=True, slots=True)
class JsonbCodec:
    name: str = "jsonb"
    oid: int = 3802
    typlen: int = -1
    typmod: int = -1
    array_oid: int = 3807

    def canonical_from_text(self, data: bytes, fmt: SessionFormat) -> bytes:
        root = _parse(decode_client(data, fmt), build=True)
        assert root is not None
        return _serialize(root).encode("utf-8")

    def canonical_from_binary(self, data: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        if data[:1] != b"\x01":
            raise InvalidBinaryRepresentation("unsupported jsonb version number")
        return self.canonical_from_text(data[1:], fmt)

    def to_text(self, canonical: bytes, fmt: SessionFormat) -> bytes:
        return utf8_to_client(canonical, fmt)

    def to_binary(self, canonical: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        return b"\x01" + utf8_to_client(canonical, fmt)


JSON = JsonCodec()
JSONB = JsonbCodec()
