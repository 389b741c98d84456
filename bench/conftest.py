"""Options for the pytest-benchmark suite (``pytest bench --benchmark-only``)."""
import pytest

import targets

#: Seconds each benchmark spends in its timed rounds unless --benchmark-max-time is given:
#: about 200 cells, so pytest-benchmark's default of 1 s would make the default run minutes long.
DEFAULT_MAX_TIME = 0.3


def pytest_addoption(parser):
    parser.addoption("--bench-large", action="store_true", default=False,
                     help="also run the largest sizes (10^8 elements: several GB, minutes)")
    parser.addoption("--bench-threads", type=int, default=None,
                     help="threads for fastrms, torch and numexpr alike (default: usable CPUs)")


def pytest_configure(config):
    if not any(arg.startswith("--benchmark-max-time") for arg in config.invocation_params.args):
        if hasattr(config.option, "benchmark_max_time"):
            config.option.benchmark_max_time = DEFAULT_MAX_TIME
    # One explicit thread count for every library, before any test runs: see bench/targets.py.
    threads = config.getoption("--bench-threads")
    if threads is not None and threads < 1:
        raise pytest.UsageError(f"--bench-threads must be at least 1, got {threads}")
    targets.pin_threads(threads)
