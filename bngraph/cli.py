"""argv -> exit code. Each verb lives in `bngraph/commands/<verb>.py`; its docstring is its help.

Exit codes: 0 done, 1 a check ran and failed, 2 the user's input is wrong (one line on stderr),
130 interrupted (Ctrl-C; nothing half-written is left).

Building the parser imports each verb's module for its docstring and arguments, and nothing
heavy: a verb imports torch and onnx inside its run(), so `bngraph --help` and `bngraph zoo`
start without them (tests/test_packaging.py checks).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import importlib
import importlib.abc
import importlib.metadata
import io
import os
import re
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

import rich

import bngraph
from bngraph.atomic import refuse_empty_output, working_folder_pinned
from bngraph.errors import CheckFailed, UserError, printable, user_frame

# The life of a BN model, in order: a module of bngraph/commands each. Named, not discovered: a
# module deleted from the source can live on in an installed copy (setuptools' build/ keeps what
# it once copied), and one without a command in it stopped `bngraph` from starting.
COMMANDS = ("insert", "train", "recalibrate", "reproduce", "fold", "export", "verify", "graph", "zoo")


def _versions() -> str:
    """bngraph's version and the torch build beside it (read from its metadata: no torch import)."""
    try:
        torch = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch = "not installed"
    return f"bngraph {bngraph.__version__} (torch {torch})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bngraph",
        description="Batch Normalization as a compiler pass: insert, train, fold, export, verify.",
        allow_abbrev=False,  # `--stri` taken for --strict, and broken by the next option named --stri...
    )
    parser.add_argument("--version", action="version", version=_versions())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)
    for name in COMMANDS:
        module = importlib.import_module(f"bngraph.commands.{name}")
        doc = (module.__doc__ or name).strip()  # `python -OO` strips docstrings: the help is then the name
        p = sub.add_parser(
            name,
            help=" ".join(doc.split("\n\n")[0].split()),  # the first paragraph, unwrapped
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        for action in p._actions:
            if type(action) is argparse._StoreAction:
                action.__class__ = _StoreOnce
        p.set_defaults(run=module.run)
    return parser


class _CommandParser(argparse.ArgumentParser):
    """A command's parser: an option it does not know is refused with the command's usage (argparse
    hands such options up to `bngraph`'s own parser, whose usage lists no option of the command)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


class _StoreOnce(argparse._StoreAction):
    """An option with a value, refused when given twice (`-o first -o second` wrote `second`
    without a word): which one the user meant is theirs to say."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_options_given", set())
        if self.dest in given:
            parser.error(f"{option_string or self.dest} is given twice: give it once")
        given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


# Packages whose initialisation a stop signal must not interrupt: a KeyboardInterrupt raised
# inside it has aborted the process, failed a later import ("cannot load module more than once"),
# or been swallowed, letting the command run to the end.
_IMPORTED_WHOLE = ("numpy", "torch", "onnx", "onnxruntime")


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM held back while the block runs, and delivered when it ends. Two holds:
    the main thread's signal mask, so that no system call of the block's C code fails with EINTR,
    and Python handlers that only record, since a thread torch started before the block takes
    the signal in its place and Python then runs the handler in the main thread, inside the
    block (onnxruntime's initialisation failed so)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived = []
    previous = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    masked = hasattr(signal, "pthread_sigmask")  # not on Windows
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(previous)) if masked else None
    try:
        yield
    finally:
        if masked:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal it held arrives now, recorded
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in arrived[:1]:
            signal.raise_signal(signum)


class _ImportsWhole(importlib.abc.MetaPathFinder):
    """While installed, the first import of each of `_IMPORTED_WHOLE` runs with stop signals held:
    a Ctrl-C or SIGTERM then ends the command right after it, as at any other time. Finds nothing
    itself: it wraps the loader that the finders after it give."""

    def __init__(self):
        self.pending = {name for name in _IMPORTED_WHOLE if name not in sys.modules}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        later = sys.meta_path[sys.meta_path.index(self) + 1 :]
        spec = next((s for f in later if (s := f.find_spec(fullname, path, target)) is not None), None)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_whole(module):
                # Pending until it runs: a library asking whether onnxruntime is installed
                # (importlib.util.find_spec) finds its spec and never imports it.
                self.pending.discard(fullname)
                with _signals_held():
                    exec_module(module)

            spec.loader.exec_module = exec_whole
        return spec


def _refuse_an_empty_output(args: argparse.Namespace) -> None:
    """`-o ""` (often `-o "$OUT"` with OUT unset), before any work: a command that may run
    without -o (fold) read it as none, did the whole fold, and its check then called it "-o .",
    the folder the user is in."""
    if getattr(args, "output", None) is not None:
        refuse_empty_output(args.output)


