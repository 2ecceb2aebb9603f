"""KEK providers: where the master key lives, and how DEKs are wrapped and unwrapped with it.

This module owns the :class:`KeyProvider` seam, the development-only ``local`` provider (a key file)
and the factory that builds a provider from its configuration. It never sees plaintext values or the
keystore; it turns 32-byte DEKs into wrapped blobs and back. ``pkcs11`` (SoftHSM2 in tests) and cloud
KMS / Vault providers plug in behind the same protocol in later work.

Local master key file: exactly 64 lowercase or uppercase hex digits (the 32 key bytes), optionally
followed by one newline, mode 0600. Hex rather than raw bytes so the file survives copy-paste into a
secret store and can be inspected for length without printing it.

Wrapped DEK (local provider), 60 bytes::

    nonce (12, random) · ciphertext (32) · tag (16)

AES-256-GCM under the KEK with associated data ``b"pgveil-dek-wrap-v1" + kek_id`` (UTF-8), so a blob
wrapped under one KEK version can never be presented as wrapped under another.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keymgmt.errors import MasterKeyError, ProviderConfigError

log = logging.getLogger(__name__)

WRAP_LABEL = b"pgveil-dek-wrap-v1"
KEK_LENGTH = 32
_NONCE_LENGTH = 12
_TAG_LENGTH = 16
_DEK_LENGTH = 32
_WRAPPED_LENGTH = _NONCE_LENGTH + _DEK_LENGTH + _TAG_LENGTH


class KeyProvider(Protocol):
    """Holds a KEK and wraps DEKs with it. Implementations never return or log the KEK itself."""

    @property
    def provider_id(self) -> str:
        """Which kind of provider this is, e.g. ``"local"``; stored beside each KEK id."""
        ...

    @property
    def kek_id(self) -> str:
        """Stable id of the KEK version that :meth:`wrap` uses now."""
        ...

    def wrap(self, dek_bytes: bytes) -> bytes:
        """Wraps a DEK under the current KEK version (:attr:`kek_id`)."""
        ...

    def unwrap(self, wrapped: bytes, kek_id: str) -> bytes:
        """Unwraps a DEK that was wrapped under KEK version ``kek_id``.

        Raises :class:`~keymgmt.errors.MasterKeyError` when this provider does not hold that KEK or the
        blob does not authenticate, :class:`~keymgmt.errors.KeyProviderUnavailable` when the provider
        cannot be reached.
        """
        ...


def _kek_fingerprint(kek: bytes) -> str:
    # A domain-separated hash of the key: stable across restarts and machines, different for a
    # different key file, and useless for recovering the key.
    return hashlib.sha256(b"pgveil-kek-id-v1\x00" + kek).hexdigest()[:32]


class LocalKeyProvider:
    """A KEK kept in a file on the proxy host. For development only: the key sits beside the proxy.

    The file is created with 32 random bytes on first use (atomically, mode 0600). An existing file
    that group or others may access is refused, as ssh refuses a private key with loose permissions.
    """

    provider_id = "local"

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        kek = self._load_or_create()
        self._kek_id = "local-" + _kek_fingerprint(kek)
        self._aead = AESGCM(kek)
        log.warning(
            "using the local key provider (master key file %s, KEK %s): for development only; "
            "anyone who can read that file can decrypt every protected value. Use an HSM in production.",
            self.path,
            self._kek_id,
        )

    @property
    def kek_id(self) -> str:
        return self._kek_id

    def __repr__(self) -> str:
        return f"LocalKeyProvider(path={str(self.path)!r}, kek_id={self._kek_id!r})"

    def wrap(self, dek_bytes: bytes) -> bytes:
        if len(dek_bytes) != _DEK_LENGTH:
            raise ValueError(f"a DEK is {_DEK_LENGTH} bytes, got {len(dek_bytes)}")
        nonce = os.urandom(_NONCE_LENGTH)
        return nonce + self._aead.encrypt(nonce, dek_bytes, self._wrap_associated_data(self._kek_id))

    def unwrap(self, wrapped: bytes, kek_id: str) -> bytes:
        if kek_id != self._kek_id:
            raise MasterKeyError(
                f"this DEK was wrapped under KEK {kek_id!r}, but the local master key file "
                f"{self.path} holds KEK {self._kek_id!r}",
                hint="point the local provider at the master key file the keystore was created with",
            )
        if len(wrapped) != _WRAPPED_LENGTH:
            raise MasterKeyError(f"a wrapped DEK under KEK {kek_id!r} has the wrong length")
        try:
            dek = self._aead.decrypt(
                wrapped[:_NONCE_LENGTH], wrapped[_NONCE_LENGTH:], self._wrap_associated_data(kek_id)
            )
        except InvalidTag:
            raise MasterKeyError(
                f"a wrapped DEK does not authenticate under KEK {kek_id!r} (altered keystore row?)"
            ) from None
        return dek

    @staticmethod
    def _wrap_associated_data(kek_id: str) -> bytes:
        return WRAP_LABEL + kek_id.encode("utf-8")

    # -- the key file ----------------------------------------------------------------------------
    def _load_or_create(self) -> bytes:
        try:
            return self._load()
        except FileNotFoundError:
            pass
        try:
            return self._create()
        except FileExistsError:
            # Another process created it between our two attempts; theirs is the key.
            return self._load()

    def _load(self) -> bytes:
        # Symlinks are followed (secret mounts are often symlinks); the checks apply to the target.
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise MasterKeyError(f"cannot open master key file {self.path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise MasterKeyError(f"master key file {self.path} is not a regular file")
            if st.st_mode & 0o077:
                raise MasterKeyError(
                    f"master key file {self.path} is accessible by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it",
                    hint=f"chmod 600 {self.path}",
                )
            raw = os.read(fd, 4 * KEK_LENGTH)
        finally:
            os.close(fd)
        text = raw.decode("ascii", errors="replace")
        text = text[:-1] if text.endswith("\n") else text
        try:
            kek = bytes.fromhex(text) if len(text) == 2 * KEK_LENGTH else b""
        except ValueError:
            kek = b""
        if len(kek) != KEK_LENGTH:
            raise MasterKeyError(
                f"master key file {self.path} must hold exactly {2 * KEK_LENGTH} hex digits and an optional newline"
            )
        return kek

    def _create(self) -> bytes:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        kek = os.urandom(KEK_LENGTH)
        # Write a private temporary file, then link it into place: link() fails if the name exists, so
        # a concurrent starter either sees no file or a complete one, never a half-written key.
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)  # the umask could only have narrowed it; make it exact anyway
                os.write(fd, kek.hex().encode("ascii") + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        with contextlib.suppress(OSError):
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        log.warning(
            "GENERATED A NEW MASTER KEY at %s (mode 0600). This is the local development key provider: "
            "losing this file makes every value encrypted under it unrecoverable, and anyone who can "
            "read it can decrypt them. Do not use the local provider in production.",
            self.path,
        )
        return kek


def make_provider(spec: Mapping[str, Any], base_dir: Path) -> KeyProvider:
    """Builds the KEK provider a configuration's ``key_provider`` section describes.

    ``spec["type"]`` picks the provider: ``local`` takes ``path`` (relative paths are resolved against
    ``base_dir``, the configuration file's directory). Errors are :class:`ProviderConfigError` whose
    ``setting`` names the key inside ``spec``, so the configuration loader can prefix its dotted path.
    """
    kind = spec.get("type")
    if kind == "local":
        unknown = sorted(set(spec) - {"type", "path"})
        if unknown:
            raise ProviderConfigError(unknown[0], "unknown setting for the local key provider")
        path = spec.get("path")
        if not isinstance(path, str) or not path:
            raise ProviderConfigError("path", "the local key provider needs the master key file's path")
        resolved = Path(path).expanduser()
        if not resolved.is_absolute():
            resolved = base_dir / resolved
        return LocalKeyProvider(resolved)
    if kind == "pkcs11":
        raise ProviderConfigError("type", "the pkcs11 key provider is not implemented yet")
    raise ProviderConfigError("type", f"unknown key provider type {kind!r}; expected 'local' or 'pkcs11'")
