"""Training quality with bfloat16 parameters (issue 14): final loss and test accuracy.

Two models, each trained from the same initial weights and minibatch order:

1. the digits MLP of ``fastrms demo`` (64-64-10, tanh, softmax cross-entropy, backprop in
   NumPy, scikit-learn's bundled digits) with ``fastrms.RMSprop``: float32 parameters, and
   bfloat16 parameters under ``param_rounding="nearest"``, ``"stochastic"`` and
   ``master_weights=True`` (forward and backward in float32 on the widened weights; the
   gradient is float32), and ``torch.optim.RMSprop`` on bfloat16 tensors (its state bfloat16
   too) when torch is installed;
2. a small torch MLP on the same data (64-128-128-10, ReLU) run entirely in bfloat16 (weights,
   activations, gradients) with ``fastrms.torch.RMSprop`` under the same three modes, against
   float32 and ``torch.optim.RMSprop`` in bfloat16.

The expectation (Zamirai et al. 2020, "Revisiting BFloat16 Training"): nearest rounding stalls
once updates fall below half a bfloat16 ulp of the weights; stochastic rounding and master
weights track float32. Not run in CI; ``python bench/low_precision_quality.py`` prints the
Markdown table of docs/performance.md (about a minute on one core).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastrms  # noqa: E402
from fastrms.report.demo import accuracy, init_params, load_data, loss_and_grads  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
MODES = {"float32": None, "bfloat16 nearest": dict(param_rounding="nearest"),
         "bfloat16 stochastic": dict(param_rounding="stochastic", seed=0),
         "bfloat16 master weights": dict(master_weights=True)}


def mean_loss(params, x, y) -> float:
    return loss_and_grads(params, x, y)[0]


def numpy_mlp(epochs: int, lr: float, batch: int, seed: int) -> dict:
    x_train, y_train, x_test, y_test = load_data(seed=seed)
    initial = init_params(x_train.shape[1], 64, 10, seed)
    runs = {}
    for name, options in MODES.items():
        if options is None:
            params = [p.copy() for p in initial]
            opt = fastrms.RMSprop(params, lr=lr)
        else:
            params = [p.astype(BF16) for p in initial]
            opt = fastrms.RMSprop(params, lr=lr, **options)
        runs[name] = (params, opt.step)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        tensors = [torch.from_numpy(p.astype(np.float32)).to(torch.bfloat16) for p in initial]
        theirs = torch.optim.RMSprop(tensors, lr=lr, alpha=0.99, eps=1e-8)

        def torch_step(grads, tensors=tensors, theirs=theirs):
            for t, g in zip(tensors, grads):
                t.grad = torch.from_numpy(g).to(torch.bfloat16)
            theirs.step()

        runs["torch.optim.RMSprop bfloat16"] = (tensors, torch_step)
    order = np.random.default_rng(seed)
    for _ in range(epochs):
        permutation = order.permutation(len(x_train))
        for start in range(0, len(x_train), batch):
            index = permutation[start:start + batch]
            for params, step in runs.values():
                wide = _widen(params)
                step(loss_and_grads(wide, x_train[index], y_train[index])[1])
    return {name: (mean_loss(_widen(p), x_train, y_train), accuracy(_widen(p), x_test, y_test))
            for name, (p, _) in runs.items()}


def _widen(params):
    out = []
    for p in params:
        if hasattr(p, "detach"):  # a torch tensor
            p = p.detach().float().numpy()
        out.append(np.asarray(p, np.float32))
    return out


def torch_mlp(epochs: int, lr: float, batch: int, seed: int) -> dict:
    import torch

    import fastrms.torch

    x_train, y_train, x_test, y_test = load_data(seed=seed)
    xs = [torch.from_numpy(a) for a in (x_train, x_test)]
    ys = [torch.from_numpy(a) for a in (y_train, y_test)]
    torch.manual_seed(seed)
    template = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                   torch.nn.Linear(128, 128), torch.nn.ReLU(),
                                   torch.nn.Linear(128, 10))
    configs = {"float32": (torch.float32, fastrms.torch.RMSprop, {}),
               **{name: (torch.bfloat16, fastrms.torch.RMSprop, options)
                  for name, options in MODES.items() if options is not None},
               "torch.optim.RMSprop bfloat16": (torch.bfloat16, torch.optim.RMSprop, {})}
    runs = {}
    for name, (dtype, kind, options) in configs.items():
        model = _copy_model(template).to(dtype)
        runs[name] = (model, dtype, kind(model.parameters(), lr=lr, **options))
    order = np.random.default_rng(seed)
    for _ in range(epochs):
        permutation = torch.from_numpy(order.permutation(len(x_train)))
        for start in range(0, len(x_train), batch):
            index = permutation[start:start + batch]
            for model, dtype, opt in runs.values():
                opt.zero_grad()
                logits = model(xs[0][index].to(dtype)).float()
                torch.nn.functional.cross_entropy(logits, ys[0][index]).backward()
                opt.step()
    out = {}
    with torch.no_grad():
        for name, (model, dtype, _) in runs.items():
            loss = torch.nn.functional.cross_entropy(model(xs[0].to(dtype)).float(), ys[0])
            acc = (model(xs[1].to(dtype)).argmax(1) == ys[1]).float().mean()
            out[name] = (float(loss), float(acc))
    return out


def _copy_model(model):
    import copy
    return copy.deepcopy(model)


def markdown(title: str, results: dict) -> str:
    lines = [f"**{title}**", "", "| parameters / optimizer | final train loss | test accuracy |",
             "|---|---|---|"]
    lines += [f"| {name} | {loss:.4f} | {acc:.3f} |" for name, (loss, acc) in results.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    settings = f"{args.epochs} epochs, batch {args.batch}, RMSprop lr={args.lr} alpha=0.99"
    print(markdown(f"NumPy digits MLP 64-64-10, fastrms.RMSprop ({settings})",
                   numpy_mlp(args.epochs, args.lr, args.batch, args.seed)))
    try:
        import torch  # noqa: F401
    except ImportError:
        print("\n(torch not installed: no torch model)")
        return 0
    print()
    print(markdown(f"torch MLP 64-128-128-10 in bfloat16, fastrms.torch.RMSprop ({settings})",
                   torch_mlp(args.epochs, args.lr, args.batch, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
