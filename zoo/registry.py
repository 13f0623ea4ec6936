"""The zoo's registry: builders filed by name, each with the example input it declares.

The builders' modules import torch, so they are imported on first need: `CATALOG` lets
`bngraph zoo` list the models (names, parameters, inputs) without torch or building any.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bngraph.errors import UserError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ZooEntry:
    """A registered model: its name, builder, example input shape and one-line description."""

    name: str
    build: Callable[..., nn.Module]
    input_shape: tuple[int, ...]  # an example input, batch first (a batch of 2: BN needs > 1)
    description: str


_REGISTRY: dict[str, ZooEntry] = {}


@dataclass(frozen=True)
class Listed:
    module: str  # the bngraph.zoo module whose builder registers the model
    input_shape: tuple[int, ...]
    parameters: int
    description: str


# What `bngraph zoo` prints. tests/test_packaging.py checks every row against the registered
# builder and the model it builds, so this copy cannot drift from them.
CATALOG: dict[str, Listed] = {
    "mnist-mlp": Listed("mnist_mlp", (2, 1, 28, 28), 99_710,
                        "The paper's MNIST MLP: 3 hidden layers of 100 sigmoid units, no BN (Sec. 4.1)."),
    "inception": Listed("inception", (2, 3, 224, 224), 11_268_536,
                        "The paper's Inception variant for 224x224 ImageNet, without BN (appendix, Figure 5)."),
    "inception-small": Listed("inception", (2, 1, 28, 28), 645_026,
                              "The same Inception modules at 1/4 width for 28x28x1 images (MNIST), CPU-sized."),
}


def _import_builders() -> None:
    for module in sorted({listed.module for listed in CATALOG.values()}):
        importlib.import_module(f"bngraph.zoo.{module}")


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_model(name: str, input_shape: tuple[int, ...]):
    """File a builder under `name`; its docstring's first line is the description."""

    def register(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = _canonical(name)
        if key in _REGISTRY:
            raise ValueError(f"zoo model {key!r} registered twice")
        doc = (build.__doc__ or "").strip().splitlines()
        _REGISTRY[key] = ZooEntry(key, build, tuple(input_shape), doc[0] if doc else "")
        return build

    return register


def list_models(pattern: str = "*") -> list[str]:
    """The zoo's names matching a glob, sorted (without importing a builder)."""
    return sorted(n for n in {*CATALOG, *_REGISTRY} if fnmatch.fnmatch(n, _canonical(pattern)))


def get_entry(name: str) -> ZooEntry:
    """The registered builder of `name`, with its example input and description."""
    _import_builders()
    try:
        return _REGISTRY[_canonical(name)]
    except KeyError:
        raise UserError(f"no model named {name!r} in the zoo (list them: bngraph zoo)") from None


def create_model(name: str, seed: int | None = 0, **kwargs) -> nn.Module:
    """Build a zoo model. Its initial weights depend on `seed` alone (None: the global RNG), so
    `zoo:NAME` names the same weights on every machine and in every process."""
    import torch  # here, not above: `bngraph zoo` lists the catalog without torch

    entry = get_entry(name)
    if seed is None:
        return entry.build(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return entry.build(**kwargs)


def describe_models(pattern: str = "*") -> list[dict]:
    """What `bngraph zoo` lists for each name matching `pattern`: its parameter count, example
    input shape and description. The catalog's models are listed without torch (their numbers
    are checked against the models); one registered by other code is built to count."""
    rows = []
    for name in list_models(pattern):
        if name in CATALOG:
            shape, params, description = CATALOG[name].input_shape, CATALOG[name].parameters, CATALOG[name].description
        else:
            entry = get_entry(name)
            shape, description = entry.input_shape, entry.description
            params = sum(p.numel() for p in create_model(name).parameters())
        rows.append({"name": name, "parameters": params, "input_shape": list(shape), "description": description})
    return rows
