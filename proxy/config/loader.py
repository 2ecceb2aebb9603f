"""Reading a configuration: ``load_config`` finds and reads the file (I/O), applies command-line
overrides, validates it with ``parse_config`` and checks with ``check_files`` that the files it references
are readable. ``read_secret_file`` reads a password or PIN file when a component needs the secret.

Must not: open network connections, or show the content of a file in an error.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from proxy.config.parser import parse_config, parse_host_port
from proxy.config.roles import show_value as _show
from proxy.config.roles import suggestion as _suggest
from proxy.config.types import Config, Pkcs11MasterKeyConfig
from proxy.errors import ConfigError

CONFIG_ENV: Final = "PGVEIL_CONFIG"
DEFAULT_CONFIG_FILE: Final = "pgveil.yaml"


def default_config_path() -> Path:
    """``$PGVEIL_CONFIG`` when set, otherwise ``./pgveil.yaml``."""
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_FILE)


def load_config(
    path: str | os.PathLike[str] | None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Reads, validates and checks a configuration file.

    With ``path`` None: ``$PGVEIL_CONFIG`` (which must exist), else ``./pgveil.yaml`` if it exists, else
    the built-in defaults. ``overrides`` carries command-line settings: ``listen`` and ``upstream``, each
    ``"HOST:PORT"`` (None means "not given"); they replace the file's values. Referenced files (TLS
    certificates, password files, PKCS#11 module and PIN) must be readable. Raises ``ConfigError``.
    """
    env = os.environ if environ is None else environ
    source: Path | None
    if path is not None:
        source = Path(path)
    elif env.get(CONFIG_ENV):
        source = Path(env[CONFIG_ENV])
    else:
        source = Path(DEFAULT_CONFIG_FILE) if Path(DEFAULT_CONFIG_FILE).is_file() else None

    data: Any = read_yaml(source) if source is not None else None
    errors: list[str] = []
    data = _with_overrides(data, overrides or {}, errors)
    base_dir = source.absolute().parent if source is not None else Path.cwd()
    try:
        config = parse_config(data, base_dir=base_dir, environ=env)
    except ConfigError as e:
        raise ConfigError(errors + e.errors) from None
    errors.extend(check_files(config))
    if errors:
        raise ConfigError(errors)
    return dataclasses.replace(config, source_path=source.absolute() if source is not None else None)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which PyYAML would otherwise silently let the last win."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {_show(key)}", key_node.start_mark)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: Path) -> Any:
    """The decoded YAML document at ``path``. Errors give line and column but never echo file content,
    which may hold a DSN with a password."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConfigError([f"{path}: cannot read: {reason}"]) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError([f"{where}: YAML syntax error: {e.problem or e.context}"]) from None
    except yaml.YAMLError:
        raise ConfigError([f"{path}: YAML syntax error"]) from None


def _with_overrides(data: Any, overrides: Mapping[str, Any], errors: list[str]) -> Any:
    """``data`` with command-line overrides applied; a bad override is reported under its flag."""
    known = ("listen", "upstream")
    given = {k: v for k, v in overrides.items() if v is not None}
    for key in given:
        if key not in known:
            errors.append(f"--{key}: unknown override{_suggest(key, known)}")
    if not given or not isinstance(data, Mapping | None):
        return data
    out: dict[Any, Any] = dict(data or {})
    for key, listening in (("listen", True), ("upstream", False)):
        if key not in given:
            continue
        value = given[key]
        if key == "listen" and isinstance(value, list | tuple):
            try:
                out["listen"] = [str(parse_host_port(v, listening=True)) for v in value if isinstance(v, str)]
            except ValueError as e:
                errors.append(f"--listen: {e}")
            continue
        try:
            if not isinstance(value, str):
                raise ValueError(f"must be 'HOST:PORT', got {_show(value)}")
            addr = parse_host_port(value, listening=listening)
        except ValueError as e:
            errors.append(f"--{key}: {e}")
            continue
        if key == "listen":
            out["listen"] = str(addr)
        else:
            section = out.get("upstream")
            merged = dict(section) if isinstance(section, Mapping) else {}
            if section is not None and not isinstance(section, Mapping):
                continue  # the parser reports the malformed section itself
            merged.update(host=addr.host, port=addr.port)
            out["upstream"] = merged
    return out


def check_files(config: Config) -> list[str]:
    """One line per referenced file that cannot be read. The local master key is not checked: the
    provider creates it on first run."""
    wanted: list[tuple[str, Path]] = []
    if config.upstream.ca_file is not None:
        wanted.append(("upstream.ca_file", config.upstream.ca_file))
    if config.client_tls is not None:
        wanted += [("client_tls.cert_file", config.client_tls.cert_file)]
        wanted += [("client_tls.key_file", config.client_tls.key_file)]
    if config.keystore is not None:
        if config.keystore.password_file is not None:
            wanted.append(("keystore.password_file", config.keystore.password_file))
        mk = config.keystore.master_key
        if isinstance(mk, Pkcs11MasterKeyConfig):
            wanted.append(("keystore.master_key.module", mk.module))
            if mk.pin_file is not None:
                wanted.append(("keystore.master_key.pin_file", mk.pin_file))
    if config.service is not None and config.service.password_file is not None:
        wanted.append(("service.password_file", config.service.password_file))
    problems: list[str] = []
    seen: set[Path] = set()
    for name, path in wanted:
        if path in seen:
            continue
        seen.add(path)
        if not path.is_file():
            problems.append(f"{name}: {path} does not exist or is not a file")
        elif not os.access(path, os.R_OK):
            problems.append(f"{name}: {path} is not readable")
    return problems


def read_secret_file(path: Path) -> str:
    """The first line of a password or PIN file, without its line ending. Raises ``ConfigError``
    naming the file but never its content."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise ConfigError([f"{path}: cannot read secret file"]) from None
    first = text.splitlines()[0] if text else ""
    if not first:
        raise ConfigError([f"{path}: secret file is empty"])
    return first
