"""Numba's on-disk cache: a fresh process loads the compiled kernels (the ``parallel=True`` driver
included) instead of compiling them, and gets the same bits.

Two fresh interpreters run the Numba backend with ``NUMBA_CACHE_DIR`` pointed at an empty
temporary directory, on arrays above the parallel threshold (the ``prange`` driver) and below it
(the serial loop), for both dtypes. The first must compile (cache misses, index files written),
the second must load (cache hits, no misses); their results must be byte-identical to each other
and to the NumPy reference. Evidence is the dispatchers' ``stats``, never timing.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import fastrms

from rms_helpers import LARGE, assert_bits_equal, clean_env, reference_update, require_backend

pytestmark = pytest.mark.skipif(not fastrms.backends.availability("numba")[0],
                                reason=f"numba backend unavailable: "
                                       f"{fastrms.backends.availability('numba')[1]}")

SCRIPT = r"""
import json, sys
import numpy as np
import fastrms
from fastrms.backends import numba_backend as nb

out_dir, n = sys.argv[1], int(sys.argv[2])
assert n >= nb.PARALLEL_THRESHOLD
for dtype in (np.float32, np.float64):
    name = np.dtype(dtype).name
    rng = np.random.default_rng(0)
    p, g, s, b, a = (rng.standard_normal(n).astype(dtype) for _ in range(5))
    s = np.abs(s)
    small = [x[:100].copy() for x in (p, g, s)]
    for _ in range(2):
        fastrms.rmsprop_update(p, g, s, lr=0.01, momentum=0.9, momentum_buffer=b, centered=True,
                               grad_avg=a, backend="numba")
    fastrms.rmsprop_update(*small, lr=0.01, backend="numba")
    np.savez(f"{out_dir}/{name}.npz", p=p, s=s, b=b, a=a, small_p=small[0], small_s=small[2])

stats = {}
for function in ("_update_parallel", "_update_serial"):
    st = getattr(nb, function).stats
    stats[function] = {"hits": sum(st.cache_hits.values()), "misses": sum(st.cache_misses.values()),
                       "path": st.cache_path}
print(json.dumps({"stats": stats, "threads": nb._thread_count(), "cache": nb.CACHE}))
"""


def _reference(dtype):
    rng = np.random.default_rng(0)
    p, g, s, b, a = (rng.standard_normal(LARGE).astype(dtype) for _ in range(5))
    s = np.abs(s)
    small = [x[:100].copy() for x in (p, g, s)]
    options = dict(lr=0.01, momentum=0.9, centered=True)
    state = {"param": p, "square_avg": s, "momentum_buffer": b, "grad_avg": a}
    for _ in range(2):
        state = reference_update(options, state, g)
    small_state = reference_update(dict(lr=0.01), {"param": small[0], "square_avg": small[2],
                                                   "momentum_buffer": None, "grad_avg": None},
                                   small[1])
    return {"p": state["param"], "s": state["square_avg"], "b": state["momentum_buffer"],
            "a": state["grad_avg"], "small_p": small_state["param"],
            "small_s": small_state["square_avg"]}


def _run(cache_dir, out_dir, **env):
    out_dir.mkdir()
    # Two Numba threads whatever the machine, so that the prange driver really runs.
    environment = clean_env(NUMBA_CACHE_DIR=str(cache_dir), NUMBA_NUM_THREADS="2", **env)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out_dir), str(LARGE)],
                          env=environment, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    results = {}
    for dtype in ("float32", "float64"):
        with np.load(out_dir / f"{dtype}.npz") as data:
            results[dtype] = {k: data[k] for k in data.files}
    return report, results


def test_second_process_loads_from_cache_and_gets_the_same_bits(tmp_path):
    require_backend("numba")
    cache_dir = tmp_path / "numba-cache"
    first, first_results = _run(cache_dir, tmp_path / "first")
    assert first["threads"] == 2 and first["cache"] is True
    for function, st in first["stats"].items():
        assert st["misses"] >= 2, (function, st)  # compiled, once per dtype
        assert st["hits"] == 0, (function, st)
        assert st["path"].startswith(str(cache_dir)), st["path"]
    index_files = sorted(p.name for p in cache_dir.rglob("*.nbi"))
    data_files = list(cache_dir.rglob("*.nbc"))
    assert any("_update_parallel" in name for name in index_files), index_files
    assert any("_update_serial" in name for name in index_files), index_files
    assert len(data_files) >= 4

    second, second_results = _run(cache_dir, tmp_path / "second")
    for function, st in second["stats"].items():
        assert st["hits"] >= 2, (function, st)  # loaded, once per dtype
        assert st["misses"] == 0, (function, st)

    for dtype in ("float32", "float64"):
        reference = _reference(np.dtype(dtype))
        for key, value in first_results[dtype].items():
            assert value.tobytes() == second_results[dtype][key].tobytes(), (dtype, key)
            assert_bits_equal(value, reference[key], f"{dtype} {key}")


def test_cache_can_be_disabled(tmp_path):
    require_backend("numba")
    cache_dir = tmp_path / "numba-cache"
    report, results = _run(cache_dir, tmp_path / "out", FASTRMS_NUMBA_CACHE="0")
    assert report["cache"] is False
    assert not list(cache_dir.rglob("*.nbi")) and not list(cache_dir.rglob("*.nbc"))
    reference = _reference(np.float32)
    for key, value in results["float32"].items():
        assert_bits_equal(value, reference[key], f"float32 {key}")
