import html
import importlib.util
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from bngraph.cli import main
from bngraph.draw import MARKS, graph_of
from bngraph.layout import layered_layout
from tests.mnist_like import write_learnable
from tests.util import randomize_bn


def test_graph_marks_every_inserted_batchnorm(tmp_path, capsys):
    assert main(["insert", "zoo:inception-small", "-o", str(tmp_path / "a")]) == 0
    assert main(["graph", str(tmp_path / "a"), "-o", str(tmp_path / "g.dot")]) == 0
    dot = (tmp_path / "g.dot").read_text()
    assert len(re.findall(f'fillcolor="{MARKS["inserted"][0]}"', dot)) == 69
    assert dot.count("->") > 69


def test_graph_marks_the_batchnorms_a_recipe_inserted(tmp_path, capsys):
    # A recipe's insert is in the run's history under "recipe": its BNs were drawn as "left".
    data = write_learnable(tmp_path / "mnist", n_train=64, n_test=32)
    args = ["train", "zoo:mnist-mlp", "--recipe", "bn-baseline", "--data", str(data), "--steps", "2", "--quiet"]
    assert main([*args, "-o", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["graph", str(tmp_path / "run"), "-o", str(tmp_path / "g.dot")]) == 0
    out = capsys.readouterr().out
    # and counted as still in the graph: "still in the graph: 0" beside three green BatchNorms
    assert "inserted: 3" in out and "left: 3" in out and "left_inserted: 3" in out


def test_graph_marks_batchnorms_a_model_already_had(tmp_path, capsys):
    from tests.conftest import MODELS_PY

    assert main(["graph", f"{MODELS_PY}:AlreadyNormalized", "-o", str(tmp_path / "g.svg")]) == 0
    out = capsys.readouterr().out
    assert "left: 2" in out  # self.bn is called twice: two graph sites
    assert (tmp_path / "g.svg").read_text().startswith("<?xml")


def test_graph_refuses_an_unknown_format(tmp_path, capsys):
    assert main(["graph", "zoo:mnist-mlp", "-o", str(tmp_path / "g.jpg")]) == 2
    assert "use a .svg, .png or .dot" in capsys.readouterr().err
    assert not (tmp_path / "g.jpg").exists()


def test_graph_marks_the_layers_a_fold_merged_into(tmp_path, capsys):
    assert main(["insert", "zoo:mnist-mlp", "-o", str(tmp_path / "a")]) == 0
    assert main(["fold", str(tmp_path / "a"), "-o", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert main(["graph", str(tmp_path / "b"), "-o", str(tmp_path / "g.dot")]) == 0
    assert "folded: 3" in capsys.readouterr().out
    dot = (tmp_path / "g.dot").read_text()
    folded = re.findall(rf'"(\w+)" \[label="[^"]*", fillcolor="{MARKS["folded"][0]}"\]', dot)
    assert folded == ["fc1", "fc2", "fc3"]


GRAPH_MODELS = Path(__file__).parent / "graph_models.py"


@pytest.fixture
def residual_weights(tmp_path):
    """ResidualNet's weights with random BN statistics, saved as a user would save them."""
    spec = importlib.util.spec_from_file_location("graph_models", GRAPH_MODELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path / "weights.pt"
    torch.save(randomize_bn(module.ResidualNet()).state_dict(), path)
    return path


def test_boxes_are_labelled_with_the_users_module_paths(tmp_path, capsys):
    assert main(["graph", f"{GRAPH_MODELS}:ResidualNet", "-o", str(tmp_path / "g.dot")]) == 0
    labels = dict(re.findall(r'"(\w+)" \[label="([^"]*)"', (tmp_path / "g.dot").read_text()))
    assert labels["b1_conv1"] == "b1.conv1\\nConv2d" and labels["b2_bn_skip"] == "b2.bn_skip\\nBatchNorm2d"


def test_legend_counts_are_the_fold_reports(tmp_path, capsys, residual_weights):
    model = f"{GRAPH_MODELS}:ResidualNet"
    assert main(["fold", model, "--weights", str(residual_weights), "-o", str(tmp_path / "f"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    hows = Counter(row["how"] for row in report["folded"])
    assert hows == {"into the layer before it": 4, "multiply-add": 3}  # two ways, both in the picture
    into_layers = {row["into"] for row in report["folded"] if row["how"] != "multiply-add"}

    assert main(["graph", str(tmp_path / "f"), "-o", str(tmp_path / "g.dot"), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert (counts["folded"], counts["folded_into_layers"]) == (hows["into the layer before it"], len(into_layers))
    assert counts["multiply_add"] == hows["multiply-add"] and counts["left"] == report["batchnorms_after"]
    dot = (tmp_path / "g.dot").read_text()
    assert "layer a BatchNorm was folded into: 4 BatchNorms into 4 layers" in dot
    assert "BatchNorm turned into a multiply-add: 3" in dot
    # Each multiply-add box is the BatchNorm it replaced, marked as such, not an "other op".
    boxes = re.findall(rf'"\w+" \[label="(\w+)\\nmultiply-add[^"]*", fillcolor="{MARKS["multiply_add"][0]}"', dot)
    assert sorted(boxes) == sorted(row["node"] for row in report["folded"] if row["how"] == "multiply-add")


def test_a_skip_edge_runs_in_its_own_lane_beside_the_chain():
    from bngraph.load import load_model
    from bngraph.trace import trace

    loaded = load_model(f"{GRAPH_MODELS}:ResidualNet")
    graph = graph_of(trace(loaded.module, loaded.example_inputs()))
    layout = layered_layout(graph)
    skip = layout.paths[("b2_bn_skip", "add_1")]  # around block 2: from its skip BatchNorm to its add
    assert ("b2_bn_skip", "add_1") in graph.edges and len(skip) > 3
    for point in skip[1:-1]:  # beside every op it passes, never behind one
        x, y = layout.points[point]
        ops_in_row = [p for n, p in layout.points.items() if n in graph and p[1] == y]
        assert ops_in_row and all(abs(x - ox) >= 1 for ox, _ in ops_in_row)


def test_a_deep_graph_wraps_into_columns_of_a_page_like_shape(tmp_path, capsys):
    assert main(["graph", "zoo:inception-small", "-o", str(tmp_path / "g.png")]) == 0
    from PIL import Image

    width, height = Image.open(tmp_path / "g.png").size
    assert 0.5 < height / width < 2.5  # not a 960 x 9900 strip


@pytest.mark.parametrize("graphviz", [False, True], ids=["built-in layout", "graphviz dot"])
def test_the_svg_shows_module_paths_and_the_legend(graphviz, tmp_path, residual_weights):
    if graphviz and shutil.which("dot") is None:
        pytest.skip("Graphviz dot is not installed")
    from bngraph.draw import draw_graph, marks_from_history
    from bngraph.fold import fold
    from bngraph.load import load_model

    loaded = load_model(f"{GRAPH_MODELS}:ResidualNet", weights=residual_weights)
    folded, report = fold(loaded.module, loaded.example_inputs())
    graph = graph_of(folded, marks_from_history([{"command": "fold", "report": report.to_json()}]))
    svg = html.unescape(draw_graph(graph, tmp_path / "g.svg", graphviz=graphviz).read_text())
    assert "b1.conv1" in svg and "b2_bn_skip" in svg
    assert "BatchNorm turned into a multiply-add: 3" in svg


class _ClampsInHalf(torch.nn.Module):
    """A forward that branches on a computed value's dtype, as HF T5's blocks do: its trace holds
    a dtype guard."""

    def __init__(self):
        super().__init__()
        self.fc, self.act = torch.nn.Linear(4, 6), torch.nn.ReLU()

    def forward(self, x):
        h = self.fc(x)
        if h.dtype == torch.float16:
            h = h.clamp(-1000, 1000)
        return self.act(h)


def test_dtype_guards_are_not_drawn_as_ops():
    from bngraph.trace import trace

    gm = trace(_ClampsInHalf(), [torch.randn(3, 4)])
    assert any(n.op == "call_function" and n.target.__name__ == "check_traced_dtype" for n in gm.graph.nodes)
    graph = graph_of(gm)
    assert [graph.nodes[n]["module"] for n in graph] == ["input x", "fc", "act", "output"]
