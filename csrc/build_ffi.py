"""cffi build script (out-of-line API mode) for fastrms's C backend.

Every compiler flag lives here. Knobs, each an environment variable read at build time:

- ``FASTRMS_OPENMP=0`` builds without OpenMP (single-threaded C backend).
- ``FASTRMS_CFLAGS`` appends extra compiler flags (for example a sanitizer build).

The flags are not negotiable for correctness: ``-ffp-contract=off`` keeps GCC from fusing
``a * b + c`` into an FMA (which would break bit-identity with the NumPy reference), and
``-fno-math-errno`` lets GCC vectorise ``sqrt`` (about 4x faster; results are unchanged).
No ``-march=native``: SIMD levels are chosen at run time inside rmsprop.c.
"""
import os
import shlex

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
use_openmp = os.environ.get("FASTRMS_OPENMP", "1") != "0"
extra_cflags = shlex.split(os.environ.get("FASTRMS_CFLAGS", ""))

compile_args = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-std=c11", "-Wall", "-Wextra"]
link_args = []
if use_openmp:
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
compile_args += extra_cflags
link_args += extra_cflags

with open(os.path.join(HERE, "fastrms.h")) as header:
    ffibuilder = FFI()
    ffibuilder.cdef(header.read())

# Paths relative to the project root, where setup.py runs; setuptools wants relative sources.
ffibuilder.set_source(
    "fastrms._fastrms_c",
    '#include "fastrms.h"',
    sources=["csrc/rmsprop.c"],
    include_dirs=["csrc"],
    depends=["csrc/fastrms.h", "csrc/rmsprop_kernel.h", "csrc/codecs16.h", "csrc/rmsprop16.h",
             "csrc/compact_state.h", "csrc/compact_fused.h"],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    libraries=["m"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
