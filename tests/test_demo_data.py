"""Tests for the demo data generator (guided_diffusion.demo_data, scripts/make_demo_data.py).

Most tests use a small ellipsoid phantom instead of the MNI template, so they run in
seconds; one runs the whole generator on the real template at a coarse voxel size.
"""

import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull, Delaunay

from guided_diffusion import demo_data, volumes
from guided_diffusion.cli import UserError
from test_prepare import snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import make_demo_data  # noqa: E402


@pytest.fixture(scope="module")
def phantom():
    """A 1 mm 'brain': an ellipsoid of grey level 0.6 with a dark 'ventricle' inside."""
    x, y, z = np.indices((70, 80, 64), dtype=float)
    brain = ((x - 35) / 28) ** 2 + ((y - 40) / 32) ** 2 + ((z - 32) / 25) ** 2 <= 1
    ventricle = ((x - 35) / 6) ** 2 + ((y - 40) / 12) ** 2 + ((z - 34) / 6) ** 2 <= 1
    image = np.where(brain, np.where(ventricle, 0.12, 0.6), 0.0).astype(np.float32)
    return demo_data.Template(image, brain.astype(np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))


def test_subjects_are_deterministic_and_differ(phantom):
    first = demo_data.synthesize_subject(phantom, np.random.default_rng([0, 1]), voxel_size=2.0)
    again = demo_data.synthesize_subject(phantom, np.random.default_rng([0, 1]), voxel_size=2.0)
    other = demo_data.synthesize_subject(phantom, np.random.default_rng([0, 2]), voxel_size=2.0)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])
    image, seg, affine = first
    assert image.dtype == np.float32 and seg.dtype == np.uint8 and image.shape == seg.shape
    np.testing.assert_allclose(np.diag(affine)[:3], [2.0, 2.0, 2.0])
    assert set(np.unique(seg)) <= {0, 1, 2, 4}


def test_deformation_moves_the_brain_but_keeps_its_size(phantom):
    volumes_ml = []
    for seed in range(4):
        _, brain, _ = demo_data.deform_template(phantom, np.random.default_rng(seed), voxel_size=2.0)
        volumes_ml.append(brain.sum() * 8 / 1000)
    true_ml = phantom.brain.sum() / 1000
    assert all(0.7 * true_ml < v < 1.4 * true_ml for v in volumes_ml)  # scale 0.9..1.1 per axis
    assert len(set(volumes_ml)) == 4  # every subject deformed differently


def test_lesions_are_exactly_where_the_mask_says(phantom):
    image, brain, _ = demo_data.deform_template(phantom, np.random.default_rng(5), voxel_size=2.0)
    for seed in range(6):
        before = image.copy()
        painted = image.copy()
        seg = demo_data.add_lesions(painted, brain, np.random.default_rng(seed), 2.0, count=3)
        lesion = seg > 0
        assert lesion.any() and not (lesion & ~brain).any()  # in the brain only
        changed = painted != before
        assert not (changed & ~lesion).any()  # nothing changes outside the mask
        # the lesion stands out: on average far from the healthy median, voxel by voxel
        median = np.median(before[brain])
        assert np.abs(painted[lesion] - before[lesion]).mean() > 0.3 * median
        rim, core = seg == demo_data.LABEL_RIM, seg == demo_data.LABEL_CORE
        if rim.any():
            assert painted[rim].mean() > 1.4 * median > painted[core].mean()  # bright rim, dark core
        hyper = seg == demo_data.LABEL_HYPER
        if hyper.any():
            assert painted[hyper].mean() > 1.3 * median


def test_lesions_are_irregular_and_span_mm_to_cm(phantom):
    def solidity(mask):
        """Voxels of the mask / grid points inside the convex hull of its voxels (1 for convex shapes)."""
        points = np.argwhere(mask).astype(float)
        hull = Delaunay(points[ConvexHull(points).vertices])
        return mask.sum() / (hull.find_simplex(np.argwhere(np.ones_like(mask)).astype(float)) >= 0).sum()

    grid = np.mgrid[-12:13, -12:13, -12:13]
    assert solidity((grid[0] / 10) ** 2 + (grid[1] / 8) ** 2 + (grid[2] / 9) ** 2 <= 1) > 0.99
    blobs = [demo_data.irregular_blob(8.0, np.random.default_rng(s)) for s in range(6)]
    assert np.mean([solidity(b) for b in blobs]) < 0.9  # lobulated: not ellipsoids or discs
    for radius in (1.0, 3.0, 8.0):
        sizes = [demo_data.irregular_blob(radius, np.random.default_rng(s)).sum() for s in range(5)]
        equivalent_radius = (3 * np.mean(sizes) / (4 * np.pi)) ** (1 / 3)
        assert 0.5 * radius < equivalent_radius < 1.6 * radius
    image, brain, _ = demo_data.deform_template(phantom, np.random.default_rng(0), voxel_size=1.0)
    diameters = []
    for seed in range(12):
        seg = demo_data.add_lesions(image.copy(), brain, np.random.default_rng(seed), 1.0, count=1)
        if seg.any():
            diameters.append(2 * (3 * (seg > 0).sum() / (4 * np.pi)) ** (1 / 3))
    assert min(diameters) < 10 and max(diameters) > 25  # millimetres, at 1 mm voxels


