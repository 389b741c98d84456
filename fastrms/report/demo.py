"""``python -m fastrms demo``: fastrms.RMSprop training a small NumPy MLP, and the 2-D picture.

1. An MLP (64 inputs, ``hidden`` tanh units, 10 softmax outputs, cross-entropy, backprop written
   in NumPy) learns scikit-learn's bundled digits (``load_digits``: no download) three times
   from the same initial weights and minibatch order: with ``fastrms.RMSprop`` (automatic
   backend), with ``fastrms.RMSprop(..., backend="numpy")`` (the reference) and with
   ``torch.optim.RMSprop`` when torch is installed (on tensors sharing memory with NumPy
   weights; each step the NumPy gradients are copied into ``.grad``). It prints loss and test
   accuracy per epoch and the time spent inside the optimizer's ``step``. The two fastrms runs
   must end with identical weights (every backend gives the reference's bits); torch agrees to
   a tolerance only (its float32 sqrt is not correctly rounded: docs/contract.md).
2. The paths of SGD, SGD with momentum and RMSprop on the contours of the ill-conditioned
   quadratic f(x, y) = (x^2 + 25 y^2) / 2: SGD must keep its step below 2/25 for the steep
   direction and crawls along the shallow one; momentum overshoots and spirals; RMSprop divides
   each coordinate by its own RMS gradient and heads for the minimum on a near-diagonal.

Figures are written only with ``--out DIR`` (``demo_training.png``, ``demo_paths.png``), so a
plain run leaves no files behind.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

#: ``fastrms demo --help``: plain text.
DESCRIPTION = """\
Train a NumPy MLP (64-64-10, tanh, softmax cross-entropy) on scikit-learn's bundled digits
(no download) with fastrms.RMSprop, with its NumPy reference backend and, when torch is
installed, with torch.optim.RMSprop, from the same weights and batches; print loss and test
accuracy per epoch and the time inside step(). Then run SGD, momentum and RMSprop on
f(x, y) = (x^2 + 25 y^2) / 2. Figures are written only with --out DIR.
Needs scikit-learn (and matplotlib for --out): pip install "fastrms[bench]"."""
EXTRA_HINT = 'pip install "fastrms[bench]"'


def _rmsprop_class():
    import fastrms

    return fastrms.RMSprop


# -- data and model -----------------------------------------------------------------------------

def load_data(subset: int | None = None, seed: int = 0, test_fraction: float = 0.2):
    """Digits as float32 in [0, 1], split (stratified) into train and test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction,
                                                        random_state=seed, stratify=y)
    if subset is not None:
        x_train, y_train = x_train[:subset], y_train[:subset]
    return x_train, y_train, x_test, y_test


def init_params(n_in: int, hidden: int, n_out: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n_in, hidden)) / np.sqrt(n_in)).astype(np.float32),
            np.zeros(hidden, np.float32),
            (rng.standard_normal((hidden, n_out)) / np.sqrt(hidden)).astype(np.float32),
            np.zeros(n_out, np.float32)]


def forward(params, x):
    w1, b1, w2, b2 = params
    h = np.tanh(x @ w1 + b1)
    logits = h @ w2 + b2
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return h, exp / exp.sum(axis=1, keepdims=True)


def loss_and_grads(params, x, y):
    """Mean cross-entropy and its gradients (C-contiguous float32, one per parameter)."""
    w1, b1, w2, b2 = params
    h, probs = forward(params, x)
    batch = x.shape[0]
    loss = float(-np.log(probs[np.arange(batch), y] + 1e-12).mean())
    dlogits = probs
    dlogits[np.arange(batch), y] -= 1.0
    dlogits /= batch
    dh = (dlogits @ w2.T) * (1.0 - h * h)
    grads = [x.T @ dh, dh.sum(axis=0), h.T @ dlogits, dlogits.sum(axis=0)]
    return loss, [np.ascontiguousarray(g, dtype=np.float32) for g in grads]


def accuracy(params, x, y) -> float:
    return float((forward(params, x)[1].argmax(axis=1) == y).mean())


# -- optimizers, one interface: step(grads) -----------------------------------------------------

def _fastrms_optimizer(params, lr, backend):
    return _rmsprop_class()(params, lr=lr, alpha=0.99, eps=1e-8, backend=backend).step


def _torch_optimizer(params, lr):
    """torch.optim.RMSprop on tensors that share memory with ``params``; step(grads) copies the
    NumPy gradients into .grad outside the timed region and returns the optimizer's step."""
    import torch

    tensors = [torch.from_numpy(p) for p in params]
    for t in tensors:
        t.grad = torch.zeros_like(t)
    optimizer = torch.optim.RMSprop(tensors, lr=lr, alpha=0.99, eps=1e-8)

    def copy_in(grads):
        for t, g in zip(tensors, grads):
            t.grad.copy_(torch.from_numpy(g))
    return copy_in, optimizer.step


def optimizers_available(with_torch: bool = True) -> dict:
    """name -> None when usable, else the reason it is absent."""
    found = {"fastrms": None, "fastrms-numpy": None}
    if with_torch:
        try:
            import torch  # noqa: F401
            found["torch"] = None
        except ImportError as exc:
            found["torch"] = f"torch is not installed ({exc})"
    return found


