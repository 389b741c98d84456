"""Options for the pytest-benchmark suite (``pytest bench --benchmark-only``)."""


def pytest_addoption(parser):
    parser.addoption("--bench-large", action="store_true", default=False,
                     help="also run the largest sizes (10^8 elements: ~2 GB of memory, minutes)")
