"""scripts/image_p_seg.py end to end on tiny checkpoints and a tiny generated NIfTI-derived dataset."""

import csv
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import script_util
from guided_diffusion.checkpoint_util import write_args_json
from guided_diffusion.cli import UserError
from guided_diffusion.segment import command
from guided_diffusion.metrics import dice_3d
from guided_diffusion.volumes import SliceOptions, VolumeCase, export_slice_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "image_p_seg.py")

image_p_seg = command

TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16",
            diffusion_steps=100)
TINY_CLASSIFIER = dict(image_size=32, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="16",
                       classifier_channel_mult="1,2", classifier_num_head_channels=32, diffusion_steps=100)
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def write_subject(folder, subject, seed):
    """A 24x24x8 'brain' (an ellipse of tissue) with a bright cuboid lesion in slices 2..5."""
    rng = np.random.default_rng(seed)
    xx, yy = np.meshgrid(np.arange(24), np.arange(24), indexing="ij")
    brain = ((xx - 11.5) / 10) ** 2 + ((yy - 11.5) / 9) ** 2 < 1
    volume = np.where(brain[..., None], rng.uniform(0.3, 0.6, (24, 24, 8)), 0).astype(np.float32)
    seg = np.zeros((24, 24, 8), np.int16)
    x0, y0 = 6 + seed % 4, 8
    seg[x0:x0 + 6, y0:y0 + 7, 2:6] = 1
    volume[seg > 0] = 1.0
    os.makedirs(os.path.join(folder, subject), exist_ok=True)
    flair = os.path.join(folder, subject, f"{subject}_flair.nii.gz")
    seg_path = os.path.join(folder, subject, f"{subject}_seg.nii.gz")
    nib.save(nib.Nifti1Image(volume, AFFINE), flair)
    nib.save(nib.Nifti1Image(seg, AFFINE), seg_path)
    return VolumeCase(subject, (flair,), seg_path)


def write_model(directory, **overrides):
    config = script_util.model_and_diffusion_defaults()
    config.update(TINY, **overrides)
    torch.manual_seed(0)
    model, _ = script_util.create_model_and_diffusion(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # the zero-initialised output layer would make every map zero
    os.makedirs(directory, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(directory, "model000000.pt"))
    write_args_json(directory, config)
    return os.path.join(directory, "model000000.pt")


def write_classifier(directory, **overrides):
    config = script_util.classifier_and_diffusion_defaults()
    config.update(TINY_CLASSIFIER, **overrides)
    torch.manual_seed(1)
    classifier = script_util.create_classifier(**{k: config[k] for k in script_util.classifier_defaults()})
    with torch.no_grad():
        for p in classifier.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    os.makedirs(directory, exist_ok=True)
    torch.save(classifier.state_dict(), os.path.join(directory, "model000000.pt"))
    write_args_json(directory, config)
    return os.path.join(directory, "model000000.pt")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    raw = root / "raw"
    cases = [write_subject(str(raw), f"S{i}", i) for i in range(3)]
    slices = str(root / "slices")
    export_slice_dataset(cases, slices, SliceOptions(image_size=32, min_lesion_pixels=4), input_dir=str(raw),
                         val_fraction=0.34, seed=0)
    return dict(
        root=root,
        slices=slices,
        model=write_model(str(root / "ddpm")),
        classifier=write_classifier(str(root / "cls")),
    )


def run(setup, out, *extra):
    args = ["--src_dir", setup["slices"], "--model_path", setup["model"], "--out_dir", str(out),
            "--noise_level", "0.1", "--steps", "3", "--batch_size", "3", "--grid_images", "2", *extra]
    image_p_seg.main(args)
    return out


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tumour_slices(setup):
    folder = os.path.join(setup["slices"], "validation", "tumor")
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("method", ["cdm", "cg-cdm", "cg-diff", "anomaly", "cam", "gradcam", "gradcam++", "layercam",
                                    "scorecam"])
def test_every_method_writes_every_output(setup, tmp_path, method):
    out = run(setup, tmp_path / method, "--method", method, "--classifier_path", setup["classifier"],
              "--stride", "2")
    names = tumour_slices(setup)
    assert len(names) == 4  # the validation subject's four lesion slices
    rows = read_csv(out / "metrics.csv")
    assert [r["name"] for r in rows] == names
    for row in rows:
        dice = float(row["dice"])
        assert 0 <= dice <= 1 and row["label"] == "1"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["n_images"] == 4 and summary["seconds_per_image"] > 0
    (variant,) = summary["variants"].values()  # one schema: a single variant is still under "variants"
    for kind in ("otsu", "largest_component"):
        assert variant[kind]["n"] == 4
        assert variant[kind]["dice_mean"] == pytest.approx(np.mean([float(r["dice" if kind == "otsu" else "dice_lcc"])
                                                                     for r in rows]))
    saved = np.load(out / "saliency.npz")
    assert saved["maps"].shape == (4, 32, 32) and list(saved["names"]) == names
    for folder in ("masks", "masks_lcc"):
        pngs = sorted(os.listdir(out / folder))
        assert pngs == [os.path.splitext(n)[0] + ".png" for n in names]
        mask = np.asarray(Image.open(out / folder / pngs[0]))
        assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}
    assert (out / "grid.png").stat().st_size > 1000
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporary files left


