"""`bngraph train --nproc N` becomes this process: torchrun's launcher (`torch.distributed.run`)
with bngraph's way out.

    python -m bngraph.training.torchrun --standalone --nproc-per-node=2 -m bngraph train ...

Run bare, torchrun answered a Ctrl-C or SIGTERM with a Python traceback (exit 1), a rank's
one-line error with another traceback around its report, and left a `torchelastic_*` folder of
its logs in $TMPDIR after every job. Here:
- a stop signal exits 128 + the signal, as a shell reports it, after rank 0's one line saying
  where the job resumes;
- a rank that failed with bngraph's own exit code (1 a check, 2 the user's input, 130/143
  stopped) has said why in its one line: the job exits with that code, without torchrun's report
  (a rank whose peer failed says only that, exit 1: see bngraph.cli); any other failure (a crash,
  a kill) gets torchrun's report, without the traceback;
- torchrun's log folder is made inside a folder of our own, removed when the job ends.
"""

from __future__ import annotations

import logging
import shutil
import signal
import sys
import tempfile

_RANKS_SAID_WHY = {1, 2, 128 + signal.SIGINT, 128 + signal.SIGTERM}  # bngraph's exit codes, each after one line


def main(argv: list[str]) -> int:
    try:  # torch's import takes seconds, before torchrun's own signal handlers
        from torch.distributed import run
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    except KeyboardInterrupt:
        print("bngraph: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT

    # torchrun's log lines as it stops ("Received 2 death signal, shutting down workers", one per
    # process it signals; "failed (exitcode: 2)" after a rank's one line): the ranks and this
    # function say what happened, once. Each of its modules' loggers sets its own level as it is
    # imported (all are, with `run`).
    for name, logger in logging.root.manager.loggerDict.items():
        if name.startswith("torch.distributed.elastic") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL)
    logs = tempfile.mkdtemp(prefix="bngraph-torchrun.")
    tempfile.tempdir = logs  # torchrun's torchelastic_* folder, made with tempfile.mkdtemp(), goes inside
    try:
        run.main(argv)
        return 0
    except SignalException as stop:  # rank 0 has said where the job resumes
        return 128 + int(stop.sigval)
    except ChildFailedError as failed:
        codes = {failure.exitcode for failure in failed.failures.values()}
        if codes <= _RANKS_SAID_WHY:
            # The one whose line says why: a user's error over the rank that lost it as a peer (1).
            return next(code for code in (2, 128 + signal.SIGTERM, 128 + signal.SIGINT, 1) if code in codes)
        print(f"bngraph: error: a process of the job failed\n{failed.format_msg()}", file=sys.stderr)
        return 1
    finally:
        tempfile.tempdir = None
        shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
