"""Training loop: exact resume, atomic checkpoints, NaN guard, EMA, microbatches, lr annealing, scripts."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import logger
from guided_diffusion.cli import UserError
from guided_diffusion.resample import LossSecondMomentResampler
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.train.checkpoints import checkpoint_files, latest_complete_checkpoint
from guided_diffusion.train.loop import NonFiniteLossError, TrainLoop, TrainLoopBase, annealed_lr
from guided_diffusion.train.plots import plot_curves, truncate_progress
from guided_diffusion.train.precision import resolve_amp
from guided_diffusion.train.stream import ShuffledBatches

REPO = Path(__file__).resolve().parents[1]
TINY_UNET = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                 num_heads=2, diffusion_steps=4, noise_schedule="cosine")


def tiny_ddpm(seed, **overrides):
    torch.manual_seed(seed)
    config = {**model_and_diffusion_defaults(), **TINY_UNET, **overrides}
    return create_model_and_diffusion(**config)


def image_dataset(n=10, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [dict(image=torch.rand(1, size, size, generator=g) * 2 - 1, label=torch.tensor(i % 2)) for i in range(n)]


def all_tensors_equal(a, b):
    """Bitwise equality of nested dicts / lists of tensors and plain values."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(all_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(all_tensors_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def ddpm_loop(save_dir, max_steps, resume="", init_seed=0, data=None, **kwargs):
    logger.configure(str(save_dir), format_strs=["log", "csv"])
    model, diffusion = tiny_ddpm(init_seed, dropout=0.1, learn_sigma=True)
    sampler = LossSecondMomentResampler(diffusion, history_per_term=2)
    options = dict(batch_size=4, microbatch=2, lr=1e-3, ema_rate="0.9,0.99", log_interval=1, save_interval=2,
                   max_steps=max_steps, seed=7, progress=False)
    options.update(kwargs)
    return TrainLoop(model=model, diffusion=diffusion, schedule_sampler=sampler,
                     data=data if data is not None else ShuffledBatches(image_dataset(), 4, seed=3),
                     save_dir=str(save_dir), resume_checkpoint=resume, **options)


# ---------------------------------------------------------------------------------------------
# Resume and checkpoints


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    straight = ddpm_loop(tmp_path / "straight", max_steps=8)
    straight.run_loop()
    assert straight.schedule_sampler._warmed_up()  # the sampler's history took part in the run

    first_half = ddpm_loop(tmp_path / "resumed", max_steps=4)
    first_half.run_loop()
    # A different initialisation: everything must come from the checkpoint.
    second_half = ddpm_loop(tmp_path / "resumed", max_steps=8, resume="auto", init_seed=123)
    assert second_half.step == 4
    second_half.run_loop()

    a = checkpoint_files(str(tmp_path / "straight"), 8, [0.9, 0.99])
    b = checkpoint_files(str(tmp_path / "resumed"), 8, [0.9, 0.99])
    assert all_tensors_equal(load(a["model"]), load(b["model"]))
    for rate in (0.9, 0.99):
        assert all_tensors_equal(load(a["ema"][rate]), load(b["ema"][rate]))
    assert all_tensors_equal(load(a["opt"]), load(b["opt"]))
    # The EMA differs from the weights (so the comparison above is not vacuous).
    assert not all_tensors_equal(load(a["model"]), load(a["ema"][0.9]))
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "resumed" / "progress.csv"))]
    assert steps == list(range(1, 9))


