"""The main job's report: ``fastrms.report`` (bench tables, JSON, plot; the demo)."""
from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from fastrms.backends.numpy_reference import reference_step
from fastrms import kernel_coefficients
from fastrms.report import bench, demo, machine, registry

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = dict(sizes=[1000], dtypes=["float32"], variants=["plain", "momentum"], min_time=1e-4,
             budget=0.05, min_repeats=2, max_repeats=3, progress=None)


@pytest.fixture(scope="module")
def quick_report():
    return bench.run(**QUICK)


def _expected_step(variant, state):
    coeffs = kernel_coefficients(state["param"].dtype, registry.LR, registry.ALPHA, registry.EPS,
                                 **registry.VARIANTS[variant])
    return reference_step(coeffs, state["param"], state["grad"], state["square_avg"],
                          state.get("momentum_buffer"), state.get("grad_avg"))


# -- the registry -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("variant", list(registry.VARIANTS))
def test_numpy_inplace_gives_the_reference_bits(variant, dtype):
    state = registry.make_state(variant, dtype, 1000 + 7)
    expected = _expected_step(variant, state)
    registry.numpy_inplace(variant, state, block=64)()  # several blocks and a short last one
    for got, want in zip((state["param"], state["square_avg"], state.get("momentum_buffer"),
                          state.get("grad_avg")), expected):
        if want is not None:
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("variant", list(registry.VARIANTS))
@pytest.mark.parametrize("impl", [i for i in registry.IMPLEMENTATIONS if i.kind != "roofline"
                                  and i.state_format == "float32"], ids=lambda i: i.name)
def test_every_implementation_takes_the_same_step(impl, variant):
    """One step of each row agrees with the reference (peers to a tolerance): no row is timing
    a misconfigured optimizer."""
    available, reason = impl.availability()
    if not available:
        pytest.skip(f"{impl.name} absent: {reason}")
    state = registry.make_state(variant, np.float64, 1000)
    before = state["param"].copy()
    want = _expected_step(variant, state)[0] - before
    if impl.name == "optax-jit":  # it keeps its own arrays: compare through a copy
        pytest.importorskip("jax")
        step = impl.make(variant, state)
        step()
        got = np.asarray(step.current[0]) - before
    else:
        impl.make(variant, state)()
        got = state["param"] - before
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", list(registry.VARIANTS))
@pytest.mark.parametrize("impl", [i for i in registry.IMPLEMENTATIONS if i.kind != "roofline"
                                  and i.state_format != "float32"], ids=lambda i: i.name)
def test_compact_state_rows_take_the_reference_step_on_their_own_state(impl, variant, dtype):
    """A compact row steps the shared parameters with compact copies of the shared state, with
    the bits of the NumPy reference on the same copies, and leaves the shared state alone."""
    import fastrms

    state = registry.make_state(variant, np.dtype(dtype), 1000)
    shared = {k: v.copy() for k, v in state.items()}
    copies = registry._compact_copies(variant, shared, impl.state_format)
    options = dict(registry.VARIANTS[variant])
    if "momentum" in options:
        options["momentum_buffer"] = copies["momentum_buffer"]
    if options.get("centered"):
        options["grad_avg"] = copies["grad_avg"]
    want = shared["param"].copy()
    fastrms.rmsprop_update(want, shared["grad"], copies["square_avg"], lr=registry.LR,
                           alpha=registry.ALPHA, eps=registry.EPS, backend="numpy", **options)
    step = impl.make(variant, state)
    step()
    assert np.array_equal(state["param"].view(np.uint8), want.view(np.uint8))
    for name in ("square_avg", "momentum_buffer", "grad_avg"):
        if name in state:
            np.testing.assert_array_equal(state[name], shared[name])
    step.reset()  # back to the copies it started from: the same step again gives the same bits
    state["param"][...] = shared["param"]
    step()
    assert np.array_equal(state["param"].view(np.uint8), want.view(np.uint8))


