"""The C kernels under memory checkers.

tests/c/kernel_harness.c calls every entry point directly with exact-size buffers (every flag
set, both dtypes, lengths ending mid-vector, n = 0, offset and misaligned pointers, overlap, the
multi-tensor entry point, the roofline, 1 and 2 threads, every SIMD level the CPU has). It runs
twice:

- built with AddressSanitizer and UndefinedBehaviorSanitizer. GCC does not vectorise
  instrumented loops, so this run covers the scalar code paths;
- built exactly as shipped (-O3, vectorised) under valgrind's memcheck, which covers the SIMD
  loops and their remainders. Valgrind's CPU has no AVX-512, so the kernel's run-time dispatch
  exercises the SSE2 and AVX2 versions there.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
HARNESS = ROOT / "tests" / "c" / "kernel_harness.c"
SHIPPED_FLAGS = ["-std=c11", "-O3", "-g", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


def _build(binary: Path, extra_flags: list[str]) -> None:
    command = ["gcc", *SHIPPED_FLAGS, *extra_flags, f"-I{CSRC}", str(CSRC / "rmsprop.c"),
               str(HARNESS), "-o", str(binary), "-lm"]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)


def _assert_clean(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failures" in result.stdout, result.stdout


@needs_gcc
def test_kernels_are_clean_under_address_and_undefined_sanitizers(tmp_path):
    binary = tmp_path / "kernel_harness_asan"
    _build(binary, ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    "-fno-omit-frame-pointer"])
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1", UBSAN_OPTIONS="print_stacktrace=1")
    _assert_clean(subprocess.run([str(binary)], capture_output=True, text=True, timeout=600, env=env))


@needs_gcc
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_vectorised_kernels_are_clean_under_valgrind(tmp_path):
    binary = tmp_path / "kernel_harness"
    _build(binary, [])
    result = subprocess.run(["valgrind", "-q", "--error-exitcode=99", str(binary)],
                            capture_output=True, text=True, timeout=900)
    _assert_clean(result)
