"""The audit: section: defaults, every error named by its dotted path, and config/policy.schema.json's
$defs/audit agreeing with the parser on the shape of the section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import parse_config
from proxy.config.types import AnomalyRule, AuditConfig
from proxy.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
SCHEMA = json.loads((REPO / "config" / "policy.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator({"$ref": "#/$defs/audit", "$defs": SCHEMA["$defs"]})
TABLES = {
    "public.customers": {"columns": {"email": {"type": "text", "encrypt": True}, "ssn": {"type": "text"}}},
}
ROLES = {"default": "hidden", "support": {"public.customers.email": "plaintext"}}


def parse(audit: Any) -> AuditConfig:
    data = {"tables": TABLES, "roles": ROLES, "audit": audit}
    return parse_config(data, base_dir=Path("/"), environ={"PGVEIL_KEYSTORE_DSN": "postgresql://x/y"}).audit


def errors_of(audit: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(audit)
    return e.value.errors


def test_absent_or_null_is_the_defaults() -> None:
    assert parse(None) == AuditConfig()
    assert parse({}) == AuditConfig()
    assert AuditConfig().flush_seconds == 10.0
    assert AuditConfig().window_seconds == 60.0


def test_a_rule_is_read_with_its_pattern_in_canonical_form() -> None:
    cfg = parse(
        {
            "flush_seconds": 2,
            "window_seconds": 5,
            "anomaly": [
                {"role": "support", "column": "Public.Customers.Email", "plaintext_per_minute": 100, "refuse": True},
                {"role": "default", "column": "public.*", "plaintext_per_minute": 0},
            ],
        }
    )
    assert cfg.flush_seconds == 2.0
    assert cfg.anomaly == (
        AnomalyRule("support", "public.customers.email", 100, True),
        AnomalyRule("default", "public.*", 0, False),
    )


@pytest.mark.parametrize(
    ("audit", "expected"),
    [
        ("yes", "audit: must be a mapping, got 'yes'"),
        ({"flush": 1}, "audit.flush: unknown setting"),
        ({"flush_seconds": 0}, "audit.flush_seconds: must be a number of seconds > 0, got 0"),
        ({"window_seconds": "1m"}, "audit.window_seconds: must be a number of seconds > 0, got '1m'"),
        ({"max_pending_records": 1.5}, "audit.max_pending_records: must be an integer >= 1, got 1.5"),
        ({"enabled": "on"}, "audit.enabled: must be true or false, got 'on'"),
        ({"anomaly": {"role": "support"}}, "audit.anomaly: must be a list of rules"),
        ({"anomaly": ["support"]}, "audit.anomaly[0]: must be a mapping"),
        ({"anomaly": [{"role": "support", "column": "public.customers.email"}]},
         "audit.anomaly[0].plaintext_per_minute: required"),
        ({"anomaly": [{"role": "suport", "column": "public.customers.email", "plaintext_per_minute": 1}]},
         "audit.anomaly[0].role: 'suport' is not a role of the roles: section (did you mean 'support'?)"),
        ({"anomaly": [{"role": "support", "column": "public.customers.phone", "plaintext_per_minute": 1}]},
         "audit.anomaly[0].column: 'public.customers.phone' names no column of the tables: section"),
        ({"anomaly": [{"role": "support", "column": "public.customers", "plaintext_per_minute": 1}]},
         "audit.anomaly[0].column: a pattern must be"),
        ({"anomaly": [{"role": "support", "column": "*", "plaintext_per_minute": -1}]},
         "audit.anomaly[0].plaintext_per_minute: must be an integer >= 0, got -1"),
        ({"anomaly": [{"role": "support", "column": "*", "plaintext_per_minute": 1, "refuse": "yes"}]},
         "audit.anomaly[0].refuse: must be true or false, got 'yes'"),
        ({"anomaly": [{"role": "support", "column": "*", "plaintext_per_minute": 1, "limit": 2}]},
         "audit.anomaly[0].limit: unknown setting"),
        ({"anomaly": [{"role": "support", "column": "*", "plaintext_per_minute": 1},
                      {"role": "support", "column": "*", "plaintext_per_minute": 2}]},
         "audit.anomaly[1]: role support has another rule for *"),
    ],
)  # fmt: skip
def test_every_error_names_its_dotted_path(audit: Any, expected: str) -> None:
    errors = errors_of(audit)
    assert any(e.startswith(expected) for e in errors), errors
    assert not VALIDATOR.is_valid(audit) or "role" in expected or "column" in expected or "another rule" in expected


def test_the_schema_is_valid_and_accepts_the_example_section() -> None:
    import yaml

    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    example = yaml.safe_load((REPO / "config" / "pgveil.example.yaml").read_text())
    VALIDATOR.validate(example["audit"])


def parser_accepts(audit: Any) -> bool:
    try:
        parse(audit)
    except ConfigError:
        return False
    return True


NON_STRINGS = st.one_of(st.none(), st.booleans(), st.integers(-2, 200), st.floats(-1, 100, allow_nan=False))
VALUES = NON_STRINGS | st.sampled_from(["", "x", " "])
# Roles and columns the config names (which a schema cannot know), and shapes no config accepts.
RULES = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["support", "default", ""]) | NON_STRINGS,
        "column": st.sampled_from(
            ["public.customers.email", "public.*", "*", "public.customers.*", "public.customers", "*.x", ""]
        )
        | NON_STRINGS,
        "plaintext_per_minute": VALUES,
        "refuse": VALUES,
    },
)
SECTIONS = st.fixed_dictionaries(
    {},
    optional={
        "enabled": VALUES,
        "flush_seconds": VALUES,
        "window_seconds": VALUES,
        "instance": VALUES | st.sampled_from(["pgveil-1", "a" * 201]),
        "max_pending_records": VALUES,
        "anomaly": st.none() | st.lists(RULES, max_size=2),
    },
)


@settings(max_examples=500)
@given(SECTIONS)
def test_the_schema_and_the_parser_agree_on_the_shape(audit: dict[str, Any]) -> None:
    """Roles and columns the schema cannot know are taken from the config; with them, both agree."""
    rules = audit.get("anomaly") or []
    pairs = [(r.get("role"), r.get("column")) for r in rules]
    if len(set(pairs)) != len(pairs):
        return  # two rules of one role for one pattern: only the parser sees it
    assert parser_accepts(audit) is VALIDATOR.is_valid(audit)
