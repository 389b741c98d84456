"""The speed-target check that ends a benchmark file: ratios measured in this one process.

A ratio the suite reports must compare like with like. Five things made its figures impossible
on one machine kind or another (fastrms issue 13), and this module is where each is handled:

- Noise. The machines are shared: their speed drifts by up to 2x over seconds, so two minima
  taken in different tests can disagree by more than a target's margin. Every ratio is timed
  here, :func:`interleave`: all the steps it compares in turn, round after round, and the
  ratio of each round (both times taken within milliseconds) is the sample. Targets use the
  median of those per-round ratios; the best-of-each ratio and the spread are reported beside.
- Cache state. Each timed batch is preceded by one untimed call of the same step, so every
  step is timed as it runs after itself (its own arrays as warm as they can be) and never in
  the cache state another step left behind.
- Thread pools. That same call gives the previous step's OpenMP workers (which spin for
  several milliseconds after a parallel region) time to go to sleep, and wakes this step's own.
- Thread counts. fastrms follows OpenMP's thread setting unless told otherwise, and torch sets
  that to the number of *physical* cores on its first parallel op: on a VM whose vCPUs are SMT
  siblings that silently halves fastrms's threads mid-suite. :func:`pin_threads` (called by
  bench/conftest.py) gives fastrms, torch and numexpr one explicit count.
- Cache size. On a machine whose last-level cache holds 10^7 float32 elements (an Intel Xeon
  with 260 MiB of L3), the roofline at 10^7 is an L3 figure, not a memory one.
  :func:`out_of_cache_size` picks the size at which a roofline target means what it says.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import pytest

#: (description, measured ratio, bound, True if the ratio must be at most the bound)
Ratio = tuple[str, float, float, bool]


@dataclass(frozen=True)
class RatioStats:
    """time(slower) / time(faster) over interleaved rounds."""
    median: float  #: median of the per-round ratios: what targets are checked against
    low: float  #: first quartile of the per-round ratios
    high: float  #: third quartile
    best: float  #: best time of ``slower`` over best time of ``faster``
    rounds: int

    def describe(self) -> str:
        return (f"median of {self.rounds} rounds, IQR {self.low:.2f}-{self.high:.2f}, "
                f"best/best {self.best:.2f}")

    def as_dict(self) -> dict:
        return {"median": round(self.median, 3), "iqr": [round(self.low, 3), round(self.high, 3)],
                "best_over_best": round(self.best, 3), "rounds": self.rounds}


@dataclass
class Interleaved:
    """Seconds per call of each step, one sample per round (see :func:`interleave`)."""
    samples: dict[str, list[float]]
    calls_per_batch: dict[str, int]

    def best(self, name: str) -> float:
        return min(self.samples[name])

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratio(self, slower: str, faster: str) -> RatioStats:
        per_round = [a / b for a, b in zip(self.samples[slower], self.samples[faster])]
        if len(per_round) >= 2:
            low, _, high = statistics.quantiles(per_round, n=4, method="inclusive")
        else:
            low = high = per_round[0]
        return RatioStats(statistics.median(per_round), low, high,
                          self.best(slower) / self.best(faster), len(per_round))


def interleave(steps: Mapping[str, Callable[[], object]], *, rounds: int = 30,
               batch_seconds: float = 2e-3, warmup_seconds: float = 0.0,
               max_seconds: float | None = None,
               before: Mapping[str, Callable[[], object]] | None = None) -> Interleaved:
    """Time every step once per round, in turn, and keep every round's figure.

    Each step runs in batches of about ``batch_seconds`` (at least one call), so that the
    timer's resolution and a call's fixed costs do not dominate small steps. Before each timed
    batch the same step runs once untimed: it is then timed after itself, on its own warm
    caches and thread pool, whatever ran before it. The order turns by one step each round.

    ``before`` maps some steps to a call that prepares each of their timed calls instead (for
    example a forward and ``loss.backward()``, to time an optimizer step where it runs in a
    training loop): such a step is timed one call at a time, right after its ``before``.
    ``warmup_seconds`` first runs all steps round-robin for that long (fresh memory on these
    VMs runs slowly for a while after its first touch); ``max_seconds`` stops early, after at
    least 5 rounds, when a busy machine makes the rounds far longer than planned.
    """
    names = list(steps)
    before = dict(before or {})
    calls = {}
    for name in names:
        step, prepare = steps[name], before.get(name)
        step()
        if prepare is not None:
            prepare()
            calls[name] = 1
            continue
        start = time.perf_counter()
        step()
        calls[name] = max(1, int(batch_seconds / max(time.perf_counter() - start, 1e-9)))
    end = time.perf_counter() + warmup_seconds
    while time.perf_counter() < end:
        for name in names:
            if name in before:
                before[name]()
            steps[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            step, count = steps[name], calls[name]
            before.get(name, step)()
            start = time.perf_counter()
            for _ in range(count):
                step()
            samples[name].append((time.perf_counter() - start) / count)
        if max_seconds is not None and r >= 4 and time.perf_counter() - started > max_seconds:
            break
    return Interleaved(samples, calls)


def interleaved_best(steps: Mapping[str, Callable[[], object]], *, rounds: int = 30,
                     batch_seconds: float = 2e-3) -> dict[str, float]:
    """Best seconds per call of each step, timed round-robin by :func:`interleave`."""
    timed = interleave(steps, rounds=rounds, batch_seconds=batch_seconds)
    return {name: timed.best(name) for name in steps}


def check_targets(benchmark, request, ratios: Callable[[], list[Ratio]]) -> None:
    """Compute the ratios, print them, record them in extra_info and fail on a missed target.

    The computation goes through the benchmark fixture (one round, no timing of interest) so
    that --benchmark-only, which skips tests without the fixture, runs it. A bound of inf (or
    0 with at_most False) marks a ratio that is reported, not checked.
    """
    if request.config.getoption("benchmark_disable", False):
        pytest.skip("needs timings: run with --benchmark-only")
    benchmark.group = "speed targets (ratios of interleaved timings)"
    others = busy_cores_of_others()
    measured = benchmark.pedantic(ratios, rounds=1, iterations=1)
    busy = others()
    if not measured:
        pytest.skip("the implementations the targets compare were not run")
    lines = []
    for what, ratio, bound, at_most in measured:
        met = ratio <= bound if at_most else ratio >= bound
        checked = bound not in (float("inf"), 0.0)
        verdict = (f"(target {'<=' if at_most else '>='} {bound})  {'ok' if met else 'MISSED'}"
                   if checked else "(reported)")
        lines.append(f"{what} = {ratio:6.2f} {verdict}")
    benchmark.extra_info["ratios"] = {what: round(ratio, 3) for what, ratio, _, _ in measured}
    benchmark.extra_info["threads"] = thread_settings()
    benchmark.extra_info["cpu"] = cpu_model()
    benchmark.extra_info["others_busy_cores"] = None if busy is None else round(busy, 2)
    header = f"{cpu_model()}, threads {thread_settings()}"
    if busy is not None:
        header += f", other processes kept {busy:.2f} of {os.cpu_count()} cores busy"
        if busy > BUSY_WARNING:
            header += (" (a parallel step then waits for a descheduled thread of its team: "
                       "these ratios say more about the other processes than about the steps)")
    print(f"\n{header}\n" + "\n".join(lines))
    missed = [line for line in lines if line.endswith("MISSED")]
    assert not missed, "speed targets missed:\n" + "\n".join(missed)


def target(what: str, stats: RatioStats, bound: float, at_most: bool = False) -> Ratio:
    """A :data:`Ratio` checked on the median of per-round ratios, its spread in the text."""
    return (f"{what} [{stats.describe()}]", stats.median, bound, at_most)


# -- the machine ---------------------------------------------------------------------------------

#: Cores kept busy by other processes above which the printed ratios carry a warning.
BUSY_WARNING = 0.25


def busy_cores_of_others() -> Callable[[], float | None]:
    """Start a meter; calling the result gives how many cores *other* processes kept busy on
    average since (Linux /proc/stat minus this process's CPU time), or None where unreadable.
    On a 2-core machine this is most of the noise: a thread team whose member was descheduled
    waits a scheduler tick at its barrier, so a parallel step can take 10 ms whatever its size.
    """
    def read():
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        own = os.times()
        return time.perf_counter(), sum(fields) - fields[3] - fields[4], own.user + own.system

    start = read()

    def since() -> float | None:
        end = read()
        if start is None or end is None or end[0] <= start[0]:
            return None
        busy = (end[1] - start[1]) / os.sysconf("SC_CLK_TCK") - (end[2] - start[2])
        return max(0.0, busy / (end[0] - start[0]))
    return since


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def pin_threads(threads: int | None = None) -> dict:
    """One explicit thread count for fastrms, torch and numexpr (usable CPUs by default).

    Without it fastrms's kernels follow OpenMP's setting, which torch changes to its default
    (the number of physical cores) when it initialises, so a row's thread count would depend
    on what ran before it. torch is imported here when installed, and before fastrms, as a
    torch user's script does: ``import fastrms`` loads the system's libgomp, torch then runs on
    that copy instead of its own, and in that state, once ``torch.set_num_threads`` has been
    called and a Numba ``prange`` loop has run, every MKL-threaded torch op (``sqrt``, ``exp``:
    torch's RMSprop) takes milliseconds (measured: 10 us -> 2.8 ms for ``sqrt`` of 5000 floats,
    with or without fastrms). Returns :func:`thread_settings`.
    """
    import importlib.util

    threads = usable_cpus() if threads is None else threads
    torch = sys.modules.get("torch")
    if torch is None and importlib.util.find_spec("torch") is not None:
        import torch
    import fastrms

    fastrms.set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(threads)
    if "numexpr" in sys.modules:
        sys.modules["numexpr"].set_num_threads(threads)
    return thread_settings()


def thread_settings() -> dict:
    """The thread counts in force now, for extra_info."""
    import fastrms

    settings = {"fastrms": fastrms.get_num_threads()}
    for module in ("torch", "numexpr", "numba"):
        if module in sys.modules and hasattr(sys.modules[module], "get_num_threads"):
            settings[module] = sys.modules[module].get_num_threads()
    return settings


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def last_level_cache_bytes() -> int | None:
    """The largest cache of CPU 0 (Linux sysfs), or None where it cannot be read. A VM reports
    the host's cache as its hypervisor presents it (32 MiB on the AMD EPYC kinds)."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    sizes = []
    for index in base.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None


#: A roofline target needs the arrays to be this many times the last-level cache, so that what
#: a step leaves in cache is a small part of what the next one reads.
OUT_OF_CACHE_FACTOR = 3


def out_of_cache_size(array_bytes_per_element: int, minimum: int = 10**7) -> int:
    """The smallest of ``minimum`` x 1, 2, 5, 10, 20, ... at which the arrays of one step
    (``array_bytes_per_element`` x n, e.g. 12 for float32 param, grad and square_avg) are at
    least :data:`OUT_OF_CACHE_FACTOR` times the last-level cache. ``minimum`` if the cache size
    is unknown. 10^7 on the AMD EPYC kinds (32 MiB L3), 10^8 on a 260 MiB L3 (where 5 x 10^7
    would be only 2.2 times the cache, and an adaptive replacement policy keeps part of it)."""
    cache = last_level_cache_bytes()
    if cache is None:
        return minimum
    n, steps = minimum, (2, 2.5, 2)  # 1, 2, 5, 10, 20, 50, ...
    k = 0
    while n * array_bytes_per_element < OUT_OF_CACHE_FACTOR * cache:
        n = int(n * steps[k % 3])
        k += 1
    return n