@pytest.mark.parametrize("crash_in", ["ema_0.9_", "opt", "model"])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, crash_in):
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        path = getattr(getattr(f, "file", None), "name", f)  # a path, or a file object writing to one
        if f"{crash_in}000004" in os.path.basename(str(path)):
            Path(path).write_bytes(b"half a checkpoint")
            raise OSError("simulated crash: disk full")
        return real_save(obj, f, *args, **kwargs)

    loop = ddpm_loop(tmp_path, max_steps=4)
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated crash"):
        loop.run_loop()
    monkeypatch.setattr(torch, "save", real_save)

    names = set(os.listdir(tmp_path))
    assert "model000004.pt" not in names
    assert not [n for n in names if ".tmp" in n], names  # no temporary leftovers
    assert latest_complete_checkpoint(str(tmp_path), [0.9, 0.99]).endswith("model000002.pt")
    state = load(tmp_path / "model000002.pt")
    model, _ = tiny_ddpm(0, learn_sigma=True)
    model.load_state_dict(state)
    resumed = ddpm_loop(tmp_path, max_steps=4, resume="auto")
    assert resumed.step == 2


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    good = ShuffledBatches(image_dataset(), 4, seed=3)

    def data():
        for step in range(100):
            images, cond = next(good)
            if step == 2:
                images[1, 0, 3, 3] = float("nan")
            yield images, cond

    loop = ddpm_loop(tmp_path, max_steps=10, data=data(), save_interval=2)
    with pytest.raises(NonFiniteLossError) as err:
        loop.run_loop()
    message = str(err.value)
    assert "step 3" in message and "model000002.pt" in message and "\n" not in message
    assert isinstance(err.value, UserError)  # scripts report it in one line, exit status 2
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("model")) == ["model000002.pt"]
    state = load(tmp_path / "model000002.pt")
    assert all(torch.isfinite(v).all() for v in state.values())


def test_latest_complete_checkpoint_skips_incomplete(tmp_path):
    for step in (2, 4, 6):
        files = checkpoint_files(str(tmp_path), step, [0.99])
        for path in [files["model"], files["opt"], *files["ema"].values()]:
            Path(path).write_bytes(b"x")
    os.remove(checkpoint_files(str(tmp_path), 6, [0.99])["opt"])
    os.remove(checkpoint_files(str(tmp_path), 4, [0.99])["ema"][0.99])
    assert latest_complete_checkpoint(str(tmp_path), [0.99]).endswith("model000002.pt")
    assert latest_complete_checkpoint(str(tmp_path), []).endswith("model000004.pt")


def test_truncate_progress_drops_rows_after_the_checkpoint(tmp_path):
    path = tmp_path / "progress.csv"
    path.write_text("loss,step\n1.0,1\n0.9,2\n0.8,3\n")
    truncate_progress(str(path), 2)
    assert path.read_text().split() == ["loss,step", "1.0,1", "0.9,2"]


def test_plot_curves_writes_a_png(tmp_path):
    (tmp_path / "progress.csv").write_text("loss,step,val_acc\n1.0,1,\n0.5,2,0.75\n")
    plot_curves(str(tmp_path / "progress.csv"), str(tmp_path / "curve.png"), ["loss", "val_acc", "absent"])
    assert Image.open(tmp_path / "curve.png").size[0] > 400  # two panels


# ---------------------------------------------------------------------------------------------
# The optimisation itself, on a linear toy problem with a closed-form gradient


class LinearLoop(TrainLoopBase):
    def compute_loss(self, batch, cond):
        pred = self.ddp_model(batch.flatten(1)).squeeze(1)
        return ((pred - cond["y"].float()) ** 2).mean()


def linear_batches(n_steps, batch_size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 1, 2, 3, generator=g), {"y": torch.randint(0, 3, (batch_size,), generator=g)})
            for _ in range(n_steps)]


def linear_loop(tmp_path, batches, **kwargs):
    logger.configure(str(tmp_path), format_strs=["csv"])
    torch.manual_seed(0)
    options = dict(batch_size=4, lr=0.1, log_interval=1, save_interval=1000, progress=False)
    options.update(kwargs)
    return LinearLoop(model=torch.nn.Linear(6, 1), data=iter(batches), save_dir=str(tmp_path), **options)


