"""bench/targets.py, the timing method behind every ratio the benchmark suite reports: what it
calls in which order and how it forms ratios (no timing is asserted here)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "targets.py"
_spec = importlib.util.spec_from_file_location("bench_targets", _PATH)
targets = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_targets", targets)
_spec.loader.exec_module(targets)


def test_each_timed_batch_follows_a_call_of_its_own_step():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timed = targets.interleave(steps, rounds=4, batch_seconds=0.0)
    assert all(len(samples) == 4 for samples in timed.samples.values())
    rounds = calls[2 * len(steps):]  # after the two calibration calls of each step
    # Each round: (untimed call, timed batch of one call) per step, the order turning by one.
    pairs = [rounds[k:k + 2] for k in range(0, len(rounds), 2)]
    assert all(a == b for a, b in pairs)
    order = [a for a, _ in pairs]
    assert order == list("abc" "bca" "cab" "abc")


def test_before_calls_prepare_each_timed_call():
    calls = []
    steps = {"step": lambda: calls.append("step"), "other": lambda: calls.append("other")}
    before = {"step": lambda: calls.append("backward")}
    timed = targets.interleave(steps, rounds=3, batch_seconds=1e-4, before=before)
    assert timed.calls_per_batch["step"] == 1  # timed one call at a time
    after_calibration = calls[calls.index("backward") + 1:]
    for k, name in enumerate(after_calibration):
        if name == "step" and k > 0 and after_calibration[k - 1] != "backward":
            pytest.fail(f"a timed step did not follow its before-call: {after_calibration}")


def test_ratio_statistics():
    timed = targets.Interleaved({"slow": [2.0, 4.0, 3.0, 100.0], "fast": [1.0, 2.0, 1.0, 1.0]},
                                {"slow": 1, "fast": 1})
    stats = timed.ratio("slow", "fast")
    assert stats.median == pytest.approx(2.5)  # per-round ratios 2, 2, 3, 100
    assert stats.best == pytest.approx(2.0)  # best of each: 2 / 1
    assert stats.low <= stats.median <= stats.high and stats.rounds == 4
    assert "median of 4 rounds" in stats.describe()
    what, ratio, bound, at_most = targets.target("x", stats, 1.5)
    assert ratio == stats.median and bound == 1.5 and at_most is False and "IQR" in what


@pytest.mark.parametrize("cache, bytes_per_element, expected", [
    (32 * 2**20, 12, 10**7),    # AMD EPYC: 120 MB of arrays against a 32 MiB L3
    (32 * 2**20, 16, 10**7),
    (260 * 2**20, 12, 10**8),   # Intel Xeon, 260 MiB L3: 10^7 and 5 * 10^7 are too close
    (None, 12, 10**7),          # unknown: the default
])
def test_out_of_cache_size(monkeypatch, cache, bytes_per_element, expected):
    monkeypatch.setattr(targets, "last_level_cache_bytes", lambda: cache)
    assert targets.out_of_cache_size(bytes_per_element) == expected


def test_pinned_threads_reach_fastrms_and_torch():
    import fastrms

    torch = sys.modules.get("torch")
    if torch is None and importlib.util.find_spec("torch") is not None:
        import torch
    torch_before = None if torch is None else torch.get_num_threads()
    try:
        settings = targets.pin_threads(1)
        assert settings["fastrms"] == 1
        if torch is not None:
            assert settings["torch"] == 1
    finally:
        fastrms.set_num_threads(None)
        if torch is not None:
            torch.set_num_threads(torch_before)
