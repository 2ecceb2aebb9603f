"""KEK providers: where the master key lives, and how DEKs are wrapped and unwrapped with it.

This module owns the :class:`KeyProvider` seam, the development-only ``local`` provider (a key file),
:class:`ProviderChain` (several providers as one, for a move from one provider to another) and the
factory that builds a provider from its configuration. It never sees plaintext values or the keystore;
it turns 32-byte DEKs into wrapped blobs and back. ``pkcs11`` lives in :mod:`keymgmt.pkcs11`; a cloud
KMS or Vault Transit provider is one more module implementing :class:`KeyProvider` (see docs/keys.md).

KEK versions: a provider may hold several KEK versions at once, each with a stable id (``kek_id``,
stored beside every wrapped DEK). :meth:`KeyProvider.wrap` uses the provider's newest version unless
told which; :meth:`KeyProvider.unwrap` uses whichever version the DEK names, looking it up (a file, a
token object) if it was created since the provider started, so proxies keep working while
``pgveil keys rotate-kek`` moves the DEKs to a new version. A KEK id starts with its provider id and a
hyphen (``local-…``, ``pkcs11-…``).

Local master key file: exactly 64 lowercase or uppercase hex digits (the 32 key bytes), optionally
followed by one newline, mode 0600. Hex rather than raw bytes so the file survives copy-paste into a
secret store and can be inspected for length without printing it. The configured file holds the newest
version; a rotation keeps each older version beside it, in ``<file>.<kek_id>`` (same format and mode),
until ``pgveil keys destroy-kek`` removes it.

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
from typing import Any, Protocol, runtime_checkable

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
    """Holds one or more KEK versions and wraps DEKs with them. Implementations never return or log a
    KEK's bytes, and convert every library or I/O failure into a :class:`~keymgmt.errors.KeyManagementError`:
    :class:`~keymgmt.errors.KeyProviderUnavailable` (58000) when the key store (token, KMS) cannot be
    reached, :class:`~keymgmt.errors.MasterKeyError` (F0000) when a KEK is missing or a blob does not
    authenticate. The calls are synchronous and made on the proxy's event loop, only on key-cache misses
    and key creation, so they should answer in milliseconds."""

    @property
    def provider_id(self) -> str:
        """Which kind of provider this is, e.g. ``"local"``; stored beside each KEK id."""
        ...

    @property
    def kek_id(self) -> str:
        """The newest KEK version this provider holds: what :meth:`wrap` uses when not told otherwise."""
        ...

    def holds(self, kek_id: str) -> bool:
        """Whether this provider can wrap and unwrap under KEK version ``kek_id`` (it may look the version
        up: another process may have created it since). Raises nothing for an unknown version."""
        ...

    def wrap(self, dek_bytes: bytes, kek_id: str | None = None) -> bytes:
        """Wraps a DEK under KEK version ``kek_id`` (default: :attr:`kek_id`)."""
        ...

    def unwrap(self, wrapped: bytes, kek_id: str) -> bytes:
        """Unwraps a DEK that was wrapped under KEK version ``kek_id``.

        Raises :class:`~keymgmt.errors.MasterKeyError` when this provider does not hold that KEK or the
        blob does not authenticate, :class:`~keymgmt.errors.KeyProviderUnavailable` when the provider
        cannot be reached.
        """
        ...


@runtime_checkable
class KekLifecycle(Protocol):
    """What ``pgveil keys rotate-kek`` and ``destroy-kek`` need on top of :class:`KeyProvider`, for a
    provider that can create and destroy its own KEK versions (a provider without it can still be the
    target of a rotation to a KEK made elsewhere, e.g. in a KMS console)."""

    def create_kek(self) -> str:
        """Creates a new KEK version, makes it this provider's :attr:`KeyProvider.kek_id`, returns its id."""
        ...

    def destroy_kek(self, kek_id: str) -> bool:
        """Destroys KEK version ``kek_id``'s material; False if this provider holds no such version. The
        caller (``destroy-kek``) has made sure that nothing depends on it."""
        ...


def provider_of(kek_id: str) -> str:
    """The provider id a KEK id starts with (``local-abc…`` → ``local``)."""
    return kek_id.split("-", 1)[0]


def _kek_fingerprint(kek: bytes) -> str:
    # A domain-separated hash of the key: stable across restarts and machines, different for a
    # different key file, and useless for recovering the key.
    return hashlib.sha256(b"pgveil-kek-id-v1\x00" + kek).hexdigest()[:32]


