"""Which backend runs a call, and the introspection around it.

Precedence: the ``backend`` argument > ``use_backend`` > ``set_backend`` > ``FASTRMS_BACKEND``
(read at import) > automatic choice. Each test proves which backend ran with spies on the backend
modules' ``update_if_ready`` / ``update`` (every call goes through one of them), or in a fresh
interpreter for what happens at import.
"""
from __future__ import annotations

import asyncio
import contextvars
import json
import sys
import threading

import numpy as np
import pytest

import fastrms
from fastrms import _coefficients, _dispatch, backends

from rms_helpers import BACKENDS, clean_env, require_backend, run_python


@pytest.fixture
def spy(monkeypatch):
    """Record the name of every backend whose update path runs; start from a clean dispatch state
    (no environment choice, nothing cached for the automatic fast path)."""
    calls = []
    for name in BACKENDS:
        if not backends.availability(name)[0]:
            continue
        module = backends.load(name)
        for attribute in ("update_if_ready", "update"):
            original = getattr(module, attribute)

            def wrapper(*args, _original=original, _name=name, **kwargs):
                calls.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, attribute, wrapper)
    set_env_choice(monkeypatch, None)
    fastrms.set_backend(None)
    return calls


def set_env_choice(monkeypatch, name):
    """As if FASTRMS_BACKEND had been ``name`` at import (when nothing is cached yet)."""
    monkeypatch.setattr(_dispatch, "_env_choice", name)
    monkeypatch.setattr(_dispatch, "auto_module", None)


def ran(calls, **kwargs) -> str:
    """Run one update and return the name of the one backend that ran it."""
    del calls[:]
    p = np.ones(8, np.float32)
    g = np.full(8, 0.5, np.float32)
    s = np.zeros(8, np.float32)
    fastrms.rmsprop_update(p, g, s, lr=0.01, **kwargs)
    assert p[0] != 1.0  # it really ran
    names = set(calls)
    assert len(names) == 1, calls
    return names.pop()


def available_backends():
    return [name for name in BACKENDS if backends.availability(name)[0]]


# --------------------------------------------------------------------------------------------
# precedence


def test_precedence_argument_use_backend_set_backend_env_automatic(spy, monkeypatch):
    for name in ("c", "numba"):
        require_backend(name)
    automatic = fastrms.automatic_choice(8)[0]
    assert ran(spy) == automatic == "c"

    set_env_choice(monkeypatch, "numba")
    assert ran(spy) == "numba"                         # env > automatic
    fastrms.set_backend("numpy")
    assert ran(spy) == "numpy"                         # set_backend > env
    with fastrms.use_backend("c"):
        assert ran(spy) == "c"                         # use_backend > set_backend
        assert ran(spy, backend="numba") == "numba"    # argument > use_backend
        assert ran(spy, backend="numpy") == "numpy"
    assert ran(spy) == "numpy"                         # the with block restored set_backend
    fastrms.set_backend(None)
    assert ran(spy) == "numba"                         # back to the environment variable
    set_env_choice(monkeypatch, None)
    assert ran(spy) == "c"                             # and to automatic choice


@pytest.mark.parametrize("chosen", BACKENDS)
def test_argument_beats_every_other_choice(spy, monkeypatch, chosen):
    require_backend(chosen)
    other = next(n for n in available_backends() if n != chosen) if len(available_backends()) > 1 \
        else chosen
    set_env_choice(monkeypatch, other)
    fastrms.set_backend(other)
    with fastrms.use_backend(other):
        assert ran(spy, backend=chosen) == chosen
        assert ran(spy) == other


@pytest.mark.parametrize("chosen", BACKENDS)
def test_each_mechanism_selects_each_backend(spy, monkeypatch, chosen):
    require_backend(chosen)
    assert ran(spy, backend=chosen) == chosen
    with fastrms.use_backend(chosen):
        assert ran(spy) == chosen
    fastrms.set_backend(chosen)
    assert ran(spy) == chosen
    fastrms.set_backend(None)
    set_env_choice(monkeypatch, chosen)
    assert ran(spy) == chosen


def test_automatic_runs_the_automatic_choice(spy):
    name, why = fastrms.automatic_choice(8)
    assert name in BACKENDS and isinstance(why, str) and why
    assert ran(spy) == name
    assert ran(spy) == name  # the cached fast path agrees
    assert _dispatch.requested_backend(None) == (None, "automatic")


