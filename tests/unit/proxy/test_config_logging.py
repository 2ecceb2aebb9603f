"""The ``logging:`` section: config/policy.schema.json's ``$defs/logging`` agrees with pgveil's parser on
what a valid section is, and the example configuration follows it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import LogFormat, LogLevel, parse_config
from proxy.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
SCHEMA = json.loads((REPO / "config" / "policy.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator({"$ref": "#/$defs/logging", "$defs": SCHEMA["$defs"]})
EXAMPLE = yaml.safe_load((REPO / "config" / "pgveil.example.yaml").read_text())


def parsed(section: Any) -> Any:
    try:
        return parse_config({"logging": section}, base_dir=Path("/"), environ={}).logging
    except ConfigError:
        return None


def canonical(section: Any) -> Any:
    """The section as the schema shows it: level and format in lower case (pgveil reads any case)."""
    if not isinstance(section, dict):
        return section
    return {k: v.lower() if k in ("level", "format") and isinstance(v, str) else v for k, v in section.items()}


def test_the_example_follows_the_schema() -> None:
    VALIDATOR.validate(EXAMPLE["logging"])
    assert parsed(EXAMPLE["logging"]) is not None


@pytest.mark.parametrize(
    ("section", "valid"),
    [
        (None, True),
        ({}, True),
        ({"level": "debug", "format": "json"}, True),
        ({"level": "WARNING"}, True),
        ({"level": "verbose"}, False),
        ({"level": 10}, False),
        ({"format": "yaml"}, False),
        ({"level": None}, False),
        ({"lvl": "info"}, False),
        ("info", False),
        (["info"], False),
    ],
)
def test_the_schema_and_the_parser_agree(section: Any, valid: bool) -> None:
    assert (parsed(section) is not None) is valid
    assert VALIDATOR.is_valid(canonical(section)) is valid


def _case_variants(words: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(words).flatmap(
        lambda w: st.lists(st.booleans(), min_size=len(w), max_size=len(w)).map(
            lambda upper: "".join(c.upper() if u else c for c, u in zip(w, upper, strict=True))
        )
    )


_VALUES = st.one_of(
    _case_variants([e.value for e in LogLevel] + [e.value for e in LogFormat] + ["verbose", "yaml", ""]),
    st.text(max_size=8),
    st.integers(),
    st.none(),
    st.booleans(),
    st.lists(st.text(max_size=3), max_size=2),
)
_SECTIONS = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(["level", "format", "levels", "Level", "file"]), _VALUES, max_size=3),
    _VALUES,
)


@given(_SECTIONS)
def test_the_schema_holds_the_parser_to_its_shape(section: Any) -> None:
    got = parsed(section)
    assert VALIDATOR.is_valid(canonical(section)) is (got is not None)
    if got is not None and isinstance(section, dict):
        # What was accepted is what was written, in canonical case.
        for key in ("level", "format"):
            if key in section:
                assert getattr(got, key).value == section[key].lower()