class LocalKeyProvider:
    """KEKs kept in files on the proxy host. For development only: the key sits beside the proxy.

    The configured file holds the newest version; it is created with 32 random bytes on first use
    (atomically, mode 0600). Older versions live beside it as ``<file>.<kek_id>``. A file that group or
    others may access is refused, as ssh refuses a private key with loose permissions.
    """

    provider_id = "local"

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._keks: dict[str, AESGCM] = {}
        kek = self._load_or_create()
        self._kek_id = self._remember(kek)
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

    def _remember(self, kek: bytes) -> str:
        kek_id = "local-" + _kek_fingerprint(kek)
        self._keks[kek_id] = AESGCM(kek)
        return kek_id

    def _version_path(self, kek_id: str) -> Path:
        return self.path.with_name(f"{self.path.name}.{kek_id}")

    def holds(self, kek_id: str) -> bool:
        return self._aead(kek_id) is not None

    def _aead(self, kek_id: str) -> AESGCM | None:
        aead = self._keks.get(kek_id)
        if aead is not None or provider_of(kek_id) != "local" or "/" in kek_id:
            return aead
        # Not in memory: a rotation elsewhere may have replaced the key file (the new version) or kept
        # this one beside it (an older version).
        candidates = [self._version_path(kek_id), self.path]
        for path in candidates:
            try:
                kek = self._load(path)
            except FileNotFoundError:
                continue
            found = self._remember(kek)
            if path == self.path and found != self._kek_id:
                log.info("master key file %s now holds KEK %s (rotated)", self.path, found)
                self._kek_id = found
            if found == kek_id:
                return self._keks[kek_id]
        return None

    def wrap(self, dek_bytes: bytes, kek_id: str | None = None) -> bytes:
        if len(dek_bytes) != _DEK_LENGTH:
            raise ValueError(f"a DEK is {_DEK_LENGTH} bytes, got {len(dek_bytes)}")
        kek_id = self._kek_id if kek_id is None else kek_id
        aead = self._aead(kek_id)
        if aead is None:
            raise MasterKeyError(f"the local key provider ({self.path}) holds no KEK {kek_id!r}")
        nonce = os.urandom(_NONCE_LENGTH)
        return nonce + aead.encrypt(nonce, dek_bytes, self._wrap_associated_data(kek_id))

    def unwrap(self, wrapped: bytes, kek_id: str) -> bytes:
        aead = self._aead(kek_id)
        if aead is None:
            raise MasterKeyError(
                f"this DEK was wrapped under KEK {kek_id!r}, but the local master key file "
                f"{self.path} holds KEK {self._kek_id!r}",
                hint="point the local provider at the master key file the keystore was created with",
            )
        if len(wrapped) != _WRAPPED_LENGTH:
            raise MasterKeyError(f"a wrapped DEK under KEK {kek_id!r} has the wrong length")
        try:
            dek = aead.decrypt(wrapped[:_NONCE_LENGTH], wrapped[_NONCE_LENGTH:], self._wrap_associated_data(kek_id))
        except InvalidTag:
            raise MasterKeyError(
                f"a wrapped DEK does not authenticate under KEK {kek_id!r} (altered keystore row?)"
            ) from None
        return dek

    @staticmethod
    def _wrap_associated_data(kek_id: str) -> bytes:
        return WRAP_LABEL + kek_id.encode("utf-8")

    # -- versions ---------------------------------------------------------------------------------
    def create_kek(self) -> str:
        """A new KEK in the configured file; the previous one is kept as ``<file>.<its kek_id>``.

        Crash-safe order: the old key is linked to its version file first, then the new key replaces the
        configured file atomically, so at every instant both keys exist on disk."""
        current = self._load(self.path)  # the file, not memory: another process may have rotated it
        old_id = self._remember(current)
        with contextlib.suppress(FileExistsError):
            os.link(self.path, self._version_path(old_id))
        kek = os.urandom(KEK_LENGTH)
        tmp = self._write_private_tmp(kek)
        try:
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._fsync_dir()
        self._kek_id = self._remember(kek)
        log.warning(
            "created KEK %s in %s; KEK %s kept in %s", self._kek_id, self.path, old_id, self._version_path(old_id)
        )
        return self._kek_id

    def destroy_kek(self, kek_id: str) -> bool:
        # Whether a KEK may go is the keystore's decision (no data key may depend on it, and it is not
        # primary); here only where its material is: its version file, or the configured file itself
        # (after a move to another provider, when this one is only in previous_master_keys).
        self._aead(kek_id)  # refreshes what the configured file holds
        path = self.path if kek_id == self._kek_id else self._version_path(kek_id)
        self._keks.pop(kek_id, None)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise MasterKeyError(f"cannot open KEK file {path}: {exc.strerror}") from None
        try:
            # Overwrite before unlinking: a best effort on copy-on-write or journaling file systems and
            # SSDs, where only destroying the storage is certain.
            os.write(fd, b"0" * (2 * KEK_LENGTH) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(path)
        self._fsync_dir()
        log.warning("destroyed KEK %s (removed %s)", kek_id, path)
        return True

    # -- the key files ----------------------------------------------------------------------------
    def _load_or_create(self) -> bytes:
        try:
            return self._load(self.path)
        except FileNotFoundError:
            pass
        try:
            return self._create()
        except FileExistsError:
            # Another process created it between our two attempts; theirs is the key.
            return self._load(self.path)

    @staticmethod
    def _load(path: Path) -> bytes:
        # Symlinks are followed (secret mounts are often symlinks); the checks apply to the target.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise MasterKeyError(f"cannot open master key file {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise MasterKeyError(f"master key file {path} is not a regular file")
            if st.st_mode & 0o077:
                raise MasterKeyError(
                    f"master key file {path} is accessible by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it",
                    hint=f"chmod 600 {path}",
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
                f"master key file {path} must hold exactly {2 * KEK_LENGTH} hex digits and an optional newline"
            )
        return kek

    def _write_private_tmp(self, kek: bytes) -> Path:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask could only have narrowed it; make it exact anyway
            os.write(fd, kek.hex().encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def _fsync_dir(self) -> None:
        with contextlib.suppress(OSError):
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def _create(self) -> bytes:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        kek = os.urandom(KEK_LENGTH)
        # Write a private temporary file, then link it into place: link() fails if the name exists, so
        # a concurrent starter either sees no file or a complete one, never a half-written key.
        tmp = self._write_private_tmp(kek)
        try:
            os.link(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._fsync_dir()
        log.warning(
            "GENERATED A NEW MASTER KEY at %s (mode 0600). This is the local development key provider: "
            "losing this file makes every value encrypted under it unrecoverable, and anyone who can "
            "read it can decrypt them. Do not use the local provider in production.",
            self.path,
        )
        return kek


class ProviderChain:
    """Several providers as one: the first wraps new DEKs (and creates new KEK versions); any of them
    unwraps a DEK under a KEK version it holds. The shape of a move from one provider to another
    (``master_key`` plus ``previous_master_keys``)."""

    def __init__(self, primary: KeyProvider, *others: KeyProvider) -> None:
        # Flattened: a chain of chains (a rotation's target in front of a configuration that has
        # previous_master_keys) routes by each member's own provider id.
        flat: list[KeyProvider] = []
        for provider in (primary, *others):
            flat.extend(provider.providers if isinstance(provider, ProviderChain) else (provider,))
        self.providers: tuple[KeyProvider, ...] = tuple(flat)

    def __repr__(self) -> str:
        return f"ProviderChain({', '.join(repr(p) for p in self.providers)})"

    @property
    def provider_id(self) -> str:
        return self.providers[0].provider_id

    @property
    def kek_id(self) -> str:
        return self.providers[0].kek_id

    def provider_for(self, kek_id: str) -> KeyProvider | None:
        for provider in self.providers:
            if provider_of(kek_id) == provider.provider_id and provider.holds(kek_id):
                return provider
        return None

    def holds(self, kek_id: str) -> bool:
        return self.provider_for(kek_id) is not None

    def wrap(self, dek_bytes: bytes, kek_id: str | None = None) -> bytes:
        if kek_id is None:
            return self.providers[0].wrap(dek_bytes)
        provider = self.provider_for(kek_id)
        if provider is None:
            raise MasterKeyError(f"no configured key provider holds KEK {kek_id!r}")
        return provider.wrap(dek_bytes, kek_id)

    def unwrap(self, wrapped: bytes, kek_id: str) -> bytes:
        provider = self.provider_for(kek_id)
        if provider is None:
            raise MasterKeyError(
                f"this DEK was wrapped under KEK {kek_id!r}, which no configured key provider holds",
                hint="add the provider that holds it to keystore.previous_master_keys",
            )
        return provider.unwrap(wrapped, kek_id)

    def create_kek(self) -> str:
        primary = self.providers[0]
        if not isinstance(primary, KekLifecycle):
            raise MasterKeyError(f"the {primary.provider_id} key provider cannot create KEK versions")
        return primary.create_kek()

    def destroy_kek(self, kek_id: str) -> bool:
        provider = self.provider_for(kek_id)
        if provider is None or not isinstance(provider, KekLifecycle):
            return False
        return provider.destroy_kek(kek_id)


def make_provider(spec: Mapping[str, Any], base_dir: Path) -> KeyProvider:
    """Builds the KEK provider a configuration's ``master_key`` section describes.

    ``spec["type"]`` picks the provider: ``local`` takes ``path``; ``pkcs11`` takes ``module``,
    ``token_label``, ``key_label`` and one of ``pin_file`` / ``pin_env`` (see :mod:`keymgmt.pkcs11`).
    Relative paths are resolved against ``base_dir``, the configuration file's directory. Errors are
    :class:`ProviderConfigError` whose ``setting`` names the key inside ``spec``, so the configuration
    loader can prefix its dotted path; a provider that cannot start raises its own errors.
    """
    kind = spec.get("type")
    if kind == "local":
        unknown = sorted(set(spec) - {"type", "path"})
        if unknown:
            raise ProviderConfigError(unknown[0], "unknown setting for the local key provider")
        return LocalKeyProvider(
            _path_setting(spec, "path", base_dir, "the local key provider needs the master key file's path")
        )
    if kind == "pkcs11":
        from keymgmt.pkcs11 import pkcs11_provider_from_spec

        return pkcs11_provider_from_spec(spec, base_dir)
    raise ProviderConfigError("type", f"unknown key provider type {kind!r}; expected 'local' or 'pkcs11'")


def _path_setting(spec: Mapping[str, Any], name: str, base_dir: Path, missing: str) -> Path:
    value = spec.get(name)
    if not isinstance(value, str) or not value:
        raise ProviderConfigError(name, missing)
    resolved = Path(value).expanduser()
    return resolved if resolved.is_absolute() else base_dir / resolved