def test_set_backend_none_restores_automatic(spy):
    automatic = fastrms.automatic_choice(8)[0]
    ran(spy)  # let the automatic module be cached
    fastrms.set_backend("numpy")
    assert ran(spy) == "numpy"
    assert _dispatch.requested_backend(None) == ("numpy", "set_backend()")
    fastrms.set_backend(None)
    assert ran(spy) == automatic


def test_use_backend_restores_on_exit_and_on_exception(spy):
    automatic = fastrms.automatic_choice(8)[0]
    ran(spy)  # cache the automatic module: the context must bypass it
    other = "numpy" if automatic != "numpy" else next(iter(available_backends()))
    with fastrms.use_backend(other):
        assert ran(spy) == other
        assert _dispatch.requested_backend(None) == (other, "use_backend()")
    assert ran(spy) == automatic
    with pytest.raises(RuntimeError, match="boom"):
        with fastrms.use_backend(other):
            assert ran(spy) == other
            raise RuntimeError("boom")
    assert ran(spy) == automatic
    assert _dispatch.requested_backend(None) == (None, "automatic")


def test_use_backend_nests(spy):
    names = available_backends()
    outer, inner = names[0], names[-1]
    with fastrms.use_backend(outer):
        with fastrms.use_backend(inner):
            assert ran(spy) == inner
        assert ran(spy) == outer
        try:
            with fastrms.use_backend(inner):
                raise KeyError
        except KeyError:
            pass
        assert ran(spy) == outer


def test_use_backend_applies_to_its_own_thread_only(spy):
    automatic = fastrms.automatic_choice(8)[0]
    other = "numpy" if automatic != "numpy" else None
    if other is None:
        pytest.skip("only the numpy backend is available")
    seen = {}

    def worker():
        seen["thread"] = ran(spy)

    with fastrms.use_backend(other):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert ran(spy) == other
    assert seen["thread"] == automatic


# --------------------------------------------------------------------------------------------
# unknown and unavailable backends


@pytest.mark.parametrize("name", ["cuda", "NUMPY", "", "numpy "])
def test_unknown_names_raise_value_error(spy, name):
    p, g, s = np.ones(4), np.ones(4), np.zeros(4)
    with pytest.raises(ValueError, match="unknown backend"):
        fastrms.rmsprop_update(p, g, s, lr=0.01, backend=name)
    with pytest.raises(ValueError, match="unknown backend"):
        fastrms.set_backend(name)
    with pytest.raises(ValueError, match="unknown backend"):
        with fastrms.use_backend(name):
            pass  # pragma: no cover
    assert spy == []
    assert (p == 1).all() and (s == 0).all()


def test_unknown_name_from_the_environment_names_the_variable(spy, monkeypatch):
    set_env_choice(monkeypatch, "gpu")
    with pytest.raises(ValueError, match="FASTRMS_BACKEND") as info:
        fastrms.rmsprop_update(np.ones(4), np.ones(4), np.zeros(4), lr=0.01)
    assert "gpu" in str(info.value)


def _make_unavailable(monkeypatch, name, reason):
    monkeypatch.delitem(backends._loaded, name, raising=False)
    monkeypatch.setitem(backends._load_errors, name, reason)
    monkeypatch.setattr(_dispatch, "auto_module", None)


@pytest.mark.parametrize("name", ["c", "numba"])
def test_requested_unavailable_backend_says_why(spy, monkeypatch, name):
    reason = f"ImportError: simulated missing {name} for the test"
    _make_unavailable(monkeypatch, name, reason)
    assert backends.availability(name) == (False, reason)
    p, g, s = np.ones(4), np.ones(4), np.zeros(4)
    for how, source in ((dict(backend=name), "backend argument"),):
        with pytest.raises(fastrms.BackendUnavailableError) as info:
            fastrms.rmsprop_update(p, g, s, lr=0.01, **how)
        assert isinstance(info.value, ValueError)
        assert reason in str(info.value) and source in str(info.value) and name in str(info.value)
    with fastrms.use_backend(name):
        with pytest.raises(ValueError, match="simulated missing.*use_backend"):
            fastrms.rmsprop_update(p, g, s, lr=0.01)
    fastrms.set_backend(name)
    with pytest.raises(ValueError, match="simulated missing.*set_backend"):
        fastrms.rmsprop_update(p, g, s, lr=0.01)
    fastrms.set_backend(None)
    set_env_choice(monkeypatch, name)
    with pytest.raises(ValueError, match="simulated missing.*FASTRMS_BACKEND"):
        fastrms.rmsprop_update(p, g, s, lr=0.01)
    assert (p == 1).all() and (s == 0).all() and spy == []
    report = fastrms.info()["backends"][name]
    assert report["available"] is False and report["reason"] == reason


