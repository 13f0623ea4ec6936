"""The two ways a command ends early on purpose, each with one line on stderr.

A `UserError` is something the user can fix (a path, a model name, a shape, an untraceable
forward): exit code 2. A `CheckFailed` is a check that ran and failed (a transformed model that
no longer computes what it was given, a verification beyond tolerance): exit code 1, and nothing
written. Anything else is a bug in bngraph and keeps its traceback (see `bngraph.cli`).
"""


class UserError(Exception):
    """Something the user can fix: a path, a model name, a shape, an untraceable forward."""


class CheckFailed(Exception):
    """A check ran and failed: the result would compute something else, so nothing is written."""
