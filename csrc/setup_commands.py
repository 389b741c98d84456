"""The two setuptools commands fastrms changes: an optional C extension, and the wheel's tag.

``setup.py`` loads this file (``runpy``, since the project root is not on ``sys.path`` under a
PEP 517 build) and passes :data:`CMDCLASS`; cffi then wraps this ``build_ext`` with its own
step that writes the extension's C source (``csrc/build_ffi.py``).

- ``build_ext``: the C extension is optional. A failed compile prints the compiler's output and
  a warning, and the install goes on without it: fastrms then runs on Numba or NumPy, and
  :func:`fastrms.info` reports the compiler's error, which is kept beside the package as
  ``fastrms/_fastrms_c.build-error.txt``. ``FASTRMS_REQUIRE_C=1`` makes a failed compile fatal
  (for CI and for wheels that must carry the kernel). It also leaves out the interpreter's
  ``-Wl,-rpath`` that Python's own link command carries: the extension uses the stable ABI and
  needs no libpython, and a build machine's path has no place in a wheel.
- ``bdist_wheel``: the extension is built against the stable ABI (cffi's ``.abi3.so``), so the
  wheel is tagged ``cp310-abi3-<platform>`` (the oldest Python in ``requires-python``) instead of
  the building interpreter's ``cp311-cp311``.

See docs/install.md for the whole wheel recipe (``auditwheel repair --strip``).
"""
import os
import sys
import tempfile

from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1: the wheel package provides it
    from wheel.bdist_wheel import bdist_wheel

#: Written beside the extension when its build failed, and read by fastrms.backends.
BUILD_ERROR_FILE = "_fastrms_c.build-error.txt"
REQUIRE_C = "FASTRMS_REQUIRE_C"
#: The oldest CPython the stable-ABI extension (and requires-python) supports.
LIMITED_API_TAG = "cp310"
#: How much of the compiler's output the recorded reason keeps (its end holds the error).
KEPT_LINES = 40


def _required() -> bool:
    return os.environ.get(REQUIRE_C, "0") not in ("", "0")


class OptionalBuildExt(build_ext):
    """build_ext whose extensions may fail to build, unless FASTRMS_REQUIRE_C=1."""

    def build_extensions(self):
        # Python's LDSHARED may carry -Wl,-rpath,<its own lib dir> (pyenv, conda): drop it.
        self.compiler.linker_so = [arg for arg in self.compiler.linker_so
                                   if not arg.startswith(("-Wl,-rpath", "-Wl,--enable-new-dtags"))]
        super().build_extensions()

    def build_extension(self, ext):
        output, failure = self._captured(super().build_extension, ext)
        record_dirs = self._record_dirs(ext)
        if failure is None:
            for folder in record_dirs:
                stale = os.path.join(folder, BUILD_ERROR_FILE)
                if os.path.exists(stale):
                    os.remove(stale)
            return
        if _required():
            raise failure
        lines = output.strip().splitlines()
        first_error = next((line.strip() for line in lines if "error:" in line), "")
        reason = (f"the C extension {ext.name} failed to build when fastrms was installed: "
                  f"{first_error or failure}\n{type(failure).__name__}: {failure}\n"
                  + "\n".join(lines[-KEPT_LINES:]) + "\n")
        for folder in record_dirs:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, BUILD_ERROR_FILE), "w") as f:
                f.write(reason)
        message = (f"fastrms: building the C extension {ext.name} failed ("
                   f"{first_error or type(failure).__name__}); installing "
                   f"without it. fastrms will run on Numba or NumPy, and fastrms.info() gives "
                   f"the compiler's error. Set {REQUIRE_C}=1 to make this fatal.")
        self.warn(message)

    def _record_dirs(self, ext) -> list:
        """Where the extension goes: the build folder and, for in-place and editable builds,
        the source package that will be imported."""
        folders = [os.path.dirname(self.get_ext_fullpath(ext.name))]
        if getattr(self, "editable_mode", False) and not self.inplace:
            package = ".".join(ext.name.split(".")[:-1])
            build_py = self.get_finalized_command("build_py")
            folders.append(os.path.abspath(build_py.get_package_dir(package)))
        return folders

    @staticmethod
    def _captured(function, *args):
        """Run function with this process's stdout and stderr (the compiler's too) going to a
        file; echo what was written, and return it with the build error, if any."""
        failure = None
        with tempfile.TemporaryFile(mode="w+b") as log:
            sys.stdout.flush()
            sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                function(*args)
            except (CCompilerError, CompileError, ExecError, LinkError, PlatformError) as exc:
                failure = exc
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
            log.seek(0)
            output = log.read().decode("utf-8", "replace")
        sys.stderr.write(output)
        sys.stderr.flush()
        return output, failure


class AbiThreeWheel(bdist_wheel):
    """bdist_wheel tagged for the stable ABI that the cffi extension is built against."""

    def finalize_options(self):
        if not self.py_limited_api:
            self.py_limited_api = LIMITED_API_TAG
        super().finalize_options()


CMDCLASS = {"build_ext": OptionalBuildExt, "bdist_wheel": AbiThreeWheel}