@pytest.mark.parametrize("microbatch", [1, 3])
def test_microbatches_give_the_full_batch_gradient(tmp_path, microbatch):
    batch, cond = linear_batches(1)[0]
    loop = linear_loop(tmp_path, [], microbatch=microbatch)
    w, b = loop.model.weight.detach().clone(), loop.model.bias.detach().clone()
    loop.run_step(batch, cond)
    x, y = batch.flatten(1), cond["y"].float()
    residual = x @ w[0] + b - y
    expected_w = 2 * (residual[:, None] * x).mean(0)  # d/dw mean((xw + b - y)^2)
    expected_b = 2 * residual.mean()
    torch.testing.assert_close(loop.model.weight.grad[0], expected_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loop.model.bias.grad[0], expected_b, rtol=1e-5, atol=1e-6)


def test_ema_follows_the_closed_form(tmp_path):
    batches = linear_batches(3)
    loop = linear_loop(tmp_path, batches, ema_rate="0.5,0.9")
    history = [loop.model.weight.detach().clone()]
    for batch, cond in batches:
        loop.run_step(batch, cond)
        history.append(loop.model.weight.detach().clone())
    for rate, ema in zip([0.5, 0.9], loop.ema_params):
        expected = history[0]
        for w in history[1:]:
            expected = rate * expected + (1 - rate) * w
        torch.testing.assert_close(ema[0], expected, rtol=1e-6, atol=1e-7)


def test_lr_anneals_linearly_and_ends_the_run(tmp_path):
    loop = linear_loop(tmp_path, linear_batches(10), lr=0.2, lr_anneal_steps=4)
    loop.run_loop()
    assert loop.step == 4
    rows = list(csv.DictReader(open(tmp_path / "progress.csv")))
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.2, 0.15, 0.1, 0.05])
    assert annealed_lr(0.2, 3, 0) == 0.2


def test_max_steps_wins_over_the_anneal_horizon(tmp_path):
    loop = linear_loop(tmp_path, linear_batches(10), lr_anneal_steps=100, max_steps=3)
    loop.run_loop()
    assert loop.step == 3 and os.path.isfile(tmp_path / "model000003.pt")


def test_sigterm_saves_and_stops_after_the_current_step(tmp_path):
    batches = linear_batches(10)

    class Interrupted(LinearLoop):
        def compute_loss(self, batch, cond):
            if self.step == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().compute_loss(batch, cond)

    before = signal.getsignal(signal.SIGTERM)  # restored afterwards, whatever the test runner set
    logger.configure(str(tmp_path), format_strs=["csv"])
    loop = Interrupted(model=torch.nn.Linear(6, 1), data=iter(batches), save_dir=str(tmp_path), batch_size=4,
                       lr=0.1, save_interval=1000, max_steps=10, progress=False)
    loop.run_loop()
    assert loop.step == 2
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("model")) == ["model000002.pt"]
    assert signal.getsignal(signal.SIGTERM) == before


def test_bf16_autocast_runs_on_cpu(tmp_path):
    loop = linear_loop(tmp_path, linear_batches(2), amp="bf16", max_steps=2)
    loop.run_loop()
    assert torch.isfinite(loop.model.weight).all() and loop.model.weight.dtype == torch.float32


def test_amp_choices():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", False, cpu) is None
    assert resolve_amp("bf16", False, cpu) == torch.bfloat16
    with pytest.raises(UserError, match="--amp fp16"):
        resolve_amp("fp16", False, cpu)
    with pytest.raises(UserError, match="--use_fp16"):
        resolve_amp("bf16", True, cpu)
    # --use_fp16 True is float16 autocast with loss scaling: a CUDA GPU, and no second kind of precision.
    with pytest.raises(UserError, match="--use_fp16 True needs a CUDA GPU"):
        resolve_amp("none", True, cpu)
    cuda = torch.device("cuda")
    assert resolve_amp("auto", True, cuda) == torch.float16
    assert resolve_amp("none", True, cuda) == torch.float16
    assert resolve_amp("fp16", True, cuda) == torch.float16


# ---------------------------------------------------------------------------------------------
# The data stream


