"""pgveil's key management: envelope, key providers, keystore, rotation, shredding, ledger.

This package never imports from :mod:`proxy`. Its modules:

- :mod:`keymgmt.errors`: the error hierarchy; every leaf carries its SQLSTATE.
- :mod:`keymgmt.envelope`: the ciphertext envelope v1 and :class:`~keymgmt.envelope.DataKey` (pure).
- :mod:`keymgmt.keycache`: the bounded TTL cache of unwrapped keys (pure, synchronous).
- :mod:`keymgmt.providers`: KEK providers that wrap and unwrap DEKs (``local``; ``pkcs11`` later).
- :mod:`keymgmt.keystore`: the ``pgveil`` schema, DEK creation and loading, LISTEN invalidation.
"""
