"""Errors a user can fix, told apart from failures of a running job.

A ``UserError`` is the user's job file, flags, inputs or output that is wrong: the command line
prints its message (one paragraph naming the file, field, URL or line) and exits 2, without a
traceback. Anything else that escapes a run is a failure of the job (exit 1)."""
from __future__ import annotations


class UserError(Exception):
    """str() is the whole, user-facing message."""


class OutputError(UserError):
    """The output cannot be used: cannot be created, unreachable, or holds files recap did not write."""


class DatasetConflict(UserError):
    """The output holds a dataset made from another input or another source config."""


class DatasetLocked(UserError):
    """Another run holds the dataset's lease."""


class ClusterUnreachable(UserError):
    """``--address`` names a Ray cluster that does not answer."""
