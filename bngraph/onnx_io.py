"""ONNX files in and out: load one the checker accepts, save one past protobuf's 2 GiB limit, and
write one only once it verifies against its reference (`bngraph export` and `bngraph fold x.onnx`).

    proto = load_onnx("in.onnx")
    result, written = write_verified(model, "out.onnx", reference, batches, batch_sizes=(1, 3))
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from bngraph import __version__
from bngraph.atomic import (
    ONNX, ONNX_PRODUCER, SEAL_KEY, fresh_sibling, onnx_metadata_entry, output_kind, sha256, write_atomically,
)
from bngraph.errors import UserError, one_line
from bngraph.compare import VerifyResult
from bngraph.verify import verify

# protobuf cannot serialize a message over 2 GiB; keep a margin for the graph itself.
SINGLE_FILE_LIMIT_BYTES = 2**31 - 2**27
# The metadata entry in which a model whose weights sit in `<name>.data` records that file's
# SHA-256: the model's seal covers it, so an edit to either makes the pair the user's.
WEIGHTS_DIGEST_KEY = b"bngraph_weights_sha256"
# The metadata entry that keeps the producer (exporter and version) of a file bngraph rewrote.
EXPORTED_BY_KEY = "bngraph_exported_by"


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_onnx(model: ir.Model, path: Path, external_data: str | None = None) -> None:
    """Save `model`, its weights in the file `external_data` beside it where given. Its producer
    is bngraph: the mark by which a later `-o ... --force` knows it may replace it."""
    if model.producer_name and model.producer_name != ONNX_PRODUCER:  # the exporter the mark replaces, kept
        exported_by = f"{model.producer_name} {model.producer_version or ''}".strip()
        model.metadata_props.setdefault(EXPORTED_BY_KEY, exported_by)
    model.producer_name, model.producer_version = ONNX_PRODUCER, __version__
    # A model read from a file bngraph wrote carries that file's seal; `write_atomically` seals anew.
    for key in (SEAL_KEY, WEIGHTS_DIGEST_KEY):
        model.metadata_props.pop(key.decode(), None)
    if not external_data:
        ir.save(model, path)
        return
    ir.save(model, path, external_data=external_data)
    with path.open("ab") as f:
        f.write(onnx_metadata_entry(WEIGHTS_DIGEST_KEY, sha256(path.with_name(external_data)).encode()))


def weights_file(model: ir.Model, path: Path) -> Path | None:
    """Where `model`'s weights go when saved at `path`: None (inside it) unless they pass
    protobuf's 2 GiB limit, then `<name>.data` beside it."""
    return path.with_name(f"{path.name}.data") if initializer_bytes(model) > SINGLE_FILE_LIMIT_BYTES else None


def _check_weights_file(data: Path, path: Path, force: bool) -> None:
    """Refuse to write over a `<name>.data` that bngraph did not write: one is replaced only with
    --force, and only as the weights of the bngraph ONNX file at `path`, as it wrote them."""
    if not data.exists() and not data.is_symlink():
        return
    if not (force and _own_weights_file(path, data)):
        raise UserError(f"{data} exists, and the weights of {path.name} (over 2 GiB) would be written there: "
                        "bngraph did not write it (or it was changed since), so it is left as it is; "
                        "choose another -o")


class _Weights:
    """The weights file `<name>.data` of a model over 2 GiB, put in place only once the model's
    rename is all that is left (an edited old model there refused at the last check left the
    user's model without its weights), the old one moved aside until the new model is in."""

    def __init__(self, path: Path | None):
        self.path, self.staged, self.old, self.placed = path, None, None, False

    def stage(self, built: Path) -> None:
        self.staged = fresh_sibling(self.path, "partial")
        os.replace(built, self.staged)

    def put_in_place(self) -> None:
        if self.staged is None:
            return
        if os.path.lexists(self.path):  # the old model's, as `_check_weights_file` allowed
            self.old = fresh_sibling(self.path, "old")
            os.replace(self.path, self.old)
        os.replace(self.staged, self.path)
        self.placed = True

    def done(self) -> None:
        if self.old is not None:
            self.old.unlink(missing_ok=True)

    def undo(self) -> None:
        if self.placed:
            self.path.unlink(missing_ok=True)
        elif self.staged is not None:
            self.staged.unlink(missing_ok=True)
        if self.old is not None:
            os.replace(self.old, self.path)


