"""Scans are checked against what the models were trained on before they are segmented
(guided_diffusion.segment.scan_checks, scans.prepare_scan, scripts/segment_scans.py)."""

import json

import nibabel as nib
import numpy as np
import pytest

from guided_diffusion.cli import UserError, run_main
from guided_diffusion.segment import scans_command
from guided_diffusion.segment.scan_checks import (Expectations, check_geometry, check_skull_stripped, expectations,
                                                  side_face_fraction)
from guided_diffusion.segment.scans import find_scans, prepare_scan
from guided_diffusion.volumes import SliceOptions
from test_image_p_seg import write_classifier, write_model
from test_layouts import (SHAPE, brain_mask, label_map, modalities_of_subject, prepare_brats, region_mask, save,
                          write_2021, write_2023, write_msd)

OPTIONS = SliceOptions(image_size=32, min_lesion_pixels=4)
GEOMETRY = {"voxel_mm": {"min": [1, 1, 1], "max": [1, 1, 1]}, "fov_mm": {"min": list(SHAPE), "max": list(SHAPE)}}


def unstripped_head(seed=0):
    """The FLAIR of the synthetic subject inside a bright scalp shell, in noisy air (as a scanner writes it)."""
    x, y, z = np.indices(SHAPE, dtype=float)
    radius = ((x - 14.5) / 14) ** 2 + ((y - 16.5) / 16) ** 2 + ((z - 9.5) / 10) ** 2
    scalp = (radius > 0.8) & (radius <= 1)
    air = np.abs(np.random.default_rng(seed).normal(0, 4, SHAPE)) + 0.5
    return np.where(brain_mask(), modalities_of_subject()["flair"], np.where(scalp, 350.0, air)).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan_checks")
    write_2021(root / "raw")
    prepare_brats.main(["--input_dir", str(root / "raw"), "--out_dir", str(root / "slices"), "--image_size", "32",
                        "--val_fraction", "0", "--min_tumor_pixels", "4"])
    write_2023(root / "brats2023")
    write_msd(root / "Task01_BrainTumour")
    return root


# ----------------------------------------------------------------------------- skull stripping


def test_a_scalp_in_noisy_air_is_refused_and_a_stripped_brain_passes(data, tmp_path):
    stripped = find_scans([str(data / "raw" / "BraTS2021_00001")], ("flair",))[0]
    assert prepare_scan(stripped, OPTIONS).warnings == []
    head = save(unstripped_head(), tmp_path / "head_flair.nii.gz")
    with pytest.raises(UserError, match=r"head_flair.nii.gz: 100 % of the voxels on its side faces are nonzero, so "
                                        r"it does not look skull-stripped") as info:
        prepare_scan(find_scans([head], ("flair",))[0], OPTIONS)
    assert "\n" not in str(info.value)
    # CT-like data are not normalised on a zero background: no such check
    assert prepare_scan(find_scans([head], ("flair",))[0], SliceOptions(image_size=32, intensity="ct")).warnings == []


