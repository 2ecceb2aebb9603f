"""The ``pkcs11`` key provider: KEKs that live in an HSM (or SoftHSM2) and never leave it.

This module owns the PKCS#11 side of key management: loading the module, logging in to the token,
finding or creating the KEK versions on it, and wrapping and unwrapping DEKs there. It never reads a
KEK's value (the KEKs are created ``CKA_SENSITIVE`` and not ``CKA_EXTRACTABLE``), never logs or
reports the PIN, and turns every library exception into a :mod:`keymgmt.errors` error that names the
token and the failure kind but nothing secret.

KEK versions on the token: secret keys with ``CKA_LABEL`` = the configured ``key_label`` and
``CKA_ID`` = ``v1``, ``v2``, … (a key with that label and another id, made by an operator, is a version
named by its id in hex). The newest is the one with the highest ``vN``. KEK id in the keystore:
``pkcs11-<token_label>/<key_label>/<version>``. A version that another process created after this one
started is found on first use.

Wrapping happens on the token, with the first mechanism it offers of:

- ``CKM_AES_KEY_WRAP`` (RFC 3394): the DEK becomes a session object (``CKA_TOKEN`` false) for the one
  ``C_WrapKey`` call, then is destroyed; ``C_UnwrapKey`` makes a session object whose value is read once
  (pgveil's own AES-GCM needs the DEK bytes) and destroyed.
- ``CKM_AES_GCM``: the DEK is encrypted as data under the KEK, associated data
  ``b"pgveil-dek-wrap-v1" + kek_id``.

Wrapped DEK (pkcs11 provider)::

    mechanism (1: 0x01 AES key wrap, 0x02 AES-GCM) · blob (AES key wrap: 40; AES-GCM: nonce 12 · ciphertext 32 · tag 16)

PKCS#11 logs in per application, not per session: a second provider on the same token in one process
(``rotate-kek`` from one key label to another) shares the login.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as pk_errors

from keymgmt.errors import KeyProviderUnavailable, MasterKeyError, ProviderConfigError
from keymgmt.providers import WRAP_LABEL

log = logging.getLogger(__name__)

T = TypeVar("T")

_DEK_LENGTH = 32
_KW = 0x01
_GCM = 0x02
_GCM_NONCE = 12
_VERSION_ID = re.compile(rb"v([1-9][0-9]{0,8})")

# Failures of the device or the link to it: worth one new session, then "unavailable" (58000).
_UNREACHABLE = (
    pk_errors.DeviceError,
    pk_errors.DeviceMemory,
    pk_errors.DeviceRemoved,
    pk_errors.FunctionFailed,
    pk_errors.GeneralError,
    pk_errors.HostMemory,
    pk_errors.SessionClosed,
    pk_errors.SessionCount,
    pk_errors.SessionHandleInvalid,
    pk_errors.TokenNotPresent,
    pk_errors.TokenNotRecognised,
    pk_errors.UserNotLoggedIn,
    pk_errors.ObjectHandleInvalid,
    pk_errors.KeyHandleInvalid,
    pk_errors.WrappingKeyHandleInvalid,
    pk_errors.UnwrappingKeyHandleInvalid,
)
_PIN_REFUSED = (
    pk_errors.PinIncorrect,
    pk_errors.PinInvalid,
    pk_errors.PinLenRange,
    pk_errors.PinLocked,
    pk_errors.PinExpired,
    pk_errors.UserPinNotInitialized,
)
_BAD_BLOB = (
    pk_errors.WrappedKeyInvalid,
    pk_errors.WrappedKeyLenRange,
    pk_errors.EncryptedDataInvalid,
    pk_errors.EncryptedDataLenRange,
    pk_errors.DataInvalid,
    pk_errors.DataLenRange,
)


def _error_queue_clearer() -> Callable[[], None]:
    # SoftHSM2, like other modules built on OpenSSL, can leave entries in OpenSSL's per-thread error
    # queue (an engine it failed to load). Python's ssl module shares that libcrypto and reports a
    # stale entry as the error of its next TLS read: the keystore's asyncpg connection over TLS then
    # fails with "no such engine". So the queue is emptied after every call into the module.
    name = ctypes.util.find_library("crypto")
    if name is None:
        return lambda: None
    try:
        clear = ctypes.CDLL(name).ERR_clear_error
    except (OSError, AttributeError):
        return lambda: None
    clear.restype = None
    clear.argtypes = []
    return clear


_clear_openssl_errors = _error_queue_clearer()
# (module, token label, sha256 of the PIN) -> the refusal: PINs a token refused in this process.
_REFUSED_PINS: dict[tuple[str, str, bytes], str] = {}


class Pkcs11KeyProvider:
    """KEK versions on one PKCS#11 token. ``pin`` is held in memory only to log in again after the token
    or its sessions were lost; ``repr`` never shows it."""

    provider_id = "pkcs11"

    def __init__(self, module: Path, token_label: str, key_label: str, pin: str, *, create: bool = True) -> None:
        self.module = module
        self.token_label = token_label
        self.key_label = key_label
        self.__pin = pin
        try:
            self._lib = _load_module(module)
        finally:
            _clear_openssl_errors()
        self._session: Any = None
        self._mechanism = _KW
        self._keks: dict[str, Any] = {}  # kek_id -> pkcs11 SecretKey of the current session
        self._kek_id = ""
        try:
            self._open()
        finally:
            _clear_openssl_errors()
        if not self._kek_id:
            if not create:
                raise MasterKeyError(f"PKCS#11 token {token_label!r} holds no key labelled {key_label!r}")
            self._kek_id = self._generate(1)
            log.warning("created KEK %s on PKCS#11 token %r (not extractable)", self._kek_id, token_label)
        log.info(
            "pkcs11 key provider: token %r, key %r, newest KEK %s, wrapping with %s",
            token_label,
            key_label,
            self._kek_id,
            "CKM_AES_KEY_WRAP" if self._mechanism == _KW else "CKM_AES_GCM",
        )

    def __repr__(self) -> str:
        return (
            f"Pkcs11KeyProvider(module={str(self.module)!r}, token_label={self.token_label!r}, "
            f"key_label={self.key_label!r}, kek_id={self._kek_id!r})"
        )

    @property
    def kek_id(self) -> str:
        return self._kek_id

    # -- sessions -----------------------------------------------------------------------------------
    def _open(self) -> None:
        try:
            token = self._lib.get_token(token_label=self.token_label)
        except (pk_errors.NoSuchToken, pk_errors.MultipleTokensReturned):
            raise MasterKeyError(
                f"the PKCS#11 module {self.module} has no single token labelled {self.token_label!r}",
                hint="check master_key.token_label (softhsm2-util --show-slots lists the tokens)",
            ) from None
        except pk_errors.PKCS11Error as exc:
            raise self._unavailable(exc) from None
        refused = _REFUSED_PINS.get(self._pin_key())
        if refused is not None:
            # Never the same wrong PIN twice: an HSM may lock its user PIN after a few failed logins, and
            # the proxy retries a failed start every few seconds. A changed PIN file is tried again.
            raise self._pin_refused(refused, again=True)
        try:
            try:
                session = token.open(user_pin=self.__pin, rw=True)
            except pk_errors.UserAlreadyLoggedIn:
                session = token.open(rw=True)  # this process is logged in already (another provider)
        except _PIN_REFUSED as exc:
            _REFUSED_PINS[self._pin_key()] = type(exc).__name__
            raise self._pin_refused(type(exc).__name__) from None
        except pk_errors.PKCS11Error as exc:
            raise self._unavailable(exc) from None
        try:
            mechanisms = set(token.slot.get_mechanisms())
            if Mechanism.AES_KEY_WRAP in mechanisms:
                self._mechanism = _KW
            elif Mechanism.AES_GCM in mechanisms:
                self._mechanism = _GCM
            else:
                raise MasterKeyError(
                    f"the PKCS#11 token {self.token_label!r} offers neither CKM_AES_KEY_WRAP nor CKM_AES_GCM"
                )
            found = self._versions_in(session)
        except pk_errors.PKCS11Error as exc:
            raise self._unavailable(exc) from None
        # Only a complete new session replaces the old one (which a failed attempt leaves in place: a
        # token that hiccuped may still answer it). The old one is dropped, never closed: closing the
        # session that logged in would log out every session of this process on the token.
        self._session = session
        self._install(found)

    def _pin_key(self) -> tuple[str, str, bytes]:
        return (str(self.module), self.token_label, hashlib.sha256(self.__pin.encode("utf-8")).digest())

    def _pin_refused(self, reason: str, *, again: bool = False) -> MasterKeyError:
        not_again = "; not tried again until the PIN changes" if again else ""
        return MasterKeyError(
            f"the PKCS#11 token {self.token_label!r} refused the PIN ({reason}){not_again}",
            hint="check the file or environment variable master_key.pin_file / pin_env names",
        )

    def _find_versions(self) -> None:
        self._install(self._versions_in(self._session))

    def _versions_in(self, session: Any) -> dict[str, tuple[int, Any]]:
        found: dict[str, tuple[int, Any]] = {}
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: self.key_label}):
            version, rank = _version_name(bytes(obj[Attribute.ID] or b""))
            found[self._id_for(version)] = (rank, obj)
        return found

    def _install(self, found: dict[str, tuple[int, Any]]) -> None:
        self._keks = {kek_id: obj for kek_id, (_rank, obj) in found.items()}
        if found:
            self._kek_id = max(found.items(), key=lambda item: item[1][0])[0]

    def _id_for(self, version: str) -> str:
        return f"pkcs11-{self.token_label}/{self.key_label}/{version}"

    def _unavailable(self, exc: BaseException) -> KeyProviderUnavailable:
        return KeyProviderUnavailable(
            f"the PKCS#11 token {self.token_label!r} cannot be reached ({type(exc).__name__})",
            hint="check that the HSM is up and that master_key.module and token_label are right",
        )

    def _call(self, op: Callable[[], T]) -> T:
        """Runs a token operation; on a device or session failure opens a new session and tries once more."""
        try:
            return self._call_once_more(op)
        finally:
            _clear_openssl_errors()

    def _call_once_more(self, op: Callable[[], T]) -> T:
        try:
            return op()
        except _UNREACHABLE as exc:
            log.warning("PKCS#11 token %r: %s; opening a new session", self.token_label, type(exc).__name__)
        try:
            self._open()
        except (KeyProviderUnavailable, MasterKeyError):
            raise
        try:
            return op()
        except _UNREACHABLE as exc:
            raise self._unavailable(exc) from None

    def _generate(self, version: int) -> str:
        label = f"v{version}".encode("ascii")
        template = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.MODIFIABLE: False,
            Attribute.WRAP: True,
            Attribute.UNWRAP: True,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.SIGN: False,
            Attribute.VERIFY: False,
            Attribute.DERIVE: False,
        }
        obj = self._call(
            lambda: self._session.generate_key(
                KeyType.AES, 256, label=self.key_label, id=label, store=True, template=template
            )
        )
        kek_id = self._id_for(label.decode("ascii"))
        self._keks[kek_id] = obj
        return kek_id

    def _kek(self, kek_id: str) -> Any:
        obj = self._keks.get(kek_id)
        if obj is None and kek_id.startswith(self._id_for("")):
            # Created by another process since we looked (a rotation): look again, at most once per miss.
            newest = self._kek_id
            self._call(self._find_versions)
            if self._kek_id != newest:
                log.info("PKCS#11 token %r now holds KEK %s", self.token_label, self._kek_id)
            obj = self._keks.get(kek_id)
        return obj

    def _require(self, kek_id: str) -> Any:
        # After a new session the handles were looked up again; a version destroyed meanwhile is gone.
        obj = self._keks.get(kek_id)
        if obj is None:
            raise MasterKeyError(f"PKCS#11 token {self.token_label!r} holds no KEK {kek_id!r} (destroyed?)")
        return obj

    # -- KeyProvider --------------------------------------------------------------------------------
    def holds(self, kek_id: str) -> bool:
        return self._kek(kek_id) is not None

    def wrap(self, dek_bytes: bytes, kek_id: str | None = None) -> bytes:
        if len(dek_bytes) != _DEK_LENGTH:
            raise ValueError(f"a DEK is {_DEK_LENGTH} bytes, got {len(dek_bytes)}")
        kek_id = self._kek_id if kek_id is None else kek_id
        if self._kek(kek_id) is None:
            raise MasterKeyError(f"PKCS#11 token {self.token_label!r} holds no KEK {kek_id!r}")
        if self._mechanism == _KW:
            return bytes([_KW]) + self._call(lambda: self._wrap_kw(self._require(kek_id), dek_bytes))
        nonce = os.urandom(_GCM_NONCE)
        params = pkcs11.mechanisms.GCMParams(nonce, WRAP_LABEL + kek_id.encode("utf-8"), 128)
        sealed = self._call(
            lambda: self._require(kek_id).encrypt(dek_bytes, mechanism=Mechanism.AES_GCM, mechanism_param=params)
        )
        return bytes([_GCM]) + nonce + bytes(sealed)

    def _wrap_kw(self, kek: Any, dek_bytes: bytes) -> bytes:
        dek = self._session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: dek_bytes,
                Attribute.TOKEN: False,
                Attribute.SENSITIVE: False,
                Attribute.EXTRACTABLE: True,
            }
        )
        try:
            return bytes(kek.wrap_key(dek, mechanism=Mechanism.AES_KEY_WRAP))
        finally:
            dek.destroy()

    def unwrap(self, wrapped: bytes, kek_id: str) -> bytes:
        kek = self._kek(kek_id)
        if kek is None:
            raise MasterKeyError(
                f"this DEK was wrapped under KEK {kek_id!r}, which PKCS#11 token {self.token_label!r} does not hold",
                hint="point master_key at the token and key label the keystore was created with",
            )
        if not wrapped or wrapped[0] not in (_KW, _GCM):
            raise MasterKeyError(f"a wrapped DEK under KEK {kek_id!r} has an unknown format")
        try:
            if wrapped[0] == _KW:
                dek = self._call(lambda: self._unwrap_kw(self._require(kek_id), wrapped[1:]))
            else:
                nonce, sealed = wrapped[1 : 1 + _GCM_NONCE], wrapped[1 + _GCM_NONCE :]
                params = pkcs11.mechanisms.GCMParams(nonce, WRAP_LABEL + kek_id.encode("utf-8"), 128)
                dek = bytes(
                    self._call(
                        lambda: self._require(kek_id).decrypt(
                            sealed, mechanism=Mechanism.AES_GCM, mechanism_param=params
                        )
                    )
                )
        except _BAD_BLOB:
            raise self._bad_blob(kek_id) from None
        except KeyProviderUnavailable:
            # SoftHSM2 reports a blob that fails the key wrap's integrity check as CKR_GENERAL_ERROR: if
            # the token answers otherwise, the blob is at fault, not the token.
            if self._answers(kek_id):
                raise self._bad_blob(kek_id) from None
            raise
        except pk_errors.PKCS11Error as exc:
            raise self._unavailable(exc) from None
        if len(dek) != _DEK_LENGTH:
            raise MasterKeyError(f"a wrapped DEK under KEK {kek_id!r} has the wrong length")
        return dek

    def _bad_blob(self, kek_id: str) -> MasterKeyError:
        return MasterKeyError(f"a wrapped DEK does not authenticate under KEK {kek_id!r} (altered keystore row?)")

    def _answers(self, kek_id: str) -> bool:
        try:
            return bool(self._keks[kek_id][Attribute.LABEL] == self.key_label)
        except (KeyError, pk_errors.PKCS11Error):
            return False

    def _unwrap_kw(self, kek: Any, blob: bytes) -> bytes:
        dek = kek.unwrap_key(
            ObjectClass.SECRET_KEY,
            KeyType.AES,
            blob,
            mechanism=Mechanism.AES_KEY_WRAP,
            store=False,
            template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True, Attribute.TOKEN: False},
        )
        try:
            return bytes(dek[Attribute.VALUE])
        finally:
            dek.destroy()

    # -- KekLifecycle -------------------------------------------------------------------------------
    def create_kek(self) -> str:
        self._call(self._find_versions)
        taken = [_version_name(bytes(obj[Attribute.ID] or b""))[1] for obj in self._keks.values()]
        self._kek_id = self._generate(max([0, *taken]) + 1)
        log.warning("created KEK %s on PKCS#11 token %r (not extractable)", self._kek_id, self.token_label)
        return self._kek_id

    def destroy_kek(self, kek_id: str) -> bool:
        obj = self._kek(kek_id)
        if obj is None:
            return False
        try:
            self._call(obj.destroy)
        except pk_errors.PKCS11Error as exc:
            raise MasterKeyError(
                f"PKCS#11 token {self.token_label!r} refused to destroy KEK {kek_id!r} ({type(exc).__name__})"
            ) from None
        self._keks.pop(kek_id, None)
        log.warning("destroyed KEK %s on PKCS#11 token %r", kek_id, self.token_label)
        return True


def _version_name(cka_id: bytes) -> tuple[str, int]:
    """A token key's version name and its rank among versions (``vN`` ranks N; other ids rank 0)."""
    m = _VERSION_ID.fullmatch(cka_id)
    if m is not None:
        return cka_id.decode("ascii"), int(m.group(1))
    return (cka_id.hex() or "noid"), 0


