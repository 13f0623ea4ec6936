"""Property: random small conv/linear/BN/ReLU stacks with random BN statistics fold to the same
function, and every BN that a layer feeds goes into that layer."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from bngraph.fold import fold
from tests.passes.fold_util import batch_norms_left
from tests.util import randomize_bn


class FeatureBatchNorm(nn.Module):
    """BatchNorm over the features of (N, T, C), the way users write it."""

    def __init__(self, features: int, **kwargs):
        super().__init__()
        self.bn = nn.BatchNorm1d(features, **kwargs)

    def forward(self, x):
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


@st.composite
def stacks(draw):
    """(model, input shape, how many BNs a layer feeds directly)."""
    kind = draw(st.sampled_from(["image", "vector", "sequence"]))
    width = start = draw(st.integers(2, 6))
    layers, fed_by_layer, after_layer = [], 0, False
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["layer", "layer", "bn", "bn", "relu"]))
        if op == "layer":
            out = draw(st.integers(2, 6))
            if kind == "image":
                kernel = draw(st.sampled_from([1, 3]))
                groups = width if draw(st.booleans()) and out % width == 0 else 1
                padding, bias = draw(st.sampled_from([0, kernel // 2])), draw(st.booleans())
                if draw(st.integers(0, 3)) == 0:
                    layers.append(nn.ConvTranspose2d(width, out, kernel, groups=groups, padding=padding, bias=bias))
                else:
                    layers.append(nn.Conv2d(width, out, kernel, padding=padding, groups=groups, bias=bias))
            else:
                layers.append(nn.Linear(width, out, bias=draw(st.booleans())))
            width, after_layer = out, True
        elif op == "bn":
            options = {"affine": draw(st.booleans()), "eps": draw(st.sampled_from([1e-5, 1e-3, 0.1]))}
            norm = {"image": nn.BatchNorm2d, "vector": nn.BatchNorm1d, "sequence": FeatureBatchNorm}[kind]
            layers.append(norm(width, **options))
            fed_by_layer += after_layer  # BN after BN: the first one folds, so a layer feeds this one too
        else:
            layers.append(nn.ReLU())
            after_layer = False
    shape = {"image": (3, start, 6, 6), "vector": (3, start), "sequence": (3, 4, start)}[kind]
    return nn.Sequential(*layers), shape, fed_by_layer


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stacks(), st.integers(0, 2**16))
def test_random_stacks_fold_exactly(stack, seed):
    model, shape, fed_by_layer = stack
    model = randomize_bn(model, seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    gm, report = fold(model, [x])
    assert batch_norms_left(gm) == [] and report.sections["remaining"] == []
    into_layer = [r for r in report.sections["folded"] if r["how"] == "into the layer before it"]
    assert len(into_layer) == fed_by_layer
    with torch.no_grad():
        want, got = model(x), gm(x)
    assert float((got - want).abs().max()) <= 1e-4 * max(float(want.abs().max()), 1.0)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stacks(), st.integers(0, 2**16))
def test_random_stacks_export_without_batchnorm_and_exactly(tmp_path_factory, stack, seed):
    import onnx
    import onnxruntime as ort

    from bngraph.export import export

    model, shape, _ = stack
    model = randomize_bn(model, seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    path = tmp_path_factory.mktemp("export") / "m.onnx"
    assert export(model, [x], path)
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(path).graph.node}
    probe = torch.randn((5, *shape[1:]), generator=torch.Generator().manual_seed(seed + 1))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: probe.numpy()})
    with torch.no_grad():
        want = model(probe).numpy()
    assert abs(got - want).max() <= 1e-4 * max(abs(want).max(), 1.0)
