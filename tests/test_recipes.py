"""Each recipe's graph has what Sec. 4.2.1-4.2.2 says: BN count, activation, no dropout, no LRN."""

import pytest
import torch
from torch import fx, nn

from bngraph.errors import UserError
from bngraph.reproduce.recipes import CONTROL, PAPER_VARIANTS, RECIPES, apply_recipe, get_recipe
from bngraph.reproduce.inception import graph_facts
from bngraph.zoo import create_model

EXAMPLE = [torch.randn(2, 1, 28, 28)]

# (BatchNorms, activation kinds, dropout layers, LRN layers, lr, weight decay, decay period)
PAPER = {
    "inception": (False, {"ReLU"}, 1, 2, 0.0015, 4e-5, 600),
    "bn-baseline": (True, {"ReLU"}, 1, 2, 0.0015, 4e-5, 600),
    "bn-x5": (True, {"ReLU"}, 0, 0, 0.0075, 8e-6, 100),
    "bn-x30": (True, {"ReLU"}, 0, 0, 0.045, 8e-6, 100),
    "bn-x5-sigmoid": (True, {"Sigmoid"}, 0, 0, 0.0075, 8e-6, 100),
    CONTROL: (False, {"Sigmoid"}, 1, 2, 0.0015, 4e-5, 600),
}


@pytest.fixture(scope="module")
def inception_small():
    torch.manual_seed(0)
    return create_model("inception-small")


def test_the_table_holds_the_papers_five_and_the_control():
    assert set(PAPER_VARIANTS) | {CONTROL} == set(RECIPES) == set(PAPER)


@pytest.mark.parametrize("name", list(PAPER))
def test_variant_graph_and_hyperparameters(name, inception_small):
    has_bn, activations, dropout, lrn, lr, weight_decay, decay_every = PAPER[name]
    sites = sum(isinstance(m, nn.ReLU) for m in inception_small.modules())  # one BN before each
    model, entry = apply_recipe(inception_small, name, EXAMPLE)
    facts = graph_facts(model)
    assert facts["batchnorms"] == (sites if has_bn else 0)
    assert set(facts["activations"]) == activations
    assert (facts["dropout"], facts["lrn"]) == (dropout, lrn)
    hyper = get_recipe(name).scale(lr=0.0015, weight_decay=4e-5, decay_every=600)
    assert hyper == pytest.approx({"lr": lr, "weight_decay": weight_decay, "decay_every": decay_every})
    assert entry["recipe"]["name"] == name
    if has_bn:  # insert's report travels with the artifact
        assert len(entry["insert"]["inserted"]) == sites
    with torch.no_grad():
        assert model.eval()(EXAMPLE[0]).shape == (2, 10)
    # The recipes never touch the model they were given.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in inception_small.modules()) == 0


def test_every_relu_site_gets_a_bn_in_front(inception_small):
    model, _ = apply_recipe(inception_small, "bn-x5-sigmoid", EXAMPLE)
    gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Sigmoid):
            feeder = node.args[0]
            assert feeder.op == "call_module" and isinstance(gm.get_submodule(feeder.target), nn.BatchNorm2d)


def test_recipes_apply_to_any_model_the_mlp_too():
    torch.manual_seed(0)
    model, _ = apply_recipe(create_model("mnist-mlp"), "bn-x30", EXAMPLE)
    assert graph_facts(model)["batchnorms"] == 3
    assert graph_facts(model)["activations"] == ["Sigmoid"]  # only ReLUs are swapped, and only by -sigmoid


def test_inception_recipe_leaves_the_model_as_it_is():
    model = create_model("mnist-mlp")
    assert apply_recipe(model, "inception", EXAMPLE)[0] is model


@pytest.mark.parametrize("name", ["bn-x7", "", "resnet"])
def test_unknown_recipe_is_a_user_error(name):
    with pytest.raises(UserError, match="choose one of inception, bn-baseline"):
        get_recipe(name)


def test_names_are_forgiving_about_case_and_underscores():
    assert get_recipe("BN_x5").name == "bn-x5"


USERS_NET_PY = '''
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    example_input_shape = (2, 1, 28, 28)

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.act, self.drop, self.head = nn.GELU(), nn.Dropout(0.3), nn.Linear(4, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = self.act(self.c2(x))
        return self.head(self.drop(x.mean((2, 3))))
'''


