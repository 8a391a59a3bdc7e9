"""Segmentation under torchrun and mpiexec (2 CPU processes, gloo): the same maps and metrics as one process."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_image_p_seg import SCRIPT, setup  # noqa: F401  (the module-scoped fixture)

BIN = Path(sys.executable).parent


def segment(launcher, setup, out, batch_size):
    command = [*launcher, SCRIPT, "--src_dir", setup["slices"], "--model_path", setup["model"], "--method", "cg-cdm",
               "--classifier_path", setup["classifier"], "--steps", "3", "--tau", "0.95,0", "--batch_size",
               str(batch_size), "--grid_images", "0", "--out_dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def assert_same_outputs(a, b, exact):
    """Same batches on each process: bit-identical; other batch sizes: equal up to float32 summation order."""
    for variant in ("tau_0.95", "tau_0"):
        first, second = np.load(a / variant / "saliency.npz"), np.load(b / variant / "saliency.npz")
        assert list(first["names"]) == list(second["names"]) and len(first["names"]) == 4
        if exact:
            np.testing.assert_array_equal(first["maps"], second["maps"])
            assert (a / variant / "metrics.csv").read_text() == (b / variant / "metrics.csv").read_text()
        else:
            scale = np.abs(first["maps"]).max()
            np.testing.assert_allclose(first["maps"], second["maps"], rtol=0, atol=1e-4 * scale)


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):  # noqa: F811
    return segment([sys.executable], setup, tmp_path_factory.mktemp("single") / "out", batch_size=2)


@pytest.mark.skipif(shutil.which("torchrun", path=str(BIN)) is None, reason="torchrun is not installed")
def test_torchrun_two_processes_match_one(setup, single, tmp_path):  # noqa: F811
    launcher = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    assert_same_outputs(single, segment(launcher, setup, tmp_path / "torchrun", batch_size=2), exact=True)


@pytest.mark.skipif(not (BIN / "mpiexec").exists(), reason="mpiexec is not installed in the venv")
def test_mpiexec_two_processes_match_one(setup, single, tmp_path):  # noqa: F811
    launcher = [str(BIN / "mpiexec"), "-n", "2", sys.executable]
    assert_same_outputs(single, segment(launcher, setup, tmp_path / "mpiexec", batch_size=1), exact=False)
