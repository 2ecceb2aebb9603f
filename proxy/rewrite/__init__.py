"""SQL analysis and rewriting: from statement text to a plan (what to encrypt, what to refuse)."""
