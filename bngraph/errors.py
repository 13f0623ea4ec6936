"""The two ways a command ends early on purpose, each with one line on stderr.

A `UserError` is something the user can fix (a path, a model name, a shape, an untraceable
forward): exit code 2. A `CheckFailed` is a check that ran and failed (a transformed model that
no longer computes what it was given, a verification beyond tolerance): exit code 1, and nothing
written. Anything else is a bug in bngraph and keeps its traceback (see `bngraph.cli`).
"""

import os
import sys
import sysconfig
import traceback
import unicodedata
from collections.abc import Callable


class UserError(Exception):
    """Something the user can fix: a path, a model name, a shape, an untraceable forward."""


class CheckFailed(Exception):
    """A check ran and failed: the result would compute something else, so nothing is written."""


class ModelRaised(UserError):
    """The user's model raised while bngraph ran it unchanged: the user's code, not a pass, failed."""


class ModelNotAFunction(UserError):
    """The user's model, run unchanged, computes something else each time on the same input (a
    forward that counts its calls into a buffer it reads): no copy can be checked against it."""


def require_file(path, what: str) -> None:
    """Refuse `path`, the `what` the user named (a model file, weights), unless it is a regular
    file: "does not exist" only where nothing is there. A pipe (`--weights /dev/stdin`, `<(...)`)
    or a device exists, and is said to be what it is: bngraph seeks in its inputs and reads some
    more than once, which a pipe cannot give."""
    if os.path.isfile(path):
        return
    if not os.path.exists(path):
        raise UserError(f"{what} {path} does not exist")
    raise UserError(f"{what} {path} is not a regular file (a pipe or a device?): save it to a file and name that")


def one_line(err: BaseException) -> str:
    """`TypeName: first line of the message`."""
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    if first.endswith("for the following indices"):  # onnxruntime lists the axes and sizes below it
        first += ": " + "; ".join(line.strip() for line in text[1:] if line.strip().startswith("index:"))
    return f"{type(err).__name__}: {first}".rstrip(": ")


def printable(text: str) -> str:
    """`text` with each control character written as its escape (`\\n`, `\\x1b`): a newline in
    a folder's name must not split a one-line message or a table row, nor a terminal escape in a
    file's name reach the terminal."""
    if not any(unicodedata.category(c) == "Cc" for c in text):
        return text
    return "".join(c.encode("unicode_escape").decode() if unicodedata.category(c) == "Cc" else c for c in text)


def add_note(err: BaseException, note: str) -> None:
    """`err.add_note(note)`, which Python 3.10 lacks: there the note is kept in `__notes__`
    (which its tracebacks do not print) rather than the AttributeError hiding `err`."""
    if hasattr(err, "add_note"):
        err.add_note(note)
    else:
        err.__notes__ = [*getattr(err, "__notes__", []), note]


def _library_dirs() -> tuple[str, ...]:
    """Folders whose frames are not the user's: torch, bngraph itself (its zoo aside), the stdlib."""
    dirs = [sysconfig.get_paths()["stdlib"]]
    for name in ("torch", "bngraph", "bngraph.passes", "onnxscript", "onnx_ir", "onnx"):
        module = sys.modules.get(name)
        dirs += [os.path.realpath(p) for p in getattr(module, "__path__", [])]
    return tuple(os.path.join(d, "") for d in dirs)


def users_file() -> Callable[[str], bool]:
    """A test of a frame's file name: the user's code (a zoo model counts as the user's: it runs
    on the user's input), not torch's, bngraph's or the standard library's."""
    library = _library_dirs()
    zoo = tuple(os.path.join(os.path.realpath(p), "") for p in getattr(sys.modules.get("bngraph.zoo"), "__path__", []))

    def is_users(filename: str) -> bool:
        real = os.path.realpath(filename)
        return not filename.startswith("<") and (real.startswith(zoo) or not real.startswith(library))

    return is_users


def user_frame(err: BaseException):
    """The innermost traceback frame of `err` in the user's code, or None when every frame is
    torch's or bngraph's."""
    is_users = users_file()
    frames = [f for f in traceback.extract_tb(err.__traceback__) if is_users(f.filename)]
    return frames[-1] if frames else None


def model_raised(err: BaseException, what: str = "the model", *, failed: str | None = None) -> ModelRaised:
    """The one-line error for a user's forward that raised `err`: where in the user's file, and
    what. `failed` puts the circumstance first: "the model failed on its example input (2, 3)"."""
    frame = user_frame(err)
    where = ""
    if frame is not None:
        code = (frame.line or "").strip()
        where = f" at {frame.filename}:{frame.lineno}" + (f" ({code})" if code else "")
    if failed:
        return ModelRaised(f"{failed}: it raised{where}: {one_line(err)}")
    return ModelRaised(f"{what} raised{where}: {one_line(err)}")


class running_user_model:
    """`with running_user_model("the model"): model(x)`: an exception from inside the user's own
    code becomes a one-line `ModelRaised` (`failed`: the circumstance, as `model_raised` takes
    it); one with no frame in the user's code stays a bug."""

    def __init__(self, what: str = "the model", *, failed: str | None = None):
        self.what, self.failed = what, failed

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or not isinstance(err, Exception) or isinstance(err, (UserError, CheckFailed)):
            return False
        if user_frame(err) is None:
            return False
        raise model_raised(err, self.what, failed=self.failed) from err