@pytest.mark.filterwarnings("ignore::fastrms.BackendFallbackWarning")  # tests/test_install.py
def test_automatic_choice_skips_unavailable_backends(spy, monkeypatch):
    for name in ("c", "numba"):
        require_backend(name)
    assert fastrms.automatic_choice(8)[0] == "c"
    _make_unavailable(monkeypatch, "c", "ImportError: simulated: no C extension")
    name, why = fastrms.automatic_choice(8)
    assert name == "numba" and "simulated: no C extension" in why
    assert ran(spy) == "numba"
    assert fastrms.info()["automatic_choice"]["plain"]["backend"] == "numba"
    _make_unavailable(monkeypatch, "numba", "ImportError: simulated: no numba")
    assert fastrms.automatic_choice(8)[0] == "numpy"
    assert ran(spy) == "numpy"


# --------------------------------------------------------------------------------------------
# info


def test_info_is_a_plain_json_serializable_dict():
    report = fastrms.info()
    assert type(report) is dict
    # Plain types only: a JSON round trip gives back an equal dict (no tuples, numpy scalars...).
    assert json.loads(json.dumps(report)) == report
    assert report["version"] == fastrms.__version__
    assert set(report["backends"]) == set(BACKENDS)
    for name, entry in report["backends"].items():
        assert entry["available"] is backends.availability(name)[0]
        assert isinstance(entry["reason"], str) and entry["reason"]
    for variant in ("plain", "momentum", "centered"):
        choice = report["automatic_choice"][variant]
        assert choice["backend"] in BACKENDS and choice["why"]
        assert choice["backend"] == fastrms.automatic_choice(10**6)[0]
    assert report["threads"] == fastrms.get_num_threads()
    if backends.availability("c")[0]:
        from fastrms.backends import c_backend

        assert report["simd_level"] == c_backend.simd_level()
        assert report["simd_level"] in c_backend.SIMD_NAMES
    else:  # pragma: no cover
        assert isinstance(report["simd_level"], str)


def test_info_takes_size_and_dtype():
    report = fastrms.info(100, np.float64)
    for choice in report["automatic_choice"].values():
        assert choice["size"] == 100 and choice["dtype"] == "float64"


def test_info_reports_thread_count(restore_threads):
    fastrms.set_num_threads(1)
    assert fastrms.info()["threads"] == 1


def test_python_m_fastrms_info_prints_json():
    out = run_python(None, args=("-m", "fastrms", "info", "--size", "123", "--dtype", "float64"))
    report = json.loads(out.stdout)
    assert report["version"] == fastrms.__version__
    assert set(report["backends"]) == set(BACKENDS)
    assert report["automatic_choice"]["plain"]["size"] == 123
    assert report["automatic_choice"]["plain"]["dtype"] == "float64"
    assert "simd_level" in report and "threads" in report


def test_python_m_fastrms_info_load_numba():
    require_backend("numba")
    report = json.loads(run_python(None, args=("-m", "fastrms", "info", "--load-numba")).stdout)
    assert report["backends"]["numba"]["available"] is True
    assert "version" in report["backends"]["numba"]


def test_python_m_fastrms_without_command_fails():
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "fastrms"], env=clean_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0


# --------------------------------------------------------------------------------------------
# fresh interpreters: lazy import of Numba, the environment variable


def test_import_does_not_import_numba_and_first_numba_call_does():
    require_backend("numba")
    code = """
import sys
import numpy as np
import fastrms
assert "numba" not in sys.modules, "import fastrms imported numba"
fastrms.info()
fastrms.backends.availability("numba")
assert "numba" not in sys.modules, "info() imported numba"
p, g, s = np.ones(8), np.ones(8), np.zeros(8)
if fastrms.automatic_choice(8)[0] != "numba":
    fastrms.rmsprop_update(p, g, s, lr=0.01)
    fastrms.rmsprop_update(p, g, s, lr=0.01, backend="numpy")
    assert "numba" not in sys.modules, "a non-numba call imported numba"
fastrms.rmsprop_update(p, g, s, lr=0.01, backend="numba")
assert "numba" in sys.modules
assert "fastrms.backends.numba_backend" in sys.modules
print("ok")
"""
    assert run_python(code).stdout.strip() == "ok"


