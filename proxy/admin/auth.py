"""Who may call the admin API: bearer tokens from a tokens file, their scopes, and a limit on failures.

The tokens file (``admin.tokens_file``) is a YAML list of entries::

    - name: secops                       # shown in logs and in the record of admin actions
      sha256: 9f86d081884c7d65...        # hex of the SHA-256 of the token (never the token itself)
      scopes: [admin:read, policy:reload]

pgveil never sees a token at rest: the file holds digests. A presented token is hashed and its digest
compared with every entry's by :func:`hmac.compare_digest`, always all of them, so neither the
comparison nor the number of comparisons depends on how much of a digest matched. Entries are
distinguished by name, which is what reaches the logs; a token itself is never logged, stored or
echoed.

The file is re-read when it changes (its size, modification time or inode), at most once per
:data:`RELOAD_CHECK_SECONDS`, so a token can be revoked without a restart. A file that has become
unreadable or invalid accepts no token at all until it is fixed (fail closed), and says so in the log.

:class:`FailureLimiter` counts failed authentications per client address in a sliding window; an
address over the limit is refused (429 with Retry-After) before its token is even looked at, so a
correct guess after too many wrong ones does not get in either.

This module does no I/O beyond reading the tokens file and decides nothing about routes: which scope a
route needs is declared with the route (:mod:`proxy.admin.api`).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import logging
import math
import os
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from proxy.errors import ConfigError

log = logging.getLogger(__name__)

RELOAD_CHECK_SECONDS: Final = 1.0
# Addresses tracked by the limiter at most; the least recently failing are forgotten first.
MAX_TRACKED_ADDRESSES: Final = 10_000
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}\Z")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}\Z")


class Scope(enum.StrEnum):
    """What a token may do. Each route of the admin API needs exactly one."""

    METRICS_READ = "metrics:read"  # /metrics (and /healthz, /readyz when they are protected)
    ADMIN_READ = "admin:read"  # every read-only /v1 route
    KEYS_ROTATE = "keys:rotate"
    SUBJECTS_SHRED = "subjects:shred"
    SUBJECTS_EXPORT = "subjects:export"
    POLICY_RELOAD = "policy:reload"
    SESSIONS_TERMINATE = "sessions:terminate"


@dataclass(frozen=True, slots=True)
class Token:
    """One entry of the tokens file: a name, the SHA-256 of the token, and its scopes."""

    name: str
    digest: bytes
    scopes: frozenset[Scope]

    def __repr__(self) -> str:
        return f"Token(name={self.name!r}, scopes={sorted(self.scopes)!r})"


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def parse_tokens(data: Any, source: str) -> tuple[Token, ...]:
    """The entries of a decoded tokens file; every problem in one :class:`ConfigError`, by position."""
    if not isinstance(data, list):
        raise ConfigError([f"{source}: must be a YAML list of {{name, sha256, scopes}}"])
    errors: list[str] = []
    tokens: list[Token] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    known = {s.value for s in Scope}
    for i, entry in enumerate(data):
        where = f"{source}[{i}]"
        if not isinstance(entry, Mapping):
            errors.append(f"{where}: must be a mapping with name, sha256 and scopes")
            continue
        for key in entry:
            if key not in ("name", "sha256", "scopes"):
                errors.append(f"{where}.{key}: unknown setting")
        name, digest_hex, scopes = entry.get("name"), entry.get("sha256"), entry.get("scopes")
        ok = True
        if not isinstance(name, str) or not _NAME.match(name):
            errors.append(f"{where}.name: must be 1-64 letters, digits or _ . @ -")
            ok = False
        elif name in names:
            errors.append(f"{where}.name: {name!r} is listed twice")
            ok = False
        # The digest is not echoed: a token pasted here by mistake would land in the log.
        if not isinstance(digest_hex, str) or not _HEX_DIGEST.match(digest_hex):
            errors.append(f"{where}.sha256: must be the 64 hex digits of the token's SHA-256 (sha256sum)")
            ok = False
        elif bytes.fromhex(digest_hex) in digests:
            errors.append(f"{where}.sha256: the same token is listed twice")
            ok = False
        if not isinstance(scopes, list) or not scopes:
            errors.append(f"{where}.scopes: must be a non-empty list of {', '.join(sorted(known))}")
            ok = False
        else:
            for s in scopes:
                if s not in known:
                    errors.append(f"{where}.scopes: unknown scope {str(s)[:40]!r} (known: {', '.join(sorted(known))})")
                    ok = False
        if ok:
            assert isinstance(name, str)
            assert isinstance(digest_hex, str)
            assert isinstance(scopes, list)
            digest = bytes.fromhex(digest_hex)
            names.add(name)
            digests.add(digest)
            tokens.append(Token(name, digest, frozenset(Scope(s) for s in scopes)))
    if errors:
        raise ConfigError(errors)
    return tuple(tokens)


def read_tokens_file(path: Path) -> tuple[Token, ...]:
    """The tokens of ``path``; a missing, unreadable or invalid file raises :class:`ConfigError`."""
    source = f"admin.tokens_file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{source}: cannot read it ({e.strerror or type(e).__name__})"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{source}: is not UTF-8 text"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        # The parser's message quotes the offending line, which could be a token pasted by mistake.
        raise ConfigError([f"{source}: is not valid YAML"]) from None
    return parse_tokens(data if data is not None else [], source)


class TokenFile:
    """The tokens of a file, re-read when the file changes; :meth:`lookup` finds a presented token."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        check_every: float = RELOAD_CHECK_SECONDS,
    ) -> None:
        self.path = path
        self._clock = clock
        self._check_every = check_every
        self._stamp = self._stat()
        self.tokens: tuple[Token, ...] | None = read_tokens_file(path)  # raises: startup refuses a bad file
        self._checked = clock()
        with contextlib.suppress(OSError):
            if os.stat(path).st_mode & 0o022:
                # Whoever can write the file can give themselves every scope.
                log.warning("admin tokens file %s is writable by group or others; make it 0644 or stricter", path)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now - self._checked < self._check_every:
            return
        self._checked = now
        stamp = self._stat()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self.tokens = read_tokens_file(self.path)
        except ConfigError as e:
            self.tokens = None
            for line in e.errors:
                log.error("admin tokens file rejected, no token is accepted until it is fixed: %s", line)
            return
        log.info("admin tokens file re-read: %d tokens", len(self.tokens))

    @property
    def usable(self) -> bool:
        self._maybe_reload()
        return self.tokens is not None

    def lookup(self, presented: str) -> Token | None:
        """The entry whose digest is the presented token's, comparing with every entry (constant time)."""
        self._maybe_reload()
        tokens = self.tokens or ()
        digest = token_digest(presented)
        found: Token | None = None
        for t in tokens:
            if hmac.compare_digest(t.digest, digest):
                found = t
        return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (RFC 6750, section 2.1), else None."""
    if authorization is None:
        return None
    scheme, _, rest = authorization.strip().partition(" ")
    token = rest.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


class FailureLimiter:
    """Failed authentications per client address in a sliding window of ``window`` seconds.

    After ``limit`` failures within the window the address is blocked until the oldest of them leaves it;
    :meth:`retry_after` then gives the whole seconds to wait. Memory is bounded: at most
    ``max_addresses`` addresses (each with at most ``limit`` timestamps) are remembered.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = MAX_TRACKED_ADDRESSES,
    ) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._max = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may try again, or None when it is not blocked."""
        now = self._clock()
        times = self._recent(address, now)
        if times is None or len(times) < self.limit:
            return None
        return max(1, math.ceil(times[0] + self.window - now))

    def failed(self, address: str) -> None:
        now = self._clock()
        times = self._recent(address, now)
        if times is None:
            times = deque(maxlen=self.limit)
            self._failures[address] = times
            while len(self._failures) > self._max:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(address)
        times.append(now)

    @property
    def tracked(self) -> int:
        return len(self._failures)


def scopes_of(tokens: Iterable[Token]) -> dict[str, list[str]]:
    """Token names and their scopes (for the startup log line; never digests)."""
    return {t.name: sorted(t.scopes) for t in tokens}
