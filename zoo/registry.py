"""The zoo's registry: builders filed by name, each with the example input it declares."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bngraph.errors import UserError


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[..., nn.Module]
    input_shape: tuple[int, ...]  # an example input, batch first (a batch of 2: BN needs > 1)
    description: str


_REGISTRY: dict[str, ZooEntry] = {}


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
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, _canonical(pattern)))


def get_entry(name: str) -> ZooEntry:
    try:
        return _REGISTRY[_canonical(name)]
    except KeyError:
        raise UserError(f"no model named {name!r} in the zoo (list them: bngraph zoo)") from None


def create_model(name: str, seed: int | None = 0, **kwargs) -> nn.Module:
    """Build a zoo model. Its initial weights depend on `seed` alone (None: the global RNG), so
    `zoo:NAME` names the same weights on every machine and in every process."""
    entry = get_entry(name)
    if seed is None:
        return entry.build(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return entry.build(**kwargs)
