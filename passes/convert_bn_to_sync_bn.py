"""Turn every BatchNorm into a SyncBatchNorm, so statistics are over the global batch.

Under DistributedDataParallel each rank normalizes over its own mini-batch (the paper's setting:
the batch BN sees is the per-device batch). SyncBatchNorm all-reduces the batch statistics across
ranks instead. torch's `SyncBatchNorm.convert_sync_batchnorm` converts each one; this pass picks
which, and reports it. Parameter and buffer names are unchanged, so a checkpoint loads into the
plain model.

A BatchNorm whose call does more than BatchNorm's is left as it is, with its reason: a SyncBatchNorm
in its place would train without it (its subclass's own forward, its hooks), while the model
saved afterwards has it, so the run's numbers would be another model's. A BatchNorm reached under
two names is converted at both (torch's conversion walks each module once, and left the second).
"""

from __future__ import annotations

from torch import nn

from bngraph.passes._fx_effects import hooks_of
from bngraph.passes.base import PassResult, Skip, graph_pass

# What SyncBatchNorm computes in training, and its own forward: a subclass may compute more.
_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@graph_pass(in_place=True)  # as torch's conversion is, for any model but a lone BatchNorm (replaced)
def convert_bn_to_sync_bn(module: nn.Module) -> PassResult:
    """Convert `module`'s BatchNorms (as torch does) and report each one."""
    result = PassResult(module)
    paths_of: dict[int, list[str]] = {}
    for path, m in module.named_modules(remove_duplicate=False):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            paths_of.setdefault(id(m), []).append(path)
    for paths in paths_of.values():
        bn = module.get_submodule(paths[0])
        if reason := _why_kept(bn):
            result.skipped.extend(Skip(path, reason) for path in paths)
            continue
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(bn)
        for path in paths:
            if path == "":
                result.graph = synced
            else:
                parent, _, name = path.rpartition(".")
                setattr(module.get_submodule(parent), name, synced)
            result.changed.append(path)
            result.details.append({"bn": path, "from": type(bn).__name__})
    return result


def _why_kept(bn: nn.Module) -> str | None:
    plain = next((cls for cls in type(bn).__mro__ if cls in _PLAIN), None)
    own_forward = "forward" in vars(bn) or type(bn).forward is not nn.modules.batchnorm._BatchNorm.forward
    if plain is None or own_forward:
        kind = f"{type(bn).__name__} (a {plain.__name__} with a forward of its own)" if plain else type(bn).__name__
        return f"{kind} computes what a SyncBatchNorm in its place would not: its statistics stay the rank's own"
    if hooks := hooks_of(bn, global_hooks=False):
        return (f"it has a {' and a '.join(dict.fromkeys(hooks))}, which a SyncBatchNorm in its place would not run: its "
                "statistics stay the rank's own")
    return None
