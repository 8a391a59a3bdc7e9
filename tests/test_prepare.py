"""Tests for the NIfTI -> slice-layout converters (guided_diffusion.volumes, scripts/prepare_*.py).

Tiny synthetic subjects (an ellipsoid brain with a linear intensity ramp per modality and a
box-shaped lesion at a known place) are converted; the expected slice counts, labels and
mask positions are computed here from the volumes themselves.
"""

import csv
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from guided_diffusion import volumes
from guided_diffusion.cli import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import prepare_brats  # noqa: E402
import prepare_synapse  # noqa: E402

SHAPE = (40, 48, 30)
LESION_XY = (slice(14, 22), slice(18, 26))  # 8 x 8 voxels
LESION_DEPTH = 6
# subject -> first lesion slice (None: lesion-free)
SUBJECTS = {"BraTS_001": 8, "BraTS_002": 12, "BraTS_003": 15, "BraTS_004": 10, "BraTS_005": 13, "BraTS_006": None}


def ellipsoid_brain(shape=SHAPE):
    x, y, z = np.indices(shape, dtype=float)
    return ((x - 20) / 15) ** 2 + ((y - 24) / 18) ** 2 + ((z - 15) / 12) ** 2 <= 1


def lesion_mask(first_slice, shape=SHAPE):
    mask = np.zeros(shape, bool)
    if first_slice is not None:
        mask[LESION_XY + (slice(first_slice, first_slice + LESION_DEPTH),)] = True
    return mask


def modality_volume(name, brain, lesion, rng):
    """Each modality ramps along a different axis, so channels and orientation can be told apart."""
    x, y, z = np.indices(brain.shape, dtype=float)
    ramp = {"flair": x, "t1": y, "t1ce": z, "t2": 40 - x}[name]
    volume = 100 + 5 * ramp + rng.normal(0, 1, brain.shape)
    volume[lesion] += 400 if name != "t1" else -60
    return np.where(brain, volume, 0).astype(np.float32)


def write_subject(root, subject, first_slice, affine=None, modalities=volumes.BRATS_MODALITIES, seed=0):
    """One BraTS-style subject folder; returns (brain, lesion) in the array order written."""
    folder = os.path.join(root, subject)
    os.makedirs(folder, exist_ok=True)
    affine = np.eye(4) if affine is None else affine
    brain, lesion = ellipsoid_brain(), lesion_mask(first_slice)
    rng = np.random.default_rng(seed)
    for name in modalities:
        nib.save(nib.Nifti1Image(modality_volume(name, brain, lesion, rng), affine),
                 os.path.join(folder, f"{subject}_{name}.nii.gz"))
    seg = np.zeros(SHAPE, np.uint8)
    seg[lesion] = 2
    seg[lesion & np.roll(lesion, 2, axis=0) & np.roll(lesion, -2, axis=0)] = 4  # a core of another label
    nib.save(nib.Nifti1Image(seg, affine), os.path.join(folder, f"{subject}_seg.nii.gz"))
    return brain, lesion


@pytest.fixture
def brats_dir(tmp_path):
    root = tmp_path / "brats"
    for i, (subject, first) in enumerate(SUBJECTS.items()):
        write_subject(str(root), subject, first, seed=i)
    return str(root)


def run_brats(brats_dir, out_dir, *extra):
    prepare_brats.main(["--input_dir", brats_dir, "--out_dir", str(out_dir), "--image_size", "32",
                        "--val_fraction", "0.34", "--seed", "0", *extra])
    return volumes.read_manifest(str(out_dir))


def read_png(path):
    return np.asarray(Image.open(path))


def expected_labels(first_slice, min_brain_fraction=0.3):
    """{z: label} from the volumes: kept slices have enough brain; lesion slices are tumor."""
    area = ellipsoid_brain().sum((0, 1))
    kept = np.flatnonzero(area >= min_brain_fraction * area.max())
    lesion_slices = set() if first_slice is None else set(range(first_slice, first_slice + LESION_DEPTH))
    return {int(z): ("tumor" if z in lesion_slices else "normal") for z in kept}


