"""``pgveil check``: what the configuration file says, checked before pgveil runs with it.

Offline (the default) it checks what can be checked without a server: the file parses (every error with
its dotted path), the key provider can be built on this machine (``local``: the key file's directory, or
the file and its mode; ``pkcs11``: python-pkcs11 importable, the module file present, the PIN readable),
the admin tokens file reads, the TLS files load, the password files read. It never creates a key or
opens a token. ``--connect`` also reaches the servers: the upstream (TCP), the keystore (login, schema
pgveil, the privileges ``pgveil serve`` needs) and the service connection (login).

Every problem is one line; the exit code is the first problem's class (docs/cli.md): 2 configuration,
3 unreachable, 4 privileges, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.cli_errors import PRIVILEGES, UNREACHABLE, USAGE, CliError, connect, os_reason, privilege_fix
from proxy.config import Config, LocalMasterKeyConfig, Pkcs11MasterKeyConfig


@dataclass
class Findings:
    """Problems found, each with its exit code, and warnings."""

    problems: list[tuple[str, int]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problem(self, text: str, code: int = USAGE) -> None:
        self.problems.append((text, code))

    @property
    def code(self) -> int:
        return self.problems[0][1] if self.problems else 0


def _readable(path: Path, setting: str, found: Findings, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        found.problem(f"{setting}: cannot read {what} {path}: {os_reason(e)}")


def check_master_key(config: Config, found: Findings, *, importer: Callable[[str], Any] | None = None) -> None:
    """The key providers of ``keystore.master_key`` and ``previous_master_keys``, as far as they can be
    checked without using a key: nothing is generated and no token is opened."""
    ks = config.keystore
    if ks is None or not any(c.encrypt for t in config.tables for c in t.columns):
        return
    load = importer or importlib.import_module
    keys = [("keystore.master_key", ks.master_key)]
    keys += [(f"keystore.previous_master_keys[{i}]", mk) for i, mk in enumerate(ks.previous_master_keys)]
    for setting, mk in keys:
        if isinstance(mk, LocalMasterKeyConfig):
            path = mk.path
            if path.exists():
                try:
                    st = path.stat()
                except OSError as e:
                    found.problem(f"{setting}.path: {path}: {os_reason(e)}")
                    continue
                if not stat.S_ISREG(st.st_mode):
                    found.problem(f"{setting}.path: {path} is not a regular file")
                elif st.st_mode & 0o077:
                    found.problem(f"{setting}.path: {path} is readable by group or others: chmod 600 {path}")
                else:
                    _readable(path, f"{setting}.path", found, "the master key file")
            elif setting == "keystore.master_key":
                parent = path.parent
                if not parent.is_dir():
                    found.problem(f"{setting}.path: the directory {parent} of the master key file does not exist")
                elif not os.access(parent, os.W_OK | os.X_OK):
                    found.problem(f"{setting}.path: cannot create the master key file in {parent} (not writable)")
                else:
                    found.warnings.append(
                        f"{setting}.path: {path} does not exist; pgveil will generate a new master key there "
                        "on first run (development only)"
                    )
            else:
                found.problem(f"{setting}.path: {path} does not exist (a previous master key must be kept)")
        elif isinstance(mk, Pkcs11MasterKeyConfig):
            try:
                load("pkcs11")
            except ImportError:
                found.problem(
                    f"{setting}.provider: pkcs11 needs the python-pkcs11 package, which this installation "
                    "lacks (pip install python-pkcs11, or reinstall pgveil with its dependencies)"
                )
            module = mk.module
            if not module.is_file():
                found.problem(f"{setting}.module: the PKCS#11 module {module} does not exist")
            elif not os.access(module, os.R_OK):
                found.problem(f"{setting}.module: the PKCS#11 module {module} is not readable")
            if mk.pin_file is not None:
                _readable(mk.pin_file, f"{setting}.pin_file", found, "the PIN file")
            elif mk.pin_env is not None and not os.environ.get(mk.pin_env):
                found.problem(f"{setting}.pin_env: the environment variable {mk.pin_env} is not set")


def check_files(config: Config, found: Findings) -> None:
    """The admin tokens file, the TLS files and the password files."""
    from proxy.errors import ConfigError

    admin = config.admin
    if admin.tokens_file is not None:
        from proxy.admin.auth import read_tokens_file

        try:
            tokens = read_tokens_file(admin.tokens_file)
        except ConfigError as e:
            for line in e.errors:
                found.problem(line)
        else:
            found.notes.append(f"admin.tokens_file: {len(tokens)} tokens")
    if admin.tls is not None:
        from proxy.admin.app import admin_tls_context

        try:
            admin_tls_context(admin.tls.cert_file, admin.tls.key_file, admin.tls.client_ca_file)
        except Exception as e:  # ssl.SSLError, OSError: the type only, a file's bytes never
            found.problem(f"admin.tls: cannot load the certificate, key or client CA ({type(e).__name__})")
    if config.client_tls is not None:
        from proxy.tls import client_leg_context

        try:
            client_leg_context(config.client_tls.cert_file, config.client_tls.key_file)
        except Exception as e:
            found.problem(f"client_tls: cannot load cert_file or key_file ({type(e).__name__})")
    for setting, pf in (
        ("keystore.password_file", config.keystore.password_file if config.keystore else None),
        ("service.password_file", config.service.password_file if config.service else None),
    ):
        if pf is not None:
            _readable(pf, setting, found, "the password file")


# -- --connect ------------------------------------------------------------------------------------------
_KEYSTORE_PRIVILEGES = (
    ("pgveil.deks", "SELECT, INSERT, UPDATE"),
    ("pgveil.keks", "SELECT, INSERT, UPDATE"),
)


async def check_servers(config: Config, found: Findings) -> None:
    up = config.upstream
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(up.host, up.port), up.connect_timeout)
        writer.close()
        found.notes.append(f"upstream {up.host}:{up.port}: reachable")
    except (OSError, TimeoutError) as e:
        found.problem(f"upstream: cannot connect to {up.host}:{up.port}: {os_reason(e)}", UNREACHABLE)
    encrypted = any(c.encrypt for t in config.tables for c in t.columns)
    ks = config.keystore
    if ks is not None and ks.dsn is not None and encrypted:
        await _check_keystore(ks.dsn, ks.password_file, found)
    svc = config.service
    if svc is not None and svc.dsn is not None and any(t.columns for t in config.tables):
        try:
            conn = await connect("the service connection", svc.dsn, svc.password_file, timeout=10)
        except CliError as e:
            found.problem(f"service: {e.message}", e.code)
        else:
            await conn.close()
            found.notes.append("service connection: logged in")


async def _check_keystore(dsn: str, password_file: Path | None, found: Findings) -> None:
    try:
        conn = await connect("the keystore", dsn, password_file, timeout=10)
    except CliError as e:
        found.problem(f"keystore: {e.message}" + (f" ({e.hint})" if e.hint else ""), e.code)
        return
    try:
        user = await conn.fetchval("SELECT current_user")
        database = await conn.fetchval("SELECT current_database()")
        if await conn.fetchval("SELECT to_regnamespace('pgveil') IS NULL"):
            can_create = await conn.fetchval("SELECT has_database_privilege(current_database(), 'CREATE')")
            if can_create:
                found.warnings.append("keystore: schema pgveil does not exist yet; run `pgveil keystore init`")
            else:
                fix = privilege_fix(f"permission denied for database {database}", user, database)
                found.problem(
                    f"keystore: schema pgveil does not exist and role {user} may not create it in database "
                    f"{database}; as the owner or a superuser: {' '.join(fix)}",
                    PRIVILEGES,
                )
            return
        if not await conn.fetchval("SELECT has_schema_privilege('pgveil', 'USAGE')"):
            fix = privilege_fix("permission denied for schema pgveil", user, database)
            found.problem(f"keystore: role {user} lacks USAGE on schema pgveil; run: {' '.join(fix)}", PRIVILEGES)
            return
        for table, privileges in _KEYSTORE_PRIVILEGES:
            if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
                continue
            missing = [
                p
                for p in privileges.split(", ")
                if not await conn.fetchval("SELECT has_table_privilege($1, $2)", table, p)
            ]
            if missing:
                fix = privilege_fix(f"permission denied for table {table.split('.')[1]}", user, database)
                found.problem(
                    f"keystore: role {user} lacks {', '.join(missing)} on {table}; run: {' '.join(fix)}", PRIVILEGES
                )
                return
        found.notes.append(f"keystore: logged in as {user}, schema pgveil readable and writable")
    finally:
        await conn.close()