def test_tau_ablation_in_one_run_matches_single_runs_with_other_batches(setup, tmp_path):
    out = run(setup, tmp_path / "ablation", "--tau", "0.95,0", "--batch_size", "4")
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]) == {"tau_0.95", "tau_0"}
    assert summary["variants"]["tau_0"]["settings"]["tau"] == 0.0
    single = run(setup, tmp_path / "single", "--tau", "0", "--batch_size", "3")
    ablation_maps = np.load(out / "tau_0" / "saliency.npz")["maps"]
    single_maps = np.load(single / "saliency.npz")["maps"]
    assert np.abs(single_maps).max() > 0
    np.testing.assert_allclose(ablation_maps, single_maps, rtol=1e-4, atol=1e-4 * np.abs(single_maps).max())
    for variant in ("tau_0.95", "tau_0"):
        assert (out / variant / "metrics.csv").exists() and (out / variant / "grid.png").exists()


def test_volumes_are_pasted_on_the_source_grid_with_3d_dice(setup, tmp_path):
    out = run(setup, tmp_path / "vol", "--volumes", "True")
    rows = read_csv(out / "volumes.csv")
    assert len(rows) == 1
    subject = rows[0]["subject"]
    assert int(rows[0]["slices_evaluated"]) == 4
    prediction = nib.load(out / "volumes" / f"{subject}_pred.nii.gz")
    np.testing.assert_array_equal(prediction.affine, AFFINE)
    assert prediction.shape == (24, 24, 8)
    predicted = np.asarray(prediction.dataobj) > 0
    assert not predicted[..., [0, 1, 6, 7]].any()  # only the evaluated (lesion) slices can hold predictions
    gt = np.asarray(nib.load(setup["root"] / "raw" / subject / f"{subject}_seg.nii.gz").dataobj) > 0
    assert float(rows[0]["dice_3d"]) == pytest.approx(dice_3d(predicted, gt))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["variants"]["tau_0.95"]["volumes"]["dice_3d_mean"] == pytest.approx(float(rows[0]["dice_3d"]))


def test_seed_classifier_location_and_guided_switch(setup, tmp_path):
    out = run(setup, tmp_path / "guided", "--guided", "--save_dir", os.path.dirname(setup["classifier"]),
              "--max_images", "2")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "cg-cdm" and summary["n_images"] == 2
    assert summary["settings"]["classifier_path"] == setup["classifier"]


def test_user_errors(setup, tmp_path):
    with pytest.raises(UserError, match="--method"):
        run(setup, tmp_path / "e1", "--method", "magic")
    with pytest.raises(UserError, match="--classifier_path is required"):
        run(setup, tmp_path / "e2", "--method", "cg-cdm")
    unconditional = write_model(str(tmp_path / "uncond"), class_cond=False)
    with pytest.raises(UserError, match="not class-conditional"):
        image_p_seg.main(["--src_dir", setup["slices"], "--model_path", unconditional, "--out_dir", str(tmp_path / "e3")])
    other = write_classifier(str(tmp_path / "cls50"), diffusion_steps=50)
    with pytest.raises(UserError, match="diffusion_steps"):
        run(setup, tmp_path / "e4", "--method", "cg-cdm", "--classifier_path", other)
    with pytest.raises(UserError, match="--detect_threshold 1.5: must lie in"):
        run(setup, tmp_path / "e5", "--detect_threshold", "1.5")


def test_errors_exit_2_with_one_line_and_no_traceback(setup, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, SCRIPT, "--src_dir", setup["slices"], "--model_path", setup["model"],
                             "--method", "cg-cdm", "--out_dir", str(tmp_path / "x")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: --classifier_path is required")


def test_volumes_without_manifest_fail_before_any_output(setup, tmp_path):
    no_manifest = tmp_path / "no_manifest"
    shutil.copytree(setup["slices"], no_manifest)
    os.remove(no_manifest / "manifest.csv")
    out = tmp_path / "vol_err"
    with pytest.raises(UserError, match="--src_dir .*manifest.csv"):
        image_p_seg.main(["--src_dir", str(no_manifest), "--model_path", setup["model"], "--out_dir", str(out),
                          "--steps", "3", "--volumes", "True"])
    assert not out.exists()


def test_an_earlier_output_folder_survives_a_failed_run(setup, tmp_path, monkeypatch):
    out = run(setup, tmp_path / "keep")
    before = sorted(os.listdir(out))
    from guided_diffusion.segment import report

    def broken_grid(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_grid", broken_grid)
    with pytest.raises(UserError, match="--out_dir"):
        run(setup, out)
    assert sorted(os.listdir(out)) == before  # the complete earlier run, untouched
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".keep")]  # no temporary folder left


