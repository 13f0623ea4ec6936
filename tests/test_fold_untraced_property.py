"""Property: random stacks of Linear and HuggingFace-style Conv1D layers with activation modules,
on (N, T, C) sequences, behind a shape check torch.fx cannot trace: the module-level fallback puts
a BatchNorm over the features (the last axis) before every activation behind a layer, and with
random statistics each one a layer feeds directly folds into it, module by module, exactly."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bngraph
from tests.test_insert_fallback import GPT_FILE
from tests.util import randomize_bn


def _user_classes() -> dict:
    """The GPT-2-style file's classes, HuggingFace's Conv1D among them (tests/test_insert_fallback.py)."""
    namespace: dict = {}
    exec(GPT_FILE, namespace)  # noqa: S102 (the test's own source text)
    return namespace


Conv1D = _user_classes()["Conv1D"]


class Stack(nn.Module):
    def __init__(self, width, layers):
        super().__init__()
        self.width, self.layers = width, nn.ModuleList(layers)

    def forward(self, x):
        if len(x) == 0:  # len() of a tensor: torch.fx cannot trace it
            raise ValueError("an empty batch")
        for layer in self.layers:
            x = layer(x)
        return x


@st.composite
def stacks(draw):
    """(model, input width, activations after some layer, activations a layer feeds directly)."""
    width = start = draw(st.integers(2, 6))
    layers, behind_a_layer, fed, seen_layer, after_layer = [], 0, 0, False, False
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            out = draw(st.integers(2, 6))
            layers.append(Conv1D(out, width) if draw(st.booleans()) else nn.Linear(width, out, bias=draw(st.booleans())))
            width, seen_layer, after_layer = out, True, True
        else:
            layers.append(draw(st.sampled_from([nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh]))())
            behind_a_layer += seen_layer  # its features come from that layer, through activations
            fed += after_layer
            after_layer = False
    return Stack(start, layers), start, behind_a_layer, fed


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stacks(), st.integers(0, 2**16))
def test_random_untraceable_stacks_get_their_batchnorms_and_fold_exactly(stack, seed):
    model, width, behind_a_layer, fed = stack
    x = torch.randn(3, 5, width, generator=torch.Generator().manual_seed(seed))
    inserted, report = bngraph.insert(model, [x])
    assert report.facts["tracing"] == "module-level fallback"
    assert len(report.sections["inserted"]) == behind_a_layer
    assert all(row["axes"] == "last" for row in report.sections["inserted"])
    inserted = randomize_bn(inserted, seed)
    folded, fold_report = bngraph.fold(inserted, [x])
    assert len(fold_report.sections["folded"]) == fed  # those a layer feeds; the rest stay, with why
    assert all("not a layer module" in r["reason"] or "not a conv or linear" in r["reason"]
               for r in fold_report.sections["remaining"])
    with torch.no_grad():
        want, got = inserted(x), folded(x)
    assert float((got - want).abs().max()) <= 1e-4 * max(float(want.abs().max()), 1.0)
