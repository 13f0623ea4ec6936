import os
import sys

from bngraph.cli import main

code = main()
if all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
    # A rank of torchrun's job, done (its process group destroyed, its files written): leave
    # without the interpreter's teardown, where gloo's threads could still abort the process
    # (SIGABRT, "terminate called without an active exception") and fail a job that succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
