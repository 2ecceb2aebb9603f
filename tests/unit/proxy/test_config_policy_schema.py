"""config/policy.schema.json, the JSON Schema of the roles: section (for editors and CI checks), agrees
with pgveil's own parser on the shape of a policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.policy.rules import parse_pattern, parse_visibility

REPO = Path(__file__).resolve().parents[3]
SCHEMA = json.loads((REPO / "config" / "policy.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
EXAMPLE = yaml.safe_load((REPO / "config" / "pgveil.example.yaml").read_text())
TABLES = {
    "public.customers": {"columns": {"email": {"type": "text", "encrypt": True}, "ssn": {"type": "text"}}},
    "billing.cards": {"columns": {"pan": {"type": "text"}}},
}


def schema_accepts(roles: Any) -> bool:
    return VALIDATOR.is_valid(roles)


def parser_accepts(roles: Any) -> bool:
    try:
        parse_config({"tables": TABLES, "roles": roles}, base_dir=Path("/"), environ={"PGVEIL_KEYSTORE_DSN": "x"})
    except ConfigError:
        return False
    return True


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_the_examples_roles_follow_the_schema() -> None:
    VALIDATOR.validate(EXAMPLE["roles"])


SHAPES: list[tuple[Any, bool]] = [
    ({}, True),
    ({"default": "plaintext"}, True),
    ({"default": "match", "support": "masked:fixed:N/A"}, True),
    ({"support": {"public.customers.ssn": "masked:last4", "public.customers.*": "match:email"}}, True),
    ({"etl": {"*": "ciphertext", "public.*": "hidden", "billing.cards.pan": "deny"}}, True),
    ({"default": {"*": "hidden"}}, False),
    ({"support": None}, False),
    ({"support": ["plaintext"]}, False),
    ({"support": "maskd"}, False),
    ({"support": "masked"}, False),
    ({"support": "masked:fixed"}, False),
    ({"support": "hidden:null"}, False),
    ({"support": {"public.customers": "hidden"}}, False),
    ({"support": {"public.*.ssn": "hidden"}}, False),
    ({"support": {"*": 1}}, False),
    ({"": "hidden"}, False),
    ({"r" * 64: "hidden"}, False),
    ("plaintext", False),
]


@pytest.mark.parametrize(("roles", "valid"), SHAPES)
def test_the_schema_and_the_parser_agree_on_the_shape(roles: Any, valid: bool) -> None:
    assert schema_accepts(roles) is valid
    assert parser_accepts(roles) is valid


def render(text: str) -> str:
    visibility, mask = parse_visibility(text)
    return str(visibility) if mask is None else f"{visibility}:{mask}"


VISIBILITY_TEXT = st.one_of(
    st.sampled_from(["plaintext", "match", "match:hash", "masked:fixed:", "masked:fixed:a:b", "Hidden", "deny "]),
    st.text(alphabet="maskedplaintexhiduy4:f", max_size=16),
    st.builds("{}:{}".format, st.sampled_from(["masked", "match"]), st.text(max_size=12)),
)


@given(VISIBILITY_TEXT)
def test_a_visibility_the_schema_accepts_is_one_pgveil_reads_and_the_other_way_round(text: str) -> None:
    try:
        canonical = text == "match" or render(text) == text
    except ValueError:
        assert not schema_accepts({"r": text})
        return
    assert schema_accepts({"r": text}) is canonical  # pgveil reads more spellings; the schema the canonical ones


PATTERN_TEXT = st.one_of(
    st.sampled_from(["*", "public.*", "public.t.*", "public.t.c", "a.b.c.d", "*.t.c", "Public.T.c", "a$b._x.*"]),
    st.text(alphabet="ab_$.*1 -", max_size=10),
)


@given(PATTERN_TEXT)
def test_a_pattern_the_schema_accepts_is_one_pgveil_reads(text: str) -> None:
    if schema_accepts({"r": {text: "hidden"}}):
        parse_pattern(text)
    try:
        pattern = parse_pattern(text)
    except ValueError:
        return
    if str(pattern) == text:
        assert schema_accepts({"r": {text: "hidden"}})
