"""Faults of shared clusters, injected for real on a tiny DDPM training (16 px, a few steps, CPU).

Two runs on one --save_dir, a file-size limit hit while a checkpoint is written (SIGXFSZ / EFBIG),
a full device behind the logger, a truncated or emptied newest checkpoint, an optimizer pickle that
would run code, and kill -9 mid-run. Each checks the exit status, the one line on stderr, no
traceback, and that the last complete checkpoint still loads.
"""

import errno
import os
import pickle
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from guided_diffusion import logger, run_lock
from guided_diffusion.cli import WriteError, atomic_path, atomic_write_text, run_main
from guided_diffusion.train import checkpoints
from test_train import SCRIPT_FLAGS, all_tensors_equal, ddpm_loop, load, run_cli, train_tumor, write_slices

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
RATES = [0.99]


def train_command(data, save_dir, *extra):
    return [sys.executable, str(REPO / "scripts" / "train_tumor_ddfm.py"), "--src_dir", str(data),
            "--save_dir", str(save_dir), *SCRIPT_FLAGS, "--workers", "0", *map(str, extra)]


def flags(data, save_dir, *extra):
    return train_command(data, save_dir, *extra)[2:]


def last_line(err):
    return err.strip().splitlines()[-1].split("\r")[-1] if err.strip() else ""


def assert_one_error_line(err, expected_start):
    """One `error:` line (the last), the expected text, no traceback."""
    assert "Traceback" not in err, err
    assert last_line(err).startswith(expected_start), err
    assert sum(line.split("\r")[-1].startswith("error:") for line in err.splitlines()) == 1, err


def step_file_names(step):
    files = checkpoints.checkpoint_files("", step, RATES)
    return [files["model"], files["opt"], *files["ema"].values(), files["record"]]


def assert_same_checkpoint(a, b, step):
    for name in step_file_names(step)[:-1]:
        assert all_tensors_equal(load(Path(a) / name), load(Path(b) / name)), name