def test_side_face_rule():
    mask = np.zeros((10, 12, 5), bool)  # side faces: 2 x (12 x 5) + 2 x (10 x 5) = 220 voxels
    assert side_face_fraction(mask) == 0 and check_skull_stripped("s.nii", mask) == []
    mask[1:-1, 1:-1] = True  # a brain up to one voxel from every side face, cut by both axial end faces
    assert side_face_fraction(mask) == 0 and check_skull_stripped("s.nii", mask) == []
    mask[0] = True  # one x face (60) and its edges on the two y faces (5 + 5)
    assert side_face_fraction(mask) == pytest.approx(70 / 220)
    (warning,) = check_skull_stripped("s.nii", mask)
    assert warning.startswith("s.nii: 32 % of the voxels on its side faces are nonzero, so it does not look "
                              "skull-stripped")
    mask[:, 0] = True  # and a y face: 60 + 50 + 5 + 5
    with pytest.raises(UserError, match="s.nii: 55 % of the voxels on its side faces are nonzero"):
        check_skull_stripped("s.nii", mask)


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("zooms, shape, outcome", [
    ((1, 1, 1), SHAPE, None),
    ((1.2, 0.8, 1), (25, 42, 20), None),  # within 1.5x of the training voxel size and field of view
    ((1, 1, 2), SHAPE[:2] + (10,), "voxel size along z is 2 mm, the training data's 1 mm (more than 1.5x off"),
    ((0.5, 1, 1), (60, 34, 20), "voxel size along x is 0.5 mm, the training data's 1 mm (more than 1.5x off"),
    ((1, 1, 5), SHAPE[:2] + (4,), "error: voxel size along z is 5 mm, the training data's 1 mm (more than 4x off"),
    ((1, 1, 1), SHAPE[:2] + (6,), "error: field of view along z is 6 mm, the training data's 20 mm (more than 3x"),
    ((1, 1, 1), (30, 34, 50), "field of view along z is 50 mm, the training data's 20 mm (more than 1.5x off"),
])
def test_voxel_size_and_field_of_view_against_the_training_data(zooms, shape, outcome):
    affine = np.diag([*zooms, 1.0])
    if outcome is None:
        assert check_geometry("scan.nii", affine, shape, GEOMETRY) == []
    elif outcome.startswith("error: "):
        with pytest.raises(UserError, match="scan.nii: " + outcome[len("error: "):].replace("(", r"\(")):
            check_geometry("scan.nii", affine, shape, GEOMETRY)
    else:
        assert check_geometry("scan.nii", affine, shape, GEOMETRY) == ["scan.nii: " + outcome + ": the masks may be "
                                                                       "worse)"]
    assert check_geometry("scan.nii", affine, shape, None) == []  # nothing recorded: nothing checked


