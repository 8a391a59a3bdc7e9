"""The original README's commands, as docs/original-code.md quotes them,
run verbatim on a tiny data set in the original layout, and the section's mapping table names only
flags the scripts have."""

import json
import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guided_diffusion.cli import UserError
from guided_diffusion.datasets import select_fold
from guided_diffusion.implicit_inputs import newest_checkpoint
from guided_diffusion.sampling import check_data_fits
from guided_diffusion.segment.pipeline import select_slices
from guided_diffusion.train_cli import default_image_size

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Coming from the original code"
BLOCK_START = "# the original README, verbatim"
DATA_DIR = "data/brats_patch/flair/flair"
# Appended where a command would otherwise run for days (150000 steps, 16 samples over 4000 steps).
SHORT_RUN = {"train_tumor_ddfm.py": "--max_steps 1", "classifier_tumor_train.py": "--max_steps 1",
             "image_tumor_sample.py": "--num_samples 1 --timestep_respacing 4",
             "classifier_tumor_sample.py": "--num_samples 1 --timestep_respacing 4"}


def readme_section():
    text = (REPO / "docs" / "original-code.md").read_text()
    start = text.index(SECTION)
    return text[start:text.index("\n## ", start + len(SECTION))]


def original_commands():
    """{heading: bash text} of the quoted block, one entry per original README step."""
    section = readme_section()
    block = section[section.index(BLOCK_START):]
    block = block[block.index("\n") + 1:block.index("```")]
    chunks = re.split(r"^# (\d\..*)$", block, flags=re.M)[1:]
    return {heading.strip(): body.strip() for heading, body in zip(chunks[::2], chunks[1::2])}