def assert_loads(save_dir, step):
    """The checkpoint of `step` is complete and every file of it reads (weights only)."""
    model = Path(save_dir) / f"model{step:06d}.pt"
    assert checkpoints.checkpoint_problem(str(model), RATES) is None
    for name in step_file_names(step)[:-1]:
        checkpoints.read_checkpoint(str(Path(save_dir) / name), "--test", shared=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run saved at steps 2 and 4 ('base', to copy), and an uninterrupted 6-step run ('straight')."""
    root = tmp_path_factory.mktemp("faults")
    data = write_slices(root / "data")
    train_tumor(flags(data, root / "base", "--max_steps", "4"))
    train_tumor(flags(data, root / "straight", "--max_steps", "6"))
    return {"data": data, "base": root / "base", "straight": root / "straight"}


def copy_of_base(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["base"], run)
    return run


def snapshot(folder):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).iterdir()}


# ---------------------------------------------------------------------------------------------
# One run per folder


def wait_for(condition, proc, what, timeout=180):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, what
        time.sleep(0.05)


def test_a_second_run_on_a_held_folder_stops_at_once_and_the_first_completes(runs, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(train_command(runs["data"], run, "--max_steps", "6"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for(lambda: (run / "progress.csv").is_file(), first, "the first run never started its steps")
        os.kill(first.pid, signal.SIGSTOP)  # keep it holding the folder while the second one starts
        before = snapshot(run)
        second = subprocess.run(train_command(runs["data"], run, "--max_steps", "6", "--resume_checkpoint", "auto"),
                                capture_output=True, text=True, env=ENV, timeout=180)
        assert second.returncode == 2, second.stderr
        assert_one_error_line(second.stderr, f"error: --save_dir {run} is in use by another run: PID {first.pid} "
                                             f"on host {socket.gethostname()}, since ")
        assert f"(lock file {tmp_path / '.run.lock'})" in second.stderr
        assert snapshot(run) == before  # the second run wrote nothing
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    assert_same_checkpoint(run, runs["straight"], 6)
    assert (run / "log.txt").read_text().count("training a DDPM") == 1
    assert not (tmp_path / ".run.lock").exists()  # released and removed


def test_sampling_into_a_held_folder_stops_before_loading(runs, tmp_path, capsys):
    from test_bad_inputs import script_main

    samples = tmp_path / "samples"
    with run_lock.folder_lock(samples, "--save_dir"):
        status, err = run_cli(["--model_path", str(runs["base"] / "model000004.pt"), "--save_dir", str(samples),
                               "--num_samples", "1", "--timestep_respacing", "2"], capsys,
                              main=script_main("image_tumor_sample"))
    assert status == 2
    assert_one_error_line(err, f"error: --save_dir {samples} is in use by another run: PID {os.getpid()} ")
    assert not samples.exists() and not list(tmp_path.iterdir())  # nothing written, lock file gone too


def test_a_lock_without_flock_is_a_file_with_a_stale_rule(tmp_path, monkeypatch):
    """File systems without flock: the lock file's existence is the lock; a dead holder on this host,
    or one on another host that stopped refreshing it, is stale."""
    monkeypatch.setattr(run_lock, "flock_works", lambda directory: False)
    folder = tmp_path / "out"
    lock_file = Path(run_lock.lock_file_of(folder))
    with run_lock.folder_lock(folder, "--out_dir"):
        assert lock_file.is_file()
        in_use = f"--out_dir {folder} is in use by another run: PID {os.getpid()}"
        with pytest.raises(run_lock.FolderInUse, match=in_use):
            with run_lock.folder_lock(folder, "--out_dir"):
                pass
    assert not lock_file.exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file.write_text(f'{{"host": "{socket.gethostname()}", "pid": {dead.pid}, "since": "earlier"}}\n')
    with run_lock.folder_lock(folder):  # its holder is gone: taken over
        assert f'"pid": {os.getpid()}' in lock_file.read_text()

    lock_file.write_text('{"host": "some-other-node", "pid": 1, "since": "earlier"}\n')
    with pytest.raises(run_lock.FolderInUse, match="PID 1 on host some-other-node, since earlier"):
        with run_lock.folder_lock(folder):
            pass
    old = time.time() - run_lock.STALE_AFTER_S - 60
    os.utime(lock_file, (old, old))  # not refreshed for longer than the stale limit
    with run_lock.folder_lock(folder):
        pass
    assert not lock_file.exists()


# ---------------------------------------------------------------------------------------------
# Full disk, file-size limit, I/O errors


def test_a_file_size_limit_during_a_checkpoint_is_one_line_and_the_run_resumes(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["base"], run)
    for name in step_file_names(4):
        (run / name).unlink()  # a run at step 2
    limit = (run / "model000002.pt").stat().st_size // 2  # under a checkpoint file, above the logs

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(train_command(runs["data"], run, "--max_steps", "6", "--resume_checkpoint", "auto"),
                            capture_output=True, text=True, env=ENV, timeout=180, preexec_fn=limited)
    assert result.returncode == 74, result.stderr  # EFBIG reported (SIGXFSZ would kill it with status -25)
    assert_one_error_line(result.stderr, f"error: cannot write {run / 'ema_0.99_000004.pt'}: file too large")
    assert last_line(result.stderr).endswith(f"; the last complete checkpoint is {run / 'model000002.pt'}")
    assert not [n for n in os.listdir(run) if ".tmp" in n or "000004" in n], os.listdir(run)
    assert_loads(run, 2)

    status, err = run_cli(flags(runs["data"], run, "--max_steps", "6", "--resume_checkpoint", "auto"), capsys)
    assert status == 0, err
    assert_same_checkpoint(run, runs["straight"], 6)


BIN = Path(sys.executable).parent
LAUNCHERS = {"torchrun": [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"],
             "mpiexec": [str(BIN / "mpiexec"), "-n", "2", sys.executable]}


@pytest.mark.parametrize("launcher, fault", [("torchrun", "checkpoint"), ("torchrun", "log"), ("mpiexec", "log")])
def test_a_write_failure_on_rank_0_ends_both_ranks_at_once_with_its_line_and_status(tmp_path, launcher, fault):
    """Only rank 0 writes the log and the checkpoints. `checkpoint`: under a file-size limit its first
    checkpoint fails while rank 1 waits at the barrier after the save; `log`: its log is a full device,
    and its first line fails while rank 1 waits in DDP's first collective (which, before, kept mpiexec's
    ranks waiting until gloo's 30-minute timeout). Both ranks end within seconds, each with rank 0's line
    and exit status 74."""
    if not Path(LAUNCHERS[launcher][0]).exists():
        pytest.skip(f"{launcher} is not installed")
    data = write_slices(tmp_path / "data")
    run = tmp_path / "run"
    command = [*LAUNCHERS[launcher], *train_command(data, run, "--max_steps", "4")[1:]]
    limit = 60_000  # above the logs and args.json, below a checkpoint file of this network

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    if fault == "log":
        run.mkdir()
        (run / "log.txt").symlink_to("/dev/full")
        written, cause = run / "log.txt", "no space left on device"
    else:
        written = run / "ema_0.99_000002.pt"
        cause = "file too large (a file-size limit: ulimit -f, or the file system's); no checkpoint was saved yet"
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300,
                            preexec_fn=limited if fault == "checkpoint" else None)
    seconds = time.monotonic() - start
    err = result.stderr
    line = f"error: cannot write {written}: {cause}"
    assert [entry.split("\r")[-1] for entry in err.splitlines()].count(line) == 2, err  # one line per rank
    assert err.count("Traceback") == (launcher == "torchrun"), err  # torchrun's own report, no rank's
    if launcher == "torchrun":  # its report of each rank's exit status (it exits 1 itself)
        assert sorted(int(s) for s in re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", err, re.M)) == [74, 74], err
    else:
        assert result.returncode == 74, err
    assert seconds < 60, seconds  # gloo's timeout is 30 minutes
    assert not run.exists() or not list(run.glob("*.pt"))  # nothing saved


def test_the_shared_writers_name_the_file_and_the_cause(tmp_path):
    # A real full device behind the logger's files.
    (tmp_path / "log.txt").symlink_to("/dev/full")
    logger.configure(str(tmp_path), format_strs=["log"], rank=0)
    with pytest.raises(WriteError, match=f"^cannot write {tmp_path / 'log.txt'}: no space left on device$"):
        logger.log("a line")
    logger.configure(str(tmp_path), format_strs=["csv"], rank=0)
    logger.logkv("step", 1)
    logger.dumpkvs()
    (tmp_path / "progress.csv").unlink()
    (tmp_path / "progress.csv").symlink_to("/dev/full")  # the next row is appended to a full device
    logger.logkv("step", 2)
    with pytest.raises(WriteError, match=f"cannot write {tmp_path / 'progress.csv'}: no space left on device"):
        logger.dumpkvs()
    logger.configure(str(tmp_path / "elsewhere"), format_strs=["csv"], rank=0)

    # Each cause in words, the temporary file removed, the earlier file untouched.
    target = tmp_path / "notes.txt"
    atomic_write_text(target, "before\n")
    for code, words in [(errno.ENOSPC, "no space left on device"), (errno.EDQUOT, "disk quota exceeded"),
                        (errno.EIO, "input/output error"), (errno.EACCES, "permission denied")]:
        with pytest.raises(WriteError, match=f"^cannot write {target}: {words}"):
            with atomic_path(target) as tmp:
                Path(tmp).write_text("half")
                raise OSError(code, os.strerror(code))
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "log.txt", "notes.txt", "progress.csv"]
    assert target.read_text() == "before\n"
    # An input that cannot be read inside the block is not reported as a failed write.
    with pytest.raises(FileNotFoundError):
        with atomic_path(target):
            open(tmp_path / "missing-input.png")


ATOMIC_DIRECTORY_SCRIPT = """
import os, sys
from guided_diffusion.cli import atomic_directory, run_main

def main(out):
    with atomic_directory(out) as tmp:
        with open(os.path.join(tmp, "case1_pred.nii.gz"), "wb") as f:
            f.write(bytes(200_000))

run_main(main, sys.argv[1])
"""


def test_a_file_size_limit_while_writing_an_output_folder(tmp_path):
    out = tmp_path / "seg"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier run's output")

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    result = subprocess.run([sys.executable, "-c", ATOMIC_DIRECTORY_SCRIPT, str(out)], capture_output=True,
                            text=True, env=ENV, timeout=120, preexec_fn=limited)
    assert result.returncode == 74, result.stderr
    assert result.stderr == f"error: cannot write {out}: file too large (a file-size limit: ulimit -f, " \
                            f"or the file system's)\n"
    assert os.listdir(tmp_path) == ["seg"] and os.listdir(out) == ["earlier.txt"]


def test_an_uncaught_os_error_is_one_line(capsys):
    def main():
        raise OSError(errno.EIO, os.strerror(errno.EIO), "/scratch/data/x.png")

    with pytest.raises(SystemExit) as exit_:
        run_main(main)
    assert exit_.value.code == 74
    assert capsys.readouterr().err == "error: /scratch/data/x.png: input/output error (the disk or the network " \
                                      "file system failed)\n"


# ---------------------------------------------------------------------------------------------
# Resume skips what is broken


@pytest.mark.parametrize("broken, damage, with_record", [
    ("model000004.pt", "truncated", True),
    ("opt000004.pt", "emptied", False),  # a run of an earlier version: no completion record
])
def test_a_broken_newest_checkpoint_is_skipped_by_auto_and_refused_by_name(runs, tmp_path, capsys, broken, damage,
                                                                           with_record):
    run = copy_of_base(runs, tmp_path)
    if not with_record:
        for record in run.glob("checkpoint*.json"):
            record.unlink()
    path = run / broken
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2] if damage == "truncated" else b"")
    before = snapshot(run)

    # Given by name: an error, and nothing touched.
    status, err = run_cli(flags(runs["data"], run, "--max_steps", "6", "--resume_checkpoint", run / "model000004.pt"),
                          capsys)
    assert status == 2
    assert_one_error_line(err, f"error: --resume_checkpoint {path}: not a readable PyTorch checkpoint")
    assert snapshot(run) == before

    # auto: skipped with one warning, set aside, resumed from step 2 to the end.
    status, err = run_cli(flags(runs["data"], run, "--max_steps", "6", "--resume_checkpoint", "auto"), capsys)
    assert status == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"skipping the broken checkpoint of step 4 ({path}: not a readable" in warnings[0]
    assert "Traceback" not in err
    aside = [name + ".broken" for name in step_file_names(4)[:-1] + (["checkpoint000004.json"] if with_record else [])]
    assert warnings[0].endswith(f"its files are kept as {', '.join(aside)}")
    assert all((run / name).is_file() for name in aside)
    assert (run / (broken + ".broken")).stat().st_size == before[broken][0]  # kept as it was
    assert f"resuming from {run / 'model000002.pt'} at step 2" in (run / "log.txt").read_text()
    assert_same_checkpoint(run, runs["straight"], 6)
    assert_loads(run, 6)


def test_auto_does_not_start_over_beside_checkpoints_it_cannot_use(tmp_path):
    """A model file without its record, optimizer or EMA files (another --ema_rate?): starting from step 0
    would overwrite that run's checkpoints, so it is an error, and nothing is renamed."""
    torch.save({"w": torch.zeros(2)}, tmp_path / "model000002.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "ema_0.9999_000002.pt")
    (tmp_path / "opt000002.pt").write_bytes((tmp_path / "model000002.pt").read_bytes())
    with pytest.raises(checkpoints.UserError, match="holds model000002.pt but no complete checkpoint .*--ema_rate"):
        checkpoints.resolve_resume_checkpoint("auto", str(tmp_path), [0.99])
    assert sorted(os.listdir(tmp_path)) == ["ema_0.9999_000002.pt", "model000002.pt", "opt000002.pt"]


def test_an_old_optimizer_file_with_numpy_arrays_and_no_record_still_resumes(tmp_path):
    straight = ddpm_loop(tmp_path / "straight", max_steps=4)
    straight.run_loop()
    ddpm_loop(tmp_path / "resumed", max_steps=2).run_loop()
    opt_path = tmp_path / "resumed" / "opt000002.pt"
    state = load(opt_path)
    assert state["sampler"] and all(torch.is_tensor(v) for v in state["sampler"].values())
    state["sampler"] = {k: v.numpy() for k, v in state["sampler"].items()}  # as earlier versions wrote it
    torch.save(state, opt_path)
    (tmp_path / "resumed" / "checkpoint000002.json").unlink()
    resumed = ddpm_loop(tmp_path / "resumed", max_steps=4, resume="auto", init_seed=5)
    assert resumed.step == 2
    resumed.run_loop()
    for key in ("model", "opt"):
        a = checkpoints.checkpoint_files(str(tmp_path / "straight"), 4, [0.9, 0.99])[key]
        b = checkpoints.checkpoint_files(str(tmp_path / "resumed"), 4, [0.9, 0.99])[key]
        assert all_tensors_equal(load(a), load(b)), key


# ---------------------------------------------------------------------------------------------
# Nothing executes from a checkpoint


class Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_an_optimizer_pickle_that_would_run_code_is_refused(runs, tmp_path, capsys, writer):
    run = copy_of_base(runs, tmp_path)
    marker = tmp_path / "marker"
    opt = run / "opt000004.pt"
    crafted = {"optimizer": Payload(marker), "step": 4}
    if writer == "torch.save":
        torch.save(crafted, opt)
    else:
        with open(opt, "wb") as f:
            pickle.dump(crafted, f)
    before = snapshot(run)
    for resume in (str(run / "model000004.pt"), "auto"):
        status, err = run_cli(flags(runs["data"], run, "--max_steps", "6", "--resume_checkpoint", resume), capsys)
        assert status == 2, err
        assert_one_error_line(err, f"error: --resume_checkpoint {opt}: refused, its pickle would call io.open; "
                                   f"a checkpoint is data, not code")
        assert not marker.exists()
        assert snapshot(run) == before  # not set aside either: a file like this is no accident
    assert_loads(run, 2)


# ---------------------------------------------------------------------------------------------
# kill -9


def test_kill_9_mid_run_then_auto_resumes_bit_exactly(runs, tmp_path, capsys):
    run = tmp_path / "run"
    proc = subprocess.Popen(train_command(runs["data"], run, "--max_steps", "1000", "--save_interval", "1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    wait_for(lambda: (run / "checkpoint000003.json").is_file(), proc, "no checkpoint was written")
    os.killpg(proc.pid, signal.SIGKILL)  # a checkpoint may be half written: every save is one now
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / ".run.lock").is_file()  # the file stays; its flock died with the process
    newest = checkpoints.parse_step(checkpoints.latest_complete_checkpoint(str(run), RATES))
    end = newest + 2

    status, err = run_cli(flags(runs["data"], run, "--max_steps", end, "--resume_checkpoint", "auto"), capsys)
    assert status == 0, err
    assert "warning" not in err  # nothing broken: every file is renamed into place whole, the record last
    straight = tmp_path / "straight"
    train_tumor(flags(runs["data"], straight, "--max_steps", end))
    assert_same_checkpoint(run, straight, end)
    assert_loads(run, end)
