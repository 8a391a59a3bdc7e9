"""A training run signalled as `timeout`, SLURM, Kubernetes or Ctrl-C do it stops cleanly and resumes exactly.

The signal goes to the whole process group (main process and its two data-loader workers). The run
must finish its step, write a complete checkpoint of it, print one line without a traceback and exit
with 128 + the signal number; `--resume_checkpoint auto` must then end bit for bit where a run that
was never stopped ends. Sampling stopped by SIGTERM must leave no output behind.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from test_classifier_train import CLASSIFIER_FLAGS
from test_train import SCRIPT_FLAGS, all_tensors_equal, write_slices

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def script(name, *argv):
    return [sys.executable, str(REPO / "scripts" / name), *map(str, argv)]


def run(command):
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def signalled(command, signum, ready):
    """Start `command` in its own process group, signal the group once `ready()`; (status, stderr)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    deadline = time.time() + 240
    while not ready():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "the run never became ready"
        time.sleep(0.1)
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=240)
    for _ in range(100):  # the data-loader workers are gone with the main process
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("processes of the stopped run are still alive")
    return proc.returncode, err


def logged_steps(save_dir):
    path = save_dir / "progress.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.is_file() else 0


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def check_stop(status, err, signum, save_dir, ema_rates):
    """Exit status, the one line, and a complete checkpoint of the step it reports; returns that step."""
    assert status == 128 + signum, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1].split("\r")[-1]
    name = signal.Signals(signum).name
    assert last.startswith(f"stopped by {name} at step "), err
    step = int(last.split(" at step ")[1].split(":")[0])
    assert step >= 1
    files = [f"model{step:06d}.pt", f"opt{step:06d}.pt"] + [f"ema_{r}_{step:06d}.pt" for r in ema_rates]
    assert f"saved {save_dir / files[0]}; continue with --resume_checkpoint auto" in last
    for name in files:
        load(save_dir / name)  # complete and readable
    assert not [n for n in os.listdir(save_dir) if ".tmp" in n]
    return step


def assert_same_checkpoints(a, b, step, ema_rates):
    for name in [f"model{step:06d}.pt", f"opt{step:06d}.pt"] + [f"ema_{r}_{step:06d}.pt" for r in ema_rates]:
        assert all_tensors_equal(load(a / name), load(b / name)), name


def test_sigterm_to_the_process_group_saves_and_resumes_exactly(tmp_path):
    data = write_slices(tmp_path / "data")
    flags = ["--src_dir", data, *SCRIPT_FLAGS, "--save_interval", "1000", "--workers", "2"]
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"

    status, err = signalled(script("train_tumor_ddfm.py", *flags, "--save_dir", stopped, "--max_steps", "1000"),
                            signal.SIGTERM, lambda: logged_steps(stopped) >= 1)
    step = check_stop(status, err, signal.SIGTERM, stopped, ["0.99"])

    end = step + 2
    run(script("train_tumor_ddfm.py", *flags, "--save_dir", stopped, "--max_steps", end, "--resume_checkpoint", "auto"))
    run(script("train_tumor_ddfm.py", *flags, "--save_dir", straight, "--max_steps", end, "--workers", "0"))
    assert_same_checkpoints(stopped, straight, end, ["0.99"])
    steps = [int(line.split(",")[0]) for line in (stopped / "progress.csv").read_text().splitlines()[1:]
             if line.split(",")[0].isdigit()]
    assert not steps or steps == sorted(set(steps))  # no step logged twice

    # Sampling stopped by SIGTERM: exit 143, one line, and no samples folder left behind.
    samples = tmp_path / "samples"
    status, err = signalled(script("image_tumor_sample.py", "--model_path", straight / f"model{end:06d}.pt",
                                   "--save_dir", samples, "--num_samples", "100000", "--batch_size", "2"),
                            signal.SIGTERM, lambda: (samples / "log.txt").is_file())
    assert status == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].split("\r")[-1] == "stopped by SIGTERM before finishing"
    assert not samples.exists()


def test_ctrl_c_stops_classifier_training_cleanly_and_resumes_exactly(tmp_path):
    data = write_slices(tmp_path / "data")
    flags = ["--src_dir", data, "--dataset", "demo", "--image_size", "16", "--diffusion_steps", "50",
             *CLASSIFIER_FLAGS, "--save_interval", "1000", "--eval_interval", "2", "--ema_rate", "0.99",
             "--workers", "2"]
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"

    status, err = signalled(script("classifier_tumor_train.py", *flags, "--save_dir", stopped, "--iterations", "1000"),
                            signal.SIGINT, lambda: logged_steps(stopped) >= 1)
    step = check_stop(status, err, signal.SIGINT, stopped, ["0.99"])

    end = step + 2
    run(script("classifier_tumor_train.py", *flags, "--save_dir", stopped, "--iterations", end,
               "--resume_checkpoint", "auto"))
    run(script("classifier_tumor_train.py", *flags, "--save_dir", straight, "--iterations", end, "--workers", "0"))
    assert_same_checkpoints(stopped, straight, end, ["0.99"])


def test_sigterm_to_the_main_process_alone(tmp_path, capsys, monkeypatch):
    from guided_diffusion.train.loop import TrainLoop
    from test_train import run_cli

    data = write_slices(tmp_path / "data")
    compute_loss = TrainLoop.compute_loss

    def signalled_at_step_1(self, batch, cond):
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return compute_loss(self, batch, cond)

    monkeypatch.setattr(TrainLoop, "compute_loss", signalled_at_step_1)
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)  # restored afterwards, whatever the test runner set
    status, err = run_cli(["--src_dir", str(data), *SCRIPT_FLAGS, "--save_interval", "1000", "--workers", "0",
                           "--max_steps", "50", "--save_dir", str(run)], capsys)
    assert check_stop(status, err, signal.SIGTERM, run, ["0.99"]) == 2
    assert signal.getsignal(signal.SIGTERM) == before
