"""One segmentation configuration: selection.json read strictly, applied alike by every front end."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from guided_diffusion.cli import UserError
from guided_diffusion.segment import command as image_p_seg, scans_command
from guided_diffusion.segment.config import Detection, OperatingPoint, SegmentationConfig, as_flags
from guided_diffusion.segment.postprocess import MaskOptions
from guided_diffusion.segment.results import row_specs, run_rows
from guided_diffusion.segment.scan_decision import ScanDecision
from test_segment_scans import setup  # noqa: F401  (the module's fixture: tiny models, raw scans, slices)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LARGEST = {"smooth_sigma": 0.0, "foreground_only": False, "keep_largest": True, "positive_part": False}


def selection(**changes):
    """A selection.json whose mask-tuned choice keeps the largest component."""
    point = {"noise_level": 0.1, "steps": 2, "tau": 0.0, "classifier_scale": 1.0, "noise_draws": 2,
             "passes": 4, "training_dice": 0.5}
    chosen = {"mask_tuned": {**point, "postprocessing": dict(LARGEST)},
              "label_free": {**point, "postprocessing": MaskOptions().as_dict(), "criterion": "compact_agreement",
                             "training_criterion": 0.4},
              "mask_tuned_cdm": {**point, "classifier_scale": 0.0, "noise_draws": 1, "postprocessing": dict(LARGEST)},
              "detection": {"threshold": 0.0, "min_separability": 0.0, "auroc": 0.9}}
    for key, value in changes.items():
        chosen["mask_tuned"][key] = value
    return chosen


def write(path, value):
    path.write_text(json.dumps(value))
    return str(path)


def test_the_shipped_selection_reads_into_one_configuration():
    with open(os.path.join(REPO, "runs", "demo", "selection.json")) as f:
        shipped = json.load(f)
    config = SegmentationConfig.from_selection(shipped, "mask_tuned")
    assert config.point == OperatingPoint.from_dict(shipped["mask_tuned"])
    assert config.point.passes == shipped["mask_tuned"]["passes"]
    assert config.postprocessing == MaskOptions(**shipped["mask_tuned"]["postprocessing"])
    assert config.detection == Detection(shipped["detection"]["threshold"], shipped["detection"]["min_separability"])
    assert config.scan_decision == ScanDecision.from_dict(shipped["mask_tuned"]["scan_decision"])
    # every value the configuration sets is a flag of both front ends: nothing is skipped
    for parser in (image_p_seg.create_argparser(), scans_command.create_argparser()):
        flags = {action.dest for action in parser._actions}
        assert set(config.values()) <= flags
    assert as_flags({"steps": 2, "keep_largest": True}) == ["--steps", "2", "--keep_largest", "True"]


@pytest.mark.parametrize("changes, message", [
    ({"noise_lvl": 0.1}, "unknown key 'noise_lvl'"),
    ({"postprocessing": {**LARGEST, "dilate": 2}}, "unknown post-processing key 'dilate'"),
    ({"noise_draws": 0}, "noise_draws 0: must be at least 1"),
    ({"tau": 1.0}, r"tau 1.0: must lie in \[0, 1\)"),
    ({"scan_decision": {"rule": "volume", "seeds": 0.5}}, "unknown scan decision key 'seeds'"),
    ({"steps": "2"}, "choice 'mask_tuned': a value of the wrong type"),
    ({"postprocessing": {**LARGEST, "smooth_sigma": "1"}}, "choice 'mask_tuned': a value of the wrong type"),
])
def test_a_choice_that_cannot_be_honoured_is_an_error(changes, message):
    with pytest.raises(ValueError, match=message):
        SegmentationConfig.from_selection(selection(**changes), "mask_tuned")


def test_bad_detection_and_missing_choices_are_errors():
    bad = selection()
    bad["detection"]["threshold"] = 1.5
    with pytest.raises(ValueError, match=r"threshold 1.5: must lie in \[0, 1\]"):
        SegmentationConfig.from_selection(bad, "mask_tuned")
    with pytest.raises(ValueError, match="choice 'best': not in the selection"):
        SegmentationConfig.from_selection(selection(), "best")


def test_both_front_ends_refuse_a_key_they_cannot_honour(setup, tmp_path):  # noqa: F811
    path = write(tmp_path / "selection.json", selection(dilation=2))
    common = ["--model_path", setup["model"], "--classifier_path", setup["classifier"], "--settings", path]
    with pytest.raises(UserError, match=f"--settings {path}: choice 'mask_tuned': unknown key 'dilation'"):
        image_p_seg.main(["--src_dir", str(setup["slices"]), "--out_dir", str(tmp_path / "a"), *common])
    with pytest.raises(UserError, match=f"--settings {path}: choice 'mask_tuned': unknown key 'dilation'"):
        scans_command.main(["--input", str(setup["raw"] / "S0"), "--dataset_json", str(setup["slices"]),
                            "--out_dir", str(tmp_path / "b"), *common])
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def read_masks(folder):
    """{file name: (shape, bytes)} of a masks/ folder, for exact comparison."""
    masks = {}
    for name in sorted(os.listdir(folder)):
        pixels = np.asarray(Image.open(os.path.join(folder, name)))
        masks[name] = (pixels.shape, pixels.tobytes())
    return masks


def test_a_keep_largest_choice_gives_the_same_masks_in_every_front_end(setup, tmp_path):  # noqa: F811
    """image_p_seg.py, the results table and segment_scans.py all apply the chosen keep_largest."""
    path = write(tmp_path / "selection.json", selection())
    models = ["--model_path", setup["model"], "--classifier_path", setup["classifier"]]
    slices = tmp_path / "slices_run"
    image_p_seg.main(["--src_dir", str(setup["slices"]), "--out_dir", str(slices), "--method", "cg-cdm",
                      "--batch_size", "4", *models, "--settings", path])
    summary = json.loads((slices / "summary.json").read_text())
    assert summary["mask_options"] == LARGEST
    assert summary["settings"]["settings_file"]["applied"]["keep_largest"] is True
    masks = read_masks(slices / "masks")
    assert masks and masks == {name.replace("_lcc", ""): m for name, m in read_masks(slices / "masks_lcc").items()}
    assert any(any(pixels) for _, pixels in masks.values())
    typed = tmp_path / "typed_run"  # a typed flag wins over the file, and the option changes these masks
    image_p_seg.main(["--src_dir", str(setup["slices"]), "--out_dir", str(typed), "--method", "cg-cdm",
                      "--batch_size", "4", *models, "--settings", path, "--keep_largest", "False"])
    assert read_masks(typed / "masks") != masks

    specs = row_specs(path, setup["model"], setup["classifier"], setup["classifier"])
    run_rows(["cg-cdm"], specs, src_dir=str(setup["slices"]), out_dir=str(tmp_path / "table"), batch_size=4,
             log=lambda *a: None)
    assert read_masks(tmp_path / "table" / "cg-cdm" / "masks") == masks

    scans = tmp_path / "scans_run"
    scans_command.main(["--input", str(setup["raw"] / "S0"), "--dataset_json", str(setup["slices"]),
                        "--out_dir", str(scans), "--method", "cg-cdm", "--batch_size", "4", *models,
                        "--settings", path, "--scan_rule", "slices"])
    scan_summary = json.loads((scans / "summary.json").read_text())
    assert scan_summary["mask_options"] == LARGEST
    assert scan_summary["settings"]["settings_file"]["applied"]["keep_largest"] is True
    prediction = np.asarray(nib.load(scans / "S0_pred.nii.gz").dataobj)
    assert prediction.any()
