"""`bngraph train --nproc N` becomes this process: torchrun's launcher (`torch.distributed.run`)
with bngraph's way out.

    python -m bngraph.training.torchrun --standalone --nproc-per-node=2 -m bngraph train ...

Run bare, torchrun answered a Ctrl-C or SIGTERM with a Python traceback (exit 1), a rank's
one-line error with another traceback around its report, and left a `torchelastic_*` folder of
its logs in $TMPDIR after every job. Here:
- a stop signal exits 128 + the signal, as a shell reports it, after rank 0's one line saying
  where the job resumes;
- a rank that failed with bngraph's own exit code (1 a check, 2 the user's input, 130/143
  stopped) has said why in its one line: the job exits with that code, without torchrun's report;
  any other failure (a crash, a kill) gets torchrun's report, without the traceback;
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
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun's warnings as it stops ("Received 2 death signal, shutting down workers", one line
    # per process it signals): the stop is ours, said once below. Each of its modules' loggers
    # sets its own level as it is imported (all are, with `run`).
    for name, logger in logging.root.manager.loggerDict.items():
        if name.startswith("torch.distributed.elastic") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.ERROR)
    logs = tempfile.mkdtemp(prefix="bngraph-torchrun.")
    tempfile.tempdir = logs  # torchrun's torchelastic_* folder, made with tempfile.mkdtemp(), goes inside
    try:
        run.main(argv)
        return 0
    except SignalException as stop:  # rank 0 has said where the job resumes
        return 128 + int(stop.sigval)
    except ChildFailedError as failed:
        _, failure = failed.get_first_failure()
        if failure.exitcode in _RANKS_SAID_WHY:
            return failure.exitcode
        print(f"bngraph: error: a process of the job failed\n{failed.format_msg()}", file=sys.stderr)
        return 1
    finally:
        tempfile.tempdir = None
        shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