def test_slice_counts_labels_and_split(brats_dir, tmp_path):
    rows = run_brats(brats_dir, tmp_path / "out")
    by_subject = {}
    for row in rows:
        by_subject.setdefault(row["subject"], {})[row["slice_index"]] = row["label"]
    assert by_subject.keys() == SUBJECTS.keys()
    for subject, first in SUBJECTS.items():
        assert by_subject[subject] == expected_labels(first), subject
    # subjects, not slices, are split: 2 of 6 in validation, none in both
    splits = {}
    for row in rows:
        splits.setdefault(row["subject"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits.values())
    assert sum(s == {"validation"} for s in splits.values()) == 2
    # folders hold exactly the manifest's files, each image with a same-named mask
    for split in volumes.SPLITS:
        for label in volumes.CLASSES:
            listed = sorted(os.path.basename(r["file"]) for r in rows if r["split"] == split and r["label"] == label)
            assert sorted(os.listdir(tmp_path / "out" / split / label)) == listed
        masks = sorted(os.listdir(tmp_path / "out" / split / "seg"))
        assert masks == sorted(os.path.basename(r["mask"]) for r in rows if r["split"] == split)


def test_split_depends_only_on_subjects_and_seed():
    names = [f"s{i:02d}" for i in range(20)]
    first = volumes.split_subjects(names, 0.25, seed=3)
    assert volumes.split_subjects(list(reversed(names)), 0.25, seed=3) == first
    assert sum(v == "validation" for v in first.values()) == 5
    assert volumes.split_subjects(names, 0.25, seed=4) != first
    assert set(volumes.split_subjects(names, 0.0, seed=0).values()) == {"training"}
    with pytest.raises(UserError, match="--val_fraction"):
        volumes.split_subjects(names, 1.0, seed=0)


def positive_slices(out, rows):
    """(row, image, mask) of every positive slice of a written layout, after checking that each mask has
    the manifest's pixel count and that the normal slices' masks are empty."""
    for row in rows:
        image, mask = read_png(out / row["file"]).astype(float), read_png(out / row["mask"]) > 0
        assert mask.sum() == row["lesion_pixels"]
        if row["label"] == "normal":
            assert not mask.any()
        else:
            yield row, image, mask


def test_masks_lie_on_the_lesion(brats_dir, tmp_path):
    rows = run_brats(brats_dir, tmp_path / "out")
    for _, image, mask in positive_slices(tmp_path / "out", rows):
        brain = image > 0
        # the lesion is +400 over a ~100..300 brain: far brighter inside the mask than around it
        assert image[mask].mean() > image[brain & ~mask].mean() + 100
        # 8 x 8 voxels of a 45-voxel-wide crop, resized to 32 pixels
        assert abs(mask.sum() - (8 * 32 / 45) ** 2) < 12


def test_normalisation_closed_form():
    rng = np.random.default_rng(0)
    volume = rng.uniform(10, 500, (12, 10, 8)).astype(np.float32)
    foreground = rng.random(volume.shape) > 0.3
    out = volumes.normalize_percentiles(volume, foreground, 2.0, 98.0)
    lo, hi = np.percentile(volume[foreground], [2.0, 98.0])
    np.testing.assert_allclose(out[foreground], np.clip((volume[foreground] - lo) / (hi - lo), 0, 1), rtol=1e-5)
    assert (out[~foreground] == 0).all()
    assert out.min() == 0 and out.max() == 1
    assert np.isclose((out[foreground] == 1).mean(), 0.02, atol=0.01)
    np.testing.assert_allclose(volumes.ct_window(np.array([-1000.0, -125.0, 75.0, 275.0, 3000.0])),
                               [0, 0, 0.5, 1, 1])


def test_written_images_use_the_full_range(brats_dir, tmp_path):
    # the brain's box is 37 + 2 * 4 voxels wide: at 45 pixels nothing is resized
    rows = run_brats(brats_dir, tmp_path / "out", "--image_size", "45")
    images = [read_png(tmp_path / "out" / r["file"]) for r in rows if r["subject"] == "BraTS_006"]
    stack = np.stack(images)
    assert stack.shape[1:] == (45, 45) and stack.dtype == np.uint8 and stack.max() == 255
    assert (stack == 0).mean() > 0.2  # background outside the ellipsoid
    # the flair ramp runs along x, i.e. left to right in the picture
    middle = images[len(images) // 2].astype(float)
    row = middle[22][middle[22] > 0]
    assert np.corrcoef(np.arange(row.size), row)[0, 1] > 0.9


def test_manifest_puts_slices_back_into_the_volume(brats_dir, tmp_path):
    out = tmp_path / "out"
    rows = run_brats(brats_dir, out)
    subject_rows = [r for r in rows if r["subject"] == "BraTS_002"]
    masks = {r["file"]: read_png(out / r["mask"]) > 0 for r in subject_rows}
    pasted = volumes.paste_slices(subject_rows, masks)
    source = nib.load(subject_rows[0]["seg_source"])
    assert pasted.shape == source.shape and np.allclose(pasted.affine, source.affine)
    truth = np.asarray(source.dataobj) > 0
    got = pasted.get_fdata() > 0.5
    dice = 2 * (got & truth).sum() / (got.sum() + truth.sum())
    assert dice > 0.8  # nearest resizing 45 -> 32 -> 45 pixels moves edges by up to a voxel
    assert np.allclose(np.argwhere(got).mean(0), np.argwhere(truth).mean(0), atol=0.6)
    np.testing.assert_array_equal(got.any((0, 1)), truth.any((0, 1)))  # the same slices


def test_round_trip_is_exact_without_resizing_in_any_orientation(tmp_path):
    # an LPS-like, axis-permuted affine: slices are still axial in world space
    affine = np.array([[0, 0, -1.0, 30], [-1.0, 0, 0, 40], [0, 1.0, 0, -10], [0, 0, 0, 1]])
    root = tmp_path / "brats"
    for i, subject in enumerate(["A", "B", "C"]):
        write_subject(str(root), subject, 10 + i, affine=affine, modalities=("flair",))
    # canonical axes here are (z, x, y) of the array; a slice is 30 x 40, a square of side 40
    prepare_brats.main(["--input_dir", str(root), "--out_dir", str(tmp_path / "out"), "--crop", "none",
                        "--image_size", "40", "--val_fraction", "0.34", "--min_brain_fraction", "0"])
    rows = [r for r in volumes.read_manifest(str(tmp_path / "out")) if r["subject"] == "B"]
    assert len(rows) == ellipsoid_brain().any((0, 2)).sum()  # every axial slice with brain kept
    masks = {r["file"]: read_png(tmp_path / "out" / r["mask"]) > 0 for r in rows}
    pasted = volumes.paste_slices(rows, masks).get_fdata() > 0.5
    truth = np.asarray(nib.load(rows[0]["seg_source"]).dataobj) > 0
    np.testing.assert_array_equal(pasted, truth)


def test_cut_and_paste_are_inverse():
    rng = np.random.default_rng(1)
    slice_xy = rng.random((11, 7))
    for box in [(-3, 14, -5, 12), (2, 6, 1, 5), volumes.square_box(slice_xy > 0.5, margin=2)]:
        image = volumes.cut_box(slice_xy, box)
        assert image.shape == (box[3] - box[2], box[1] - box[0])
        back = np.full_like(slice_xy, -1.0)
        volumes.paste_box(back, image, box)
        inside = back >= 0
        np.testing.assert_array_equal(back[inside], slice_xy[inside])
        assert inside[max(box[0], 0):box[1], max(box[2], 0):box[3]].all()
    # anterior (high y) at the top, x left to right
    image = volumes.to_display(np.arange(12).reshape(3, 4))
    assert image[0, 0] == 3 and image[-1, 0] == 0 and image[-1, -1] == 8


def test_all_modalities_become_channels(brats_dir, tmp_path):
    rows = run_brats(brats_dir, tmp_path / "out", "--modality", "all")
    row = next(r for r in rows if r["subject"] == "BraTS_006" and r["slice_index"] == 15)
    assert row["file"].endswith(".npy")
    image = np.load(tmp_path / "out" / row["file"])
    assert image.shape == (4, 32, 32) and image.dtype == np.uint8
    brain = ndimage.binary_erosion(image[0] > 0, iterations=2)  # away from the blurred edge
    cols, rows_ = np.meshgrid(np.arange(32), np.arange(32))

    def trend(channel, coordinate):
        return np.corrcoef(coordinate[brain], image[channel][brain].astype(float))[0, 1]

    assert trend(0, cols) > 0.9  # flair ramps along x: left to right
    assert trend(1, rows_) < -0.9  # t1 ramps along y: anterior (high y) at the top
    assert trend(3, cols) < -0.9  # t2 ramps against x
    assert image[2][brain].std() < 25  # t1ce ramps along z: nearly flat within a slice


def test_rerun_gives_identical_files(brats_dir, tmp_path):
    run_brats(brats_dir, tmp_path / "a")
    run_brats(brats_dir, tmp_path / "b")
    first = snapshot(tmp_path / "a")
    run_brats(brats_dir, tmp_path / "a", "--workers", "2")  # replaces the earlier export
    assert snapshot(tmp_path / "a") == first == snapshot(tmp_path / "b")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary folders left


def snapshot(root):
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def test_synapse_ct_window_and_class_index(tmp_path):
    root = tmp_path / "btcv"
    os.makedirs(root / "img")
    os.makedirs(root / "label")
    x, y, z = np.indices((32, 32, 12))
    for case in ("0001", "0002", "0003"):
        ct = np.full((32, 32, 12), -1000.0)  # air
        ct[4:28, 4:28] = 75.0  # soft tissue: the middle of the default window
        label = np.zeros(ct.shape, np.int16)
        label[8:14, 8:14, 3:7] = 2  # right kidney
        label[18:24, 18:24, 5:9] = 3  # left kidney
        label[10:20, 20:26, 0:2] = 1  # spleen
        ct[label == 2] = 275.0
        nib.save(nib.Nifti1Image(ct.astype(np.int16), np.eye(4)), root / "img" / f"img{case}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "label" / f"label{case}.nii.gz")
    prepare_synapse.main(["--input_dir", str(root), "--out_dir", str(tmp_path / "out"), "--class_index", "2,3",
                          "--image_size", "32", "--val_fraction", "0.34"])
    rows = volumes.read_manifest(str(tmp_path / "out"))
    assert len(rows) == 3 * 12  # every axial slice is kept
    tumor = {r["slice_index"] for r in rows if r["label"] == "tumor" and r["subject"] == "img0001"}
    assert tumor == set(range(3, 9))  # either kidney
    row = next(r for r in rows if r["subject"] == "img0002" and r["slice_index"] == 4)
    image, mask = read_png(tmp_path / "out" / row["file"]), read_png(tmp_path / "out" / row["mask"]) > 0
    assert image.max() == 255 and image.min() == 0
    assert abs(np.median(image[(image > 0) & (image < 255)]) - 127.5) <= 1  # 75 HU -> middle grey
    assert (image[mask] == 255).mean() > 0.9 and mask.sum() == 36  # the right kidney, unresized


# ----------------------------------------------------------------------------- bad input


def expect_user_error(argv, match, tmp_path, script=prepare_brats):
    with pytest.raises(UserError, match=match) as info:
        script.main(argv)
    assert "\n" not in str(info.value)
    assert not os.path.exists(tmp_path / "out")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out")]


def test_missing_or_empty_input(tmp_path):
    expect_user_error(["--input_dir", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "out")],
                      "nope: no such directory", tmp_path)
    os.makedirs(tmp_path / "empty")
    expect_user_error(["--input_dir", str(tmp_path / "empty"), "--out_dir", str(tmp_path / "out")],
                      "empty: no subject folders", tmp_path)
    expect_user_error(["--input_dir", str(tmp_path / "empty"), "--out_dir", str(tmp_path / "out")],
                      "img: no such directory", tmp_path, script=prepare_synapse)


def test_subject_without_seg_or_modality(brats_dir, tmp_path):
    os.remove(os.path.join(brats_dir, "BraTS_003", "BraTS_003_seg.nii.gz"))
    expect_user_error(["--input_dir", brats_dir, "--out_dir", str(tmp_path / "out")],
                      r"BraTS_003: no \*_seg.nii.gz", tmp_path)
    write_subject(brats_dir, "BraTS_003", 8)
    os.remove(os.path.join(brats_dir, "BraTS_004", "BraTS_004_t1ce.nii.gz"))
    prepare_brats.main(["--input_dir", brats_dir, "--out_dir", str(tmp_path / "flair_only")])  # flair is there
    expect_user_error(["--input_dir", brats_dir, "--out_dir", str(tmp_path / "out"), "--modality", "all"],
                      r"BraTS_004: no \*_t1ce.nii.gz", tmp_path)


def test_shape_mismatch_and_corrupt_volume(brats_dir, tmp_path):
    seg_path = os.path.join(brats_dir, "BraTS_005", "BraTS_005_seg.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((40, 48, 29), np.uint8), np.eye(4)), seg_path)
    expect_user_error(["--input_dir", brats_dir, "--out_dir", str(tmp_path / "out")],
                      r"BraTS_005_seg.nii.gz: mask shape \(40, 48, 29\) differs from image", tmp_path)
    write_subject(brats_dir, "BraTS_005", 13)
    flair = os.path.join(brats_dir, "BraTS_002", "BraTS_002_flair.nii.gz")
    with open(flair, "rb") as f:
        data = f.read()
    with open(flair, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated download
    expect_user_error(["--input_dir", brats_dir, "--out_dir", str(tmp_path / "out")],
                      "BraTS_002_flair.nii.gz: cannot read NIfTI volume", tmp_path)


def test_no_lesion_anywhere(tmp_path):
    root = tmp_path / "brats"
    for subject in ("A", "B", "C"):
        write_subject(str(root), subject, None, modalities=("flair",))
    expect_user_error(["--input_dir", str(root), "--out_dir", str(tmp_path / "out")],
                      "no training slice has at least --min_tumor_pixels", tmp_path)


def test_failed_rerun_keeps_the_earlier_export(brats_dir, tmp_path):
    run_brats(brats_dir, tmp_path / "out")
    before = snapshot(tmp_path / "out")
    with open(os.path.join(brats_dir, "BraTS_006", "BraTS_006_flair.nii.gz"), "wb") as f:
        f.write(b"not a nifti")
    with pytest.raises(UserError, match="BraTS_006_flair.nii.gz"):
        run_brats(brats_dir, tmp_path / "out")
    assert snapshot(tmp_path / "out") == before


def test_refuses_to_replace_an_unrelated_folder(brats_dir, tmp_path):
    os.makedirs(tmp_path / "mine")
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="refusing to replace it"):
        run_brats(brats_dir, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_script_reports_one_line_and_exit_status_2(tmp_path):
    command = [sys.executable, os.path.join(REPO, "scripts", "prepare_brats.py"),
               "--input_dir", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --input_dir {tmp_path / 'nope'}: no such directory"]


def test_manifest_columns(brats_dir, tmp_path):
    run_brats(brats_dir, tmp_path / "out")
    with open(tmp_path / "out" / "manifest.csv", newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header) == volumes.MANIFEST_FIELDS
