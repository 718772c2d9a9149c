"""Exceptions that cross module boundaries.

Each carries a message written for the admin who will read it on a terminal or in the journal:
the CLI prints ``str(exc)`` on one line and exits 1, so messages must stand on their own.
"""


class EdgefilterError(Exception):
    """Base class: anything the CLI reports as a clean one-line error."""


class ConfigError(EdgefilterError):
    """A config file is missing, unreadable or invalid; names the file and the key."""


class PatternError(EdgefilterError, ValueError):
    """A number or pattern given by an admin or an import file cannot be used."""


class StoreError(EdgefilterError):
    """The database is unreachable, locked, read-only, full or corrupt."""


class ProtocolError(EdgefilterError):
    """A FastAGI peer broke the protocol (garbage, oversize or truncated env block)."""


class AmiError(EdgefilterError):
    """The Asterisk Manager connection is down, refused our login, or did not answer an action."""
