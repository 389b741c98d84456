"""Which 8-bit code for blockwise8 state: train with each candidate as the RMSprop state, in NumPy.

Every state buffer (square_avg, and momentum_buffer / grad_avg when used) is stored after each
step in the format under test and decoded before the next: float32 (the baseline), bfloat16
(round to nearest even), and blockwise 8-bit codes in blocks of 256 with one float32 absmax
scale per block:

- ``linear8``: absmax linear codes (the naive baseline);
- ``tree8``: the dynamic (tree) quantization map of Dettmers et al. 2021 (bitsandbytes'
  ``create_dynamic_map``: signed for momentum_buffer / grad_avg, unsigned for square_avg),
  nearest map value by table search; it has a zero, so tiny values of square_avg round to 0;
- ``fp8``: fastrms's blockwise8 (fastrms/_blockwise.py): an 8-bit float relative to the scale,
  e4m4 unsigned that never rounds a positive value to zero, e4m3 signed, converted with bit
  operations (an e5m3 unsigned variant and directed rounding were tried too, see
  docs/compact-state.md).

The update is SPEC's (torch form) in float32, written out here so that the script needs NumPy
only (and scikit-learn for the digits). Problems: a least-squares fit (200 weights, one
block, columns scaled over two decades so square_avg spans four, and over four) and the digits
MLP of ``fastrms demo`` (64-64-10, 15 epochs), each plain, with momentum 0.9 and centered.
Prints a Markdown table (docs/compact-state.md) and the NumPy encode+decode cost per element
of each code.

    python bench/compare_state_codes.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastrms import _blockwise  # noqa: E402

F32 = np.float32
BLOCK = 256


def dynamic_map(signed: bool) -> np.ndarray:
    """bitsandbytes.functional.create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)."""
    data = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else \
            2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        boundaries = np.linspace(0.1, 1, items)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += (10 ** (-(max_exponent_bits - 1) + i) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return np.sort(np.array(data, F32))


TREE = {True: dynamic_map(True), False: dynamic_map(False)}
MIDPOINTS = {k: (v[1:] + v[:-1]) / 2 for k, v in TREE.items()}


def _blocks(x):
    n = x.size
    padded = np.zeros(-(-n // BLOCK) * BLOCK, F32)
    padded[:n] = x.reshape(-1)
    return padded.reshape(-1, BLOCK)


def tree_roundtrip(x: np.ndarray, signed: bool) -> np.ndarray:
    blocks = _blocks(x)
    scale = np.abs(blocks).max(axis=1, keepdims=True)
    inv = np.where(scale > 0, F32(1) / np.where(scale > 0, scale, 1), 0).astype(F32)
    codes = np.searchsorted(MIDPOINTS[signed], blocks * inv)
    return (TREE[signed][codes] * scale).reshape(-1)[:x.size].reshape(x.shape)


def linear_roundtrip(x: np.ndarray, signed: bool) -> np.ndarray:
    """Absmax linear 8-bit codes: round(x / scale * 127) signed, * 255 unsigned."""
    blocks = _blocks(x)
    scale = np.abs(blocks).max(axis=1, keepdims=True)
    levels = F32(127 if signed else 255)
    with np.errstate(all="ignore"):
        q = np.where(scale > 0, np.rint(blocks / scale * levels), 0)
    return (q / levels * scale).astype(F32).reshape(-1)[:x.size].reshape(x.shape)


def fp8_roundtrip(x: np.ndarray, signed: bool) -> np.ndarray:
    codes, scales = _blockwise.encode(x, signed)
    return _blockwise.decode(codes, scales, signed).reshape(x.shape)


def bf16_roundtrip(x: np.ndarray, signed: bool) -> np.ndarray:
    import ml_dtypes

    return x.astype(ml_dtypes.bfloat16).astype(F32)


FORMATS = {"float32": None, "bfloat16": bf16_roundtrip, "blockwise8 linear8": linear_roundtrip,
           "blockwise8 tree8": tree_roundtrip, "blockwise8 fp8": fp8_roundtrip}


class RMSprop:
    """torch.optim.RMSprop's update (SPEC order, float32), state stored in ``fmt``."""

    def __init__(self, params, fmt, lr, alpha=0.99, eps=1e-8, momentum=0.0, centered=False):
        self.params, self.store = params, FORMATS[fmt]
        self.lr, self.alpha, self.eps = F32(lr), F32(alpha), F32(eps)
        self.one_minus_alpha = F32(1 - alpha)
        self.momentum, self.centered = F32(momentum), centered
        self.s = [np.zeros_like(p) for p in params]
        self.b = [np.zeros_like(p) for p in params] if momentum else None
        self.a = [np.zeros_like(p) for p in params] if centered else None

    def _keep(self, x, signed):
        return x if self.store is None else self.store(x, signed)

    def step(self, grads):
        for k, (p, g) in enumerate(zip(self.params, grads)):
            s = self.s[k] * self.alpha + (self.one_minus_alpha * g) * g
            v = s
            if self.centered:
                a = self.a[k] + self.one_minus_alpha * (g - self.a[k])
                v = s - a * a
                self.a[k] = self._keep(a, True)
            d = np.sqrt(v) + self.eps
            if self.momentum:
                b = self.b[k] * self.momentum + g / d
                p += -self.lr * b
                self.b[k] = self._keep(b, True)
            else:
                p += (-self.lr * g) / d
            self.s[k] = self._keep(s, False)