def test_thread_count_set_before_numba_loads_is_applied_when_it_loads():
    require_backend("numba")
    code = """
import sys
import numpy as np
import fastrms
fastrms.set_num_threads(1)
assert "numba" not in sys.modules
fastrms.rmsprop_update(np.ones(8), np.ones(8), np.zeros(8), lr=0.01, backend="numba")
from fastrms.backends import numba_backend
assert numba_backend.describe()["threads"] == 1, numba_backend.describe()
assert fastrms.get_num_threads() == 1
print("ok")
"""
    assert run_python(code).stdout.strip() == "ok"


ENV_SCRIPT = """
import json
import numpy as np
import fastrms
from fastrms import backends
calls = []
for name in fastrms.BACKEND_NAMES:
    if not backends.availability(name)[0] or name == "numba":
        continue  # numba: not needed here, and importing it costs a second
    module = backends.load(name)
    for attribute in ("update_if_ready", "update"):
        original = getattr(module, attribute)
        def wrapper(*a, _o=original, _n=name, **k):
            calls.append(_n)
            return _o(*a, **k)
        setattr(module, attribute, wrapper)

def ran(**kwargs):
    del calls[:]
    try:
        fastrms.rmsprop_update(np.ones(4), np.ones(4), np.zeros(4), lr=0.01, **kwargs)
    except ValueError as exc:
        return "ValueError: " + str(exc)
    return sorted(set(calls))

result = {"requested": fastrms.info()["requested_backend"], "plain": ran()}
result["argument"] = ran(backend="c") if backends.availability("c")[0] else None
fastrms.set_backend("numpy")
result["set_backend"] = ran()
fastrms.set_backend(None)
result["after_set_backend_none"] = ran()
print(json.dumps(result))
"""


def test_environment_variable_chooses_the_backend():
    require_backend("c")
    out = run_python(ENV_SCRIPT, env=clean_env(FASTRMS_BACKEND="numpy"))
    result = json.loads(out.stdout)
    assert result["requested"] == {"name": "numpy", "source": "FASTRMS_BACKEND environment variable"}
    assert result["plain"] == ["numpy"]
    assert result["argument"] == ["c"]
    assert result["set_backend"] == ["numpy"]
    assert result["after_set_backend_none"] == ["numpy"]

    out = run_python(ENV_SCRIPT, env=clean_env(FASTRMS_BACKEND="c"))
    result = json.loads(out.stdout)
    assert result["plain"] == ["c"]
    assert result["set_backend"] == ["numpy"]  # set_backend beats the environment


def test_environment_variable_empty_means_automatic_and_unknown_is_reported():
    require_backend("c")
    result = json.loads(run_python(ENV_SCRIPT, env=clean_env(FASTRMS_BACKEND="")).stdout)
    assert result["requested"] == {"name": None, "source": "automatic"}
    assert result["plain"] == [fastrms.automatic_choice(4)[0]]
    result = json.loads(run_python(ENV_SCRIPT, env=clean_env(FASTRMS_BACKEND="tpu")).stdout)
    assert result["plain"].startswith("ValueError") and "FASTRMS_BACKEND" in result["plain"]
    assert "tpu" in result["plain"]
    assert result["argument"] == ["c"]  # an explicit argument still works
    assert result["set_backend"] == ["numpy"]


# --------------------------------------------------------------------------------------------
# threads


@pytest.mark.parametrize("bad", [0, -1, 1.5, 2.0, True, False, "2", [2]])
def test_set_num_threads_validates(bad, restore_threads):
    with pytest.raises((TypeError, ValueError), match="n must be"):
        fastrms.set_num_threads(bad)
    assert fastrms.get_num_threads() == restore_threads


