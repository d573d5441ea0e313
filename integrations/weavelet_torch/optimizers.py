"""Which optimizers a revision may name, and what each one accepts.

Names are the lowercase class names of ``torch.optim`` (``sgd``, ``adam``, ``adamw``, ``rmsprop``, ...) plus
those offered by plugins through the ``weavelet_optimizers`` hook; a plugin's name takes precedence over a
``torch.optim`` class of the same name.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from weavelet_core.schema import describe_keys, unknown_optimizer
from weavelet_torch.errors import Rejected

IMPLEMENTATION_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable"})
"""Constructor flags that pick a kernel rather than a hyperparameter: never set remotely; a switch carries
them to the new optimizer type when it accepts them (see :attr:`OptimizerChoice.flags`)."""

CARRIED_ON_SWITCH = IMPLEMENTATION_FLAGS | {"maximize"}
"""Keys a switch of optimizer type carries from each old param group whenever the new type accepts them (besides
``lr`` and the keys the desired config sets): losing them changes how, not what, the model trains (fused
kernels, CUDA-graph capture) or flips the objective (``maximize``)."""

DECOUPLED_WEIGHT_DECAY = frozenset({"adamw", "adafactor", "muon"})
"""``torch.optim`` types whose ``weight_decay`` shrinks the weights directly (decoupled) rather than adding an L2
term to the gradient; ``adam``, ``nadam`` and ``radam`` do so with ``decoupled_weight_decay=True``."""

UNSUPPORTED = {
    "lbfgs": "it needs a closure re-evaluating the loss and a single parameter group",
    "sparseadam": "it needs sparse gradients",
}
"""``torch.optim`` classes that cannot replace an optimizer in a running loop, with the reason."""


@dataclasses.dataclass(frozen=True)
class OptimizerChoice:
    """An optimizer a revision can switch to.

    :param name: the name revisions use.
    :param factory: ``factory(params, **hyperparameters)`` returning a ``torch.optim.Optimizer``.
    :param cls: the class, for ``torch.optim`` optimizers (``None`` for plugin factories).
    :param hyperparameters: keyword hyperparameters the factory accepts, or ``None`` when it takes
        ``**kwargs`` (then any key is passed through and the factory validates it).
    :param defaults: default values of those hyperparameters, where the signature gives one.
    :param flags: the :data:`IMPLEMENTATION_FLAGS` the factory takes as keywords (empty when unknown).
    """

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    cls: type[torch.optim.Optimizer] | None
    hyperparameters: frozenset[str] | None
    defaults: Mapping[str, Any]
    flags: frozenset[str] = frozenset()

    def accepts_flag(self, key: str) -> bool:
        """Whether ``key`` (an implementation flag or ``maximize``) can be carried to this optimizer."""
        if key in IMPLEMENTATION_FLAGS:
            return key in self.flags
        return self.hyperparameters is not None and key in self.hyperparameters

    def accepts(self, key: str) -> bool:
        """Whether ``key`` is a hyperparameter of this optimizer."""
        if key in IMPLEMENTATION_FLAGS:
            return False
        return self.hyperparameters is None or key in self.hyperparameters

    def describe_keys(self) -> str:
        return describe_keys(self.hyperparameters)


def _signature_flags(fn: Callable[..., Any]) -> frozenset[str]:
    """The :data:`IMPLEMENTATION_FLAGS` ``fn`` takes as named parameters."""
    try:
        names = set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(names & IMPLEMENTATION_FLAGS)


def _signature_keys(fn: Callable[..., Any], skip: int) -> tuple[frozenset[str] | None, dict[str, Any]]:
    """Keyword parameter names of ``fn`` after the first ``skip`` positional ones, and their defaults."""
    try:
        params = list(inspect.signature(fn).parameters.values())[skip:]
    except (TypeError, ValueError):
        return None, {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None, {}
    keys = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in IMPLEMENTATION_FLAGS
    }
    defaults = {p.name: p.default for p in params if p.name in keys and p.default is not inspect.Parameter.empty}
    return frozenset(keys), defaults


def _torch_choices() -> dict[str, OptimizerChoice]:
    found: dict[str, OptimizerChoice] = {}
    for attr in getattr(torch.optim, "__all__", dir(torch.optim)):
        cls = getattr(torch.optim, attr, None)
        if not isinstance(cls, type) or not issubclass(cls, torch.optim.Optimizer):
            continue
        if cls is torch.optim.Optimizer:
            continue
        name = cls.__name__.lower()
        if name in UNSUPPORTED:
            continue
        keys, defaults = _signature_keys(cls.__init__, skip=2)  # self, params
        found[name] = OptimizerChoice(name, cls, cls, keys, defaults, _signature_flags(cls.__init__))
    return found


def _plugin_choices() -> dict[str, OptimizerChoice]:
    from weavelet_core import get_registry

    found: dict[str, OptimizerChoice] = {}
    for name, spec in get_registry().optimizers().items():
        keys, defaults = _signature_keys(spec.factory, skip=1)  # params
        found[name] = OptimizerChoice(name, spec.factory, None, keys, defaults, _signature_flags(spec.factory))
    return found


def choice_for_class(cls: type[torch.optim.Optimizer], name: str | None = None) -> OptimizerChoice:
    """An :class:`OptimizerChoice` for an optimizer class that no name maps to (a user's own class)."""
    keys, defaults = _signature_keys(cls.__init__, skip=2)
    return OptimizerChoice(name or cls.__name__.lower(), cls, cls, keys, defaults, _signature_flags(cls.__init__))


def decoupled_weight_decay(choice: OptimizerChoice, group: Mapping[str, Any]) -> bool:
    """Whether ``weight_decay`` in ``group`` of a ``choice`` optimizer decays weights directly (not as L2)."""
    return choice.name in DECOUPLED_WEIGHT_DECAY or group.get("decoupled_weight_decay") is True


def known_optimizers() -> dict[str, OptimizerChoice]:
    """Every optimizer a revision may name, by lowercase name."""
    choices = _torch_choices()
    choices.update(_plugin_choices())
    return choices


def resolve(name: object, known: Mapping[str, OptimizerChoice] | None = None) -> OptimizerChoice:
    """The optimizer called ``name``; raise :class:`Rejected` naming the known ones otherwise."""
    known = known_optimizers() if known is None else known
    if not isinstance(name, str) or not name.strip():
        raise Rejected(unknown_optimizer(name, known))
    key = name.strip().lower()
    if key in UNSUPPORTED:
        raise Rejected(f"optimizer {name!r} cannot be switched to in a running fit: {UNSUPPORTED[key]}")
    choice = known.get(key)
    if choice is None:
        raise Rejected(unknown_optimizer(name, known))
    return choice


def name_of(optimizer: torch.optim.Optimizer, known: Mapping[str, OptimizerChoice] | None = None) -> str:
    """The revision name of ``optimizer``'s type: its ``torch.optim`` name, else its lowercase class name."""
    known = known_optimizers() if known is None else known
    cls = type(optimizer)
    for name, choice in known.items():
        if choice.cls is cls:
            return name
    return cls.__name__.lower()