def test_compact_rows_count_their_own_bytes_against_their_own_roofline():
    report = bench.run(**dict(QUICK, variants=["plain"],
                              state_formats=("float32", "blockwise8")))
    rows = {r["name"]: r for r in report["results"]}
    assert "fastrms-bf16-state" not in rows and "fastrms-auto" in rows
    ours, roof = rows["fastrms-blockwise8"], rows["roofline-blockwise8"]
    assert ours["state_format"] == "blockwise8" and ours["bytes"] == 12 * 1000 + 2031
    assert ours["bytes"] == registry.bytes_moved("plain", np.float32, 1000, "blockwise8")
    assert roof["fraction_of_roofline"] == 1.0
    assert ours["fraction_of_roofline"] == pytest.approx(roof["median_s"] / ours["median_s"])
    assert rows["fastrms-auto"]["fraction_of_roofline"] == pytest.approx(
        rows["roofline"]["median_s"] / rows["fastrms-auto"]["median_s"])


def test_roofline_leaves_the_shared_state_alone():
    state = registry.make_state("momentum", np.float32, 1000)
    copies = {k: v.copy() for k, v in state.items()}
    registry.get("roofline").make("momentum", state)()
    for key, value in state.items():
        np.testing.assert_array_equal(value, copies[key])


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown implementation 'nope'"):
        registry.get("nope")
    with pytest.raises(ValueError, match="unknown variant"):
        registry.get("fastrms-c").make("sideways", registry.make_state("plain", np.float32, 8))


# -- the bench report ---------------------------------------------------------------------------

def test_quick_report_has_every_row(quick_report):
    names = [impl.name for impl in registry.IMPLEMENTATIONS if impl.state_format == "float32"]
    listed = [impl["name"] for impl in quick_report["implementations"]]
    assert listed == names
    available = [i["name"] for i in quick_report["implementations"] if i["available"]]
    for variant in QUICK["variants"]:
        rows = [r for r in quick_report["results"] if r["variant"] == variant]
        assert [r["name"] for r in rows] == available
        for row in rows:
            assert "error" not in row, row
            assert row["n"] == 1000 and row["dtype"] == "float32"
            assert row["median_s"] > 0 and row["repeats"] >= 2
            assert row["bytes"] == registry.STREAMS[variant] * 4 * 1000
            assert row["gb_per_s"] == pytest.approx(row["bytes"] / row["median_s"] / 1e9)
        by_name = {r["name"]: r for r in rows}
        assert by_name["numpy-formula"]["speedup_vs_numpy_formula"] == pytest.approx(1.0)
        assert by_name["roofline"]["fraction_of_roofline"] == pytest.approx(1.0)
        if "torch-foreach" in by_name:
            assert by_name["torch-foreach"]["speedup_vs_torch_foreach"] == pytest.approx(1.0)


def test_quick_report_table(quick_report):
    table = bench.format_tables(quick_report)
    assert "== float32 plain: 5 streams, 20 bytes per element ==" in table
    assert "== float32 momentum: 7 streams, 28 bytes per element ==" in table
    assert "interleaved" in table  # the method is stated
    for impl in quick_report["implementations"]:
        assert impl["name"] in table
        if not impl["available"]:
            assert f"absent: {impl['name']} ({impl['reason']})" in table


def test_quick_report_json_has_the_machine(quick_report, tmp_path):
    written = bench.write_outputs(quick_report, tmp_path)
    with open(written["json"]) as f:
        saved = json.load(f)
    machine = saved["machine"]
    for key in ("cpu_model", "cores", "simd_level", "threads", "versions", "caches"):
        assert key in machine
    assert machine["threads"]["fastrms"] >= 1
    assert machine["versions"]["numpy"] == np.__version__
    assert saved["method"].startswith("median of interleaved repetitions")
    assert len(saved["results"]) == len(quick_report["results"])
    if HAS_MATPLOTLIB:
        with open(written["png"], "rb") as f:
            assert f.read(8) == PNG_MAGIC


