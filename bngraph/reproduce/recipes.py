"""The paper's Inception variants (Sec. 4.2.2) as data: the passes that build each, how it trains.

Sec. 4.2.1 lists what to change "to make the most of" BN. A recipe applies those changes through
passes on the traced model, never by editing a model definition, and scales the training
hyperparameters it is given:

    recipe             BN   activation   dropout, LRN   learning rate   L2 decay   lr decay
    inception          -    as built     kept           x1              x1         x1
    bn-baseline        yes  as built     kept           x1              x1         x1
    bn-x5              yes  as built     removed        x5              /5         6x faster
    bn-x30             yes  as built     removed        x30             /5         6x faster
    bn-x5-sigmoid      yes  sigmoid      removed        x5              /5         6x faster
    inception-sigmoid  -    sigmoid      kept           x1              x1         x1

With the paper's base rate of 0.0015 these give its 0.0075 (BN-x5) and 0.045 (BN-x30). The last
row is the paper's control: Inception with sigmoid and no BN "never gets beyond chance". The
other items of Sec. 4.2.1 are about data: the batch order is reshuffled every epoch
(`bngraph.training.EpochSampler`) and no photometric distortions are applied at all.

Recipes live with the experiments, not in `bngraph.training`: building a variant inserts BN
(`bngraph.insert`, the API), and training only takes the model it is given. A recipe turns the
base training settings into its own (`Recipe.train_config`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from bngraph.insert import insert
from bngraph.errors import UserError
from bngraph.passes.base import run_passes
from bngraph.passes.strip_dropout_and_lrn import strip_dropout_and_lrn
from bngraph.passes.swap_activation import SwapActivation
from bngraph.partial_trace import trace_for_insert
from bngraph.training.config import TrainConfig

PAPER_VARIANTS = ("inception", "bn-baseline", "bn-x5", "bn-x30", "bn-x5-sigmoid")
CONTROL = "inception-sigmoid"


@dataclass(frozen=True)
class Recipe:
    name: str
    paper_name: str
    insert_bn: bool
    activation: str | None = None  # every ReLU becomes this (swap_activation's target)
    strip_dropout_and_lrn: bool = False
    lr_multiplier: float = 1.0
    weight_decay_divisor: float = 1.0
    decay_speedup: float = 1.0  # the learning rate decays this many times faster

    def scale(self, *, lr: float, weight_decay: float, decay_every: float | None) -> dict:
        """The base hyperparameters as this variant trains with them."""
        return {
            "lr": lr * self.lr_multiplier,
            "weight_decay": weight_decay / self.weight_decay_divisor,
            "decay_every": None if decay_every is None else decay_every / self.decay_speedup,
        }

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """`base` with this variant's learning rate, weight decay and decay period."""
        return replace(base, **self.scale(lr=base.lr, weight_decay=base.weight_decay, decay_every=base.decay_every))


_SEC_4_2_1 = dict(strip_dropout_and_lrn=True, weight_decay_divisor=5.0, decay_speedup=6.0)

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("inception", "Inception", insert_bn=False),
        Recipe("bn-baseline", "BN-Baseline", insert_bn=True),
        Recipe("bn-x5", "BN-x5", insert_bn=True, lr_multiplier=5.0, **_SEC_4_2_1),
        Recipe("bn-x30", "BN-x30", insert_bn=True, lr_multiplier=30.0, **_SEC_4_2_1),
        Recipe("bn-x5-sigmoid", "BN-x5-Sigmoid", insert_bn=True, activation="sigmoid", lr_multiplier=5.0, **_SEC_4_2_1),
        Recipe(CONTROL, "Inception-Sigmoid (no BN)", insert_bn=False, activation="sigmoid"),
    )
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name.strip().lower().replace("_", "-")]
    except KeyError:
        raise UserError(f"no recipe {name!r}; choose one of {', '.join(RECIPES)}") from None


def apply_recipe(
    model: nn.Module, recipe: Recipe | str, example_inputs: Sequence[torch.Tensor]
) -> tuple[nn.Module, dict]:
    """A copy of `model` with the recipe's passes applied, and the artifact-history entry.

    The order matters: the activation is swapped first so that `insert` puts its BatchNorms in
    front of the new sigmoids, and dropout/LRN go before BN so no BN is placed around them.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    entry: dict = {"command": "recipe", "recipe": asdict(recipe), "passes": {}}
    passes = []
    if recipe.activation is not None:
        passes.append(SwapActivation(to=recipe.activation))
    if recipe.strip_dropout_and_lrn:
        passes.append(strip_dropout_and_lrn)
    if not passes and not recipe.insert_bn:
        return model, entry  # nothing to do: untraceable models still train as they are
    # insert's trace: the mode read as the model runs (a plain trace wrote the mode it was in:
    # dropout on in eval), a submodule torch.fx cannot follow kept whole.
    graph, _ = trace_for_insert(model, example_inputs)
    graph, results = run_passes(graph, passes)
    entry["passes"] = {name: result.summary() for name, result in results.items()}
    if recipe.insert_bn:
        graph, report = insert(graph, example_inputs)
        entry["insert"] = report.to_json()
    return graph, entry
