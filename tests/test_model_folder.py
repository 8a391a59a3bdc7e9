"""Model folders: scripts/export_model.py writes one, --model_dir of the segmentation scripts reads it."""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from guided_diffusion.checkpoint_util import write_args_json
from guided_diffusion.cli import UserError
from guided_diffusion.model_folder import export_model_folder
from guided_diffusion.segment import command, scans_command
from test_image_p_seg import write_classifier, write_model
from test_segment_scans import scan_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Settings a wrong --model_dir would miss: one DDIM step, no guidance scale of 10, every slice segmented.
SELECTION = {
    "mask_tuned": {"noise_level": 0.1, "steps": 1, "tau": 0.0, "classifier_scale": 1.0, "noise_draws": 1,
                   "postprocessing": {"smooth_sigma": 1.0, "foreground_only": False, "keep_largest": False,
                                      "positive_part": True}, "training_dice": 0.5},
    "label_free": {"noise_level": 0.05, "steps": 2, "tau": 0.0, "classifier_scale": 0.0, "noise_draws": 1},
    "detection": {"threshold": 0.0, "min_separability": 0.0},
    "n_training_images": 4, "split": "training",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_folder")
    raw, slices = scan_dataset(root)
    model = write_model(str(root / "ddpm"))
    ema = root / "ddpm" / "ema_0.9999_000012.pt"  # as training names its EMA weights
    shutil.copyfile(model, ema)
    classifier = write_classifier(str(root / "cls"))
    selection = {**SELECTION, "model_path": str(ema), "classifier_path": classifier, "src_dir": str(slices),
                 "scan_decision": {"threshold": 0.25, "chosen_on": str(slices)}}
    (root / "selection.json").write_text(json.dumps(selection))
    folder = root / "exported" / "model"
    export_model_folder(str(folder), ddpm=str(ema), classifier=classifier, dataset_json=str(slices),
                        selection=str(root / "selection.json"), log=lambda *a: None)
    return dict(root=root, raw=raw, slices=slices, ema=str(ema), classifier=classifier, folder=folder)


def strings_in(value):
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return [value] if isinstance(value, str) else []


def test_the_exported_folder_carries_everything_and_names_no_path_outside(setup):
    folder = setup["folder"]
    for name in ("ddpm/model.pt", "ddpm/args.json", "classifier/model.pt", "classifier/args.json",
                 "preprocessing.json", "selection.json", "model.json", "README.md"):
        assert (folder / name).is_file(), name
    assert (folder / "ddpm" / "model.pt").read_bytes() == open(setup["ema"], "rb").read()
    for name in ("preprocessing.json", "selection.json", "model.json"):
        text = (folder / name).read_text()
        assert str(setup["root"]) not in text, name
        assert not [s for s in strings_in(json.loads(text)) if os.path.isabs(s)], name
    selection = json.loads((folder / "selection.json").read_text())
    assert selection["model_path"] == "ddpm/model.pt" and selection["classifier_path"] == "classifier/model.pt"
    assert "src_dir" not in selection and selection["scan_decision"] == {"threshold": 0.25}  # unknown keys pass
    assert {k: selection[k] for k in SELECTION} == SELECTION
    dataset = json.loads((setup["slices"] / "dataset.json").read_text())
    preprocessing = json.loads((folder / "preprocessing.json").read_text())
    assert preprocessing["options"] == dataset["options"] and preprocessing["modalities"] == ["flair"]
    card = json.loads((folder / "model.json").read_text())
    assert card["use"] == {"method": "cg-cdm", "choice": "mask_tuned"}
    assert card["training_data"]["subjects"] == {"training": 2, "validation": 1}
    assert card["training_data"]["slices"] == dataset["counts"]
    assert card["ddpm"]["weights"] == "EMA 0.9999" and card["ddpm"]["training_steps"] == 12
    assert card["classifier"]["weights"] == "raw" and card["ddpm"]["configuration"]["image_size"] == 32
    assert card["files"]["ddpm/model.pt"]["bytes"] == os.path.getsize(setup["ema"])
    assert card["selection"]["chosen"]["steps"] == 1 and card["versions"]["torch"]
    assert "EMA 0.9999 weights after 12 steps" in (folder / "README.md").read_text()


def segment(out, *flags):
    scans_command.main(["--batch_size", "8", "--out_dir", str(out), *flags])
    return json.loads((out / "summary.json").read_text())


def prediction(out):
    return np.asarray(nib.load(out / "S0_pred.nii.gz").dataobj)


def test_model_dir_segments_like_the_typed_flags_from_any_folder_after_a_copy(setup, tmp_path, monkeypatch, capsys):
    scan = str(setup["raw"] / "S0")
    typed = segment(tmp_path / "typed", "--input", scan, "--method", "cg-cdm", "--model_path", setup["ema"],
                    "--classifier_path", setup["classifier"], "--dataset_json", str(setup["slices"]),
                    "--settings", str(setup["root"] / "selection.json"))
    assert "untuned defaults" not in capsys.readouterr().out
    copy = tmp_path / "elsewhere" / "copied_model"
    shutil.copytree(setup["folder"], copy)
    moved = setup["folder"].with_name("moved_away")  # the original folder is gone: nothing may point at it
    os.rename(setup["folder"], moved)
    try:
        work = tmp_path / "another_working_folder"
        work.mkdir()
        monkeypatch.chdir(work)
        from_folder = segment(tmp_path / "from_folder", "--input", scan, "--model_dir", "../elsewhere/copied_model")
    finally:
        os.rename(moved, setup["folder"])
    assert np.array_equal(prediction(tmp_path / "typed"), prediction(tmp_path / "from_folder"))
    assert prediction(tmp_path / "typed").any()
    settings = from_folder["settings"]
    assert settings["settings_file"]["source"] == "--model_dir ../elsewhere/copied_model"
    assert settings["settings_file"]["applied"]["steps"] == 1 and settings["steps"] == 1
    assert settings["model_dir"] == str(copy) and from_folder["dataset_json"] == str(copy / "preprocessing.json")
    assert from_folder["method"] == "cg-cdm" and typed["settings"]["settings_file"]["source"] == "--settings"
    assert "from --model_dir ../elsewhere/copied_model" in capsys.readouterr().out


def test_typed_flags_win_over_the_folder(setup, tmp_path):
    summary = segment(tmp_path / "out", "--input", str(setup["raw"] / "S1"), "--model_dir", str(setup["folder"]),
                      "--choice", "label_free", "--steps", "3", "--method", "cdm")
    settings = summary["settings"]
    assert summary["method"] == "cdm" and settings["steps"] == 3  # typed
    assert settings["noise_level"] == 0.05 and settings["settings_file"]["choice"] == "label_free"


def test_image_p_seg_takes_the_model_dir(setup, tmp_path):
    out = tmp_path / "seg"
    command.main(["--model_dir", str(setup["folder"]), "--src_dir", str(setup["slices"]), "--max_images", "2",
                  "--batch_size", "2", "--grid_images", "0", "--out_dir", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "cg-cdm" and summary["n_images"] == 2
    assert summary["settings"]["model_path"] == str(setup["folder"] / "ddpm" / "model.pt")
    assert summary["settings"]["settings_file"]["applied"]["classifier_scale"] == 1.0
    # its scores go into the card of a new export
    card = export_model_folder(str(tmp_path / "scored"), ddpm=setup["ema"], classifier=setup["classifier"],
                               dataset_json=str(setup["slices"]), validation=[str(out / "summary.json")],
                               log=lambda *a: None)
    (scores,) = card["validation"]
    assert scores["kind"] == "slices" and scores["split"] == "validation" and scores["n_scored"] == 2
    assert scores["variants"]["tau_0"]["dice_mean"] == summary["variants"]["tau_0"]["otsu"]["dice_mean"]
    assert card["use"]["choice"] is None and "selection.json" not in card["files"]  # exported without one
    with pytest.raises(UserError, match="--validation .*model.json: not a summary.json"):
        export_model_folder(str(tmp_path / "never"), ddpm=setup["ema"], classifier=setup["classifier"],
                            dataset_json=str(setup["slices"]), validation=[str(setup["folder"] / "model.json")],
                            log=lambda *a: None)


def test_a_run_without_settings_says_it_runs_untuned_defaults(setup, tmp_path, capsys):
    segment(tmp_path / "out", "--input", str(setup["raw"] / "S1"), "--method", "cdm", "--steps", "1",
            "--model_path", setup["ema"], "--detector_path", setup["classifier"], "--dataset_json", str(setup["slices"]))
    text = capsys.readouterr().out
    assert "untuned defaults" in text and "--settings selection.json" in text and "--model_dir" in text


def broken_copy(setup, tmp_path, name):
    copy = tmp_path / "broken"
    shutil.copytree(setup["folder"], copy)
    return copy, copy / name


def test_a_missing_file_or_weights_of_another_configuration_are_one_line_errors(setup, tmp_path):
    copy, missing = broken_copy(setup, tmp_path, "classifier/model.pt")
    missing.unlink()
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "segment_scans.py"), "--input",
                             str(setup["raw"] / "S0"), "--model_dir", str(copy), "--out_dir", str(tmp_path / "never")],
                            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "classifier/model.pt is missing" in result.stderr and not (tmp_path / "never").exists()
    (copy / "model.json").unlink()
    with pytest.raises(UserError, match="no model.json"):
        segment(tmp_path / "never", "--input", str(setup["raw"] / "S0"), "--model_dir", str(copy))

    other = write_model(str(tmp_path / "wide"), num_channels=64)  # the same args.json could not build it
    copy2 = tmp_path / "swapped"
    shutil.copytree(setup["folder"], copy2)
    shutil.copyfile(other, copy2 / "ddpm" / "model.pt")
    with pytest.raises(UserError, match=r"ddpm/model.pt has \d+ bytes but model.json records"):
        segment(tmp_path / "never", "--input", str(setup["raw"] / "S0"), "--model_dir", str(copy2))
    card = json.loads((copy2 / "model.json").read_text())
    card["files"]["ddpm/model.pt"]["bytes"] = os.path.getsize(other)  # sizes agree: the configuration does not
    (copy2 / "model.json").write_text(json.dumps(card))
    with pytest.raises(UserError, match=r"swapped/ddpm/model.pt: parameter .* has shape"):
        segment(tmp_path / "never", "--input", str(setup["raw"] / "S0"), "--model_dir", str(copy2))


def test_export_refuses_weights_that_do_not_fit_their_args_json_and_missing_files(setup, tmp_path):
    mismatched = tmp_path / "mismatched"
    write_model(str(mismatched), num_channels=64)
    write_args_json(str(mismatched), {**json.loads(open(os.path.join(os.path.dirname(setup["ema"]),
                                                                     "args.json")).read())})
    common = dict(classifier=setup["classifier"], dataset_json=str(setup["slices"]), log=lambda *a: None)
    with pytest.raises(UserError, match=r"--ddpm .*mismatched/model000000.pt: parameter .* has shape"):
        export_model_folder(str(tmp_path / "out"), ddpm=str(mismatched / "model000000.pt"), **common)
    with pytest.raises(UserError, match=r"--ddpm .*nothing.pt: no such weight file"):
        export_model_folder(str(tmp_path / "out"), ddpm=str(tmp_path / "nothing.pt"), **common)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copyfile(setup["ema"], lonely / "model.pt")
    with pytest.raises(UserError, match="no args.json beside it"):
        export_model_folder(str(tmp_path / "out"), ddpm=str(lonely / "model.pt"), **common)
    with pytest.raises(UserError, match="--dataset_json"):
        export_model_folder(str(tmp_path / "out"), ddpm=setup["ema"], classifier=setup["classifier"],
                            dataset_json=str(tmp_path / "nowhere"), log=lambda *a: None)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a model folder"):
        export_model_folder(str(tmp_path / "precious"), ddpm=setup["ema"], **common)
    assert not (tmp_path / "out").exists() and (tmp_path / "precious" / "notes.txt").read_text() == "mine"


def test_the_shipped_demo_folder_is_a_model_folder():
    demo = os.path.join(REPO, "runs", "demo")
    card = json.load(open(os.path.join(demo, "model.json")))
    assert card["use"] == {"method": "cg-cdm", "choice": "mask_tuned"} and card["ddpm"]["weights"] == "EMA 0.999"
    selection = json.load(open(os.path.join(demo, "selection.json")))
    assert not [s for s in strings_in(selection) if os.path.isabs(s)]
    assert selection["mask_tuned"]["steps"] == 1 and selection["detection"]["threshold"] == pytest.approx(0.0678, abs=1e-4)
    preprocessing = json.load(open(os.path.join(demo, "preprocessing.json")))
    assert preprocessing["options"]["image_size"] == 64 and preprocessing["options"]["min_lesion_pixels"] == 5
    for name, record in card["files"].items():
        assert os.path.getsize(os.path.join(demo, name)) == record["bytes"], name


def test_compare_scan_decisions_scores_each_choice_and_decision_in_the_scans_grid(setup, tmp_path):
    from guided_diffusion.segment import compare_command

    folder = tmp_path / "model"
    selection = {**SELECTION, "label_free": {**SELECTION["mask_tuned"], "postprocessing": {}},  # the same point
                 "mask_tuned": {**SELECTION["mask_tuned"], "scan_decision": {"rule": "volume", "seed_probability": 0.0,
                                                                           "grow_probability": 0.0, "edge_fraction": 0.0,
                                                                           "min_lesion_fraction": 0.0}}}
    (tmp_path / "selection.json").write_text(json.dumps(selection))
    export_model_folder(str(folder), ddpm=setup["ema"], classifier=setup["classifier"], dataset_json=str(setup["slices"]),
                        selection=str(tmp_path / "selection.json"), log=lambda *a: None)
    out = tmp_path / "compare"
    compare_command.main(["--model_dir", str(folder), "--input", str(setup["raw"]), "--out", str(out),
                          "--subjects", f"training:{setup['slices']}", "--batch_size", "4"])
    report = json.loads((out / "comparison.json").read_text())
    training = json.loads((setup["slices"] / "dataset.json").read_text())["subjects"]["training"]
    assert sorted({r["scan"] for r in report["scans"]}) == sorted(training)
    assert [(line["choice"], line["decision"]) for line in report["summary"]] == [
        ("mask_tuned", "slices"), ("mask_tuned", "volume"), ("label_free", "slices")]
    # threshold 0, seed 0, no edge caution, no size minimum: both decisions keep every slice's Otsu mask
    tuned = {r["decision"]: r for r in report["scans"] if r["choice"] == "mask_tuned" and r["scan"] == training[0]}
    assert tuned["slices"]["predicted_voxels"] == tuned["volume"]["predicted_voxels"] > 0
    assert "| mask_tuned | volume |" in (out / "comparison.md").read_text()
    reference = np.asarray(nib.load(setup["raw"] / training[0] / f"{training[0]}_seg.nii.gz").dataobj) > 0
    assert 0 <= tuned["volume"]["dice_3d"] <= 1 and reference.any()