@pytest.mark.parametrize("module", ["numexpr", "jax", "torch"])
def test_absent_peers_are_listed_with_the_reason(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    names = {"numexpr": ["numexpr"], "jax": ["optax-jit"],
             "torch": ["torch-forloop", "torch-foreach", "torch-compile"]}[module]
    report = bench.run(**dict(QUICK, variants=["plain"]), names=["numpy-formula", *names])
    entries = {i["name"]: i for i in report["implementations"]}
    for name in names:
        assert not entries[name]["available"]
        assert f"{module} is not installed" in entries[name]["reason"]
    assert [r["name"] for r in report["results"]] == ["numpy-formula"]
    table = bench.format_tables(report)
    for name in names:
        assert f"absent: {name} ({module} is not installed" in table
    assert report["results"][0]["speedup_vs_torch_foreach"] is None


def test_bench_command_line(tmp_path, capsys):
    status = bench.main(["--sizes", "1e3", "--dtypes", "float64", "--variants", "centered",
                         "--only", "numpy-formula,fastrms-auto,roofline", "--budget", "0.02",
                         "--quiet", "--out", str(tmp_path)])
    assert status == 0
    out = capsys.readouterr().out
    assert "== float64 centered: 7 streams, 56 bytes per element ==" in out
    assert "fastrms-auto" in out and "torch-forloop" not in out
    assert (tmp_path / "bench.json").exists()
    assert (tmp_path / "bench.png").exists() == HAS_MATPLOTLIB


# -- the demo -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_training():
    if not HAS_SKLEARN:
        pytest.skip("scikit-learn is not installed (pip install scikit-learn)")
    return demo.train(epochs=2, subset=500, lr=1e-2, log=None)


def test_demo_learns(tiny_training):
    assert tiny_training["identical_fastrms"] is True  # auto backend == the reference, bit for bit
    for name, record in tiny_training["optimizers"].items():
        loss = record["loss"]
        assert np.mean(loss[-5:]) < 0.5 * np.mean(loss[:5]), name
        assert record["epoch_test_accuracy"][-1] > 0.8, name
        assert record["steps"] == 2 * 16 and record["optimizer_seconds"] > 0
    if "torch" in tiny_training["optimizers"]:
        assert tiny_training["torch_max_abs_diff"] < 1e-4


def test_demo_paths_show_rmsprop_winning():
    paths = demo.optimizer_paths(steps=50)
    distance = {name.split()[0]: float(np.hypot(*points[-1])) for name, points in paths.items()}
    assert set(distance) == {"SGD", "momentum", "RMSprop,"}
    assert distance["RMSprop,"] < 0.1 * min(distance["SGD"], distance["momentum"])
    for points in paths.values():
        assert points.shape == (51, 2)


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_demo_figures(tiny_training, tmp_path):
    written = demo.write_figures(tiny_training, demo.optimizer_paths(steps=20), tmp_path)
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["demo_paths.png", "demo_training.png"]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC


def test_a_size_that_does_not_fit_in_memory_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(machine, "memory_available", lambda: 1000)  # bytes
    report = bench.run(**dict(QUICK, variants=["plain"]), names=["numpy-formula", "fastrms-c"])
    assert [r["name"] for r in report["results"]] == ["numpy-formula", "fastrms-c"]
    for row in report["results"]:
        assert row["error"].startswith("skipped: this size needs about")
    table = bench.format_tables(report)
    assert table.count("skipped: this size needs about") == 2 and "failed" not in table


def test_16_bit_rows_are_fastrms_roofline_and_torch():
    """``--dtypes bfloat16,float16``: 16-bit params and grads with float32 state (14 bytes per
    element, plain), timed for fastrms, the roofline and torch; the NumPy baselines and the
    other peers have no 16-bit row."""
    names = ["numpy-formula", "fastrms-numpy", "fastrms-c", "roofline", "torch-foreach"]
    report = bench.run(**{**QUICK, "dtypes": ["bfloat16", "float16"], "variants": ["plain"],
                          "names": names})
    for dtype in ("bfloat16", "float16"):
        rows = {r["name"]: r for r in report["results"] if r["dtype"] == dtype}
        assert "numpy-formula" not in rows
        for name in names[1:]:
            available = {i["name"]: i["available"] for i in report["implementations"]}[name]
            if available:
                assert "median_s" in rows[name], rows[name]
                assert rows[name]["bytes"] == 14 * 1000
    text = bench.format_tables(report)
    assert "== bfloat16 plain: 5 streams, 14 bytes per element ==" in text
