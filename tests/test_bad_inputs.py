"""Every input a user can get wrong is one line `error: ...` naming the flag or path, exit status 2,
no traceback, and nothing left behind (a new --save_dir is not even created)."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_classifier_train import CLASSIFIER_FLAGS, classifier_script
from test_train import SCRIPT_FLAGS, run_cli, train_tumor, write_slices

REPO = Path(__file__).resolve().parents[1]


def script_main(name):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        module = __import__(name)
    finally:
        sys.path.pop(0)
    return module.main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_slices(tmp_path_factory.mktemp("bad_inputs") / "data")


def assert_one_line_error(status, err, *expected):
    assert status == 2, err
    # A progress bar that was running is erased (carriage returns) before the error line.
    assert err.split("\r")[-1].startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


def ddpm_error(tmp_path, capsys, argv, main=train_tumor, base=None):
    """Run a DDPM training command line that must fail; the fresh --save_dir must not exist afterwards."""
    save_dir = tmp_path / "run"
    base = ["--max_steps", "1", "--workers", "0", *SCRIPT_FLAGS] if base is None else base
    status, err = run_cli([*base, "--save_dir", str(save_dir), *argv], capsys, main=main)
    assert not save_dir.exists(), sorted(os.listdir(save_dir))
    return status, err


# ---------------------------------------------------------------------------------------------
# The cases of the reliability report


def test_corrupt_png_read_by_a_data_loader_worker(tmp_path, capsys):
    data = write_slices(tmp_path / "data")
    broken = data / "training" / "tumor" / "tumor_03.png"
    broken.write_text("not a png")
    # 12 images in batches of 4: the broken one is read within the first 3 steps, before any checkpoint.
    status, err = ddpm_error(tmp_path, capsys, ["--src_dir", str(data), "--workers", "2", "--max_steps", "3",
                                                "--save_interval", "1000"])
    assert_one_line_error(status, err, f"error: {broken}: cannot read image")
    assert "worker" not in err


def test_nan_in_an_npy_image(tmp_path, capsys):
    data = write_slices(tmp_path / "data")
    image = np.full((16, 16), 0.5, np.float32)
    image[3, 3] = np.nan
    np.save(data / "training" / "normal" / "nan.npy", image)
    (data / "training" / "normal" / "normal_00.png").unlink()  # still 12 images, 3 batches
    status, err = ddpm_error(tmp_path, capsys, ["--src_dir", str(data), "--max_steps", "3", "--save_interval", "1000"])
    assert_one_line_error(status, err, f"{data / 'training' / 'normal' / 'nan.npy'}: holds NaN or infinite")


@pytest.mark.parametrize("argv, expected", [
    (["--num_channels", "16"], "--num_channels 16: the level widths"),
    (["--num_channels", "48"], "must be multiples of 32"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--batch_size", "-2"], "--batch_size -2: must be at least 1"),
])
def test_width_and_batch_size(tmp_path, capsys, data, argv, expected):
    status, err = ddpm_error(tmp_path, capsys, ["--src_dir", str(data), *argv])
    assert_one_line_error(status, err, expected)


def test_class_index_that_is_no_number(tmp_path, capsys, data):
    flags = [f if f != "demo" else "synapse" for f in SCRIPT_FLAGS]
    status, err = ddpm_error(tmp_path, capsys, ["--src_dir", str(data), "--class_index", "kidney"],
                             main=script_main("train_2d_ddfm"), base=["--max_steps", "1", "--workers", "0", *flags])
    assert_one_line_error(status, err, "--class_index 'kidney': expected integers")


@pytest.mark.parametrize("argv, expected", [
    # the report's case: a width of 32 with the default 64 channels per head
    (["--classifier_num_head_channels", "64", "--classifier_width", "32", "--classifier_channel_mult", "1,1"],
     "--classifier_num_head_channels 64 does not divide the 32 channels"),
    (["--classifier_width", "48"], "--classifier_width 48: the level widths"),
    (["--classifier_num_head_channels", "0"], "--classifier_num_head_channels 0: must be positive"),
    (["--anneal_lr", "True", "--iterations", "0"], "--anneal_lr"),
    (["--iterations", "-1"], "--iterations -1"),
    (["--eval_interval", "-1"], "--eval_interval -1"),
    (["--val_split", "test"], "--val_split 'test'"),
])
def test_classifier_flags(tmp_path, capsys, data, argv, expected):
    save_dir = tmp_path / "run"
    status, err = run_cli(["--src_dir", str(data), "--dataset", "demo", "--image_size", "16", "--iterations", "1",
                           *CLASSIFIER_FLAGS, "--save_dir", str(save_dir), *argv], capsys, main=classifier_script)
    assert_one_line_error(status, err, expected)
    assert "num_head_channels " not in err.replace("--classifier_num_head_channels", "")
    assert not save_dir.exists()


@pytest.mark.parametrize("content", [b"hello world\n", b"", b"\x00\x01\x02\x03", b"PK\x03\x04broken", b'{"a": 1}'])
def test_a_file_that_is_no_checkpoint(tmp_path, capsys, content):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    fake = folder / "model000001.pt"
    fake.write_bytes(content)
    (folder / "args.json").write_text("{}")
    samples = tmp_path / "samples"
    status, err = run_cli(["--model_path", str(fake), "--save_dir", str(samples)], capsys,
                          main=script_main("image_tumor_sample"))
    assert_one_line_error(status, err, f"--model_path {fake}: not a readable PyTorch checkpoint")
    assert not samples.exists()


def test_checkpoint_readers_name_the_flag(tmp_path):
    from guided_diffusion.checkpoint_util import load_classifier, load_weights, read_checkpoint
    from guided_diffusion.cli import UserError

    fake = tmp_path / "model000002.pt"
    fake.write_text("text")
    (tmp_path / "args.json").write_text(json.dumps({"image_size": 64}))
    with pytest.raises(UserError, match="--classifier_path .*not a readable PyTorch checkpoint"):
        load_classifier(str(fake))
    with pytest.raises(UserError, match="--resume_checkpoint .*not a readable"):
        load_weights(torch.nn.Linear(1, 1), str(fake), "--resume_checkpoint")
    with pytest.raises(UserError, match="is a folder"):
        read_checkpoint(str(tmp_path), "--model_path")
    nan = tmp_path / "nan.pt"
    torch.save({"weight": torch.full((1, 1), float("nan")), "bias": torch.zeros(1)}, nan)
    with pytest.raises(UserError, match="weight holds NaN"):
        load_weights(torch.nn.Linear(1, 1), str(nan), "--model_path")
    (tmp_path / "args.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="expected a JSON object"):
        load_classifier(str(fake))


def test_corrupt_files_of_a_resumed_run(tmp_path, capsys, data):
    run = tmp_path / "run"
    common = ["--src_dir", str(data), "--workers", "0", *SCRIPT_FLAGS, "--save_dir", str(run)]
    train_tumor([*common, "--max_steps", "2"])
    (run / "opt000002.pt").write_text("garbage")
    # Given by name (`auto` skips a broken checkpoint instead: tests/test_faults.py).
    status, err = run_cli([*common, "--max_steps", "3", "--resume_checkpoint", str(run / "model000002.pt")], capsys)
    assert_one_line_error(status, err, f"--resume_checkpoint {run / 'opt000002.pt'}: not a readable")
    assert sorted(n for n in os.listdir(run) if n.startswith("model")) == ["model000002.pt"]


def test_errors_after_start_up_leave_no_save_dir(tmp_path, capsys, data, monkeypatch):
    from guided_diffusion.train import loop

    def fail(self):
        raise loop.UserError("something the user can fix")

    monkeypatch.setattr(loop.TrainLoop, "compute_loss", lambda self, *a: fail(self))
    status, err = ddpm_error(tmp_path, capsys, ["--src_dir", str(data)])
    assert_one_line_error(status, err, "something the user can fix")


def test_wrong_type_flags_print_one_line_and_point_to_help(tmp_path, capsys):
    cases = [
        (train_tumor, ["--batch_size", "eight"], "argument --batch_size: invalid int value: 'eight'"),
        (train_tumor, ["--class_cond", "maybe"], "argument --class_cond: boolean value expected"),
        (train_tumor, ["--num_chan", "32"], "unrecognized arguments: --num_chan 32"),
        (classifier_script, ["--iterations", "1.5"], "argument --max_steps/--iterations: invalid int value"),
        (script_main("image_tumor_sample"), ["--num_samples", "x"], "argument --num_samples: invalid int value"),
        (script_main("prepare_brats"), ["--image_size", "big"], "argument --image_size: invalid int value"),
        (script_main("prepare_synapse"), [], "the following arguments are required: --input_dir, --out_dir"),
        (script_main("prepare_chaos"), ["--modality", "t1"], "argument --modality: invalid choice: 't1'"),
        (script_main("image_p_seg"), ["--fold_size", "half"], "argument --fold_size: invalid int value"),
    ]
    for main, argv, expected in cases:
        status, err = run_cli(argv, capsys, main=main)
        assert_one_line_error(status, err, expected, "--help)")
        assert "usage:" not in err


# ---------------------------------------------------------------------------------------------
# Everything else a user can type wrong


@pytest.mark.parametrize("argv, expected", [
    (["--lr", "0"], "--lr 0.0: the learning rate must be a positive number"),
    (["--lr", "-0.0001"], "--lr -0.0001"),
    (["--lr", "nan"], "--lr nan"),
    (["--max_steps", "-1"], "--max_steps -1"),
    (["--save_interval", "0"], "--save_interval 0"),
    (["--log_interval", "0"], "--log_interval 0"),
    (["--microbatch", "3"], "--microbatch 3: must divide --batch_size 4"),
    (["--microbatch", "0"], "--microbatch 0"),
    (["--weight_decay", "-1"], "--weight_decay -1.0"),
    (["--lr_anneal_steps", "-1"], "--lr_anneal_steps -1"),
    (["--seed", "-1"], "--seed -1"),
    (["--workers", "-1"], "--workers -1"),
    (["--ema_rate", "1.5"], "--ema_rate 1.5"),
    (["--max_noise_level", "0"], "--max_noise_level 0.0"),
    (["--split", "train"], "--split 'train'"),
    (["--schedule_sampler", "importance"], "--schedule_sampler 'importance'"),
    (["--resume_checkpoint", "/no/such/model000100.pt"], "--resume_checkpoint /no/such/model000100.pt: no such file"),
    (["--num_heads", "3"], "--num_heads 3 does not divide"),
    (["--num_head_channels", "24"], "--num_head_channels 24 does not divide"),
    (["--num_heads_upsample", "0"], "--num_heads_upsample 0"),
    (["--num_res_blocks", "-1"], "--num_res_blocks -1"),
    (["--dropout", "1"], "--dropout 1.0"),
    (["--image_size", "-16"], "--image_size -16"),
    (["--in_channels", "0"], "--in_channels 0"),
    (["--channel_mult", "0,2"], "--channel_mult 0,2"),
    (["--diffusion_steps", "0"], "--diffusion_steps 0"),
    (["--noise_schedule", "quadratic"], "--noise_schedule"),
    (["--timestep_respacing", "fast"], "--timestep_respacing"),
])
def test_other_training_flags(tmp_path, capsys, data, argv, expected):
    status, err = ddpm_error(tmp_path, capsys, ["--src_dir", str(data), *argv])
    assert_one_line_error(status, err, expected)


def test_save_dir_that_is_a_file(tmp_path, capsys, data):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for save_dir in (blocker, blocker / "sub"):
        status, err = run_cli(["--src_dir", str(data), "--max_steps", "1", "--workers", "0", *SCRIPT_FLAGS,
                               "--save_dir", str(save_dir)], capsys)
        assert_one_line_error(status, err, f"--save_dir {save_dir}")


@pytest.mark.parametrize("argv, expected", [
    (["--num_samples", "0"], "--num_samples 0"),
    (["--batch_size", "-1"], "--batch_size -1"),
    (["--eta", "nan"], "--eta nan"),
    (["--seed", "-3"], "--seed -3"),
    ([], "--model_path is required"),
])
def test_sampling_flags(tmp_path, capsys, argv, expected):
    status, err = run_cli(["--save_dir", str(tmp_path / "s"), *argv], capsys, main=script_main("image_tumor_sample"))
    assert_one_line_error(status, err, expected)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--seed", "-1"], "--seed must be a non-negative integer"),
    (["--val_fraction", "1.5"], "--val_fraction must be in [0, 1)"),
])
def test_converter_flags(tmp_path, capsys, argv, expected):
    for name in ("prepare_brats", "prepare_synapse", "prepare_chaos"):
        out = tmp_path / name
        status, err = run_cli(["--input_dir", str(tmp_path / "nowhere"), "--out_dir", str(out), *argv], capsys,
                              main=script_main(name))
        assert_one_line_error(status, err, expected)
        assert not out.exists()