def _own_weights_file(path: Path, data: Path) -> bool:
    """Whether `data` holds the weights of the bngraph ONNX file at `path` as bngraph wrote them:
    a file the model names, whose SHA-256 is the one the model recorded (`save_onnx`)."""
    if output_kind(path) != ONNX or data.is_symlink() or not data.is_file():
        return False
    proto = onnx.load(str(path), load_external_data=False)
    named = {entry.value for tensor in proto.graph.initializer for entry in tensor.external_data
             if entry.key == "location"}
    recorded = {entry.key: entry.value for entry in proto.metadata_props}.get(WEIGHTS_DIGEST_KEY.decode())
    return data.name in named and recorded == sha256(data)


def _declare_output_shapes(proto: onnx.ModelProto, path: Path) -> None:
    """Give a graph output declared without a shape (other exporters write them; onnxruntime runs
    them, onnx.checker refuses them) the shape inference finds for it; a graph input without one
    is named, since nothing can say its rank."""
    unshaped = lambda values: [v for v in values if v.type.HasField("tensor_type")  # noqa: E731
                               and not v.type.tensor_type.HasField("shape")]
    if inputs := unshaped(proto.graph.input):
        raise UserError(f"{path}: graph input {inputs[0].name!r} declares no shape (not even its rank), which ONNX "
                        "requires of a graph's inputs: declare it")
    outputs = unshaped(proto.graph.output)
    if not outputs or proto.ByteSize() >= SINGLE_FILE_LIMIT_BYTES:
        return
    try:
        graph = onnx.shape_inference.infer_shapes(proto).graph
        inferred = {v.name: v for v in (*graph.value_info, *graph.output)}
    except Exception:  # the checker below says what is wrong with the file
        return
    for output in outputs:
        found = inferred.get(output.name)
        if found is None or not found.type.tensor_type.HasField("shape"):
            raise UserError(f"{path}: graph output {output.name!r} declares no shape (not even its rank), which ONNX "
                            "requires of a graph's outputs, and shape inference finds none: declare it")
        output.type.tensor_type.shape.CopyFrom(found.type.tensor_type.shape)


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """The model, if onnx.checker with shape inference accepts it: the fold ends with the same
    check, so a model that fails it is the input's fault, said here rather than after the work."""
    path = Path(path)
    try:
        proto = onnx.load(str(path))
    except Exception as err:
        raise UserError(f"{path} is not a valid ONNX model: {one_line(err)}") from err
    _declare_output_shapes(proto, path)
    try:
        onnx.checker.check_model(proto if proto.ByteSize() < SINGLE_FILE_LIMIT_BYTES else str(path), full_check=True)
    except Exception as err:
        raise UserError(f"{path} is not a valid ONNX model: {one_line(err)}") from err
    if not proto.graph.output:  # onnxruntime's words for it blamed the file the fold would write
        raise UserError(f"{path} declares no graph outputs: nothing it computes can be compared")
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
    dtypes_must_match: bool = False,
) -> tuple[VerifyResult, bool]:
    """Write `model` beside `path`, verify that file against `reference` (an nn.Module or an ONNX
    model, see `bngraph.verify.verify`), and rename it into place only if it passes.

    Returns the verification and whether `path` was written; on a failure nothing is left behind.
    An existing `path` is replaced only as `bngraph.atomic.write_atomically` allows (`force`);
    `dtypes_must_match` is `verify`'s."""
    path = Path(path)
    outcome: dict[str, VerifyResult] = {}
    data = weights_file(model, path)
    if data is not None:
        _check_weights_file(data, path, force)
    # The weights file of the old model this replaces, which the new one no longer needs.
    stale = path.with_name(f"{path.name}.data") if data is None and force else None
    if stale is not None and not _own_weights_file(path, stale):
        stale = None
    weights = _Weights(data)

    def check(saved: Path) -> None:
        try:
            outcome["result"] = result = verify(reference, saved, batches, atol, rtol, batch_sizes=batch_sizes,
                                                dtypes_must_match=dtypes_must_match)
        except UserError as err:  # about the file as the user will know it, not its temporary name
            raise UserError(str(err).replace(str(saved), str(path))) from err
        if not result:
            raise Rejected

    def write(tmp: Path) -> None:
        if data is None:
            save_onnx(model, tmp)
            check(tmp)
            return
        # The model names its weights file, which must sit beside it under its final name: the
        # two are written and verified in a folder of their own; the weights wait beside it
        # until the model's last check has passed (`_Weights`).
        with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".bngraph-onnx.") as folder:
            staged = Path(folder) / path.name
            save_onnx(model, staged, external_data=data.name)
            check(staged)
            weights.stage(staged.with_name(data.name))
            os.replace(staged, tmp)

    try:
        write_atomically(path, write, kind=ONNX, force=force, before_rename=weights.put_in_place)
    except BaseException as err:
        weights.undo()
        if isinstance(err, Rejected):
            return outcome["result"], False
        raise
    weights.done()
    if stale is not None:
        stale.unlink(missing_ok=True)
    return outcome["result"], True
