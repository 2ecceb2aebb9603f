"""Per-role field visibility: who sees a governed column in plaintext, masked, hidden, as ciphertext, or
not at all. Every decision here is pure (no I/O): role resolution over a membership graph that the
runtime reads, grant combination, masks by declared type, and the per-statement decision over the
references the SQL analysis recorded. See ``model`` for the vocabulary shared with the rest of the proxy.
"""
