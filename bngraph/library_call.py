"""What every public function (`bngraph.insert`, `fold`, `export`, `verify`, `load`, `save`,
`train`) does whatever its caller's context is: bngraph is called from notebooks and training
scripts, inside their `torch.autocast` blocks and seeded loops.

    @library_call
    def insert(model, example_inputs, ...): ...
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator

from bngraph.errors import UserError, user_frame


def library_call(function: Callable | None = None, *, refuse_inference_mode: bool = False):
    """`function` run:
    - with torch.autocast off: bngraph runs the model as it is (under a caller's bfloat16
      autocast, verify judged a float32 model at bfloat16's tolerance and passed a candidate that
      differed, and export wrote a float16 file);
    - with the caller's random state put back after (torch's, Python's): `train` seeds torch for
      its run, and an ensemble built in a seeded loop around it got one set of initial weights;
    - the user's code calling sys.exit() turned into a UserError saying where, rather than the
      end of the caller's program.
    - with torch.inference_mode off: the weights `fold` made inside the caller's block were
      inference tensors, and training the folded model failed in torch's words;
    - with the CPU as torch's default device: after the caller's torch.set_default_device, the
      tensors bngraph makes without naming a device (and the model's own) went there;
    - one call at a time in the process: torch.fx's tracer patches nn.Module.__call__ for
      everyone while it traces, and calls from two threads failed as if the model had raised.
      A call from another thread waits for the one running (a `train` on_eval callback that
      waits on another thread's `fold` would wait for ever: call it in the callback's thread).
    With `refuse_inference_mode` (a function that traces, trains or saves), a call inside
    torch.inference_mode() is a UserError: the tensors the caller made there keep no version
    counter and take no gradient, and torch's words for the failure spoke of counters."""
    if function is None:
        return functools.partial(library_call, refuse_inference_mode=refuse_inference_mode)

    @functools.wraps(function)
    def call(*args, **kwargs):
        with _ONE_CALL_AT_A_TIME, _as_the_model_is(function.__name__, refuse_inference_mode), _random_state_kept():
            try:
                return function(*args, **kwargs)
            except SystemExit as stop:
                frame = user_frame(stop)
                if frame is None:
                    raise
                raise UserError(f"the model's code called sys.exit({stop.code!r}) at {frame.filename}:{frame.lineno}") \
                    from stop

    return call


_ONE_CALL_AT_A_TIME = threading.RLock()  # reentrant: export calls fold


@contextlib.contextmanager
def _as_the_model_is(name: str, refuse_inference_mode: bool) -> Iterator[None]:
    import torch  # here: `import bngraph` does not start torch

    if refuse_inference_mode and torch.is_inference_mode_enabled():
        raise UserError(f"bngraph.{name} was called inside torch.inference_mode(), whose tensors bngraph cannot trace, "
                        "train or save: call it outside that block")
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        if torch.get_default_device().type != "cpu":  # entered only then: the mode sees every torch call
            stack.enter_context(torch.device("cpu"))
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    import torch

    from bngraph.runners import host_generators_kept  # here: `import bngraph` does not start torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with host_generators_kept(), torch.random.fork_rng(devices=devices):
        yield
