"""Persistence: the store contract, SQLite and PostgreSQL, the spool. Imports core and lists."""