def write_original_layout(root, size=32):
    """BraTS-like RGB JPG slices in the original layout: training/ and validate/ with normal, tumor, seg."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] / size
    for split, count in (("training", 4), ("validate", 3)):
        for sub in ("normal", "tumor", "seg"):
            (root / split / sub).mkdir(parents=True)
        for label in ("normal", "tumor"):
            for i in range(count):
                image = 0.4 * (((yy - 0.5) ** 2 + (xx - 0.5) ** 2) < 0.16) + 0.05 * rng.random((size, size))
                mask = np.zeros((size, size), bool)
                if label == "tumor":
                    cy, cx = rng.uniform(0.35, 0.65, 2)
                    mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < 0.01
                    image[mask] = 0.9
                stem = f"BraTS20_{split}_{i:03d}_{label}"
                grey = (image.clip(0, 1) * 255).astype(np.uint8)
                Image.fromarray(np.repeat(grey[..., None], 3, 2)).save(root / split / label / f"{stem}.jpg", quality=95)
                Image.fromarray(mask.astype(np.uint8) * 255).save(root / split / "seg" / f"{stem}.png")
    return root


def workdir(path):
    """A working directory like the repository root: scripts/ and the data in the original layout."""
    path.mkdir()
    (path / "scripts").symlink_to(REPO / "scripts")
    write_original_layout(path / DATA_DIR)
    return path


PRELUDE = f"""
set -e
data_dir={DATA_DIR}
python() {{
    case "$1" in
{''.join(f'        *{name}) extra="{flags}";;{chr(10)}' for name, flags in SHORT_RUN.items())}        *) extra="";;
    esac
    "{sys.executable}" "$@" $extra
}}
"""


def run_bash(script, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", "-c", PRELUDE + script], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=900)


def args_json(folder):
    return json.loads((folder / "args.json").read_text())


@pytest.fixture(scope="module")
def commands():
    found = original_commands()
    assert len(found) == 6, list(found)
    return list(found.values())


@pytest.fixture(scope="module")
def session(tmp_path_factory, commands):
    """Steps 1, 2, 3, the classifier and the guided sampling, run in order in one working directory."""
    cwd = workdir(tmp_path_factory.mktemp("original_readme") / "repo")
    results = {}
    for name, command in zip(("train", "train_conditional", "sample", "classifier", "guided_sample"), commands):
        results[name] = run_bash(command, cwd)
    return cwd, results


def test_the_readme_quotes_the_original_commands_verbatim(commands):
    assert commands[2] == "python scripts/image_tumor_sample.py"
    assert "--num_channels 128 --num_res_blocks 3  " in commands[0]
    assert "$MODEL_FLAGS $DIFFUSION_FLAGS -f 0 --batch_size 1 --guided" in commands[5]
    assert "{where_you_save_classifier}" in commands[5] and "{where_you_save_diffusion}" in commands[5]


def test_ddpm_training_takes_the_model_size_it_names_and_the_data_image_size(session):
    cwd, results = session
    assert results["train"].returncode == 0, results["train"].stderr[-2000:]
    run = cwd / "runs/results/diff_brats"
    assert (run / "model000001.pt").is_file()
    config = args_json(run)
    assert (config["num_channels"], config["num_res_blocks"], config["diffusion_steps"]) == (128, 3, 4000)
    assert config["image_size"] == 32 and config["lr"] == 1e-4 and config["batch_size"] == 4
    assert "--image_size 32: the side of the images" in results["train"].stdout


def test_the_second_training_command_refuses_the_first_ones_folder(session):
    _, results = session
    result = results["train_conditional"]
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --save_dir runs/results/diff_brats already holds checkpoints")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_conditional_training_in_its_own_folder(tmp_path, commands):
    cwd = workdir(tmp_path / "repo")
    result = run_bash(commands[1], cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    config = args_json(cwd / "runs/results/diff_brats")
    assert (config["image_size"], config["num_channels"], config["learn_sigma"]) == (64, 192, True)
    assert (config["noise_schedule"], config["rescale_learned_sigmas"], config["rescale_timesteps"]) == \
        ("cosine", False, False)


def test_sampling_without_flags_finds_the_newest_ddpm(session):
    cwd, results = session
    result = results["sample"]
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--model_path not given: using runs/results/diff_brats/model000001.pt" in result.stdout
    with np.load(cwd / "runs/results/diff_brats/samples/samples_1x32x32x1.npz") as f:
        assert f["arr_0"].shape == (1, 32, 32, 1) and f["arr_0"].dtype == np.uint8


def test_classifier_training_and_guided_sampling_with_src_dir(session):
    cwd, results = session
    assert results["classifier"].returncode == 0, results["classifier"].stderr[-2000:]
    classifier_dir = cwd / "runs/results/guided_diff_brats_cls_resnet"
    config = args_json(classifier_dir)
    assert (config["model_type"], config["lr"], config["batch_size"], config["image_size"]) == ("resnet50", 3e-4, 8, 32)

    result = results["guided_sample"]
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert f"--classifier_path not given: using runs/results/guided_diff_brats_cls_resnet/model000001.pt" in out
    assert "--model_path not given: using runs/results/diff_brats/model000001.pt" in out
    assert f"--src_dir {DATA_DIR}: 32 x 32 images with 3 channel(s); the models take 32 x 32 with 1 channel(s)" in out
    with np.load(classifier_dir / "samples/samples_1x32x32x1.npz") as f:
        assert f["arr_0"].shape == (1, 32, 32, 1) and f["arr_1"].shape == (1,)
    assert sorted(p.name for p in classifier_dir.glob("model*.pt")) == ["model000001.pt"]  # nothing overwritten


def test_segmentation_command_with_its_placeholders_filled(session, commands):
    cwd, results = session
    assert results["classifier"].returncode == 0
    flags = commands[5].split("\n\n")[0]  # step 4's MODEL_FLAGS, DIFFUSION_FLAGS and TRAIN_FLAGS
    train = run_bash(flags + "\npython scripts/train_tumor_ddfm.py --save_dir runs/results/diff_brats_seg "
                     "--src_dir ${data_dir} $MODEL_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS", cwd)
    assert train.returncode == 0, train.stderr[-2000:]
    command = commands[5].replace("{where_you_save_classifier}", "runs/results/guided_diff_brats_cls_resnet")
    command = command.replace("{where_you_save_diffusion}", "runs/results/diff_brats_seg/model000001.pt")
    result = run_bash(command, cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"--src_dir not given: using {DATA_DIR}, the original README's data layout" in result.stdout
    summary = json.loads((cwd / "runs/results/guided_diff_brats_cls_resnet/seg_cg-cdm/summary.json").read_text())
    assert summary["method"] == "cg-cdm" and summary["n_images"] == 3
    assert summary["settings"]["classifier_path"].endswith("guided_diff_brats_cls_resnet/model000001.pt")


def test_commands_that_leave_out_an_input_say_which_flag_when_nothing_is_found(tmp_path):
    (tmp_path / "scripts").symlink_to(REPO / "scripts")
    sample = run_bash("python scripts/image_tumor_sample.py", tmp_path)
    assert sample.returncode == 2
    assert sample.stderr == ("error: --model_path is required (no DDPM checkpoint in runs/ddpm_tumor or "
                             "runs/results/diff_brats)\n")
    seg = run_bash("python scripts/image_p_seg.py --model_path x.pt --classifier_path y.pt", tmp_path)
    assert seg.returncode == 2
    assert seg.stderr.startswith("error: --src_dir is required (no slice dataset at data/brats_patch/flair/flair")


def test_newest_checkpoint_is_the_most_recently_written(tmp_path):
    old, new = tmp_path / "a", tmp_path / "b"
    for folder, step, when in ((old, 9000, 1_000_000), (new, 10, 2_000_000)):
        folder.mkdir()
        path = folder / f"model{step:06d}.pt"
        path.write_bytes(b"")
        os.utime(path, (when, when))
    (new / "model.pt").write_bytes(b"")  # the legacy name counts only where no model{step}.pt exists
    lines = []
    assert newest_checkpoint([str(old), str(new), str(tmp_path / "none")], "--model_path", "DDPM",
                             log=lines.append) == str(new / "model000010.pt")
    assert "--model_path not given" in lines[0]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "classifier_model.pt").write_bytes(b"")
    assert newest_checkpoint([str(legacy)], "--classifier_path", "classifier", log=lines.append) == \
        str(legacy / "classifier_model.pt")


def test_fold_size_gives_the_original_blocks():
    items = [f"s{i:02d}" for i in range(7, -1, -1)]  # unsorted on purpose: blocks are of the sorted list
    assert select_fold(items, 0, 1, fold_size=3) == ["s00", "s01", "s02"]
    assert select_fold(items, 2, 1, fold_size=3) == ["s06", "s07"]
    with pytest.raises(UserError, match=r"--fold 3 is out of range 0\.\.2: 8 items make 3 block"):
        select_fold(items, 3, 1, fold_size=3)
    with pytest.raises(UserError, match="two ways to define folds"):
        select_fold(items, 0, 2, fold_size=3)
    assert select_fold(items, 1, 2) == ["s04", "s05", "s06", "s07"]  # --num_folds unchanged


def test_fold_size_selects_a_block_of_the_sorted_tumour_slices(tmp_path):
    root = write_original_layout(tmp_path / "data")
    slices = select_slices(str(root), "validation", image_size=32, in_channels=1, fold=1, fold_size=2)
    assert slices.names == ["BraTS20_validate_002_tumor.jpg"]


def test_the_training_image_size_comes_from_square_data_with_a_default_network_shape(tmp_path):
    def size_of(side, explicit=()):
        root = tmp_path / f"d{side}"
        (root / "training" / "tumor").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((side, side), np.uint8)).save(root / "training" / "tumor" / "a.png")
        return default_image_size(Namespace(src_dir=str(root), split="training", dataset="brats"), set(explicit))

    assert size_of(32) == 32 and size_of(128) == 128
    assert size_of(100) == 224  # no default channel_mult at 100 px: the dataset's size, resized
    assert size_of(100, {"channel_mult"}) == 100


def test_check_data_fits_names_channels_that_cannot_feed_the_network(tmp_path):
    root = tmp_path / "data"
    (root / "training" / "tumor").mkdir(parents=True)
    np.save(root / "training" / "tumor" / "a.npy", np.zeros((2, 48, 48), np.uint8))
    line = check_data_fits(str(root), {"image_size": 64, "in_channels": 1})
    assert line.endswith("48 x 48 images with 2 channel(s); the models take 64 x 64 with 1 channel(s); "
                         "the loaders resize them")
    with pytest.raises(UserError, match="its images have 2 channels .* but the classifier takes in_channels=4"):
        check_data_fits(str(root), {"image_size": 48, "in_channels": 1}, {"image_size": 48, "in_channels": 4})


def test_mapping_table_names_only_flags_the_scripts_have():
    rows = [line for line in readme_section().splitlines() if re.match(r"\| \d\. `", line)]
    assert len(rows) == 5
    helps = {}
    for row in rows:
        script = re.search(r"`(\w+\.py)", row).group(1)
        if script not in helps:
            helps[script] = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--help"],
                                           capture_output=True, text=True, check=True).stdout
        for flag in set(re.findall(r"(?<![\w-])(--\w+|-f)(?![\w-])", row)):
            assert re.search(rf"(?<![\w-]){flag}(?![\w-])", helps[script]), (script, flag)


def test_fold_flags_that_contradict_each_other_are_one_error():
    from guided_diffusion.segment.command import main

    with pytest.raises(UserError, match=r"^--fold_size 500 and --num_folds 4 are two ways to define folds"):
        main(["--fold_size", "500", "--num_folds", "4", "--src_dir", "nowhere", "--model_path", "x.pt"])
    with pytest.raises(UserError, match=r"^--fold_size -1: must be 0 \(off\) or positive"):
        main(["--fold_size", "-1", "--src_dir", "nowhere", "--model_path", "x.pt"])
