"""pgveil's key management: envelope, key providers, keystore, rotation, shredding, ledger.

This package never imports from :mod:`proxy`. Its modules:

- :mod:`keymgmt.errors`: the error hierarchy; every leaf carries its SQLSTATE.
- :mod:`keymgmt.envelope`: the ciphertext envelope v1 and :class:`~keymgmt.envelope.DataKey` (pure).
- :mod:`keymgmt.keycache`: the bounded TTL cache of unwrapped keys (pure, synchronous).
- :mod:`keymgmt.providers`: the KEK provider seam, the ``local`` provider, provider chains.
- :mod:`keymgmt.pkcs11`: the ``pkcs11`` provider (an HSM; SoftHSM2 in tests).
- :mod:`keymgmt.keystore`: the ``pgveil`` schema (``keymgmt/migrations``), DEK creation and loading,
  LISTEN invalidation.
- :mod:`keymgmt.kek_rotation`: KEK rotation (re-wrapping) and destruction.
"""
