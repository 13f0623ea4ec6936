"""The one error type for things the user can fix.

A `UserError` ends a command with one line on stderr and exit code 2 (see `bngraph.cli`).
Anything else is a bug in bngraph and keeps its traceback.
"""


class UserError(Exception):
    """Something the user can fix: a path, a model name, a shape, an untraceable forward."""
