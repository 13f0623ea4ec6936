"""How far a correct fold stays inside verify's tolerance: the README's margins, reproducible.

For each zoo model: BN inserted, its statistics randomized, folded (PyTorch) and exported (ONNX);
each compared with the unfolded model by `bngraph.verify` at its default tolerance. Printed is
the worst element's error as a fraction of what the rule allows (`excess`; 1 would fail).

    .venv/bin/python benchmarks/verify_margins.py [--models mnist-mlp,inception-small,inception]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import bngraph
from bngraph.runners import random_batches


def randomize_batch_norms(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                shape = m.running_mean.shape
                m.running_mean.copy_(torch.randn(shape, generator=gen))
                m.running_var.copy_(torch.rand(shape, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(shape, generator=gen))
                m.bias.copy_(torch.randn(shape, generator=gen))


def margins(name: str) -> dict[str, float]:
    model = bngraph.load(f"zoo:{name}")
    example = [torch.randn(tuple(bngraph.zoo.get_entry(name).input_shape))]
    bn_model, _ = bngraph.insert(model, example)
    randomize_batch_norms(bn_model)
    bn_model.eval()
    folded, _ = bngraph.fold(bn_model, example)
    batches = random_batches([tuple(example[0].shape)])
    worst = {"torch folded": max(d.excess for d in bngraph.verify(bn_model, folded, batches).diffs)}
    with tempfile.TemporaryDirectory() as tmp:
        result = bngraph.export(bn_model, example, Path(tmp) / "m.onnx")
    for diff in result.verification.diffs:
        worst[diff.candidate] = max(worst.get(diff.candidate, 0.0), diff.excess)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist-mlp,inception-small,inception")
    args = parser.parse_args()
    for name in args.models.split(","):
        row = margins(name)
        cells = ", ".join(f"{k}: {v:.3g} (1/{1 / v:.0f})" if v else f"{k}: 0" for k, v in row.items())
        print(f"{name:16s} {cells}", flush=True)


if __name__ == "__main__":
    main()
