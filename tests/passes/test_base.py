"""base: each pass declares whether it works in place, and run_passes holds it to that."""

import copy
import importlib
from collections import OrderedDict
from pathlib import Path

import onnx_ir as ir
import pytest
import torch
from torch import fx, nn

from bngraph.passes.base import PassResult, graph_pass, run_passes, works_in_place
from tests.onnx_models import conv_bn_file

PASSES_DIR = Path(__file__).resolve().parents[2] / "passes"


def test_every_module_but_the_contract_and_the_helpers_is_a_pass_that_declares_it():
    for path in sorted(set(PASSES_DIR.glob("*.py")) - {PASSES_DIR / "__init__.py"}):
        module = importlib.import_module(f"bngraph.passes.{path.stem}")
        own = getattr(module, path.stem, None)
        if path.stem.startswith("_") or path.stem == "base":
            assert own is None, f"{path.stem} is a helper: it holds no pass of its name"
        else:
            assert callable(own), f"{path.stem} defines no pass of its own name"
            assert works_in_place(own) is True, path.stem


def test_a_pass_that_does_not_declare_it_is_refused_before_it_runs():
    ran = []

    def undeclared(gm):
        ran.append(gm)
        return PassResult(gm)

    with pytest.raises(TypeError, match="'undeclared' does not declare whether it works in place"):
        run_passes(nn.Linear(2, 2), [undeclared])
    assert ran == []


@graph_pass(in_place=True)
def returns_a_copy(module):
    return PassResult(copy.deepcopy(module))


@graph_pass(in_place=False)
def copies(module):
    module = copy.deepcopy(module)
    module.weight.data.zero_()
    return PassResult(module)


@graph_pass(in_place=False)
def returns_what_it_was_given(module):
    return PassResult(module)


@graph_pass(in_place=False)
def writes_a_weight(module):
    with torch.no_grad():
        module.weight.mul_(2)
    return PassResult(copy.deepcopy(module))


@graph_pass(in_place=False)
def swaps_a_submodule(module):
    module.act = nn.Tanh()
    return PassResult(copy.deepcopy(module))


@graph_pass(in_place=False)
def rewires_a_node(gm):
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    node.args = (node.args[0], node.args[0])  # the old args tuple is replaced, as fx always does
    return PassResult(copy.deepcopy(gm))


def test_an_in_place_pass_must_return_the_graph_it_was_given():
    with pytest.raises(RuntimeError, match="'returns_a_copy' is declared in place but returned another graph"):
        run_passes(nn.Linear(2, 2), [returns_a_copy])


def test_a_pass_not_in_place_returns_a_new_graph_and_leaves_the_given_one_as_it_was():
    given = nn.Linear(2, 2)
    weight = given.weight.detach().clone()
    graph, results = run_passes(given, [copies])
    assert graph is not given and torch.equal(given.weight, weight) and not graph.weight.any()
    with pytest.raises(RuntimeError, match="'returns_what_it_was_given' is declared not in place but returned the graph"):
        run_passes(given, [returns_what_it_was_given])
    with pytest.raises(RuntimeError, match="'writes_a_weight' is declared not in place but changed the graph"):
        run_passes(given, [writes_a_weight])
    with pytest.raises(RuntimeError, match="'swaps_a_submodule' is declared not in place but changed the graph"):
        run_passes(nn.Sequential(OrderedDict(fc=nn.Linear(2, 2), act=nn.ReLU())), [swaps_a_submodule])


def test_a_pass_not_in_place_that_rewires_an_fx_node_is_caught():
    gm = fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    with pytest.raises(RuntimeError, match="'rewires_a_node' is declared not in place but changed the graph"):
        run_passes(gm, [rewires_a_node])


def test_a_pass_not_in_place_that_edits_an_onnx_model_is_caught():
    @graph_pass(in_place=False)
    def drops_a_node(model):
        model.graph.remove(model.graph[len(model.graph) - 1], safe=False)
        return PassResult(ir.serde.deserialize_model(ir.serde.serialize_model(model)))

    @graph_pass(in_place=False)
    def copies_it(model):
        return PassResult(ir.serde.deserialize_model(ir.serde.serialize_model(model)))

    model = ir.serde.deserialize_model(conv_bn_file())
    run_passes(model, [copies_it])
    with pytest.raises(RuntimeError, match="'drops_a_node' is declared not in place but changed the graph"):
        run_passes(model, [drops_a_node])
