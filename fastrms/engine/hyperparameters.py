"""Parameter-group hyperparameters as the engine reads them: their names, their check, and the
kernel coefficients of one (group, dtype) bucket for the step being taken.

Every front end keeps its groups as dicts (torch's ``param_groups`` or fastrms's own); this
module turns a group into :class:`~fastrms.Coefficients` through
:func:`fastrms.kernel_coefficients`, the one place where hyperparameters become coefficients.
"""
from __future__ import annotations

from collections.abc import Mapping

from .._coefficients import LR_IN_MOMENTUM, MOMENTUM, Coefficients, check_real, kernel_coefficients

#: The keys of a parameter group besides "params", in state_dict order.
HYPERPARAMETERS = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize",
                   "eps_in_sqrt", "lr_in_momentum", "nesterov", "decoupled_weight_decay",
                   "initial_square_avg")


def check_hyperparameters(hyper: Mapping, where: str) -> None:
    """Raise ``TypeError`` / ``ValueError`` prefixed with ``where`` for a group that cannot step.
    A callable ``lr`` is checked at each step, on the value it returns."""
    lr = hyper["lr"]
    try:
        kernel_coefficients("float64", 0.0 if callable(lr) else lr, hyper["alpha"],
                            hyper["eps"], hyper["weight_decay"], hyper["momentum"],
                            hyper["centered"], hyper["maximize"], hyper["eps_in_sqrt"],
                            hyper["lr_in_momentum"], hyper["nesterov"],
                            hyper["decoupled_weight_decay"])
        if "initial_square_avg" in hyper:
            check_real("initial_square_avg", hyper["initial_square_avg"])
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from None


def group_coefficients(group: Mapping, dtype, lr, where: str, grad_scale=None,
                       always_momentum: bool = False) -> Coefficients:
    """The coefficients of ``group`` for arrays of ``dtype`` at learning rate ``lr`` (the value
    of this step: a schedule or a tensor already read by the front end)."""
    try:
        coeffs = kernel_coefficients(
            dtype, lr, group["alpha"], group["eps"], group["weight_decay"], group["momentum"],
            group["centered"], group["maximize"], group["eps_in_sqrt"], group["lr_in_momentum"],
            group["nesterov"], group["decoupled_weight_decay"], grad_scale)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from None
    if always_momentum and not coeffs.flags & MOMENTUM:
        coeffs = _with_momentum_line(coeffs, group["lr_in_momentum"])
    return coeffs


_momentum_line_cache: dict = {}


def _with_momentum_line(coeffs: Coefficients, lr_in_momentum: bool) -> Coefficients:
    """TF1 runs the momentum line at momentum 0 too, so its buffer always holds the last update.
    The coefficients are kernel_coefficients' own (momentum 0); only the flags change."""
    key = (coeffs, bool(lr_in_momentum))
    forced = _momentum_line_cache.get(key)
    if forced is None:
        if len(_momentum_line_cache) > 256:  # a callable lr makes new coefficients every step
            _momentum_line_cache.clear()
        flags = coeffs.flags | MOMENTUM | (LR_IN_MOMENTUM if lr_in_momentum else 0)
        forced = _momentum_line_cache[key] = Coefficients(coeffs.values, flags, coeffs.dtype)
    return forced
