"""Data-parallel training under the venv's `mpiexec -n 2` (and torchrun): ranks agree, rank 0 writes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import SCRIPT_FLAGS, write_slices

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_two_processes(launcher, tmp_path):
    data = write_slices(tmp_path / "data")
    save_dir, dump = tmp_path / "run", tmp_path / "dump"
    command = launcher + [str(REPO / "scripts" / "train_tumor_ddfm.py"), "--src_dir", str(data),
                          "--save_dir", str(save_dir), *SCRIPT_FLAGS, "--max_steps", "3", "--save_interval", "3",
                          "--workers", "0", "--dump_final_params", str(dump)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return save_dir, dump


def check_ranks_agree_and_only_rank0_writes(save_dir, dump):
    rank0 = torch.load(dump / "params-rank0.pt")
    rank1 = torch.load(dump / "params-rank1.pt")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = torch.load(save_dir / "model000003.pt")
    assert all(torch.equal(saved[k], rank0[k]) for k in saved)
    assert saved["out.2.weight"].abs().sum() > 0  # the zero-initialised output layer has been trained
    # Checkpoints, args.json, progress.csv and the curve come from rank 0 only; rank 1 keeps just its text log.
    assert sorted(os.listdir(save_dir)) == sorted([
        "args.json", "checkpoint000003.json", "ema_0.99_000003.pt", "log-rank001.txt", "log.txt", "loss_curve.png",
        "model000003.pt", "opt000003.pt", "progress.csv",
    ])
    rows = (save_dir / "progress.csv").read_text().splitlines()
    assert len(rows) == 4  # header + one row per step: a single writer
    header = rows[0].split(",")
    assert rows[-1].split(",")[header.index("samples")] == "24"  # 3 steps x 4 images x 2 processes


@pytest.mark.skipif(not (BIN / "mpiexec").exists(), reason="mpiexec is not installed in the venv")
def test_mpiexec_two_processes(tmp_path):
    launcher = [str(BIN / "mpiexec"), "-n", "2", sys.executable]
    check_ranks_agree_and_only_rank0_writes(*run_two_processes(launcher, tmp_path))


@pytest.mark.skipif(shutil.which("torchrun", path=str(BIN)) is None, reason="torchrun is not installed")
def test_torchrun_two_processes(tmp_path):
    launcher = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    check_ranks_agree_and_only_rank0_writes(*run_two_processes(launcher, tmp_path))
