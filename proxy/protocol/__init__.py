"""The PostgreSQL wire protocol: messages, codec, and the per-connection relay state machine."""