def _load_module(module: Path) -> Any:
    try:
        return pkcs11.lib(str(module))
    except pk_errors.PKCS11Error:
        # The library's message repeats the loader's text; the path and the kind of failure suffice.
        raise MasterKeyError(
            f"cannot load the PKCS#11 module {module} (missing, or not a PKCS#11 library)",
            hint="set master_key.module to the HSM vendor's PKCS#11 library (SoftHSM2: libsofthsm2.so)",
        ) from None


def read_pin(spec: Mapping[str, Any], base_dir: Path, environ: Mapping[str, str] | None = None) -> str:
    """The PIN from ``pin_file`` (its first line) or ``pin_env``; errors name the setting, never the PIN."""
    pin_file, pin_env = spec.get("pin_file"), spec.get("pin_env")
    if (pin_file is None) == (pin_env is None):
        raise ProviderConfigError("pin_file", "exactly one of pin_file and pin_env is required")
    if pin_env is not None:
        if not isinstance(pin_env, str) or not pin_env:
            raise ProviderConfigError("pin_env", "must name an environment variable")
        value = (os.environ if environ is None else environ).get(pin_env)
        if not value:
            raise ProviderConfigError("pin_env", f"the environment variable {pin_env} is not set or empty")
        return value
    if not isinstance(pin_file, str) or not pin_file:
        raise ProviderConfigError("pin_file", "must be a file path")
    path = Path(pin_file).expanduser()
    path = path if path.is_absolute() else base_dir / path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise ProviderConfigError("pin_file", f"cannot read the PIN file {path}") from None
    first = text.splitlines()[0] if text else ""
    if not first:
        raise ProviderConfigError("pin_file", f"the PIN file {path} is empty")
    return first


def pkcs11_provider_from_spec(spec: Mapping[str, Any], base_dir: Path) -> Pkcs11KeyProvider:
    """Builds the provider from ``{type: pkcs11, module, token_label, key_label, pin_file | pin_env}``."""
    allowed = {"type", "module", "token_label", "key_label", "pin_file", "pin_env"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ProviderConfigError(unknown[0], "unknown setting for the pkcs11 key provider")
    for name in ("module", "token_label", "key_label"):
        if not isinstance(spec.get(name), str) or not spec[name]:
            raise ProviderConfigError(name, "required for the pkcs11 key provider")
    module = Path(spec["module"]).expanduser()
    module = module if module.is_absolute() else base_dir / module
    pin = read_pin(spec, base_dir)
    return Pkcs11KeyProvider(module, spec["token_label"], spec["key_label"], pin)
