from runpy import run_path
from setuptools import setup

setup(cffi_modules=["csrc/build_ffi.py:ffibuilder"],
      cmdclass=run_path("csrc/setup_commands.py")["CMDCLASS"])