def test_set_num_threads_reaches_the_loaded_backends(restore_threads):
    for n in (1, 2):
        fastrms.set_num_threads(n)
        assert fastrms.get_num_threads() == n
        if backends.availability("c")[0]:
            from fastrms.backends import c_backend

            assert c_backend.get_num_threads() == n
            assert c_backend.describe()["threads"] == n
        if backends.availability("numba")[0]:
            from fastrms.backends import numba_backend
            import numba

            assert numba_backend.describe()["threads"] == min(n, numba.config.NUMBA_NUM_THREADS)


# --------------------------------------------------------------------------------------------
# the C header and the Python constants


FLAG_NAMES = ("MAXIMIZE", "CENTERED", "EPS_IN_SQRT", "WD_COUPLED", "WD_DECOUPLED", "MOMENTUM",
              "LR_IN_MOMENTUM", "NESTEROV")


@pytest.mark.parametrize("flag", FLAG_NAMES)
def test_python_flags_equal_the_c_header(c_backend, flag):
    assert getattr(_coefficients, flag) == getattr(c_backend.lib, f"FASTRMS_{flag}")


def test_flags_are_distinct_bits():
    values = [getattr(_coefficients, flag) for flag in FLAG_NAMES]
    assert all(v > 0 and v & (v - 1) == 0 for v in values)
    assert len(set(values)) == len(values)


def test_parallel_thresholds_agree(c_backend):
    require_backend("numba")
    from fastrms.backends import numba_backend

    assert c_backend.lib.fastrms_parallel_threshold() == numba_backend.PARALLEL_THRESHOLD == 1 << 16
    assert c_backend.describe()["parallel_threshold"] == numba_backend.PARALLEL_THRESHOLD


def test_backend_names_registry():
    assert fastrms.BACKEND_NAMES == ("c", "numba", "numpy")
    assert backends.availability("numpy") == (True, "loaded") or backends.availability("numpy")[0]
    with pytest.raises(ValueError, match="unknown backend"):
        backends.availability("nope")


def test_use_backend_choice_in_a_copied_context_before_the_cache_is_warm(spy):
    """A task created inside ``use_backend`` inherits its choice (contextvars semantics), and
    requested_backend() reports it; with the automatic module not yet cached, it also runs."""
    with fastrms.use_backend("numpy"):
        context = contextvars.copy_context()
    assert context.run(_dispatch.requested_backend, None) == ("numpy", "use_backend()")
    assert context.run(ran, spy) == "numpy"


def test_use_backend_choice_in_an_asyncio_task_after_the_cache_is_warm(spy):
    automatic = fastrms.automatic_choice(8)[0]
    if automatic == "numpy":
        pytest.skip("automatic choice is numpy here; the two cannot be told apart")

    async def main():
        with fastrms.use_backend("numpy"):
            task = asyncio.create_task(_in_task(spy))
        assert ran(spy) == automatic  # an ordinary call outside the block warms the cache
        return await task

    requested, backend_that_ran = asyncio.run(main())
    assert requested == ("numpy", "use_backend()")
    assert backend_that_ran == "numpy"


async def _in_task(calls):
    return _dispatch.requested_backend(None), ran(calls)


# --------------------------------------------------------------------------------------------
# FASTRMS_SIMD, read when the C backend loads

SIMD_SCRIPT = """
import json
import numpy as np
import fastrms
report = fastrms.info()
p = np.ones(1000, np.float32)
fastrms.rmsprop_update(p, np.full(1000, 0.5, np.float32), np.zeros(1000, np.float32), lr=0.01)
print(json.dumps({"simd_level": report["simd_level"], "c": report["backends"]["c"],
                  "param": float(p[0])}))
"""


def test_simd_environment_variable_caps_the_level(c_backend):
    result = json.loads(run_python(SIMD_SCRIPT, env=clean_env(FASTRMS_SIMD="sse2")).stdout)
    assert result["simd_level"] == "sse2"
    assert result["c"]["simd_level_max"] == c_backend.describe()["simd_level_max"]
    assert result["param"] < 1.0


def test_unknown_simd_environment_variable_is_reported_not_raised(c_backend):
    # The C backend is then unavailable, info() says why, and automatic choice moves on.
    result = json.loads(run_python(SIMD_SCRIPT, env=clean_env(FASTRMS_SIMD="bogus")).stdout)
    assert result["c"]["available"] is False
    assert "FASTRMS_SIMD" in result["c"]["reason"]
    assert result["param"] < 1.0
