"""pgveil's proxy: the PostgreSQL wire protocol, sessions, SQL analysis, visibility, admin server, CLI.

Depends on :mod:`keymgmt`; :mod:`keymgmt` never imports from here.
"""

__version__ = "0.1.0"
