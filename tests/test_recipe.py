"""scripts/train_recipe.py: raw subjects in, a model folder out, stage by stage."""

import json

import nibabel as nib
import pytest

from guided_diffusion import recipe
from guided_diffusion.cli import UserError
from guided_diffusion.segment import scans_command
from test_image_p_seg import write_subject

# Tiny networks and a few steps per stage: the recipe's plumbing, not a useful model.
TINY_FLAGS = [
    "--image_size", "32", "--val_fraction", "0.2", "--ddpm_steps", "2", "--classifier_steps", "2",
    "--ddpm_batch_size", "4", "--classifier_batch_size", "4",
    "--prepare_flags", "--min_tumor_pixels 4",
    "--ddpm_flags", "--num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 16 "
                    "--diffusion_steps 100 --save_interval 1 --log_interval 1 --workers 0",
    "--classifier_flags", "--classifier_width 32 --classifier_channel_mult 1,2 --classifier_attention_resolutions 16 "
                          "--classifier_num_head_channels 32 --eval_interval 0 --log_interval 1 --workers 0",
    "--ablation_flags", "--max_images 2 --batch_size 4 --noise_levels 0.1 --record_steps 1,2 --taus 0 "
                        "--scales 0,10 --noise_draws 0 --draw_steps 1 --detect_images 4",
    "--validate_flags", "--max_images 2 --batch_size 4 --grid_images 0",
]
STAGES = ("prepare_brats.py", "train_tumor_ddfm.py", "classifier_tumor_train.py", "ablation.py", "image_p_seg.py",
          "export_model.py")


def raw_subjects(folder, count):
    for i in range(count):
        write_subject(str(folder), f"S{i}", i)
    return folder


def test_the_recipe_runs_end_to_end_then_its_model_folder_segments_a_scan(tmp_path, capfd):
    raw = raw_subjects(tmp_path / "raw", 5)
    work = tmp_path / "work"
    argv = ["--input_dir", str(raw), "--work_dir", str(work), "--validate", "False", *TINY_FLAGS]
    recipe.main(argv)
    text = capfd.readouterr().out
    assert "measured on" in text and "ddpm: 2 steps x 4 images" in text  # the estimate comes first
    for number, script in enumerate(STAGES[:4] + STAGES[5:], 1):
        assert f"[{number}/5] " in text and f"scripts/{script} " in text
    folder = work / "model"
    card = json.loads((folder / "model.json").read_text())
    assert card["training_data"]["subjects"] == {"training": 4, "validation": 1}
    assert card["ddpm"]["weights"] == "EMA 0.999" and card["ddpm"]["training_steps"] == 2
    assert card["classifier"]["training_steps"] == 2 and card["selection"]["split"] == "training"
    assert (work / "ddpm" / "ema_0.999_000002.pt").read_bytes() == (folder / "ddpm" / "model.pt").read_bytes()
    times = json.loads((work / "stages" / "times.json").read_text())  # each stage's measured wall-clock time
    assert list(times) == ["prepare", "ddpm", "classifier", "ablation", "export"]
    assert all(seconds > 0 for seconds in times.values()) and "ddpm finished in" in text

    out = tmp_path / "scans"
    scans_command.main(["--input", str(raw / "S1"), "--model_dir", str(folder), "--out_dir", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["settings_file"]["source"] == f"--model_dir {folder}"
    assert nib.load(out / "S1_pred.nii.gz").shape == nib.load(raw / "S1" / "S1_flair.nii.gz").shape
    capfd.readouterr()

    recipe.main(argv)  # everything is complete: nothing runs again
    text = capfd.readouterr().out
    assert text.count(": skipped") == 5 and "measured on" not in text
    with pytest.raises(UserError, match="prepared by another command"):
        recipe.main([*argv, "--prepare_flags", "--min_tumor_pixels 5"])


def test_too_little_data_is_refused_with_the_numbers(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["--work_dir", str(tmp_path / "work"), "--estimate", "False"]
    with pytest.raises(UserError, match="no subjects"):
        recipe.main(["--input_dir", str(empty), *base])
    with pytest.raises(UserError, match="no such directory"):
        recipe.main(["--input_dir", str(tmp_path / "nowhere"), *base])
    three = raw_subjects(tmp_path / "three", 3)
    with pytest.raises(UserError, match=r"3 subject\(s\), 2 for training and 1 for validation .* at least 4"):
        recipe.main(["--input_dir", str(three), *base])
    four = raw_subjects(tmp_path / "four", 4)
    with pytest.raises(UserError, match=r"4 subject\(s\), 4 for training and 0 for validation with --val_fraction 0"):
        recipe.main(["--input_dir", str(four), "--val_fraction", "0", *base])
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "dataset.json").write_text(json.dumps({"subjects": {"training": ["a", "b"], "validation": ["c"]}}))
    with pytest.raises(UserError, match=r"--prepared_dir .*prepared: 3 subject\(s\)"):
        recipe.main(["--prepared_dir", str(prepared), *base])
    assert not (tmp_path / "work").exists()


def test_the_plan_validates_with_the_chosen_settings_before_exporting(tmp_path, capsys):
    raw = raw_subjects(tmp_path / "raw", 4)
    recipe.main(["--input_dir", str(raw), "--work_dir", str(tmp_path / "work"), "--dry_run", "True",
                 "--estimate", "False", "--val_fraction", "0.25"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert [line.split("/scripts/")[1].split()[0] for line in lines] == list(STAGES)
    validate, export = lines[4], lines[5]
    selection = str(tmp_path / "work" / "ablation" / "selection.json")
    assert "--split validation" in validate and f"--settings {selection}" in validate
    assert f"--validation {tmp_path / 'work' / 'validation' / 'summary.json'}" in export
    assert "ema_0.999_001800.pt" in validate and "--image_size 64" in lines[0]  # the cpu preset's
    assert not (tmp_path / "work").exists()


def test_presets_give_the_demo_and_the_paper_configurations_and_flags_win(tmp_path):
    args = recipe.create_argparser().parse_args(["--prepared_dir", "d", "--preset", "paper", "--ddpm_steps", "7",
                                                 "--ddpm_flags", "--lr 3e-5 --use_checkpoint True"])
    settings = recipe.stage_settings(args)
    assert settings["prepare"]["image_size"] == 256 and settings["ddpm"]["num_channels"] == 128
    assert settings["ddpm"]["num_res_blocks"] == 3 and settings["ddpm"]["max_steps"] == 7
    assert settings["ddpm"]["lr"] == "3e-5" and settings["ddpm"]["use_checkpoint"] == "True"
    cpu = recipe.stage_settings(recipe.create_argparser().parse_args(["--prepared_dir", "d"]))
    assert (cpu["prepare"]["image_size"], cpu["ddpm"]["max_steps"], cpu["classifier"]["max_steps"]) == (64, 1800, 700)
    assert recipe.parse_stage_flags("--clip_percentiles 0.5 99.5 --switch --a=b", "--x") == {
        "clip_percentiles": ["0.5", "99.5"], "switch": None, "a": "b"}
    with pytest.raises(UserError, match="--x"):
        recipe.parse_stage_flags("stray --a 1", "--x")