def train(*, epochs: int = 15, hidden: int = 64, batch: int = 32, lr: float = 1e-3,
          subset: int | None = None, seed: int = 0, with_torch: bool = True,
          log=sys.stdout) -> dict:
    """Train the MLP once per optimizer; return per-optimizer history and timing.

    Returns ``{"optimizers": {name: {"loss": [...per step], "epoch_loss": [...],
    "epoch_test_accuracy": [...], "optimizer_seconds": float, "steps": int}}, "absent":
    {name: reason}, "identical_fastrms": bool, "torch_max_abs_diff": float | None}``.
    """
    with _one_thread_for_tiny_arrays(with_torch):
        return _train(epochs, hidden, batch, lr, subset, seed, with_torch, log)


@contextlib.contextmanager
def _one_thread_for_tiny_arrays(with_torch: bool):
    """Every array here is tiny, so threads cannot help, and on a shared 2-core machine they
    hurt: a BLAS thread spinning between calls, or a thread team waiting for a member that was
    descheduled, steals the other core (measured: torch's step, ~0.1 ms on one thread, took 8 to
    16 ms whenever another process held the second core). fastrms never starts threads below
    65,536 elements."""
    with contextlib.ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits  # a scikit-learn dependency
            stack.enter_context(threadpool_limits(limits=1, user_api="blas"))
        except ImportError:  # pragma: no cover
            pass
        torch = None
        if with_torch:
            try:
                import torch
            except ImportError:
                pass
        if torch is not None:
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            stack.callback(torch.set_num_threads, before)
        yield


def _train(epochs, hidden, batch, lr, subset, seed, with_torch, log) -> dict:
    x_train, y_train, x_test, y_test = load_data(subset, seed)
    initial = init_params(x_train.shape[1], hidden, 10, seed)
    available = optimizers_available(with_torch)
    absent = {name: why for name, why in available.items() if why is not None}
    runs = {}
    for name in (n for n, why in available.items() if why is None):
        params = [p.copy() for p in initial]
        copy_in = None
        if name == "torch":
            copy_in, step = _torch_optimizer(params, lr)
        else:
            step = _fastrms_optimizer(params, lr, None if name == "fastrms" else "numpy")
        runs[name] = {"params": params, "copy_in": copy_in, "step": step, "loss": [],
                      "epoch_loss": [], "epoch_test_accuracy": [], "optimizer_seconds": 0.0,
                      "steps": 0}
    order = np.random.default_rng(seed + 1)
    names = list(runs)
    if log is not None:
        print(f"MLP 64-{hidden}-10 (tanh, softmax cross-entropy) on digits: {len(x_train)} train"
              f" / {len(x_test)} test, batch {batch}, RMSprop lr={lr} alpha=0.99 eps=1e-8",
              file=log)
        for name, why in absent.items():
            print(f"absent: {name} ({why})", file=log)
        print("epoch  " + "  ".join(f"{name + ' loss':>18} {'acc':>6}" for name in names), file=log)
    for epoch in range(1, epochs + 1):
        permutation = order.permutation(len(x_train))
        for run in runs.values():
            run["_epoch_losses"] = []
        for start in range(0, len(x_train), batch):
            index = permutation[start:start + batch]
            xb, yb = x_train[index], y_train[index]
            for run in runs.values():
                loss, grads = loss_and_grads(run["params"], xb, yb)
                if run["copy_in"] is not None:
                    run["copy_in"](grads)
                    began = time.perf_counter()
                    run["step"]()
                else:
                    began = time.perf_counter()
                    run["step"](grads)
                run["optimizer_seconds"] += time.perf_counter() - began
                run["steps"] += 1
                run["loss"].append(loss)
                run["_epoch_losses"].append(loss)
        for run in runs.values():
            run["epoch_loss"].append(float(np.mean(run.pop("_epoch_losses"))))
            run["epoch_test_accuracy"].append(accuracy(run["params"], x_test, y_test))
        if log is not None:
            print(f"{epoch:>5}  " + "  ".join(
                f"{runs[n]['epoch_loss'][-1]:>18.4f} {runs[n]['epoch_test_accuracy'][-1]:>6.3f}"
                for n in names), file=log)
    result = {"optimizers": {}, "absent": absent, "identical_fastrms": None,
              "torch_max_abs_diff": None,
              "config": dict(epochs=epochs, hidden=hidden, batch=batch, lr=lr, subset=subset,
                             seed=seed, train=len(x_train), test=len(x_test))}
    for name, run in runs.items():
        result["optimizers"][name] = {k: run[k] for k in ("loss", "epoch_loss",
                                                          "epoch_test_accuracy",
                                                          "optimizer_seconds", "steps")}
    if "fastrms" in runs and "fastrms-numpy" in runs:
        result["identical_fastrms"] = all(np.array_equal(a, b) for a, b in
                                          zip(runs["fastrms"]["params"],
                                              runs["fastrms-numpy"]["params"]))
    if "torch" in runs and "fastrms" in runs:
        result["torch_max_abs_diff"] = max(float(np.max(np.abs(a - b))) for a, b in
                                           zip(runs["fastrms"]["params"], runs["torch"]["params"]))
    if log is not None:
        print("time inside the optimizer's step():", file=log)
        for name, record in result["optimizers"].items():
            seconds, steps = record["optimizer_seconds"], record["steps"]
            print(f"  {name:<14} {seconds * 1e3:8.1f} ms total, {seconds / steps * 1e6:7.1f} us "
                  f"per step ({steps} steps)", file=log)
        if result["identical_fastrms"] is not None:
            print(f"fastrms (automatic backend) and fastrms (numpy reference) end with identical "
                  f"weights: {result['identical_fastrms']}", file=log)
        if result["torch_max_abs_diff"] is not None:
            print(f"largest |fastrms - torch| weight difference: {result['torch_max_abs_diff']:.2e}",
                  file=log)
    return result


