"""The ``roles:`` section of the config: the visibility policy, every problem named by its dotted path."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import Config, KeystoreConfig, PolicySettings, parse_config
from proxy.config.roles import ABSENT_WARNING
from proxy.errors import ConfigError
from proxy.policy.model import Grant, Mask, MaskFunction, Visibility
from proxy.policy.rules import Pattern
from proxy.rewrite.catalog import ProtectedColumn

BASE = Path("/etc/pgveil")

# The issue's example, as the user writes it.
ISSUE_EXAMPLE = """
keystore: {dsn: "host=db"}
tables:
  public.customers:
    columns:
      email: {type: text, encrypt: true}
      ssn:   {type: text, encrypt: true}
      phone: {type: text}            # plain in the database, visibility only
  public.orders:
    columns:
      total: {type: numeric}
roles:
  default: hidden                    # any role not listed; restrictive unless configured otherwise
  billing: {"public.customers.*": plaintext}
  support:
    public.customers.email: plaintext
    public.customers.ssn: masked:last4
    public.customers.phone: masked:partial
  contractor: {"public.customers.*": deny}
  backup: {"public.customers.*": ciphertext}
"""


def parse(data: Any) -> Config:
    return parse_config(data, base_dir=BASE, environ={})


def errors_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return info.value.errors


def with_roles(roles: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(ISSUE_EXAMPLE)
    data["roles"] = roles
    return data


def col(column_id: str, declared_type: str = "text") -> ProtectedColumn:
    schema, table, name = column_id.split(".")
    return ProtectedColumn(schema=schema, table=table, name=name, declared_type=declared_type)


def test_the_issue_example() -> None:
    config = parse(yaml.safe_load(ISSUE_EXAMPLE))
    policy = config.policy
    assert policy.configured
    assert policy.role_names == {"billing", "support", "contractor", "backup"}
    assert policy.default == Grant(Visibility.HIDDEN, source="default")
    assert policy.column_ids == {
        "public.customers.email",
        "public.customers.ssn",
        "public.customers.phone",
        "public.orders.total",
    }
    support = policy.view("support", frozenset(), epoch=1)
    assert support.grant(col("public.customers.ssn")) == Grant(
        Visibility.MASKED, Mask(MaskFunction.LAST4), "support: public.customers.ssn"
    )
    assert support.grant(col("public.customers.phone")).mask == Mask(MaskFunction.PARTIAL)
    assert support.grant(col("public.customers.email")).visibility is Visibility.PLAINTEXT
    assert support.grant(col("public.orders.total")).source == "default"
    contractor = policy.view("contractor", frozenset(), epoch=1)
    assert contractor.grant(col("public.customers.email")) == Grant(
        Visibility.DENY, None, "contractor: public.customers.*"
    )
    backup = policy.view("backup", frozenset(), epoch=1)
    assert backup.grant(col("public.customers.phone")).visibility is Visibility.CIPHERTEXT  # plain columns too
    assert config.warnings == ()
    assert config.governs_anything
    # Plain and encrypted columns alike are governed; only the encrypted ones need keys.
    assert config.encrypts_anything
    assert config.keystore is not None


def test_the_same_file_gives_an_equal_policy() -> None:
    assert parse(yaml.safe_load(ISSUE_EXAMPLE)).policy == parse(yaml.safe_load(ISSUE_EXAMPLE)).policy
    reordered = with_roles(dict(reversed(list(yaml.safe_load(ISSUE_EXAMPLE)["roles"].items()))))
    assert parse(reordered).policy == parse(yaml.safe_load(ISSUE_EXAMPLE)).policy


def test_an_absent_roles_section_hides_every_governed_column_and_says_so() -> None:
    data = yaml.safe_load(ISSUE_EXAMPLE)
    del data["roles"]
    config = parse(data)
    assert not config.policy.configured
    assert config.policy.default.visibility is Visibility.HIDDEN
    view = config.policy.view("postgres", frozenset(), epoch=0)
    assert {g.visibility for g in view.grants.values()} == {Visibility.HIDDEN}
    assert config.warnings == (ABSENT_WARNING,)
    assert parse(with_roles(None)).warnings == (ABSENT_WARNING,)
    # Nothing governed, nothing to say: a pure pass-through proxy.
    assert parse({}).warnings == ()
    assert not parse({}).governs_anything


def test_a_roles_section_alone_means_statements_are_governed() -> None:
    config = parse({"roles": {"default": "hidden"}})
    assert (config.governs_anything, config.encrypts_anything, config.keystore) == (True, False, None)


def test_one_visibility_for_a_role_applies_to_every_governed_column() -> None:
    policy = parse(with_roles({"auditor": "masked:null"})).policy
    view = policy.view("auditor", frozenset(), epoch=1)
    assert {g.source for g in view.grants.values()} == {"auditor: *"}
    assert {g.mask for g in view.grants.values()} == {Mask(MaskFunction.NULL)}


def test_patterns_fold_to_lower_case_and_the_most_specific_wins() -> None:
    policy = parse(
        with_roles(
            {
                "support": {
                    "*": "hidden",
                    "Public.*": "masked:null",
                    "public.Customers.*": "masked:partial",
                    "PUBLIC.CUSTOMERS.EMAIL": "match",
                }
            }
        )
    ).policy
    (support,) = policy.roles
    assert [r.pattern for r in support.rules] == [
        Pattern("public", "customers", "email"),
        Pattern("public", "customers"),
        Pattern("public"),
        Pattern(),
    ]
    view = policy.view("support", frozenset(), epoch=1)
    assert view.grant(col("public.customers.email")) == Grant(
        Visibility.MATCH, Mask(MaskFunction.PARTIAL), "support: public.customers.email"
    )
    assert view.grant(col("public.orders.total")).mask == Mask(MaskFunction.NULL)


def test_hash_masks_need_a_keystore() -> None:
    data = {"tables": {"t": {"columns": {"phone": {"type": "text"}}}}, "roles": {"support": "masked:hash"}}
    config = parse(data)
    assert not config.encrypts_anything
    assert config.needs_keystore
    assert isinstance(config.keystore, KeystoreConfig)
    assert config.warnings == (
        "keystore.dsn: not set (nor PGVEIL_KEYSTORE_DSN); hash masks need a keystore connection",
    )


def test_role_names_are_compared_exactly() -> None:
    config = parse(with_roles({"Support": "plaintext"}))
    assert config.policy.role_names == {"Support"}
    assert config.warnings == (
        "roles.Support: role names are compared exactly; this entry applies only to a role created with the quoted "
        "name \"Support\" (an unquoted CREATE ROLE folds to 'support')",
    )
    assert config.policy.view("support", frozenset(), epoch=1).label == "default"


def test_every_problem_is_reported_with_its_dotted_path() -> None:
    errors = errors_of(
        with_roles(
            {
                "default": "plain",
                "support": {
                    "public.customers.ssn": "maskd",
                    "public.customers.sn": "hidden",
                    "public.customer.*": "hidden",
                    "publik.*": "hidden",
                    "public.customers": "hidden",
                    "public.*.ssn": "hidden",
                    "public.customers.email": "masked:lst4",
                    "public.customers.phone": ["plaintext"],
                    "public.orders.total": "masked",
                },
                "billing": None,
                "contractor": {"Public.Customers.*": "deny", "public.customers.*": "hidden"},
                "x" * 64: "hidden",
                "": "hidden",
                7: "hidden",
            }
        )
    )
    expected = [
        'roles.default: unknown visibility "plain"; expected one of plaintext, match, match:<function>, '
        "masked:<function>, hidden, ciphertext, deny (did you mean 'plaintext'?)",
        'roles.support."public.customers.ssn": unknown visibility "maskd"; expected one of plaintext, match, '
        "match:<function>, masked:<function>, hidden, ciphertext, deny (did you mean 'masked'?)",
        'roles.support."public.customers.sn": no governed column public.customers.sn (list it under tables:) '
        "(did you mean 'public.customers.ssn'?)",
        'roles.support."public.customer.*": no governed table public.customer (list it under tables:) '
        "(did you mean 'public.customers'?)",
        "roles.support.\"publik.*\": no governed table in schema publik (did you mean 'public'?)",
        'roles.support."public.customers": a pattern must be schema.table.column, schema.table.*, schema.* or *, '
        "got 'public.customers' (did you mean 'public.customers.*'?)",
        'roles.support."public.*.ssn": a pattern must be schema.table.column, schema.table.*, schema.* or *, '
        "got 'public.*.ssn' (did you mean 'public.customers.ssn'?)",
        'roles.support."public.customers.email": unknown mask function "lst4"; expected one of last4, partial, '
        "email, hash, fixed:<text>, null (did you mean 'last4'?)",
        'roles.support."public.customers.phone": must be a visibility (plaintext, match, match:<function>, '
        "masked:<function>, hidden, ciphertext, deny), got a list",
        'roles.support."public.orders.total": masked needs a function: masked:<function>, the function one of '
        "last4, partial, email, hash, fixed:<text>, null",
        "roles.billing: must be a visibility (plaintext, match, match:<function>, masked:<function>, hidden, "
        "ciphertext, deny) or a mapping of column pattern to visibility, got null",
        'roles.contractor."public.customers.*": names the same columns as another pattern of role contractor '
        "(public.customers.*)",
        f"roles.{'x' * 64}: a role name is at most 63 bytes, as in PostgreSQL",
        'roles."": a role name must be a non-empty string without NUL',
        "roles.7: a role name must be a string",
    ]
    assert errors == expected


def test_the_whole_section_must_be_a_mapping() -> None:
    assert errors_of(with_roles("plaintext")) == [
        "roles: must be a mapping of role name to a visibility or to {pattern: visibility}, got 'plaintext'"
    ]
    assert errors_of(with_roles({"default": {"*": "hidden"}})) == [
        "roles.default: must be a visibility (plaintext, match, match:<function>, masked:<function>, hidden, "
        "ciphertext, deny), got a mapping"
    ]


def test_an_unknown_top_level_key_suggests_roles() -> None:
    assert errors_of({"rolse": {}}) == ["(top level).rolse: unknown setting (did you mean 'roles'?)"]


def test_ciphertext_and_masks_are_valid_on_plain_and_encrypted_columns_alike() -> None:
    config = parse(
        with_roles(
            {
                "etl": {
                    "public.customers.phone": "ciphertext",
                    "public.customers.ssn": "ciphertext",
                    "public.orders.total": "masked:last4",
                    "public.customers.email": "match:email",
                }
            }
        )
    )
    view = config.policy.view("etl", frozenset(), epoch=1)
    assert view.grant(col("public.customers.phone")).visibility is Visibility.CIPHERTEXT
    assert view.grant(col("public.customers.ssn")).visibility is Visibility.CIPHERTEXT


def test_a_mask_must_suit_the_declared_type_of_every_column_its_rule_decides() -> None:
    data = {
        "keystore": {"dsn": "host=db"},
        "tables": {
            "public.people": {
                "columns": {
                    "name": {"type": "varchar(5)", "encrypt": True},
                    "born": {"type": "date"},
                    "died": {"type": "date"},
                    "score": {"type": "numeric(3,1)"},
                }
            }
        },
    }
    assert errors_of(data | {"roles": {"support": {"public.people.*": "masked:fixed:N/A"}}}) == [
        # Reported once per rule and type, naming the first column it would serve.
        "roles.support.\"public.people.*\": cannot mask public.people.born (date): fixed text 'N/A' is not a "
        "valid date: invalid input syntax for type date",
        "roles.support.\"public.people.*\": cannot mask public.people.score (numeric(3,1)): fixed text 'N/A' is "
        "not a valid numeric(3,1): invalid input syntax for type numeric",
    ]
    # Where a more specific rule decides a column, the broad rule's mask need not suit it.
    fine = {
        "support": {
            "public.people.*": "match:fixed:N/A",
            "public.people.born": "masked:fixed:1900-01-01",
            "public.people.died": "masked:last4",
            "public.people.score": "hidden",
        }
    }
    assert parse(data | {"roles": fine}).policy.role_names == {"support"}
    assert errors_of(data | {"roles": {"default": "masked:fixed:toolong"}}) == [
        "roles.default: cannot mask public.people.born (date): fixed text 'toolong' is not a valid date: invalid "
        "input syntax for type date",
        "roles.default: cannot mask public.people.name (varchar(5)): fixed text 'toolong' is not a valid "
        "varchar(5): value too long for type character varying(5)",
        "roles.default: cannot mask public.people.score (numeric(3,1)): fixed text 'toolong' is not a valid "
        "numeric(3,1): invalid input syntax for type numeric",
    ]


# -- docs/visibility-config.md shows what the parser does ------------------------------------------------

DOC = (Path(__file__).resolve().parents[3] / "docs" / "visibility-config.md").read_text()


def test_every_yaml_example_of_the_reference_is_a_valid_configuration() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC, re.DOTALL)
    assert len(blocks) >= 4
    for block in blocks:
        config = parse({"keystore": {"dsn": "host=db"}} | yaml.safe_load(block))
        assert config.policy.configured
        assert config.warnings == ()


def test_the_error_lines_of_the_reference_are_the_parsers() -> None:
    shown = re.search(r"```text\n(roles\..*?)```", DOC, re.DOTALL)
    assert shown is not None
    lines = shown.group(1).splitlines()
    errors = errors_of(with_roles({"support": {"public.customers.ssn": "maskd", "public.customers.sn": "hidden"}}))
    assert errors == lines


def test_the_policy_section_sets_how_membership_is_followed() -> None:
    assert parse({}).policy_settings == PolicySettings(membership_refresh_seconds=30.0)
    assert parse({"policy": {"membership_refresh_seconds": 0}}).policy_settings.membership_refresh_seconds == 0.0
    assert parse({"policy": {"membership_refresh_seconds": 2.5}}).policy_settings.membership_refresh_seconds == 2.5
    assert errors_of({"policy": {"membership_refresh_seconds": -1, "membership_refresh": 1}}) == [
        "policy.membership_refresh: unknown setting (did you mean 'membership_refresh_seconds'?)",
        "policy.membership_refresh_seconds: must be a number of seconds >= 0, got -1",
    ]
