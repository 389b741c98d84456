"""Installing without a working C compiler, and the reasons fastrms gives for a missing C backend.

The quick half of the install checks: a build whose compiler fails (a fake compiler that prints
an error and exits 1), a package without the extension, and one with a corrupt extension, each
imported in a fresh interpreter from outside the source tree. The long half (the sdist, the
manylinux wheel, a fresh venv) is .ci/package-checks.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import fastrms
from fastrms import _dispatch, backends
from fastrms.backends.numpy_reference import reference_step

from rms_helpers import clean_env, require_backend

ROOT = Path(__file__).resolve().parent.parent
COMPILER_MESSAGE = "fake-cc: error: this compiler is broken"
#: Imports fastrms from PYTHONPATH only: a developer's editable install of another checkout
#: (setuptools' meta-path finder) would otherwise supply the missing extension module.
ISOLATE = textwrap.dedent("""
    import sys
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not getattr(f, "__module__", "").startswith("__editable__")]
""")


def _copy_sources(destination: Path) -> None:
    """The files a build needs, without any built extension."""
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, destination / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "_fastrms_c.c",
                                    "_fastrms_c.build-error.txt")
    shutil.copytree(ROOT / "csrc", destination / "csrc", ignore=ignore)
    shutil.copytree(ROOT / "fastrms", destination / "fastrms", ignore=ignore)


def _fake_compiler(folder: Path) -> Path:
    compiler = folder / "fake-cc"
    compiler.write_text(f"#!/bin/sh\necho '{COMPILER_MESSAGE}' >&2\nexit 1\n")
    compiler.chmod(0o755)
    return compiler


def _build_with_broken_compiler(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, Path]:
    source = tmp_path / "source"
    source.mkdir()
    _copy_sources(source)
    build_env = clean_env(CC=str(_fake_compiler(tmp_path)), **env)
    proc = subprocess.run([sys.executable, "setup.py", "build", "--build-base", str(tmp_path / "b")],
                          cwd=source, env=build_env, capture_output=True, text=True, timeout=300)
    libs = list((tmp_path / "b").glob("lib*"))
    return proc, (libs[0] if libs else tmp_path / "b" / "lib")


def _inspect(package_root: Path, cwd: Path, code: str) -> dict:
    """Run code (which fills the dict ``out``) in a fresh interpreter importing fastrms from
    package_root, outside the source tree; return ``out``."""
    program = ISOLATE + textwrap.dedent("""
        import json, warnings
        import numpy as np
        import fastrms
        out = {"file": fastrms.__file__}
    """) + textwrap.dedent(code) + "\nprint(json.dumps(out))\n"
    env = clean_env(PYTHONPATH=str(package_root))
    proc = subprocess.run([sys.executable, "-c", program], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_failed_compile_warns_and_installs_without_c(tmp_path):
    proc, lib = _build_with_broken_compiler(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "building the C extension fastrms._fastrms_c failed" in proc.stdout + proc.stderr
    assert COMPILER_MESSAGE in proc.stdout + proc.stderr  # the compiler's output still shows
    assert not list(lib.glob("fastrms/_fastrms_c*.so"))
    assert COMPILER_MESSAGE in (lib / "fastrms" / "_fastrms_c.build-error.txt").read_text()

    out = _inspect(lib, tmp_path, """
        info = fastrms.info()
        out["c"] = info["backends"]["c"]
        out["auto"] = info["automatic_choice"]["plain"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                fastrms._dispatch.resolve(None, 8, np.float32, 0)
        out["warnings"] = [(w.category.__name__, str(w.message)) for w in caught]
    """)
    assert out["file"].startswith(str(lib))
    assert out["c"]["available"] is False
    first_line = out["c"]["reason"].splitlines()[0]
    assert first_line.startswith("the C extension fastrms._fastrms_c failed to build")
    assert COMPILER_MESSAGE in first_line
    fallback = "numba" if backends.availability("numba")[0] else "numpy"
    assert out["auto"]["backend"] == fallback
    assert COMPILER_MESSAGE in out["auto"]["why"]
    assert len(out["warnings"]) == 1, out["warnings"]  # once, not once per call
    category, message = out["warnings"][0]
    assert category == "BackendFallbackWarning"
    assert f"automatic choice uses {fallback!r}" in message and COMPILER_MESSAGE in message


def test_fastrms_require_c_makes_a_failed_compile_fatal(tmp_path):
    proc, lib = _build_with_broken_compiler(tmp_path, FASTRMS_REQUIRE_C="1")
    assert proc.returncode != 0
    assert COMPILER_MESSAGE in proc.stdout + proc.stderr
    assert not (lib / "fastrms" / "_fastrms_c.build-error.txt").exists()


def _package_copy(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    shutil.copytree(ROOT / "fastrms", root / "fastrms",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "_fastrms_c.c",
                                                  "_fastrms_c.build-error.txt"))
    return root


def test_a_package_without_the_extension_says_not_built(tmp_path):
    out = _inspect(_package_copy(tmp_path), tmp_path, """
        out["c"] = fastrms.info()["backends"]["c"]
    """)
    assert out["c"]["available"] is False
    assert "fastrms._fastrms_c is not built" in out["c"]["reason"]


def test_a_corrupt_extension_is_reported_as_a_load_error(tmp_path):
    root = _package_copy(tmp_path)
    corrupt = root / "fastrms" / "_fastrms_c.abi3.so"
    corrupt.write_bytes(b"this is not an ELF file" * 100)
    out = _inspect(root, tmp_path, """
        out["c"] = fastrms.info()["backends"]["c"]
        try:
            fastrms.rmsprop_update(np.ones(4), np.ones(4), np.zeros(4), lr=0.1, backend="c")
        except fastrms.BackendUnavailableError as exc:
            out["error"] = str(exc)
    """)
    reason = out["c"]["reason"]
    assert out["c"]["available"] is False
    assert reason.startswith(f"the C extension {corrupt} failed to load: ImportError")
    assert "not built" not in reason
    assert "failed to load" in out["error"] and "requested by backend argument" in out["error"]


@pytest.fixture
def c_unavailable(monkeypatch):
    """This process, as if the C extension had failed to build (the registry's record of it)."""
    monkeypatch.setattr(backends, "_loaded", {k: v for k, v in backends._loaded.items() if k != "c"})
    monkeypatch.setitem(backends._load_errors, "c", f"the C extension failed: {COMPILER_MESSAGE}")
    monkeypatch.setattr(_dispatch, "auto_module", None)
    monkeypatch.setattr(_dispatch, "_fallback_warned", False)
    monkeypatch.setattr(_dispatch, "_global_choice", None)
    monkeypatch.setattr(_dispatch, "_env_choice", None)
    yield
    _dispatch.auto_module = None  # resolved again, with C, by the next automatic call


def test_the_first_automatic_fallback_warns_once_naming_the_cause(c_unavailable):
    require_backend("numba")
    rng = np.random.default_rng(0)
    param, grad = rng.standard_normal(64), rng.standard_normal(64)
    square_avg = np.zeros(64)
    expected = reference_step(fastrms.kernel_coefficients(np.float64, 0.01), param, grad,
                              square_avg, None, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastrms.rmsprop_update(param, grad, square_avg, lr=0.01)
        fastrms.rmsprop_update(param.copy(), grad, square_avg.copy(), lr=0.01)
    fallbacks = [w for w in caught if issubclass(w.category, fastrms.BackendFallbackWarning)]
    assert len(fallbacks) == 1
    message = str(fallbacks[0].message)
    assert "automatic choice uses 'numba'" in message and COMPILER_MESSAGE in message
    assert fallbacks[0].filename == __file__  # points at the caller's line
    assert _dispatch.auto_module is backends.load("numba")
    np.testing.assert_array_equal(param, expected[0])


def test_an_explicit_backend_choice_does_not_warn(c_unavailable):
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastrms.BackendFallbackWarning)
        fastrms.rmsprop_update(np.ones(4), np.ones(4), np.zeros(4), lr=0.1, backend="numpy")
        with fastrms.use_backend("numpy"):
            fastrms.rmsprop_update(np.ones(4), np.ones(4), np.zeros(4), lr=0.1)


def test_the_source_tree_reports_its_own_extension():
    """Inside this checkout the C backend is this tree's build (or, unbuilt, says so)."""
    available, reason = backends.availability("c")
    if available:
        from fastrms import _fastrms_c

        assert Path(_fastrms_c.__file__).parent == Path(fastrms.__file__).parent
    else:
        assert "not built" in reason or "failed" in reason, reason
