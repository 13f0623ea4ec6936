"""ONNX files in and out: load one the checker accepts, save one past protobuf's 2 GiB limit, and
write one only once it verifies against its reference (`bngraph export` and `bngraph fold x.onnx`).

    proto = load_onnx("in.onnx")
    result, written = write_verified(model, "out.onnx", reference, batches, batch_sizes=(1, 3))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from bngraph import __version__
from bngraph.atomic import ONNX, ONNX_PRODUCER, write_atomically
from bngraph.errors import UserError, one_line
from bngraph.compare import VerifyResult
from bngraph.verify import verify

# protobuf cannot serialize a message over 2 GiB; keep a margin for the graph itself.
SINGLE_FILE_LIMIT_BYTES = 2**31 - 2**27


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_onnx(model: ir.Model, path: Path, final: Path) -> None:
    """One self-contained file unless the weights pass protobuf's 2 GiB limit; then the weights go
    to `<final name>.data` beside it (written whole by onnx-ir before the model file appears).
    Its producer is bngraph: the mark by which a later `-o ... --force` knows it may replace it."""
    model.producer_name, model.producer_version = ONNX_PRODUCER, __version__
    if initializer_bytes(model) > SINGLE_FILE_LIMIT_BYTES:
        ir.save(model, path, external_data=f"{final.name}.data")
    else:
        ir.save(model, path)


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """The model, if onnx.checker with shape inference accepts it: the fold ends with the same
    check, so a model that fails it is the input's fault, said here rather than after the work."""
    path = Path(path)
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto if proto.ByteSize() < SINGLE_FILE_LIMIT_BYTES else str(path), full_check=True)
    except Exception as err:
        raise UserError(f"{path} is not a valid ONNX model: {one_line(err)}") from err
    return proto


class Rejected(Exception):
    """Raised inside an atomic write to drop the file: the check ran and failed."""


def write_verified(
    model: ir.Model,
    path: str | Path,
    reference: Any,
    batches: Sequence[Sequence[np.ndarray]],
    atol: float | None = None,
    rtol: float | None = None,
    *,
    batch_sizes: Sequence[int],
    force: bool = False,
) -> tuple[VerifyResult, bool]:
    """Write `model` beside `path`, verify that file against `reference` (an nn.Module or an ONNX
    model, see `bngraph.verify.verify`), and rename it into place only if it passes.

    Returns the verification and whether `path` was written; on a failure nothing is left behind.
    An existing `path` is replaced only as `bngraph.atomic.write_atomically` allows (`force`)."""
    path = Path(path)
    outcome: dict[str, VerifyResult] = {}

    def write(tmp: Path) -> None:
        save_onnx(model, tmp, path)
        outcome["result"] = result = verify(reference, tmp, batches, atol, rtol, batch_sizes=batch_sizes)
        if not result:
            raise Rejected

    try:
        write_atomically(path, write, kind=ONNX, force=force)
    except Rejected:
        return outcome["result"], False
    return outcome["result"], True