@contextlib.contextmanager
def _stdout_for_the_report(args: argparse.Namespace) -> Iterator[None]:
    """--json: stdout holds the report alone. Python's prints go to stderr, and so does what is
    written to file descriptor 1 below Python (a C extension's printf, a subprocess the model
    file runs), which came before the JSON and broke `| jq`; `args.report_stream` is stdout."""
    try:
        real = sys.stdout.fileno() == 1
    except (AttributeError, ValueError, io.UnsupportedOperation):  # a stream in memory (pytest's capsys)
        real = False
    if not real:
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with os.fdopen(os.dup(saved), "w") as report, contextlib.redirect_stdout(sys.stderr):
            args.report_stream = report
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None  # not called from Python: the process ends when this returns
    argv = sys.argv[1:] if argv is None else list(argv)
    _closed_streams_to_devnull()
    # A path may hold bytes that are not UTF-8 (a folder named in Latin-1, os.fsdecode's
    # surrogates): printed escaped, as stderr already does, rather than a UnicodeEncodeError.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        args = build_parser().parse_args(argv)  # argparse already exits 2 on a bad flag
    except KeyboardInterrupt:  # a Ctrl-C while the verbs' modules import, before our handler
        print("bngraph: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    args.argv = argv  # for a command that starts others with the same arguments (train --nproc)
    stopped_by = []  # the signals that asked the command to stop

    def stop(signum, frame):
        # A scheduler's or kill's SIGTERM takes the same way out as Ctrl-C: temporary outputs
        # removed, worker processes ended, an old output left as it was (the default handler
        # would end this process at once and leave its workers running).
        stopped_by.append(signum)
        raise KeyboardInterrupt("terminated" if signum == signal.SIGTERM else "")

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
    imports_whole = _ImportsWhole()
    if in_main_thread:  # signal masks are per thread
        sys.meta_path.insert(0, imports_whole)
    try:
        # Warnings (torch's, the user's model's) are held until the command ends: shown after a
        # result, dropped before the one line that says why there is none.
        # With --json, stdout is the report's alone: what the user's model prints goes to stderr.
        printed_elsewhere = _stdout_for_the_report(args) if getattr(args, "json", False) else contextlib.nullcontext()
        args.report_stream = sys.stdout
        with warnings.catch_warnings(record=True) as caught, printed_elsewhere, working_folder_pinned():
            _refuse_an_empty_output(args)
            code = args.run(args)
        _show(caught)
        return code
    except UserError as err:
        if stopped_by:  # the signal landed in code that turned it into another error (torch's lazy imports)
            print(f"bngraph: interrupted{': terminated' if stopped_by[-1] == signal.SIGTERM else ''}", file=sys.stderr)
            return 128 + stopped_by[-1]
        if getattr(err, "said_by_rank_0", False) and _a_rank_of_torchrun() and os.environ["RANK"] != "0":
            return 2  # the same on every rank: rank 0's line says it for the job
        print(f"bngraph: error: {printable(str(err))}", file=sys.stderr)
        return 2
    except CheckFailed as err:
        print(f"bngraph: check failed: {printable(str(err))}", file=sys.stderr)
        return 1
    except SystemExit as stop:  # the user's code called sys.exit(): theirs, in one line, not our exit code
        frame = user_frame(stop)
        if frame is not None and Path(frame.filename).is_relative_to(Path(rich.__file__).parent):
            return _reader_left()  # rich, printing the report into a closed pipe, exits so itself
        if frame is None:
            raise
        print(f"bngraph: error: the model's code called sys.exit({stop.code!r}) at {frame.filename}:{frame.lineno}",
              file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _reader_left()
    except OSError as err:
        if err.filename is not None or err.errno not in _STREAM_ERRORS:
            raise
        if _raised_writing_the_report(err):
            return _streams_failed(err)
        # Elsewhere, no file named: the shared memory DataLoader workers pass batches through
        # (/dev/shm, 64 MB in a default container) was full, and was called a report to stdout.
        print(f"bngraph: error: {err.strerror}, with no file named: the disk, or the shared memory of /dev/shm "
              "(streamed data's workers use it: try --loader-workers 0), is full", file=sys.stderr)
        return 2
    except Exception as err:
        if (shm := _shared_memory_file(err)) is not None:
            return _shared_memory_failed(err, shm)
        if not _a_peer_was_lost(err):
            raise
        # Another rank failed and said why in its own line; this one's collective broke with it.
        print(f"bngraph: error: rank {os.environ['RANK']} stopped: another process of the job failed", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # a stopped training run says where to resume
        if not _a_rank_of_torchrun() or os.environ["RANK"] == "0":  # under torchrun, rank 0 says it for the job
            print(f"bngraph: interrupted{f': {err}' if str(err) else ''}", file=sys.stderr)
        # 128 + the signal, as a shell reports it: the training loop stops on either signal
        # itself (after a whole step) and says which; else SIGTERM came through our handler.
        return 128 + getattr(err, "signum", stopped_by[-1] if stopped_by else signal.SIGINT)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if in_main_thread:
            sys.meta_path.remove(imports_whole)
        if as_program:
            # Python's exit would walk every object torch made, ~1 s after a command that used
            # it; frozen, they are left to the OS.
            gc.freeze()


def _a_rank_of_torchrun() -> bool:
    """As `bngraph.training.distributed.under_torchrun` (which imports torch): RANK alone is set
    in many a cluster's shell, where a plain run said nothing when stopped."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"))


def _a_peer_was_lost(err: BaseException) -> bool:
    """Whether `err` is a rank's collective failing under torchrun (gloo's "Connection closed by
    peer", NCCL's errors): another rank of the job failed, and its traceback was noise."""
    if not _a_rank_of_torchrun() or err.__traceback__ is None:
        return False
    # DDP's all-reduce runs in autograd's C++ engine: its error is known by its words, not its frame.
    frames = [frame.f_code.co_filename.replace(os.sep, "/") for frame, _ in traceback.walk_tb(err.__traceback__)]
    return "torch/distributed/" in frames[-1] or type(err).__name__.startswith("Dist") or \
        any(word in str(err) for word in ("gloo/transport", "Connection closed by peer", "Connection reset by peer",
                                          "NCCL error", "ProcessGroupNCCL"))


# A standard stream that cannot be written (`> /dev/full`, a stream on a lost terminal or disk).
_STREAM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EBADF}


def _closed_streams_to_devnull() -> None:
    """`bngraph ... >&-` or `2>&-`: Python starts without sys.stdout (or stderr), and printing the
    report raised AttributeError on None (exit 1, "a check failed"). The closed descriptor gets
    os.devnull: the user asked for no output there."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is None:
            null = os.open(os.devnull, os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, "w", errors="backslashreplace", closefd=False))


# torch's words when a tensor cannot be put into shared memory: the file it made in /dev/shm.
_SHARED_MEMORY_FILE = re.compile(r"unable to (?:allocate shared memory\(shm\) for|resize|write to) file </(torch_\d+_\d+_\d+)>")


def _shared_memory_file(err: BaseException) -> str | None:
    found = _SHARED_MEMORY_FILE.search(str(err)) if isinstance(err, RuntimeError) else None
    return None if found is None else found[1]


def _shared_memory_failed(err: BaseException, name: str) -> int:
    """A tensor torch shares with worker processes (reproduce's workers, streamed data's loader)
    did not fit in /dev/shm (64 MB in a default container) or under a file-size limit: one line,
    and torch's half-made file removed where it is this process's (its name holds the pid)."""
    if name.startswith(f"torch_{os.getpid()}_"):
        with contextlib.suppress(OSError):
            os.unlink(f"/dev/shm/{name}")
    reason = str(err).rsplit(":", 1)[-1].strip()
    print(f"bngraph: error: cannot share a tensor with the worker processes through /dev/shm ({reason}): make room "
          "there (docker run --shm-size), or use fewer workers (--workers 1, --loader-workers 0)", file=sys.stderr)
    return 2


def _raised_writing_the_report(err: OSError) -> bool:
    """Whether `err` came from printing (the report, rich's console, a flush here), where the
    innermost frame of its traceback is."""
    frames = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(err.__traceback__)]
    here = (str(Path(rich.__file__).parent), str(Path(__file__).parent / "report.py"), __file__)
    return not frames or frames[-1].startswith(here)


def _streams_failed(err: OSError) -> int:
    """The report could not be written (`> /dev/full`): one line where stderr still takes it, and
    exit 2, not a traceback and exit 1 (a failed check). What the command wrote to disk is whole
    by then (outputs are written before the report)."""
    with contextlib.suppress(OSError):
        print(f"bngraph: error: cannot write the report to standard output: {err.strerror}", file=sys.stderr)
        sys.stderr.flush()
    null = os.open(os.devnull, os.O_WRONLY)  # and no second error as Python flushes them at exit
    for fd in (1, 2):
        os.dup2(null, fd)
    os.close(null)
    return 2


def _reader_left() -> int:
    """`bngraph ... | head`: the reader took what it wanted and left. What the command writes to
    disk is whole by then; the rest of the report has nowhere to go."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and no second error at exit
    return 128 + signal.SIGPIPE  # as a shell reports a process that SIGPIPE ended


def _show(caught: list) -> None:
    """The warnings a successful command held back (recorded past the filters), shown now, each
    once per place and text: the filters' own once-per-place memory starts over wherever code
    enters `warnings.catch_warnings()` (torch's and the checks' runs do), which repeated a
    model's warning for every check that ran it."""
    shown = set()
    for w in caught:
        key = (str(w.message), w.category, w.filename, w.lineno)
        if key not in shown:
            shown.add(key)
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


if __name__ == "__main__":
    sys.exit(main())
