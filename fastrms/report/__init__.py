"""The main job: ``fastrms bench`` and ``fastrms demo``.

- :mod:`fastrms.report.workload`: the problem every row solves (hyperparameters, variants,
  streams, the shared state and the guard that keeps it valid).
- :mod:`fastrms.report.registry`: every implementation the report times (NumPy baselines, each
  fastrms backend, the roofline kernel, then the peers), one record each: name, availability
  check with its reason, factory returning a step over given state.
- :mod:`fastrms.report.peers`: the peers (torch, numexpr, optax), one ``Peer`` each; their
  libraries are imported only when a step is made.
- :mod:`fastrms.report.timing`: the interleaved timing; :func:`~fastrms.report.timing.run`
  returns the report as a dict.
- :mod:`fastrms.report.machine`: the machine, its load and its memory, recorded with every
  figure.
- :mod:`fastrms.report.tables`: the text and Markdown tables.
- :mod:`fastrms.report.bench`: the command line and the files (JSON, PNG).
- :mod:`fastrms.report.demo`: an MLP on scikit-learn's digits and the 2-D optimizer paths.
- :mod:`fastrms.report.plots`: every figure (matplotlib, Agg backend).

Imports run one way (workload <- peers <- registry <- timing <- bench; tables and machine below
them; plots on top), with no cycle. The run that docs/performance.md quotes is in
``bench/results/`` (``bench.json``, ``bench.png``, ``bench.txt``).

Nothing here imports matplotlib, torch, jax, numexpr or scikit-learn at import time.
"""