def test_the_prepared_dataset_records_what_scans_are_checked_against(data, tmp_path):
    expected = expectations(json.loads((data / "slices" / "dataset.json").read_text()))
    assert expected == Expectations(modalities=("flair",), geometry=GEOMETRY, region="wt", scheme="brats2021")
    # a thick-sliced copy of the subject (every other slice, 2 mm) is segmented with a warning
    flair = nib.load(data / "raw" / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz")
    thick = str(tmp_path / "thick.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(flair.dataobj)[:, :, ::2], np.diag([1.0, 1, 2, 1])), thick)
    prepared = prepare_scan(find_scans([thick], ("flair",))[0], OPTIONS, expected=expected)
    assert prepared.warnings == [f"{thick}: voxel size along z is 2 mm, the training data's 1 mm (more than 1.5x "
                                 f"off: the masks may be worse)"]


# ----------------------------------------------------------------------------- channels and references


def test_a_decathlon_image_gives_the_same_model_inputs_as_the_brats_files(data):
    msd = str(data / "Task01_BrainTumour" / "imagesTr" / "BRATS_001.nii.gz")
    for modalities in (("flair",), ("t1ce", "t2"), ("flair", "t1", "t1ce", "t2")):
        from_msd = prepare_scan(find_scans([msd], modalities)[0], OPTIONS)
        from_folder = prepare_scan(find_scans([str(data / "raw" / "BraTS2021_00001")], modalities)[0], OPTIONS)
        assert from_msd.images.shape[1] == len(modalities)
        np.testing.assert_array_equal(from_msd.images.numpy(), from_folder.images.numpy())


@pytest.mark.parametrize("region", ["wt", "tc", "et"])
def test_reference_regions_in_every_layout(data, region):
    expected = Expectations(region=region)
    for path in (data / "raw" / "BraTS2021_00001", data / "brats2023" / "BraTS-GLI-00001-000",
                 data / "Task01_BrainTumour" / "imagesTr" / "BRATS_001.nii.gz"):
        prepared = prepare_scan(find_scans([str(path)], ("flair",))[0], OPTIONS, expected=expected)
        np.testing.assert_array_equal(prepared.reference, region_mask(region), err_msg=str(path))


def test_reference_labels_must_fit_the_layout_and_region(data, tmp_path):
    folder = write_2023(tmp_path, seg=label_map("brats2021"))  # 2021 values (ET 4) under 2023 names
    scan = find_scans([str(folder)], ("flair",))[0]
    with pytest.raises(UserError, match=r"BraTS-GLI-00001-000-seg.nii.gz: label values 1, 2, 4 are not BraTS 2023\+"):
        prepare_scan(scan, OPTIONS, expected=Expectations(region="wt"))
    anonymous = save(modalities_of_subject()["flair"], tmp_path / "scan.nii.gz")
    unnamed = find_scans([anonymous], ("flair",))[0]
    unnamed.reference = save(label_map("brats2021"), tmp_path / "labels.nii.gz")
    with pytest.raises(UserError, match="--region tc: the labels follow no known scheme"):
        prepare_scan(unnamed, OPTIONS, expected=Expectations(region="tc"))
    # the training data's scheme stands in for a reference of unknown layout
    prepared = prepare_scan(unnamed, OPTIONS, expected=Expectations(region="tc", scheme="brats2021"))
    np.testing.assert_array_equal(prepared.reference, region_mask("tc"))


# ----------------------------------------------------------------------------- through segment_scans.py


@pytest.fixture(scope="module")
def models(data):
    return dict(model=write_model(str(data / "ddpm")), classifier=write_classifier(str(data / "cls")))


def segment(data, models, inputs, out, *extra):
    return ["--input", *inputs, "--model_path", models["model"], "--method", "cdm", "--detector_path",
            models["classifier"], "--dataset_json", str(data / "slices"), "--noise_level", "0.1", "--steps", "1",
            "--detect_threshold", "0", "--batch_size", "8", "--out_dir", str(out), *extra]


def test_segment_scans_reports_the_reference_region_by_the_references_layout(data, models, tmp_path):
    folder = str(data / "brats2023" / "BraTS-GLI-00001-000")
    scans_command.main(segment(data, models, [folder], tmp_path / "out", "--region", "tc"))
    row = json.loads((tmp_path / "out" / "summary.json").read_text())["scans"][0]
    assert row["reference_voxels"] == int(region_mask("tc").sum())  # 2023 labels 1 and 3, not 1 and 4


def test_scans_the_models_cannot_take_are_one_line_errors_with_exit_status_2(data, models, tmp_path, capsys):
    t1_only = tmp_path / "t1_only"
    t1_only.mkdir()
    save(modalities_of_subject()["t1"], t1_only / "P1_t1.nii.gz")
    two_channels = save(np.stack([modalities_of_subject()["flair"]] * 2, -1), tmp_path / "two.nii.gz")
    head = save(unstripped_head(), tmp_path / "head.nii.gz")
    folder = str(data / "raw" / "BraTS2021_00001")
    cases = [
        ([folder], ["--modality", "t1"], "--modality t1: the models were trained on flair"),
        ([str(t1_only / "P1_t1.nii.gz")], [], "P1_t1.nii.gz: named as a t1 scan, but the models take flair"),
        ([str(t1_only)], [], "t1_only: no *_flair.nii.gz (the models take flair)"),
        ([two_channels], [], "two.nii.gz: expected a 3-D volume, or a 4-D one whose channels"),
        ([head], [], "head.nii.gz: 100 % of the voxels on its side faces are nonzero"),
        ([folder], ["--region", "xx"], "--region xx: expected wt"),
    ]
    for inputs, extra, expected in cases:
        out = tmp_path / "never"
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            run_main(scans_command.main, segment(data, models, inputs, out, *extra))
        err = capsys.readouterr().err
        assert info.value.code == 2, err
        assert err.split("\r")[-1].startswith("error: ") and err.count("\n") == 1 and expected in err, err
        assert not out.exists()
