"""Options for the pytest-benchmark suite (``pytest bench --benchmark-only``)."""

#: Seconds each benchmark spends in its timed rounds unless --benchmark-max-time is given:
#: about 200 cells, so pytest-benchmark's default of 1 s would make the default run minutes long.
DEFAULT_MAX_TIME = 0.3


def pytest_addoption(parser):
    parser.addoption("--bench-large", action="store_true", default=False,
                     help="also run the largest sizes (10^8 elements: several GB, minutes)")


def pytest_configure(config):
    if not any(arg.startswith("--benchmark-max-time") for arg in config.invocation_params.args):
        if hasattr(config.option, "benchmark_max_time"):
            config.option.benchmark_max_time = DEFAULT_MAX_TIME