def test_train_reports_what_a_recipe_did_to_the_users_model(tmp_path, capsys):
    # The paper's BN-x5-Sigmoid swaps ReLUs; a user's GELU is kept, and the report says so.
    import json

    import bngraph
    from bngraph.cli import main
    from tests.mnist_like import write_learnable

    (tmp_path / "net.py").write_text(USERS_NET_PY)
    data = write_learnable(tmp_path / "data", n_train=40, n_test=20)
    code = main(["train", str(tmp_path / "net.py"), "--recipe", "bn-x5-sigmoid", "--data", str(data), "--steps", "2",
                 "--batch-size", "8", "--quiet", "--json", "-o", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0
    # The list of changes was under "recipe" too, where it replaced the recipe's name in the JSON.
    assert json.loads(out)["recipe"] == "bn-x5-sigmoid"
    rows = [(r["pass"], r["node"], r["change"]) for r in json.loads(out)["recipe_changes"]]
    assert rows == [
        ("swap_activation", "relu", "relu -> sigmoid"),
        ("swap_activation", "act", "none: GELU is not relu: kept"),
        ("strip_dropout_and_lrn", "drop", "removed Dropout"),
        ("insert", "sigmoid", "BatchNorm2d before sigmoid"),
        ("insert", "act", "BatchNorm2d before GELU"),
    ]
    trained = bngraph.load(tmp_path / "run")
    kinds = {type(m).__name__ for m in trained.modules()}
    assert "GELU" in kinds and "Dropout" not in kinds and "sigmoid_bn" in dict(trained.named_modules())


MODE_READING_NET_PY = '''
import torch
import torch.nn.functional as F
from torch import nn


class Gate(nn.Module):  # torch.fx cannot follow it: its forward branches on its data
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, x):
        if x.sum() > -1e9:
            x = x + 0
        return self.act(x)


class Net(nn.Module):
    example_input_shape = (2, 1, 28, 28)

    def __init__(self):
        super().__init__()
        self.c1, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 10)
        self.gate = Gate()

    def forward(self, x):
        x = F.relu(self.c1(x))
        return self.head(F.dropout(x.mean((2, 3)), 0.5, training=self.training))


class Gated(Net):
    def forward(self, x):
        return self.head(self.gate(self.c1(x)).mean((2, 3)))
'''


def test_a_recipe_keeps_dropout_reading_the_mode_and_refuses_before_training_what_it_cannot_write(tmp_path, capsys):
    # Traced in the mode the model was in: `F.dropout(..., training=self.training)` became
    # `training=True`, dropping units at inference. A BatchNorm wrapped inside a submodule
    # torch.fx kept whole could not be written: the run failed after all its steps.
    import bngraph
    from bngraph.cli import main
    from tests.mnist_like import write_learnable

    (tmp_path / "net.py").write_text(MODE_READING_NET_PY)
    data = write_learnable(tmp_path / "data", n_train=40, n_test=20)
    common = ["--recipe", "bn-baseline", "--data", str(data), "--steps", "2", "--batch-size", "8", "--quiet"]
    assert main(["train", f"{tmp_path}/net.py:Net", *common, "-o", str(tmp_path / "run")]) == 0
    trained = bngraph.load(tmp_path / "run").eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(trained(x), trained(x), rtol=0, atol=0)  # no dropout in eval
    capsys.readouterr()
    code = main(["train", f"{tmp_path}/net.py:Gated", *common, "-o", str(tmp_path / "gated")])
    err = capsys.readouterr().err
    assert code == 2 and "nothing was trained" in err and not (tmp_path / "gated" / "checkpoint.pt").exists()


def test_the_report_says_the_weight_decay_and_period_used_and_an_l2_cut_with_nothing_to_cut(tmp_path, capsys):
    import json

    from bngraph.cli import main
    from tests.mnist_like import write_learnable

    data = write_learnable(tmp_path / "data", n_train=40, n_test=20)
    assert main(["train", "zoo:mnist-mlp", "--recipe", "bn-x5", "--data", str(data), "--steps", "8", "--batch-size", "8",
                 "--quiet", "--json", "-o", str(tmp_path / "run")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weight_decay"] == 0 and report["lr_decay_every"] == pytest.approx(8 / 8 / 6, rel=1e-5)
    assert any("divides L2 weight decay by 5, but the run had none" in note for note in report["notes"])
