"""Framework presets: each framework's RMSprop defaults and conventions, as data.

This is the presets table of the contract (docs/contract.md, "Framework presets"), one
:class:`Preset` per row. ``RMSprop(preset=...)`` starts from a row and lets explicit arguments
override any field. Field names are fastrms's; ``names`` maps them to the framework's own
argument names.

>>> from fastrms.presets import PRESETS
>>> PRESETS["keras"].eps, PRESETS["tf1"].initial_square_avg
(1e-07, 1.0)
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class Preset:
    """One framework's RMSprop: its defaults and the conventions that change the numbers."""

    name: str
    #: The framework object reproduced.
    source: str
    #: Default learning rate; None when the framework has none (lr must then be given).
    lr: float | None
    alpha: float
    eps: float
    #: eps inside the square root: sqrt(v + eps); else sqrt(v) + eps.
    eps_in_sqrt: bool
    initial_square_avg: float
    #: The momentum buffer accumulates lr * g / d (TF1 / Keras / optax), not g / d (torch).
    lr_in_momentum: bool
    #: Weight decay as p -= p * wd * lr before the update (Keras 3), not g += wd * p (torch).
    decoupled_weight_decay: bool
    #: TF1 keeps a momentum buffer and runs the momentum line even at momentum 0, so the buffer
    #: always holds the last update.
    always_momentum_buffer: bool = False
    #: The framework's own names for fastrms's arguments, where they differ.
    names: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    notes: str = ""

    def defaults(self) -> dict[str, float | bool]:
        """The hyperparameter defaults of this preset, as RMSprop keyword arguments (``lr`` is
        absent when the framework requires it)."""
        values: dict[str, float | bool] = {
            "alpha": self.alpha,
            "eps": self.eps,
            "weight_decay": 0.0,
            "momentum": 0.0,
            "centered": False,
            "maximize": False,
            "eps_in_sqrt": self.eps_in_sqrt,
            "lr_in_momentum": self.lr_in_momentum,
            "nesterov": False,
            "decoupled_weight_decay": self.decoupled_weight_decay,
            "initial_square_avg": self.initial_square_avg,
        }
        if self.lr is not None:
            values["lr"] = self.lr
        return values


PRESETS: Mapping[str, Preset] = MappingProxyType({
    "torch": Preset(
        name="torch", source="torch.optim.RMSprop",
        lr=1e-2, alpha=0.99, eps=1e-8, eps_in_sqrt=False, initial_square_avg=0.0,
        lr_in_momentum=False, decoupled_weight_decay=False,
        notes="coupled L2 decay (g += wd * p) after maximize flips g; centered has no clamp"),
    "keras": Preset(
        name="keras", source="keras.optimizers.RMSprop (Keras 3)",
        lr=1e-3, alpha=0.9, eps=1e-7, eps_in_sqrt=True, initial_square_avg=0.0,
        lr_in_momentum=True, decoupled_weight_decay=True,
        names=MappingProxyType({"alpha": "rho", "eps": "epsilon", "lr": "learning_rate"}),
        notes="weight decay p -= p * wd * lr before the update; no maximize or nesterov"),
    "tf1": Preset(
        name="tf1", source="tf.compat.v1.train.RMSPropOptimizer",
        lr=None, alpha=0.9, eps=1e-10, eps_in_sqrt=True, initial_square_avg=1.0,
        lr_in_momentum=True, decoupled_weight_decay=False, always_momentum_buffer=True,
        names=MappingProxyType({"alpha": "decay", "eps": "epsilon", "lr": "learning_rate"}),
        notes="ms += (g*g - ms) * (1 - decay); no weight decay of its own (an explicit "
              "weight_decay is applied coupled)"),
    "optax": Preset(
        name="optax", source="optax.rmsprop",
        lr=None, alpha=0.9, eps=1e-8, eps_in_sqrt=True, initial_square_avg=0.0,
        lr_in_momentum=True, decoupled_weight_decay=False,
        names=MappingProxyType({"alpha": "decay", "initial_square_avg": "initial_scale",
                                "lr": "learning_rate", "momentum": "momentum (None for 0)"}),
        notes="weight decay is chained (add_decayed_weights adds wd * p to g), i.e. coupled; "
              "nesterov supported"),
})

#: The preset used when none is named: torch's conventions, as fastrms.rmsprop_update.
DEFAULT_PRESET = "torch"


def get(name: str | None) -> Preset:
    """The preset called ``name`` (None: torch's), or ValueError naming the choices.

    >>> from fastrms import presets
    >>> presets.get("optax").source
    'optax.rmsprop'
    """
    if name is None:
        name = DEFAULT_PRESET
    preset = PRESETS.get(name) if isinstance(name, str) else None
    if preset is None:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(map(repr, PRESETS))}")
    return preset
