"""A typed user of fastrms's public API. ``mypy`` must accept it (.ci/doc-checks runs it), and
it runs as a script: ``python tests/typecheck/usage.py``.

The optimizer classes are called loosely (their signatures are being rewritten).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

import fastrms
from fastrms import presets
from fastrms.report import registry, workload

Array32 = npt.NDArray[np.float32]


def one_step(param: Array32, grad: Array32, square_avg: Array32) -> None:
    fastrms.rmsprop_update(param, grad, square_avg, lr=1e-3, alpha=0.9, eps_in_sqrt=True)


def describe() -> str:
    report: dict[str, Any] = fastrms.info(1000, np.float64)
    name, why = fastrms.automatic_choice(10**6, np.float32)
    names: tuple[str, ...] = fastrms.BACKEND_NAMES
    threads: int = fastrms.get_num_threads()
    return f"{report['version']}: {name} of {names} ({why}); {threads} threads"


def with_reference_backend(param: Array32, grad: Array32, square_avg: Array32) -> None:
    with fastrms.use_backend("numpy"):
        one_step(param, grad, square_avg)
    fastrms.set_backend("numpy")
    fastrms.set_backend(None)


def preset_defaults(name: str) -> dict[str, float | bool]:
    preset: presets.Preset = presets.get(name)
    renamed: str = preset.names.get("alpha", "alpha")
    return {renamed: preset.alpha, **preset.defaults()}


def optimizer(param: Array32, grad: Array32) -> None:
    opt: Any = fastrms.RMSprop([param], lr=1e-2, momentum=0.9)
    opt.step([grad])


def bench_rows() -> list[str]:
    state: dict[str, np.ndarray] = workload.make_state("plain", np.float32, 16)
    step = registry.get("fastrms-numpy").make("plain", state)
    step()
    return [impl.name for impl in registry.IMPLEMENTATIONS if impl.availability()[0]]


def fallback_warnings_are_a_category() -> type[Warning]:
    return fastrms.BackendFallbackWarning


if __name__ == "__main__":
    p = np.ones(8, np.float32)
    g = np.full(8, 0.5, np.float32)
    s = np.zeros(8, np.float32)
    one_step(p, g, s)
    with_reference_backend(p, g, s)
    optimizer(p, g)
    print(describe(), preset_defaults("keras")["rho"], len(bench_rows()),
          fallback_warnings_are_a_category().__name__)
