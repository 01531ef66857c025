"""Errors a user sees. Each names the file (or thing) at fault and the reason."""

from __future__ import annotations


class D3NError(Exception):
    """A user-facing failure: the CLI prints the message (no traceback) and exits non-zero."""

    exit_code = 1


class DataError(D3NError):
    """Bad dataset input: unreadable files, bad annotations, empty datasets."""


class ArtifactError(D3NError):
    """A run folder, repository or model file that is missing, corrupt or does not match."""


class ConfigError(D3NError):
    """A config file or option that does not validate."""