def test_mask_options_reach_the_report(setup, tmp_path):
    out = run(setup, tmp_path / "options", "--smooth_sigma", "1", "--foreground_only", "True")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mask_options"] == {"smooth_sigma": 1.0, "foreground_only": True, "keep_largest": False,
                                       "positive_part": False}
    assert 0 <= summary["variants"]["tau_0.95"]["map_separability"] <= 1
    with pytest.raises(UserError, match="--smooth_sigma"):
        run(setup, tmp_path / "bad", "--smooth_sigma", "-1")


def test_sigterm_during_segmentation_leaves_no_output(setup, tmp_path):
    import signal
    import time

    out = tmp_path / "stopped"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, SCRIPT, "--src_dir", setup["slices"], "--model_path", setup["model"], "--method", "cdm",
         "--noise_level", "95", "--steps", "90", "--batch_size", "1", "--out_dir", str(out)],
        stderr=subprocess.PIPE, text=True, env=env)
    seen = ""
    deadline = time.time() + 120
    while "batches" not in seen and time.time() < deadline:  # the maps are being computed
        seen += process.stderr.read(1)
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in seen + rest
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".stopped")]


def test_a_split_without_masks_is_a_prediction_only_run_with_the_same_maps(setup, tmp_path):
    evaluated = run(setup, tmp_path / "evaluated")
    no_masks = tmp_path / "no_masks"
    shutil.copytree(setup["slices"], no_masks)
    shutil.rmtree(no_masks / "validation" / "seg")
    image_p_seg.main(["--src_dir", str(no_masks), "--model_path", setup["model"], "--out_dir",
                            str(tmp_path / "predicted"), "--noise_level", "0.1", "--steps", "3", "--batch_size", "3"])
    out = tmp_path / "predicted"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 4 and summary["n_scored"] == 0 and summary["n_segmented"] == 4
    assert summary["variants"]["tau_0.95"]["otsu"]["n"] == 0
    rows = read_csv(out / "metrics.csv")
    assert [r["has_mask"] for r in rows] == ["False"] * 4 and all(r["dice"] == "" for r in rows)
    assert len(os.listdir(out / "masks")) == 4
    # the same images give the same maps whether or not they have masks
    np.testing.assert_array_equal(np.load(out / "saliency.npz")["maps"], np.load(evaluated / "saliency.npz")["maps"])


