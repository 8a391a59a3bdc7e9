"""scripts/segment_scans.py: whole scans in, masks in the scan's own voxel grid out."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import nibabel as nib
import numpy as np
import pytest
import torch

from guided_diffusion.datasets import SliceDataset
from guided_diffusion.metrics import dice_3d
from guided_diffusion.segment import scans_command
from guided_diffusion.segment.scan_decision import ScanDecision, ScanEvidence
from guided_diffusion.segment.postprocess import MaskOptions
from guided_diffusion.segment.scans import ScanWriter, Scan, find_scans, prepare_scan
from guided_diffusion.volumes import SliceOptions, export_slice_dataset
from test_image_p_seg import write_classifier, write_model, write_subject

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = SliceOptions(image_size=32, min_lesion_pixels=4)


def scan_dataset(root):
    """Three synthetic FLAIR subjects under root/raw and their slice layout under root/slices."""
    raw = root / "raw"
    cases = [write_subject(str(raw), f"S{i}", i) for i in range(3)]
    slices = root / "slices"
    export_slice_dataset(cases, str(slices), OPTIONS, input_dir=str(raw), val_fraction=0.34, seed=0,
                         extra_settings=dict(dataset="brats", modalities=["flair"]))
    return raw, slices


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scans")
    raw, slices = scan_dataset(root)
    model = write_model(str(root / "ddpm"))
    args_json = root / "ddpm" / "args.json"
    args_json.write_text(json.dumps({**json.loads(args_json.read_text()), "src_dir": str(slices)}))  # as training writes
    return dict(root=root, raw=raw, slices=slices, model=model, classifier=write_classifier(str(root / "cls")))


def oblique_flipped_affine():
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.5, 2.0, -2.5])  # x and z flipped, anisotropic voxels
    affine[:3, 3] = [40.0, -12.0, 30.0]
    return affine


def write_scan(path, volume, affine, qform_code=1):
    image = nib.Nifti1Image(volume.astype(np.float32), affine)
    image.set_qform(affine, qform_code)
    image.set_sform(affine, 2)
    nib.save(image, path)
    return str(path)


def blob_scan(tmp_path):
    """A 'brain' ellipsoid with a bright blob off-centre, axes in scanner order (y, z, x permuted)."""
    xx, yy, zz = np.meshgrid(np.arange(30), np.arange(26), np.arange(12), indexing="ij")
    brain = ((xx - 15) / 13) ** 2 + ((yy - 13) / 11) ** 2 + ((zz - 6) / 7) ** 2 < 1
    blob = ((xx - 20) / 4) ** 2 + ((yy - 9) / 3.5) ** 2 + ((zz - 7) / 3) ** 2 < 1
    volume = np.where(brain, 0.4, 0.0) + np.where(blob, 0.6, 0.0)
    volume = np.transpose(volume, (1, 2, 0))  # the file's first axis is not x: reorientation is exercised
    blob = np.transpose(blob, (1, 2, 0))
    return write_scan(tmp_path / "oblique.nii.gz", volume, oblique_flipped_affine()), blob


def test_an_oblique_flipped_scan_comes_back_on_its_own_grid_with_the_blob_in_place(tmp_path):
    path, blob = blob_scan(tmp_path)
    prepared = prepare_scan(Scan("oblique", (path,)), OPTIONS)
    assert prepared.images.shape[1:] == (1, 32, 32) and len(prepared.z) >= 8
    # a map that is the image itself: Otsu over the brain separates the blob, pasted back it must sit where it was
    maps = prepared.images[:, 0].numpy() + 1.0
    evidence = ScanEvidence(maps.astype(np.float32), np.ones(len(maps)), prepared.images.numpy())
    out = tmp_path / "out"
    out.mkdir()
    ScanWriter(str(out), MaskOptions(foreground_only=True), ScanDecision(rule="slices", threshold=0.5)).write(
        prepared, evidence)
    source = nib.load(path)
    for name, dtype in (("oblique_pred.nii.gz", np.uint8), ("oblique_map.nii.gz", np.float32)):
        written = nib.load(out / name)
        assert written.shape == source.shape and written.get_data_dtype() == dtype
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-6)
        for form in ("qform", "sform"):
            matrix, code = getattr(written, f"get_{form}")(coded=True)
            expected, expected_code = getattr(source, f"get_{form}")(coded=True)
            assert code == expected_code
            np.testing.assert_allclose(matrix, expected, atol=1e-5)
    prediction = np.asarray(nib.load(out / "oblique_pred.nii.gz").dataobj) > 0
    assert dice_3d(prediction, blob) > 0.8
    assert (out / "oblique_overview.png").stat().st_size > 5000


def test_scans_are_prepared_exactly_as_the_training_slices(setup):
    subject = "S2"
    prepared = prepare_scan(Scan(subject, (str(setup["raw"] / subject / f"{subject}_flair.nii.gz"),)), OPTIONS)
    written = {}
    for split in ("training", "validation"):
        for label in ("normal", "tumor"):
            folder = setup["slices"] / split / label
            written.update({os.path.splitext(n)[0]: folder / n for n in os.listdir(folder) if n.startswith(subject)})
    common = [i for i, name in enumerate(prepared.names) if name in written]
    assert len(common) >= 4
    data = SliceDataset(str(setup["slices"]), files=[str(written[prepared.names[i]]) for i in common])
    for k, i in enumerate(common):
        torch.testing.assert_close(prepared.images[i], data[k]["image"], rtol=0, atol=1e-6)


def run(setup, out, *extra, inputs=None):
    argv = ["--input", *(inputs or [str(setup["raw"] / "S0")]), "--model_path", setup["model"],
            "--dataset_json", str(setup["slices"]), "--noise_level", "0.1", "--steps", "2", "--batch_size", "4",
            "--out_dir", str(out), *extra]
    scans_command.main(argv)
    return out


def test_subject_folders_give_masks_maps_overviews_and_reference_metrics(setup, tmp_path):
    out = run(setup, tmp_path / "out", "--method", "cg-cdm", "--classifier_path", setup["classifier"],
              "--detect_threshold", "0", inputs=[str(setup["raw"])])
    names = ["S0", "S1", "S2"]
    for name in names:
        source = nib.load(setup["raw"] / name / f"{name}_flair.nii.gz")
        pred = nib.load(out / f"{name}_pred.nii.gz")
        assert pred.shape == source.shape and np.allclose(pred.affine, source.affine)
        assert (out / f"{name}_overview.png").exists() and (out / f"{name}_map.nii.gz").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_scans"] == 3 and summary["n_with_reference"] == 3
    assert [s["scan"] for s in summary["scans"]] == names
    for row in summary["scans"]:
        prediction = np.asarray(nib.load(out / f"{row['scan']}_pred.nii.gz").dataobj) > 0
        gt = np.asarray(nib.load(setup["raw"] / row["scan"] / f"{row['scan']}_seg.nii.gz").dataobj) > 0
        assert row["dice_3d"] == pytest.approx(dice_3d(prediction, gt))
        assert row["segmented_slices"] == row["slices"]  # threshold 0: every slice
    assert summary["detection"]["sensitivity"] == 1.0 and summary["settings"]["detect_threshold"] == 0
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("scan,")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary folder left


def test_a_threshold_above_every_probability_gives_empty_masks(setup, tmp_path):
    out = run(setup, tmp_path / "out", "--method", "cdm", "--detector_path", setup["classifier"],
              "--detect_threshold", "1")
    prediction = np.asarray(nib.load(out / "S0_pred.nii.gz").dataobj)
    assert not prediction.any()
    row = json.loads((out / "summary.json").read_text())["scans"][0]
    assert row["segmented_slices"] == 0 and row["dice_3d"] == 0.0


def test_an_empty_scan_and_nan_voxels_warn_and_do_not_crash(setup, tmp_path, capsys):
    empty = write_scan(tmp_path / "empty.nii.gz", np.zeros((20, 20, 6)), np.eye(4))
    volume = np.asarray(nib.load(setup["raw"] / "S0" / "S0_flair.nii.gz").dataobj).copy()
    volume[0, 0, :] = np.nan
    with_nan = write_scan(tmp_path / "nan.nii.gz", volume, nib.load(setup["raw"] / "S0" / "S0_flair.nii.gz").affine)
    out = run(setup, tmp_path / "out", "--method", "cdm", "--detector_path", setup["classifier"], inputs=[empty, with_nan])
    text = capsys.readouterr().out
    assert "warning:" in text and "an empty scan" in text and "NaN" in text
    assert not np.asarray(nib.load(out / "empty_pred.nii.gz").dataobj).any()
    assert nib.load(out / "nan_pred.nii.gz").shape == volume.shape


def run_cli(argv):
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "segment_scans.py"), *argv], cwd=REPO,
                            capture_output=True, text=True)
    return result.returncode, result.stderr


def test_bad_inputs_are_one_line_errors_and_leave_no_output(setup, tmp_path):
    base = ["--model_path", setup["model"], "--method", "cdm", "--detector_path", setup["classifier"],
            "--dataset_json", str(setup["slices"]), "--steps", "1"]
    subject = str(setup["raw"] / "S0")
    four_d = write_scan(tmp_path / "fourd.nii.gz", np.zeros((8, 8, 4, 2)), np.eye(4))
    two_d = write_scan(tmp_path / "twod.nii.gz", np.zeros((8, 8)), np.eye(4))
    (tmp_path / "notes.txt").write_text("not a scan")
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes((setup["raw"] / "S0" / "S0_flair.nii.gz").read_bytes()[:200])
    no_flair = tmp_path / "nosubject"
    no_flair.mkdir()
    shutil.copy(setup["raw"] / "S0" / "S0_seg.nii.gz", no_flair / "nosubject_t1.nii.gz")
    other_grid = write_scan(tmp_path / "ref.nii.gz", np.zeros((24, 24, 7)), np.eye(4))
    ct_dataset = tmp_path / "ct"
    ct_dataset.mkdir()
    settings = json.loads((setup["slices"] / "dataset.json").read_text())
    settings["options"] = asdict(SliceOptions(image_size=32, intensity="ct"))
    (ct_dataset / "dataset.json").write_text(json.dumps(settings))
    model_without_data = write_model(str(tmp_path / "ddpm_nodata"))
    four_channels = write_model(str(tmp_path / "ddpm4"), in_channels=4)
    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps({"mask_tuned": {"noise_level": 0.1, "steps": 1, "tau": 0, "classifier_scale": 0}}))
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    cases = [
        (["--input", four_d, *base], "expected a 3-D volume"),
        (["--input", two_d, *base], "expected a 3-D volume"),
        (["--input", str(tmp_path / "notes.txt"), *base], "not a NIfTI file"),
        (["--input", str(truncated), *base], "cannot read NIfTI volume"),
        (["--input", str(no_flair), *base], "no *_flair.nii.gz"),
        (["--input", str(tmp_path / "nowhere.nii.gz"), *base], "no such file or folder"),
        (["--input", subject, *base, "--reference", other_grid], "must share the voxel grid"),
        (["--input", subject, *base, "--dataset_json", str(tmp_path / "missing.json")], "--dataset_json"),
        (["--input", subject, *base, "--dataset_json", str(ct_dataset)], "another kind of data"),
        (["--input", subject, *base, "--dataset_json", str(tmp_path / "other.json")], "not the dataset.json"),
        (["--input", subject, *base, "--model_path", model_without_data, "--dataset_json", ""], "--dataset_json is required"),
        (["--input", subject, *base, "--model_path", four_channels], "in_channels=4"),
        (["--input", subject, *base, "--detect_threshold", "-0.5"], "--detect_threshold -0.5: must lie in [0, 1]"),
        (["--input", subject, *base, "--tau", "0.95,0"], "takes one tau"),
        (["--input", subject, *base, "--settings", str(tmp_path / "other.json")], "not a selection"),
        (["--input", subject, *base, "--settings", str(selection), "--choice", "magic"], "--choice 'magic'"),
    ]
    for argv, expected in cases:
        out = tmp_path / "never"
        status, err = run_cli([*argv, "--out_dir", str(out)])
        assert status == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert expected in err, (argv, err)
        assert not out.exists()


DEMO_MODELS = os.path.join(REPO, "runs", "demo")


def test_a_healthy_scan_gives_a_near_empty_mask_with_the_demo_models(tmp_path):
    """A lesion-free subject of the demo generator (never seen in training), the shipped models and the
    shipped selection (detection threshold chosen on the demo training split)."""
    from dataclasses import replace

    from guided_diffusion import demo_data

    rng = np.random.default_rng([2026, 12])
    settings = replace(demo_data.GLIOMA_SETTINGS, lesion_free_fraction=1.0)
    image, seg, affine = demo_data.synthesize_subject(demo_data.load_mni_template(2.0), rng, 2.0, settings)
    assert not seg.any()
    scan = write_scan(tmp_path / "healthy_flair.nii.gz", np.rint(image * 1000), affine)
    dataset = tmp_path / "demo_dataset"
    dataset.mkdir()  # the demo's preprocessing (scripts/make_demo_data.py), without building the demo data
    (dataset / "dataset.json").write_text(json.dumps({"options": asdict(SliceOptions(image_size=64, min_lesion_pixels=5)),
                                                      "modalities": ["flair"]}))
    out = tmp_path / "out"
    scans_command.main(["--input", scan, "--model_path", os.path.join(DEMO_MODELS, "ddpm", "model.pt"),
                        "--classifier_path", os.path.join(DEMO_MODELS, "classifier", "model.pt"), "--method", "cg-cdm",
                        "--settings", os.path.join(DEMO_MODELS, "selection.json"), "--dataset_json", str(dataset),
                        "--batch_size", "64", "--out_dir", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    row = summary["scans"][0]
    assert summary["settings"]["min_separability"] > 0  # the shipped selection's label-free map check is on
    brain = int((image > 0).sum())
    # measured: 4 of 55 slices, all at the top of the brain, 1.1 % of the brain's voxels (the demo's
    # lesions, 20-70 mm across, cover 0.2-10 %); without detection every slice would get an Otsu mask
    assert row["segmented_slices"] <= 0.1 * row["slices"], row
    assert row["predicted_voxels"] <= 0.02 * brain, row


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun is not installed")
def test_torchrun_shares_a_scan_between_two_processes_with_the_same_result(setup, tmp_path):
    def segment(launcher, out):
        command = [*launcher, os.path.join(REPO, "scripts", "segment_scans.py"), "--input", str(setup["raw"] / "S1"),
                   "--model_path", setup["model"], "--method", "cg-cdm", "--classifier_path", setup["classifier"],
                   "--steps", "2", "--detect_threshold", "0", "--batch_size", "2", "--out_dir", str(out)]
        result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                                timeout=300, cwd=REPO)
        assert result.returncode == 0, result.stderr[-3000:]
        return out

    one = segment([sys.executable], tmp_path / "one")
    two = segment([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", "2"],
                  tmp_path / "two")
    for name in ("S1_pred.nii.gz", "S1_map.nii.gz"):
        np.testing.assert_array_equal(np.asarray(nib.load(one / name).dataobj), np.asarray(nib.load(two / name).dataobj))
    first, second = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert first["scans"][0]["dice_3d"] == second["scans"][0]["dice_3d"]
    assert second["settings"]["world_size"] == 2


def test_a_scan_given_as_its_file_or_as_its_subject_folder_gets_the_same_masks(setup, tmp_path):
    flair = str(setup["raw"] / "S1" / "S1_flair.nii.gz")
    by_file = prepare_scan(find_scans([flair], ("flair",))[0], OPTIONS)
    by_folder = prepare_scan(find_scans([str(setup["raw"] / "S1")], ("flair",))[0], OPTIONS)
    assert by_file.names == by_folder.names and by_folder.names[0].startswith("S1_z")  # the converter's names
    extra = ["--method", "cg-cdm", "--classifier_path", setup["classifier"], "--scan_rule", "volume"]
    file_out = run(setup, tmp_path / "file", *extra, inputs=[flair])
    folder_out = run(setup, tmp_path / "folder", *extra, inputs=[str(setup["raw"] / "S1")])
    for suffix in ("pred", "map"):
        a = np.asarray(nib.load(file_out / f"S1_flair_{suffix}.nii.gz").dataobj)
        b = np.asarray(nib.load(folder_out / f"S1_{suffix}.nii.gz").dataobj)
        np.testing.assert_array_equal(a, b)
