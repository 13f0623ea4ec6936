import re

from bngraph.cli import main
from bngraph.draw import MARKS


def test_graph_marks_every_inserted_batchnorm(tmp_path, capsys):
    assert main(["insert", "zoo:inception-small", "-o", str(tmp_path / "a")]) == 0
    assert main(["graph", str(tmp_path / "a"), "-o", str(tmp_path / "g.dot")]) == 0
    dot = (tmp_path / "g.dot").read_text()
    assert len(re.findall(f'fillcolor="{MARKS["inserted"][0]}"', dot)) == 69
    assert dot.count("->") > 69


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
