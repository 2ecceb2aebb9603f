"""The key-management error hierarchy.

Every leaf carries the SQLSTATE the proxy reports it with, so a caller turns any of these into an
ErrorResponse without a lookup table (keymgmt never imports the proxy's own errors). Messages never
contain plaintext, ciphertext, key material or file contents; key ids, KEK ids and column ids are
not secret (key ids travel in every envelope header) and may appear.

SQLSTATE choices (PostgreSQL docs, Appendix A "PostgreSQL Error Codes"):

- ``XX001`` data_corrupted for a value that does not authenticate: from the client's point of view the
  stored datum is corrupt, whatever the cause.
- ``58000`` system_error for an unreachable key provider or keystore: class 58 is "errors external to
  PostgreSQL itself". Class 08 (connection exception) was rejected on purpose: drivers and pools treat
  08xxx as "this connection is dead" and discard or retry it, while here the client's connection is
  healthy and only a dependency of the proxy is failing.
- ``55000`` object_not_in_prerequisite_state for a key that exists but may not be used (disabled, or
  destroyed by crypto-shredding): the request is well-formed, the key is in the wrong state.
- ``F0000`` config_file_error for a master key file or provider setting that is wrong.
"""

from __future__ import annotations


class KeyManagementError(Exception):
    """Root of every error raised by :mod:`keymgmt`."""

    sqlstate: str = "XX000"

    def __init__(self, message: str, *, detail: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint


class DecryptionFailed(KeyManagementError):
    """An envelope could not be opened.

    The message never says which check failed (framing, algorithm, tag): an attacker who can submit
    ciphertext must not learn which part of a forgery was wrong. The caller adds the table and column.
    """

    sqlstate = "XX001"

    def __init__(self, message: str = "a protected value could not be decrypted") -> None:
        super().__init__(message)


class UnknownKey(DecryptionFailed):
    """No usable data key exists for a key id (never created here, or gone)."""

    sqlstate = "XX001"

    def __init__(self, message: str = "the data key of a protected value is unknown") -> None:
        super().__init__(message)


class KeyDestroyed(UnknownKey):
    """The data key was destroyed (crypto-shredded); its tombstone remains so the subject stays shredded.

    A subclass of :class:`UnknownKey` so code that only cares about "no key" needs one ``except``;
    the proxy catches this one first because shredded reads become NULL rather than errors.
    """

    sqlstate = "55000"

    def __init__(self, message: str = "the data key was destroyed") -> None:
        super().__init__(message)


class KeyDisabled(KeyManagementError):
    """The data key exists but is DISABLED: it may neither encrypt nor decrypt until re-enabled."""

    sqlstate = "55000"


class KeyProviderUnavailable(KeyManagementError):
    """The KEK provider (key file, HSM, KMS) cannot be reached or refused the operation."""

    sqlstate = "58000"


class KeystoreError(KeyManagementError):
    """The keystore database is unreachable, not initialised, or holds an inconsistent row."""

    sqlstate = "58000"


class MasterKeyError(KeyManagementError):
    """The master key (KEK) is unusable: bad file mode or contents, or it does not unwrap a DEK."""

    sqlstate = "F0000"


class ProviderConfigError(KeyManagementError):
    """A key provider specification is invalid; ``setting`` names the offending key inside it."""

    sqlstate = "F0000"

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
