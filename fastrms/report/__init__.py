"""The main job: ``python -m fastrms bench`` and ``python -m fastrms demo``.

- :mod:`fastrms.report.registry`: every implementation the report times (NumPy baselines, each
  fastrms backend, the roofline kernel, the peers), one record each: name, availability check
  with its reason, factory returning a step over given state.
- :mod:`fastrms.report.peers`: the factories for torch, numexpr and optax (imported lazily).
- :mod:`fastrms.report.bench`: the interleaved timing, the tables, the JSON and ``main``.
- :mod:`fastrms.report.demo`: an MLP on scikit-learn's digits and the 2-D optimizer paths.
- :mod:`fastrms.report.plots`: every figure (matplotlib, Agg backend).

The run the README quotes is in ``bench/results/`` (``bench.json``, ``bench.png``, ``bench.txt``).

Nothing here imports matplotlib, torch, jax, numexpr or scikit-learn at import time.
"""
