"""The error type for a user's mistake (an option, a file, a folder), as opposed to a bug in prunelab.

The ``prunelab`` command prints a :class:`UserError` as one line, ``prunelab: error: <message>``, and exits
with status 2; every other exception is a bug and keeps its traceback. ``prunelab --verbose`` (or
``PRUNELAB_VERBOSE=1`` / ``HYDRA_FULL_ERROR=1``) shows the traceback of a user error too.

A ``UserError`` is a ``ValueError``, so code and tests that catch ``ValueError`` keep working. The CLI also
treats a ``ValueError``, ``TypeError`` or ``OSError`` raised *by prunelab's own code* (its checks name the
option) as a user error; the same exception types raised inside a library are bugs.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message names the option (or file) and says what is allowed."""
