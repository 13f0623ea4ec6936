"""Turn every BatchNorm into a SyncBatchNorm, so statistics are over the global batch.

Under DistributedDataParallel each rank normalizes over its own mini-batch (the paper's setting:
the batch BN sees is the per-device batch). SyncBatchNorm all-reduces the batch statistics across
ranks instead. torch's `SyncBatchNorm.convert_sync_batchnorm` does the conversion; this pass
reports it. Parameter and buffer names are unchanged, so a checkpoint loads into the plain model.
"""

from __future__ import annotations

from torch import nn

from bngraph.passes.base import PassResult, Skip, graph_pass


@graph_pass(in_place=True)  # as torch's conversion is, for any model but a lone BatchNorm (replaced)
def convert_bn_to_sync_bn(module: nn.Module) -> PassResult:
    """Convert `module`'s BatchNorms (as torch does) and report each one."""
    result = PassResult(module)
    before = {
        path: type(m).__name__
        for path, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
    }
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    result.graph = converted
    for path, kind in before.items():
        if isinstance(converted.get_submodule(path), nn.SyncBatchNorm):
            result.changed.append(path)
            result.details.append({"bn": path, "from": kind})
        else:
            result.skipped.append(Skip(path, f"{kind} was not converted"))
    return result