def test_every_slice_with_detection_scores_healthy_slices_too(setup, tmp_path):
    tumour_only = run(setup, tmp_path / "tumour", "--method", "cg-cdm", "--classifier_path", setup["classifier"])
    out = run(setup, tmp_path / "all", "--method", "cg-cdm", "--classifier_path", setup["classifier"],
              "--slices", "all", "--detect_threshold", "0")
    summary = json.loads((out / "summary.json").read_text())
    rows = read_csv(out / "metrics.csv")
    normal = sorted(os.listdir(os.path.join(setup["slices"], "validation", "normal")))
    assert summary["n_images"] == len(rows) == 4 + len(normal) and summary["n_segmented"] == len(rows)
    detection = summary["detection"]
    assert detection["threshold"] == 0 and detection["sensitivity"] == 1 and detection["specificity"] == 0
    assert detection["n_positive"] == 4 and detection["n_negative"] == len(normal)
    assert 0 <= detection["auroc"] <= 1
    probabilities = [float(r["tumour_probability"]) for r in rows]
    assert all(0 <= p <= 1 for p in probabilities)
    variant = summary["variants"]["tau_0.95"]
    assert variant["otsu"]["n"] == 4 and variant["all_slices"]["otsu"]["n"] == len(rows)
    # tumour slices keep the maps of the tumour-only run: a slice's noise depends on its name alone
    maps = dict(zip(np.load(out / "saliency.npz")["names"], np.load(out / "saliency.npz")["maps"]))
    saved = np.load(tumour_only / "saliency.npz")
    for name, expected in zip(saved["names"], saved["maps"]):  # other batch neighbours: float tolerance
        np.testing.assert_allclose(maps[name], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # a threshold above every probability segments nothing: every mask is empty, healthy slices score no FP
    nothing = run(setup, tmp_path / "none", "--method", "cg-cdm", "--classifier_path", setup["classifier"],
                  "--slices", "all", "--detect_threshold", "1")
    summary = json.loads((nothing / "summary.json").read_text())
    assert summary["n_segmented"] == 0 and summary["detection"]["sensitivity"] == 0
    assert not np.load(nothing / "saliency.npz")["maps"].any()
    assert summary["variants"]["tau_0.95"]["otsu"]["dice_mean"] == 0.0  # a missed tumour slice counts 0
    # the label-free map check: a minimum separability of 1 rejects every detected slice's (imperfect) map
    gated = run(setup, tmp_path / "gated", "--method", "cg-cdm", "--classifier_path", setup["classifier"],
                "--slices", "all", "--detect_threshold", "0", "--min_separability", "1")
    summary = json.loads((gated / "summary.json").read_text())
    assert summary["n_segmented"] == 0 and summary["settings"]["min_separability"] == 1.0
    assert summary["detection"]["n_detected"] == 0 and not np.load(gated / "saliency.npz")["maps"].any()


def test_bf16_autocast_maps_follow_the_fp32_maps(setup, tmp_path):
    flags = ("--method", "cg-cdm", "--classifier_path", setup["classifier"], "--tau", "0")
    fp32 = np.load(run(setup, tmp_path / "fp32", *flags) / "saliency.npz")["maps"]
    bf16_out = run(setup, tmp_path / "bf16", *flags, "--precision", "bf16")
    bf16 = np.load(bf16_out / "saliency.npz")["maps"]
    assert json.loads((bf16_out / "summary.json").read_text())["settings"]["precision"] == "bf16"
    assert not np.array_equal(fp32, bf16)  # autocast did run in bfloat16
    for a, b in zip(fp32, bf16):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def test_relative_manifests_survive_moving_the_dataset(setup, tmp_path):
    from guided_diffusion.volumes import read_manifest

    first = tmp_path / "first"
    cases = [write_subject(str(first / "raw"), f"S{i}", i) for i in range(3)]
    export_slice_dataset(cases, str(first / "slices"), SliceOptions(image_size=32, min_lesion_pixels=4),
                         input_dir=str(first / "raw"), val_fraction=0.34, seed=0)
    stored = read_csv(first / "slices" / "manifest.csv")
    assert all(not os.path.isabs(r["source"]) and r["source"].startswith("S") for r in stored)
    moved = tmp_path / "moved"
    shutil.move(str(first), str(moved))  # workstation to cluster: the old place is gone
    flags = ("--src_dir", str(moved / "slices"), "--volumes", "True", "--steps", "1")
    out = tmp_path / "together"
    image_p_seg.main(["--model_path", setup["model"], "--out_dir", str(out), *flags])
    assert len(read_csv(out / "volumes.csv")) == 1
    assert read_manifest(str(moved / "slices"))[0]["source"].startswith(str(moved / "raw"))
    elsewhere = tmp_path / "scratch" / "brats"
    shutil.move(str(moved / "raw"), str(elsewhere))
    with pytest.raises(UserError, match="pass --raw_dir"):
        image_p_seg.main(["--model_path", setup["model"], "--out_dir", str(tmp_path / "lost"), *flags])
    assert not (tmp_path / "lost").exists()
    image_p_seg.main(["--model_path", setup["model"], "--out_dir", str(tmp_path / "found"), *flags,
                      "--raw_dir", str(elsewhere)])
    subject = read_csv(tmp_path / "found" / "volumes.csv")[0]["subject"]
    assert nib.load(tmp_path / "found" / "volumes" / f"{subject}_pred.nii.gz").shape == (24, 24, 8)


def test_the_grid_shows_several_subjects_and_the_worst_slice(tmp_path):
    from guided_diffusion.segment.postprocess import MaskOptions
    from guided_diffusion.segment.report import VariantWriter

    writer = VariantWriter(str(tmp_path), 0, (4, 4), MaskOptions(), grid_images=3)
    empty = np.zeros((4, 4), bool)
    for subject, z, area, dice in (("A", 1, 2, 0.9), ("A", 2, 5, 0.8), ("B", 1, 3, 0.1), ("C", 1, 1, 0.7),
                                   ("D", 1, 4, 0.6), ("E", 1, 2, 0.95)):
        gt = empty.copy()
        gt.flat[:area] = True
        writer._offer_to_grid((np.zeros((1, 4, 4)), gt, np.zeros((4, 4)), empty, f"{subject}_z{z:03d}.png", dice, True))
    names = [entry[4] for entry in writer.grid]
    # two evenly spaced subjects (A's largest lesion, E) and the lowest-Dice slice (B)
    assert names == ["A_z002.png", "E_z001.png", "B_z001.png"]
    writer.csv_file.close()