def test_shuffled_batches_shard_each_epoch_and_seek():
    data = list(range(22))
    ranks = [ShuffledBatches(data, 3, seed=5, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == 3  # 22 // (3*2); the tail of 4 is dropped
    epoch0 = [i for k in range(3) for r in ranks for i in r.indices(k)]
    assert len(set(epoch0)) == 18  # each image at most once per epoch, shards disjoint
    epoch1 = [i for k in range(3, 6) for r in ranks for i in r.indices(k)]
    assert epoch1 != epoch0  # reshuffled
    assert ranks[0].indices(4) == ShuffledBatches(data, 3, seed=5, rank=0, world_size=2).indices(4)

    stream = ShuffledBatches([dict(image=torch.full((1, 2, 2), float(i)), label=i % 2) for i in range(8)], 2, seed=1)
    batches = [next(stream) for _ in range(6)]
    stream.seek(4)
    images, cond = next(stream)
    assert torch.equal(images, batches[4][0]) and torch.equal(cond["y"], batches[4][1]["y"])
    assert torch.equal(cond["y"], images[:, 0, 0, 0].long() % 2)  # labels travel with their images


def test_batch_larger_than_dataset_is_a_user_error():
    with pytest.raises(UserError, match="--batch_size 8"):
        ShuffledBatches(list(range(5)), 8, rank=0, world_size=1)


# ---------------------------------------------------------------------------------------------
# The scripts, end to end on a small generated dataset

SCRIPT_FLAGS = ["--dataset", "demo", "--image_size", "16", "--num_channels", "32", "--num_res_blocks", "1",
                "--channel_mult", "1,2", "--attention_resolutions", "8", "--num_heads", "2",
                "--diffusion_steps", "50", "--batch_size", "4", "--log_interval", "1", "--save_interval", "2",
                "--ema_rate", "0.99", "--amp", "none"]


def write_slices(root, counts=(("training", "normal", 6), ("training", "tumor", 6),
                               ("validation", "normal", 4), ("validation", "tumor", 4)), seed=0):
    """A tiny dataset in the slice layout: brighter blob in tumor images, masks in validation/seg."""
    rng = np.random.default_rng(seed)
    for split, label, n in counts:
        os.makedirs(root / split / label, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(40, 90, size=(16, 16)).astype(np.uint8)
            mask = np.zeros((16, 16), np.uint8)
            if label == "tumor":
                mask[5:9, 6:11] = 255
                pixels[mask > 0] = 220
            Image.fromarray(pixels).save(root / split / label / f"{label}_{i:02d}.png")
            if split == "validation":
                os.makedirs(root / split / "seg", exist_ok=True)
                Image.fromarray(mask).save(root / split / "seg" / f"{label}_{i:02d}.png")
    return root


def train_tumor(argv):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import train_tumor_ddfm
    finally:
        sys.path.pop(0)
    return train_tumor_ddfm.main(argv)


def run_cli(argv, capsys, main=train_tumor):
    """Run a script's main as `run_main` does; return (exit status, stderr)."""
    from guided_diffusion.cli import run_main

    capsys.readouterr()
    try:
        run_main(main, argv)
        status = 0
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().err


def test_ddpm_script_trains_resumes_and_writes_its_configuration(tmp_path):
    from guided_diffusion.checkpoint_util import load_model_and_diffusion

    data = write_slices(tmp_path / "data")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--src_dir", str(data), "--workers", "1", *SCRIPT_FLAGS]
    train_tumor(common + ["--save_dir", str(straight), "--max_steps", "4"])
    train_tumor(common + ["--save_dir", str(resumed), "--max_steps", "2"])
    # Resuming needs no model flags: they come from args.json.
    train_tumor(["--src_dir", str(data), "--save_dir", str(resumed), "--resume_checkpoint", "auto",
                 "--max_steps", "4", "--workers", "1", "--batch_size", "4", "--save_interval", "2",
                 "--ema_rate", "0.99", "--amp", "none", "--log_interval", "1"])

    names = set(os.listdir(straight))
    assert {"args.json", "log.txt", "progress.csv", "loss_curve.png", "model000002.pt", "model000004.pt",
            "opt000004.pt", "ema_0.99_000004.pt"} <= names
    for name in ("model000004.pt", "opt000004.pt", "ema_0.99_000004.pt"):
        assert all_tensors_equal(load(straight / name), load(resumed / name)), name
    config = __import__("json").loads((resumed / "args.json").read_text())
    assert set(model_and_diffusion_defaults()) <= set(config)
    assert config["num_channels"] == 32 and config["diffusion_steps"] == 50 and config["max_steps"] == 4
    model, diffusion, _ = load_model_and_diffusion(str(straight / "model000004.pt"), device="cpu")
    assert diffusion.num_timesteps == 50 and model.image_size == 16
    rows = list(csv.DictReader(open(straight / "progress.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and all(float(r["loss"]) > 0 for r in rows)


def test_ddpm_script_user_errors(tmp_path, capsys):
    data = write_slices(tmp_path / "data")
    one_class = write_slices(tmp_path / "one", counts=(("training", "normal", 6),))
    run = tmp_path / "run"
    train_tumor(["--src_dir", str(data), "--save_dir", str(run), "--max_steps", "1", "--workers", "0", *SCRIPT_FLAGS])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [
        ([], "--src_dir is required"),
        (["--src_dir", str(tmp_path / "missing")], "--src_dir"),
        (["--src_dir", str(one_class)], "training/tumor holds no images"),
        (["--src_dir", str(data), "--save_dir", str(blocker / "sub")], "--save_dir"),
        (["--src_dir", str(data), "--save_dir", str(run)], "--resume_checkpoint auto"),
        (["--src_dir", str(data), "--save_dir", str(run), "--resume_checkpoint", "auto", "--num_channels", "64"],
         "--num_channels 64 disagrees"),
        (["--src_dir", str(data), "--save_dir", str(run), "--resume_checkpoint", str(run / "model000009.pt")],
         "--resume_checkpoint"),
    ]
    for argv, expected in cases:
        save_dir = [] if "--save_dir" in argv else ["--save_dir", str(tmp_path / "fresh")]
        # Flags typed later win, so the case's own flags go last.
        status, err = run_cli(["--max_steps", "1", "--workers", "0", *SCRIPT_FLAGS, *save_dir, *argv], capsys)
        assert status == 2, (argv, err)
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1, (argv, err)


def test_error_exit_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "train_tumor_ddfm.py"),
                             "--src_dir", str(tmp_path / "nowhere"), "--save_dir", str(tmp_path / "run")],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --src_dir {tmp_path / 'nowhere'}: no such directory"


def test_abdominal_script_reads_npy_volumes(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import train_2d_ddfm
    finally:
        sys.path.pop(0)
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    rng = np.random.default_rng(0)
    for v in range(2):
        vol = np.zeros((5, 2, 16, 16), np.float32)
        vol[:, 0] = rng.random((5, 16, 16))
        vol[1:3, 1, 4:8, 4:8] = 2  # organ 2 in slices 1 and 2
        np.save(volumes / f"case{v}.npy", vol)
    flags = [f for f in SCRIPT_FLAGS]
    flags[flags.index("demo")] = "synapse"
    loop = train_2d_ddfm.main(["--src_dir", str(volumes), "--save_dir", str(tmp_path / "run"), "--class_index", "2",
                               "--max_steps", "1", "--workers", "0", *flags])
    assert sorted(loop.data.dataset.labels()) == [0] * 6 + [1] * 4
    assert os.path.isfile(tmp_path / "run" / "model000001.pt")


def test_nan_before_any_checkpoint_says_so(tmp_path):
    batches = linear_batches(3)
    batches[0][0][0, 0, 0, 0] = float("inf")
    loop = linear_loop(tmp_path, batches, max_steps=3)
    with pytest.raises(NonFiniteLossError, match="step 1; stopped without saving it \\(no checkpoint was saved yet\\)"):
        loop.run_loop()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".pt")]
