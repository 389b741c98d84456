"""Calls that mypy must reject: proof that the public API's hints are seen and mean something.
.ci/doc-checks checks that mypy reports an error on exactly the lines marked ``# error``.
Never run (the calls are wrong on purpose)."""
import fastrms
from fastrms import presets

fastrms.set_backend(3)  # error
fastrms.info(size="big")  # error
choice: int = fastrms.automatic_choice(10)  # error
presets.get("torch").defaults()["lr"].upper()  # error
fastrms.BACKEND_NAMES.append("mine")  # error
