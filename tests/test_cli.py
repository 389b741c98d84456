"""The command line as a user meets it: ``fastrms info``, ``fastrms bench``, ``fastrms demo``.

Bad arguments are checked in-process through :func:`fastrms.__main__.main` (argparse exits with
SystemExit), and once end to end in a fresh interpreter (no traceback on stderr).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from fastrms import __main__ as cli
from fastrms.report import bench, demo, registry, timing, workload

from rms_helpers import clean_env, require_backend

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

BAD_BENCH_ARGUMENTS = [
    (["--only", "fastrms-cc"], "unknown implementation 'fastrms-cc'"),
    (["--only", ","], "no implementation given"),
    (["--threads", "0"], "'0' must be at least 1"),
    (["--threads", "-3"], "'-3' must be at least 1"),
    (["--threads", "two"], "'two' is not a whole number"),
    (["--dtypes", "float8"], "unknown dtype 'float8'; choose from float32, float64, bfloat16, float16"),
    (["--variants", "sideways"], "unknown variant 'sideways'"),
    (["--sizes", "1e3,abc"], "'abc' is not a size"),
    (["--sizes", "0"], "'0' is not a whole number of elements"),
    (["--sizes", "1.5"], "'1.5' is not a whole number of elements"),
    (["--sizes", "inf"], "'inf' is not a whole number of elements"),
    (["--budget", "0"], "'0' must be a positive, finite number"),
    (["--budget", "nan"], "'nan' must be a positive, finite number"),
    (["--out", "README.md"], "exists and is not a folder"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
]


def _exit(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    out, err = capsys.readouterr()
    return stopped.value.code, out, err


@pytest.mark.parametrize("argv, message", BAD_BENCH_ARGUMENTS, ids=lambda a: " ".join(a)
                         if isinstance(a, list) else None)
def test_a_bad_bench_argument_is_one_line_and_exit_status_2(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(cli.__file__.rsplit("/fastrms/", 1)[0])  # README.md is a file here
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("timed despite a bad argument"))
    status, out, err = _exit(["bench", *argv], capsys)
    assert status == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastrms") and "error:" in lines[0] and message in lines[0]


@pytest.mark.parametrize("argv, message", [
    (["info", "--size", "0"], "'0' must be at least 1"),
    (["info", "--dtype", "float16"], "invalid choice: 'float16'"),
    (["demo", "--epochs", "0"], "'0' must be at least 1"),
    (["demo", "--lr", "-1"], "'-1' must be a positive, finite number"),
    (["sideways"], "invalid choice: 'sideways'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_other_bad_arguments_are_one_line_too(argv, message, capsys):
    status, out, err = _exit(argv, capsys)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_a_bad_argument_prints_no_traceback_in_a_fresh_process():
    proc = subprocess.run([sys.executable, "-m", "fastrms", "bench", "--only", "fastrms-cc"],
                          capture_output=True, text=True, timeout=120, env=clean_env())
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [[], ["info"], ["bench"], ["demo"]], ids=" ".join)
def test_help_is_plain_text(argv, capsys):
    status, out, _ = _exit([*argv, "--help"], capsys)
    assert status == 0 and out.startswith("usage: fastrms")
    for markup in ("``", ":mod:", ":func:", ":class:", ":data:"):
        assert markup not in out, f"reST markup {markup!r} in --help"


def test_demo_options_have_help_and_defaults(capsys):
    parser = cli.argparse.ArgumentParser()
    demo.add_arguments(parser)
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"--{action.dest} has no help"
        if action.default is not None and action.default is not False:
            assert "default" in action.help, f"--{action.dest} does not show its default"
    _exit(["demo", "--help"], capsys)  # and the defaults are rendered
    status, out, _ = _exit(["demo", "--help"], capsys)
    assert "(default 15)" in out and "(default 0.001)" in out


@pytest.mark.parametrize("module, extra", [("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")])
def test_demo_without_its_extras_names_them(module, extra, monkeypatch, capsys, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == module else real_find_spec(name, *a))
    monkeypatch.setattr(demo, "train", lambda **k: pytest.fail("trained without its extras"))
    status = cli.main(["demo", "--out", str(tmp_path)])
    _, err = capsys.readouterr()
    assert status == 1
    assert err.strip().splitlines() == [
        f"fastrms demo: error: fastrms demo needs {extra}, which is not installed: "
        f'pip install "fastrms[bench]"']


def test_demo_without_out_does_not_need_matplotlib(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name == "matplotlib" else object())
    assert demo.missing_extras(with_figures=False) is None


def test_bench_without_matplotlib_writes_the_json_and_names_the_extra(monkeypatch, tmp_path):
    import fastrms.report

    monkeypatch.setitem(sys.modules, "fastrms.report.plots", None)  # `import` raises ImportError
    monkeypatch.delattr(fastrms.report, "plots", raising=False)  # loaded by an earlier test
    report = timing.run([1000], ["float32"], ["plain"], ["numpy-formula"], min_time=1e-4,
                        budget=0.01, min_repeats=2, max_repeats=2, progress=None)
    written = bench.write_outputs(report, tmp_path)
    assert (tmp_path / "bench.json").exists() and written["png"] is None
    assert 'pip install "fastrms[bench]"' in written["png_skipped"]


def test_info_load_numba_reports_the_threading_layer():
    require_backend("numba")
    proc = subprocess.run([sys.executable, "-m", "fastrms", "info", "--load-numba"],
                          capture_output=True, text=True, timeout=300, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["numba_threading_layer"] in ("omp", "tbb", "workqueue"), info["numba_threading_layer"]
    assert info["backends"]["numba"]["threading_layer"] == info["numba_threading_layer"]


# -- the centered rows stay valid ---------------------------------------------------------------

def test_centered_state_goes_invalid_without_the_guard():
    """The reason for the guard: a fixed gradient drives s - a*a below zero."""
    state = workload.make_state("centered", np.float32, 4096)
    step = registry.get("numpy-inplace").make("centered", state)
    with np.errstate(invalid="ignore"):
        for _ in range(6000):
            step()
    assert not np.isfinite(state["param"]).all()


@pytest.mark.parametrize("name", ["numpy-formula", "numpy-inplace"])
def test_centered_numpy_rows_time_valid_data(name):
    """5000 steps in samples of 100, as the timing loop takes them: no invalid sqrt, and the
    state is restored every 1000 steps."""
    state = workload.make_state("centered", np.float32, 4096)
    guard = workload.StateGuard("centered", state)
    step = registry.get(name).make("centered", state)
    resets = [step.reset] if hasattr(step, "reset") else []
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        for _ in range(50):
            guard.before(100, resets)
            for _ in range(100):
                step()
    assert guard.restores == 4
    assert np.isfinite(state["param"]).all()


def test_the_timing_loop_keeps_to_the_guard():
    """No sample runs past the guard's budget, and every row's own reset runs at a restore."""
    count = {"since_restore": 0, "most": 0}

    def make_step():
        def step():
            count["since_restore"] += 1
            count["most"] = max(count["most"], count["since_restore"])

        step.reset = lambda: count.update(since_restore=0)
        return step

    state = workload.make_state("centered", np.float32, 8)
    guard = workload.StateGuard("centered", state)
    guard.limit = 50
    steps = {"a": make_step(), "b": make_step()}
    result = timing.time_interleaved(steps, min_time=1e-3, budget=0.05, min_repeats=5,
                                     max_repeats=5, guard=guard)
    assert all(r["number"] <= 50 for r in result.values())
    assert guard.restores > 0 and 0 < count["most"] <= 50


def test_a_centered_bench_cell_raises_no_invalid_value():
    with warnings.catch_warnings(), np.errstate(invalid="raise"):
        warnings.simplefilter("error")
        report = timing.run([1000], ["float32"], ["centered"],
                            ["numpy-formula", "numpy-inplace", "fastrms-auto"], min_time=2e-3,
                            budget=0.2, min_repeats=4, max_repeats=6, progress=None)
    rows = report["results"]
    assert [r["name"] for r in rows] == ["numpy-formula", "numpy-inplace", "fastrms-auto"]
    assert all("median_s" in r for r in rows)


# -- the plot -----------------------------------------------------------------------------------

def _synthetic_report() -> dict:
    names = [impl.name for impl in registry.IMPLEMENTATIONS]
    absent = {"torch-forloop": "torch is not installed (ImportError; pip install torch==2.13.0)",
              "optax-jit": "jax is not installed (ImportError; pip install jax)"}
    implementations = [{"name": impl.name, "kind": impl.kind, "description": impl.description,
                        "available": impl.name not in absent,
                        "reason": absent.get(impl.name, "ok")} for impl in registry.IMPLEMENTATIONS]
    results = []
    for n, scale in ((1000, 1.0), (100000, 10.0)):
        for name in names:
            if name in absent:
                continue
            rate = scale * (20.0 if name == "roofline" else 10.0)
            if name == "fastrms-c" and n == 100000:
                rate = scale * 25.0  # faster than the roofline: must be flagged
            results.append({"name": name, "dtype": "float32", "variant": "plain", "n": n,
                            "gb_per_s": rate, "fraction_of_roofline": rate / (scale * 20.0),
                            "others_busy_cores": 0.5 if n == 1000 else 0.0})
    return {"date": "2026-12-01T00:00:00+00:00", "implementations": implementations,
            "results": results, "others_busy_cores": 0.1,
            "settings": {"dtypes": ["float32"], "variants": ["plain"]},
            "machine": {"cpu_model": "test CPU", "cores_usable": 2, "simd_level": "avx2",
                        "threads": {"fastrms": 2}, "automatic_choice": "c"}}


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_the_plot_tells_c_and_auto_apart_names_absent_peers_and_flags_the_roofline(tmp_path):
    from fastrms.report import plots

    report = _synthetic_report()
    plan = plots.plan_bandwidth(report)
    c, auto = plan["lines"]["fastrms-c"], plan["lines"]["fastrms-auto"]
    assert c["style"]["color"] != auto["style"]["color"]
    assert c["style"]["linestyle"] != auto["style"]["linestyle"]
    assert c["style"]["marker"] != auto["style"]["marker"]
    assert auto["label"] == "fastrms-auto (chooses c)"
    assert [name for name, _ in plan["absent"]] == ["torch-forloop", "optax-jit"]
    assert plan["above_roofline"] == [("float32", "plain", 100000, "fastrms-c", 1.25)]
    assert plan["noisy"] == [("float32", "plain", 1000)]
    path = plots.plot_bandwidth(report, tmp_path / "bench.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_every_cell_above_the_roofline_is_flagged():
    from fastrms.report import plots

    report = _synthetic_report()
    rooflines = {impl.name for impl in registry.IMPLEMENTATIONS if impl.kind == "roofline"}
    for row in report["results"]:
        if row["name"] not in rooflines:
            row["fraction_of_roofline"] = 1.01
    flagged = plots.plan_bandwidth(report)["above_roofline"]
    assert len(flagged) == sum(1 for r in report["results"] if r["name"] not in rooflines)