def test_intensity_variation_keeps_background_zero_and_brain_positive(phantom):
    image, brain, _ = demo_data.deform_template(phantom, np.random.default_rng(1), voxel_size=2.0)
    varied = demo_data.vary_intensity(image, brain, np.random.default_rng(2), voxel_size=2.0)
    assert (varied[~brain] == 0).all() and (varied[brain] > 0).all()
    ratio = varied[brain].mean() / image[brain].mean()
    assert 0.6 < ratio < 1.6 and not np.allclose(varied[brain], image[brain] * ratio, atol=0.01)


def test_smooth_field_is_standardised_and_smooth():
    field = demo_data.smooth_field((40, 30, 20), np.random.default_rng(0), spacing=10)
    assert field.shape == (40, 30, 20)
    assert abs(field.mean()) < 1e-5 and abs(field.std() - 1) < 1e-4
    assert np.abs(np.diff(field, axis=0)).mean() < 0.3  # neighbours nearly equal


def test_whole_generator_on_the_mni_template(tmp_path):
    settings = demo_data.LesionSettings(lesion_free_fraction=0.0, min_diameter_mm=12.0, max_diameter_mm=40.0)
    kwargs = dict(num_subjects=4, voxel_size=6.0, image_size=24, val_fraction=0.25, min_tumor_pixels=2,
                  settings=settings, seed=3)
    counts = demo_data.make_demo_dataset(str(tmp_path / "demo"), **kwargs)
    assert sorted(os.listdir(tmp_path / "demo" / "raw")) == ["demo.json"] + [f"demo_{i:03d}" for i in range(4)]
    assert os.listdir(tmp_path / "demo" / "raw" / "demo_002") and os.path.getsize(tmp_path / "demo" / "preview.png")
    rows = volumes.read_manifest(str(tmp_path / "demo" / "slices"))
    assert counts["training"]["tumor"] > 0 and counts["validation"]["tumor"] > 0
    assert len({r["subject"] for r in rows if r["split"] == "validation"}) == 1
    # in the written slices, the masked pixels stand out from the rest of the brain
    contrast = []
    for row in rows:
        if row["label"] == "tumor" and row["lesion_pixels"] >= 4:
            image = np.asarray(Image.open(tmp_path / "demo" / "slices" / row["file"]), float)
            mask = np.asarray(Image.open(tmp_path / "demo" / "slices" / row["mask"])) > 0
            healthy = (image > 0) & ~ndimage.binary_dilation(mask)
            median = np.median(image[healthy])
            contrast.append(np.abs(image[mask] - median).mean() - np.abs(image[healthy] - median).mean())
    assert len(contrast) >= 5 and np.median(contrast) > 20
    first = snapshot(tmp_path / "demo")
    demo_data.make_demo_dataset(str(tmp_path / "demo"), **kwargs)  # same seed: same files, replaced
    assert snapshot(tmp_path / "demo") == first
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_the_brats_2023_naming_holds_the_same_voxels_and_prepares_to_the_same_slices(tmp_path):
    kwargs = dict(num_subjects=2, voxel_size=4.0, image_size=24, val_fraction=0.5, min_tumor_pixels=2, seed=1,
                  settings=demo_data.lesion_settings("glioma", lesion_free_fraction=0.0))
    demo_data.make_demo_dataset(str(tmp_path / "old"), preview=False, **kwargs)
    demo_data.make_demo_dataset(str(tmp_path / "new"), preview=False, naming="brats2023", **kwargs)
    old_raw, new_raw = tmp_path / "old" / "raw", tmp_path / "new" / "raw"
    assert sorted(os.listdir(new_raw)) == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000", "demo.json"]
    folder = new_raw / "BraTS-GLI-00001-000"
    assert sorted(os.listdir(folder)) == ["BraTS-GLI-00001-000-seg.nii.gz", "BraTS-GLI-00001-000-t2f.nii.gz"]
    old_seg = np.asarray(nib.load(old_raw / "demo_001" / "demo_001_seg.nii.gz").dataobj)
    new_seg = np.asarray(nib.load(folder / "BraTS-GLI-00001-000-seg.nii.gz").dataobj)
    assert 4 in old_seg and 3 not in old_seg
    assert np.array_equal(new_seg, np.where(old_seg == 4, 3, old_seg))  # enhancing tumour: 4 becomes 3
    assert np.array_equal(nib.load(old_raw / "demo_001" / "demo_001_flair.nii.gz").get_fdata(),
                          nib.load(folder / "BraTS-GLI-00001-000-t2f.nii.gz").get_fdata())
    old_rows, new_rows = (volumes.read_manifest(str(tmp_path / d / "slices")) for d in ("old", "new"))
    assert len(old_rows) == len(new_rows) > 0
    for old, new in zip(old_rows, new_rows):
        assert (old["split"], old["label"], old["lesion_pixels"]) == (new["split"], new["label"], new["lesion_pixels"])
        for key in ("file", "mask"):
            if old.get(key):
                assert np.array_equal(np.asarray(Image.open(tmp_path / "old" / "slices" / old[key])),
                                      np.asarray(Image.open(tmp_path / "new" / "slices" / new[key])))


