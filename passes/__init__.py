"""Graph passes: each module does one job and returns a `PassResult` (see `base`)."""

from bngraph.passes.base import PassResult, Skip, run_passes

__all__ = ["PassResult", "Skip", "run_passes"]
