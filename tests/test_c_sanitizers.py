"""The C kernels under AddressSanitizer and UndefinedBehaviorSanitizer.

tests/c/kernel_harness.c calls every entry point directly with exact-size buffers; this test
builds it with the kernel sources and the shipping floating-point flags plus the sanitizers, and
runs it. Any out-of-bounds access, misaligned access or undefined behaviour fails the run.
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


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_kernels_are_clean_under_address_and_undefined_sanitizers(tmp_path):
    binary = tmp_path / "kernel_harness"
    # -O3 as shipped, so the vectorised loops and their remainders are the code under test.
    build = ["gcc", "-std=c11", "-O3", "-g", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
             "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
             f"-I{CSRC}", str(CSRC / "rmsprop.c"), str(HARNESS), "-o", str(binary), "-lm"]
    subprocess.run(build, check=True, capture_output=True, text=True, timeout=600)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1")
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failures" in result.stdout