def test_bad_flags_and_folders(tmp_path):
    out = str(tmp_path / "demo")
    with pytest.raises(UserError, match="--num_subjects must be at least 2"):
        make_demo_data.main(["--out_dir", out, "--num_subjects", "1"])
    with pytest.raises(UserError, match="--min_lesion_mm"):
        make_demo_data.main(["--out_dir", out, "--min_lesion_mm", "0"])
    with pytest.raises(UserError, match="--voxel_size"):
        make_demo_data.main(["--out_dir", out, "--voxel_size", "0.5"])
    assert not os.path.exists(out)
    os.makedirs(tmp_path / "demo" / "raw")
    (tmp_path / "demo" / "raw" / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="is not a demo folder"):
        make_demo_data.main(["--out_dir", out, "--num_subjects", "2"])
    assert (tmp_path / "demo" / "raw" / "mine.txt").read_text() == "keep"


def test_stress_profile_makes_each_kind_in_turn_and_splits_them_evenly(tmp_path):
    raw = demo_data.write_demo_subjects(str(tmp_path / "raw"), 10, seed=1, voxel_size=3.0,
                                        settings=demo_data.STRESS_KINDS)
    record = json.loads((tmp_path / "raw" / "demo.json").read_text())
    kinds = list(demo_data.STRESS_KINDS)
    assert record["subject_kinds"] == {f"demo_{i:03d}": kinds[i % 5] for i in range(10)}
    voxels = {}
    for i in range(10):
        seg = nib.load(os.path.join(raw, f"demo_{i:03d}", f"demo_{i:03d}_seg.nii.gz"))
        labels = np.asarray(seg.dataobj) > 0
        flair = np.asarray(nib.load(os.path.join(raw, f"demo_{i:03d}", f"demo_{i:03d}_flair.nii.gz")).dataobj)
        voxels.setdefault(kinds[i % 5], []).append(labels.sum() * 27)  # mm^3 at 3 mm voxels
        if kinds[i % 5] == "edge":  # the lesion's centre lies in the brain's top or bottom fifth
            levels = np.flatnonzero((flair > 0).any(axis=(0, 1)))
            centre = ndimage.center_of_mass(labels)[2]
            height = levels[-1] - levels[0] + 1
            assert min(centre - levels[0], levels[-1] - centre) < 0.2 * height + 3
    assert voxels["healthy"] == [0, 0]
    assert all(0 < v for kind, vs in voxels.items() if kind != "healthy" for v in vs)
    assert max(voxels["small"]) < 16000  # mm^3: at most 24 mm across, axes up to 1.3x that sphere's
    split = demo_data.stratified_split([f"demo_{i:03d}" for i in range(30)], 5, 0.5)
    for kind in range(5):
        assert sorted(split[f"demo_{i:03d}"] for i in range(kind, 30, 5)) == ["training"] * 3 + ["validation"] * 3
