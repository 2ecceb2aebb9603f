"""The ``roles:`` section: the visibility policy, validated against the governed tables.

``roles`` maps a policy role (a PostgreSQL role name, compared exactly with the login role and the roles it
is a member of) to one visibility string, which applies to every governed column, or to a mapping of
column pattern to visibility string. The reserved key ``default`` holds the grant for every column that no
role of a login's role set covers; an absent section means ``default: hidden`` (with a warning when
columns are governed). Every problem is reported with its dotted path, e.g.
``roles.support."public.customers.ssn": unknown visibility "maskd"; expected one of ... (did you mean
'masked'?)``.

A pattern must name a governed column, table or schema: a typo would otherwise grant nothing, silently.
A mask must suit the declared type of every column its rule decides (``mask_problem``).

Must not: read files or the environment.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from proxy.config.types import TableConfig
from proxy.policy.masks import mask_problem as default_mask_problem
from proxy.policy.model import Grant, Mask, MaskFunction
from proxy.policy.rules import (
    DEFAULT_KEY,
    VISIBILITY_FORMS,
    WILDCARD,
    Pattern,
    Policy,
    RoleRules,
    Rule,
    Specificity,
    make_grant,
    parse_pattern,
    parse_visibility,
)

MaskCheck = Callable[[Mask, str], str | None]

MAX_ROLE_NAME_LENGTH: Final = 63  # NAMEDATALEN - 1: a longer startup user name cannot be a role

ABSENT_WARNING: Final = (
    "roles: not configured, so every role sees every governed column hidden (NULL); set roles.default "
    "(for example to plaintext) or name the roles that may see more"
)


def role_path(role: str) -> str:
    return f"roles.{_key(role)}"


def rule_path(role: str, pattern: str) -> str:
    return f"{role_path(role)}.{_key(pattern)}"


def _key(key: str) -> str:
    """A mapping key as a dotted path shows it: quoted when it holds a dot, a star or a space."""
    if key and all(ch.isalnum() or ch in "_$" for ch in key):
        return key
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def show_value(value: object) -> str:
    """A value as an error message shows it: short, and never a whole mapping."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def suggestion(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing: the tail of an error message."""
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _RolesParser:
    def __init__(self, tables: tuple[TableConfig, ...], mask_problem: MaskCheck) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.mask_problem = mask_problem
        self.types = {f"{t.schema}.{t.name}.{c.name}": c.type for t in tables for c in t.columns}
        self.tables = {f"{t.schema}.{t.name}" for t in tables if t.columns}
        self.schemas = {t.schema for t in tables if t.columns}
        self.paths: dict[tuple[str, Pattern], str] = {}  # (role, pattern) -> its dotted path

    def parse(self, data: Any) -> Policy:
        columns = frozenset(self.types)
        if data is None:
            if columns:
                self.warnings.append(ABSENT_WARNING)
            return Policy(column_ids=columns)
        if not isinstance(data, Mapping):
            self.errors.append(
                "roles: must be a mapping of role name to a visibility or to {pattern: visibility}, "
                f"got {show_value(data)}"
            )
            return Policy(column_ids=columns)
        policy = Policy(column_ids=columns, configured=True)
        default = policy.default
        roles: list[RoleRules] = []
        for key, spec in data.items():
            if not isinstance(key, str):
                self.errors.append(f"roles.{show_value(key)}: a role name must be a string")
                continue
            if key == DEFAULT_KEY:
                grant = self.grant(spec, "roles.default", DEFAULT_KEY)
                if grant is not None:
                    default = grant
                continue
            if not self.role_name(key):
                continue
            rules = self.rules(key, spec)
            if rules is not None:
                roles.append(RoleRules(key, rules))
        policy = Policy(roles=tuple(roles), default=default, column_ids=columns, configured=True)
        self.check_masks(policy)
        return policy

    def role_name(self, role: str) -> bool:
        p = role_path(role)
        if not role or "\x00" in role:
            self.errors.append(f"{p}: a role name must be a non-empty string without NUL")
            return False
        if len(role.encode()) > MAX_ROLE_NAME_LENGTH:
            self.errors.append(f"{p}: a role name is at most {MAX_ROLE_NAME_LENGTH} bytes, as in PostgreSQL")
            return False
        if role != role.lower():
            self.warnings.append(
                f"{p}: role names are compared exactly; this entry applies only to a role created with the "
                f'quoted name "{role}" (an unquoted CREATE ROLE folds to {role.lower()!r})'
            )
        return True

    def rules(self, role: str, spec: Any) -> tuple[Rule, ...] | None:
        p = role_path(role)
        if isinstance(spec, str):
            grant = self.grant(spec, p, f"{role}: {WILDCARD}")
            if grant is None:
                return None
            self.paths[(role, Pattern())] = p
            return (Rule(Pattern(), grant),)
        if not isinstance(spec, Mapping):
            self.errors.append(
                f"{p}: must be a visibility ({', '.join(VISIBILITY_FORMS)}) or a mapping of column pattern to "
                f"visibility, got {show_value(spec)}"
            )
            return None
        out: dict[Pattern, Rule] = {}
        for key, value in spec.items():
            rp = f"{p}.{_key(key) if isinstance(key, str) else show_value(key)}"
            if not isinstance(key, str):
                self.errors.append(f"{rp}: a pattern must be a string (schema.table.column, schema.table.*, ...)")
                continue
            pattern = self.pattern(key, rp)
            grant = self.grant(value, rp, f"{role}: {pattern if pattern is not None else key}")
            if pattern is None or grant is None:
                continue
            if pattern in out:
                self.errors.append(f"{rp}: names the same columns as another pattern of role {role} ({pattern})")
                continue
            out[pattern] = Rule(pattern, grant)
            self.paths[(role, pattern)] = rp
        return tuple(out.values())

    def pattern(self, text: str, p: str) -> Pattern | None:
        try:
            pattern = parse_pattern(text)
        except ValueError as e:
            folded = text.strip().lower()
            hint = f" (did you mean '{folded}.*'?)" if folded in self.tables else suggestion(folded, self.types)
            self.errors.append(f"{p}: {e}{hint}")
            return None
        spec = pattern.specificity
        if spec is Specificity.COLUMN and str(pattern) not in self.types:
            self.errors.append(
                f"{p}: no governed column {pattern} (list it under tables:){suggestion(str(pattern), self.types)}"
            )
            return None
        table = f"{pattern.schema}.{pattern.table}"
        if spec is Specificity.TABLE and table not in self.tables:
            self.errors.append(
                f"{p}: no governed table {table} (list it under tables:){suggestion(table, self.tables)}"
            )
            return None
        if spec is Specificity.SCHEMA and pattern.schema not in self.schemas:
            self.errors.append(
                f"{p}: no governed table in schema {pattern.schema}{suggestion(pattern.schema or '', self.schemas)}"
            )
            return None
        return pattern

    def grant(self, value: Any, p: str, source: str) -> Grant | None:
        if not isinstance(value, str):
            self.errors.append(f"{p}: must be a visibility ({', '.join(VISIBILITY_FORMS)}), got {show_value(value)}")
            return None
        try:
            visibility, mask = parse_visibility(value)
        except ValueError as e:
            self.errors.append(f"{p}: {e}")
            return None
        return make_grant(visibility, mask, source)

    def check_masks(self, policy: Policy) -> None:
        """Every mask against the declared type of each column whose grant its rule decides."""
        check = self.mask_problem
        seen: set[tuple[str, str]] = set()

        def report(path: str, mask: Mask, column_id: str) -> None:
            declared = self.types[column_id]
            if (path, declared) in seen:
                return
            seen.add((path, declared))
            problem = check(mask, declared)
            if problem is not None:
                self.errors.append(f"{path}: cannot mask {column_id} ({declared}): {problem}")

        for column_id in sorted(self.types):
            if policy.default.mask is not None:
                report("roles.default", policy.default.mask, column_id)
            for rr in policy.roles:
                rule = rr.rule_for(column_id)
                if rule is not None and rule.grant.mask is not None:
                    report(self.paths[(rr.role, rule.pattern)], rule.grant.mask, column_id)


def parse_roles(
    data: Any, tables: tuple[TableConfig, ...], *, mask_problem: MaskCheck = default_mask_problem
) -> tuple[Policy, list[str], list[str]]:
    """The policy of a decoded ``roles:`` section (None when absent), with the errors and warnings found.
    ``mask_problem(mask, declared_type)`` says why a mask cannot serve a type (None: it can)."""
    parser = _RolesParser(tables, mask_problem)
    policy = parser.parse(data)
    return policy, parser.errors, parser.warnings


def uses_hash(policy: Policy) -> bool:
    """Whether any grant hashes values (its key comes from the keystore)."""
    return any(m.function is MaskFunction.HASH for m in policy.masks)
