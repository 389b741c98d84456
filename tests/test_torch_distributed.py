"""``fastrms.torch.RMSprop`` under torch.distributed: as ZeroRedundancyOptimizer's optimizer class,
and on the DTensor parameters of FSDP2's ``fully_shard``; two gloo processes on 127.0.0.1, each
launch under a hard time limit, against the same run with ``torch.optim.RMSprop``."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORKER = Path(__file__).with_name("torch_distributed_worker.py")
FSDP_WORKER = Path(__file__).with_name("torch_fsdp_worker.py")
TIME_LIMIT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(name: str | None, out: Path, worker: Path = WORKER) -> dict:
    arguments = [str(free_port()), str(out)] if name is None else [name, str(free_port()), str(out)]
    process = subprocess.Popen([sys.executable, str(worker), *arguments],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        output, _ = process.communicate(timeout=TIME_LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # every rank, not only the launcher
        process.communicate()
        pytest.fail(f"{name}: the two ranks did not finish within {TIME_LIMIT} s")
    assert process.returncode == 0, output.decode()[-3000:]
    return torch.load(out, weights_only=True)


def test_zero_redundancy_optimizer_runs_the_drop_in_like_torch(tmp_path):
    ours = launch("fastrms", tmp_path / "fastrms.pt")
    theirs = launch("torch", tmp_path / "torch.pt")
    assert ours["kernel"] is True
    assert ours["steps"] == theirs["steps"] == [6.0] * 4
    for a, b in zip(ours["params"], theirs["params"]):
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def test_fsdp2_dtensor_shards_run_on_the_kernel_like_torch(tmp_path):
    runs = launch(None, tmp_path / "fsdp.pt", FSDP_WORKER)
    ours, reference, theirs = runs["fastrms"], runs["reference"], runs["torch"]
    assert ours["kernel"] is True and reference["kernel"] is True
    assert ours["layouts_match"] and theirs["layouts_match"]
    assert ours["steps"] == theirs["steps"] == [6.0] * 4
    for a, r, b in zip(ours["params"], reference["params"], theirs["params"]):
        assert torch.equal(a, r)  # each rank's shard update has the reference's bits
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())
