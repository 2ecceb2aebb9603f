"""Transparent column encryption: the per-session rewriting layer and the per-row hot path."""