def least_squares(fmt, *, momentum=0.0, centered=False, steps=3000, seed=0, decades=2):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((1000, 200)) * np.logspace(0, -decades, 200)).astype(F32)
    x_true = rng.standard_normal(200).astype(F32)
    b = a @ x_true + F32(0.01) * rng.standard_normal(1000).astype(F32)
    x = np.zeros(200, F32)
    opt = RMSprop([x], fmt, lr=1e-3, momentum=momentum, centered=centered)
    with np.errstate(all="ignore"):
        for t in range(steps):
            opt.lr = F32(1e-2 * (1 - t / steps))  # decayed to 0: every run ends converged
            residual = a @ x - b
            opt.step([(a.T @ residual / F32(1000)).astype(F32)])
        residual = a @ x - b
    return float(residual @ residual / 2000), None


def digits(fmt, *, momentum=0.0, centered=False, epochs=15, seed=0):
    from fastrms.report import demo

    x_train, y_train, x_test, y_test = demo.load_data(seed=seed)
    params = demo.init_params(64, 64, 10, seed=seed)
    lr = 1e-3 if not momentum else 1e-4
    opt = RMSprop(params, fmt, lr=lr, momentum=momentum, centered=centered)
    rng = np.random.default_rng(seed)
    with np.errstate(all="ignore"):
        for _ in range(epochs):
            order = rng.permutation(len(x_train))
            for start in range(0, len(order), 32):
                batch = order[start:start + 32]
                _, grads = demo.loss_and_grads(params, x_train[batch], y_train[batch])
                opt.step(grads)
        loss, _ = demo.loss_and_grads(params, x_train, y_train)
    return loss, demo.accuracy(params, x_test, y_test)


def codec_cost(n=1 << 20, repeat=5):
    """Seconds per element of one encode + decode round trip, NumPy, best of ``repeat``."""
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal(n)).astype(F32) ** 2
    out = {}
    for name, fn in FORMATS.items():
        if fn is None:
            continue
        best = np.inf
        for _ in range(repeat):
            t = time.perf_counter()
            fn(x, False)
            best = min(best, time.perf_counter() - t)
        out[name] = best / n * 1e9
    return out


def main() -> None:
    problems = [(f"{name}{suffix}", fn, {**extra, **options})
                for name, fn, extra in (("least squares", least_squares, {}),
                                        ("least squares, columns over 4 decades",
                                         least_squares, {"decades": 4}),
                                        ("digits MLP", digits, {}))
                for suffix, options in (("", {}), (", momentum 0.9", {"momentum": 0.9}),
                                        (", centered", {"centered": True}))]
    print("| problem | state | final loss | vs float32 | test accuracy |")
    print("|---|---|---|---|---|")
    for title, fn, options in problems:
        base = None
        for fmt in FORMATS:
            loss, acc = fn(fmt, **options)
            base = loss if base is None else base
            rel = (loss - base) / base if np.isfinite(loss) else float("nan")
            acc_text = "" if acc is None else f"{acc:.4f}"
            print(f"| {title} | {fmt} | {loss:.6g} | {rel:+.2%} | {acc_text} |", flush=True)
    print()
    print("| code | NumPy encode + decode, ns per element |")
    print("|---|---|")
    for name, ns in codec_cost().items():
        print(f"| {name} | {ns:.1f} |")


if __name__ == "__main__":
    main()