# -- the 2-D picture ----------------------------------------------------------------------------

#: f(x, y) = (x^2 + CONDITION * y^2) / 2: curvature 1 along x, CONDITION along y.
CONDITION = 25.0
START = (-7.0, 2.0)


def quadratic(x, y):
    return 0.5 * (x * x + CONDITION * y * y)


def quadratic_grad(theta):
    return np.array([theta[0], CONDITION * theta[1]])


def optimizer_paths(steps: int = 50) -> dict:
    """name -> array (steps + 1, 2): SGD, momentum and RMSprop (fastrms) from START."""
    settings = {"SGD (lr 0.07)": ("sgd", 0.07), "momentum (lr 0.01, 0.9)": ("momentum", 0.01),
                "RMSprop, fastrms (lr 0.3, alpha 0.9)": ("rmsprop", 0.3)}
    paths = {}
    for label, (kind, lr) in settings.items():
        theta = np.array(START, dtype=np.float64)
        points = [theta.copy()]
        velocity = np.zeros(2)
        step = _rmsprop_class()([theta], lr=lr, alpha=0.9).step if kind == "rmsprop" else None
        for _ in range(steps):
            g = quadratic_grad(theta)
            if kind == "sgd":
                theta -= lr * g
            elif kind == "momentum":
                velocity = 0.9 * velocity + g
                theta -= lr * velocity
            else:
                step([g])
            points.append(theta.copy())
        paths[label] = np.array(points)
    return paths


# -- command line -------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .bench import positive_float, positive_int

    parser.add_argument("--epochs", type=positive_int, default=15, metavar="N",
                        help="passes over the training set (default %(default)s)")
    parser.add_argument("--hidden", type=positive_int, default=64, metavar="N",
                        help="hidden units (default %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=32, metavar="N",
                        help="minibatch size (default %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=1e-3,
                        metavar="LR", help="RMSprop learning rate (default %(default)s)")
    parser.add_argument("--subset", type=positive_int, default=None, metavar="N",
                        help="use only the first N training samples (default: all 1437)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initial weights and the batch order (default "
                             "%(default)s)")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip torch.optim.RMSprop even when torch is installed")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write demo_training.png and demo_paths.png into DIR (needs "
                             "matplotlib; default: no files)")


def missing_extras(with_figures: bool) -> str | None:
    """The one-line reason the demo cannot run here, naming the extra to install, or None."""
    missing = [name for module, name in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"))
               if (module != "matplotlib" or with_figures)
               and importlib.util.find_spec(module) is None]
    if not missing:
        return None
    needs = " and ".join(missing)
    return (f"fastrms demo needs {needs}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed: {EXTRA_HINT}")


def run_command(args: argparse.Namespace) -> int:
    problem = missing_extras(with_figures=bool(args.out))
    if problem is not None:
        print(f"fastrms demo: error: {problem}", file=sys.stderr)
        return 1
    result = train(epochs=args.epochs, hidden=args.hidden, batch=args.batch, lr=args.lr,
                   subset=args.subset, seed=args.seed, with_torch=not args.no_torch)
    paths = optimizer_paths()
    print("2-D paths on f(x, y) = (x^2 + 25 y^2) / 2 from (-7, 2), distance to the minimum "
          "after 50 steps:")
    for name, points in paths.items():
        print(f"  {name:<38} {float(np.hypot(*points[-1])):.3g}")
    if args.out:
        written = write_figures(result, paths, args.out)
        print("wrote " + " and ".join(written))
    else:
        print("(figures are written only with --out DIR)")
    return 0


def write_figures(result: dict, paths: dict, out_dir) -> list[str]:
    from . import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    training = plots.plot_training(result["optimizers"], out / "demo_training.png")
    picture = plots.plot_paths(quadratic, paths, out / "demo_paths.png", extent=(-8, 2, -3, 3),
                               title="f(x, y) = (x² + 25 y²) / 2: SGD zigzags across the valley, "
                                     "momentum overshoots,\nRMSprop scales each coordinate by its "
                                     "RMS gradient")
    return [str(training), str(picture)]


def main(argv: list[str] | None = None) -> int:
    from .bench import OneLineErrorParser

    parser = OneLineErrorParser(prog="python -m fastrms.report.demo", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
