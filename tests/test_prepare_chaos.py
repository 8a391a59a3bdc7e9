"""Tests for the CHAOS MR converter (guided_diffusion.chaos, scripts/prepare_chaos.py).

Small CHAOS-format patients are written here with pydicom: 20 x 24 pixels (rows x columns, so a
transposition shows), 8 slices 3 mm apart, file names and InstanceNumbers shuffled against the slice
positions. The anatomy is defined along the feet-to-head index h of a slice: kidneys, liver and spleen
are boxes present on known slices, bright in the image, and every slice's tissue level rises with h,
so the written order can be read off the pictures. Patient 1 is a plain axial series, patient 2 is
tilted by 20 degrees with its slice normal pointing feet-ward, patient 3's ground truth is named
`liver_GT_NNN.png` (pairing by name order).
"""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from guided_diffusion import chaos, volumes
from guided_diffusion.cli import UserError
from test_prepare import positive_slices, read_png, snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import prepare_chaos  # noqa: E402

ROWS, COLS, N = 20, 24, 8
PIXEL_SPACING = (1.5, 1.25)  # between rows, between columns
STEP = 3.0
# organ number -> (slices h where present, rows, cols, grey level written, intensity added)
ANATOMY = {
    2: ({1, 2, 3}, slice(5, 10), slice(3, 8), 126, 3000),  # right kidney
    3: ({2, 3, 4, 5}, slice(5, 10), slice(15, 20), 189, 3000),  # left kidney
    1: ({4, 5, 6, 7}, slice(12, 18), slice(2, 12), 60, 1000),  # liver, a grey level inside 55-70
    4: ({0, 1, 2}, slice(12, 17), slice(14, 22), 250, 1500),  # spleen, inside 240-255
}
KIDNEY = {h for organ in (2, 3) for h in ANATOMY[organ][0]}
TILT = np.deg2rad(20)
ORIENTATIONS = {  # ImageOrientationPatient (row direction, column direction), LPS
    "axial": ((1, 0, 0), (0, 1, 0)),  # normal +z: head-ward
    "tilted_feetward": ((1, 0, 0), (0, -np.cos(TILT), np.sin(TILT))),  # normal (0, -sin, -cos): feet-ward
    "coronal": ((1, 0, 0), (0, 0, -1)),  # normal +y
}
PATIENTS = {"1": ("axial", "name"), "2": ("tilted_feetward", "name"), "3": ("axial", "order")}


def organ_labels(h):
    """(ROWS, COLS) organ numbers of the slice at feet-to-head index h."""
    labels = np.zeros((ROWS, COLS), np.uint8)
    for organ, (present, rows, cols, _, _) in ANATOMY.items():
        if h in present:
            labels[rows, cols] = organ
    return labels


def grey_png(h):
    grey = np.zeros((ROWS, COLS), np.uint8)
    labels = organ_labels(h)
    for organ, (_, _, _, level, _) in ANATOMY.items():
        grey[labels == organ] = level
    return grey


def slice_pixels(h, base, organ_gain):
    image = np.full((ROWS, COLS), base + 50.0 * h)
    labels = organ_labels(h)
    for organ, (_, _, _, _, add) in ANATOMY.items():
        image[labels == organ] += organ_gain * add
    return image.astype(np.uint16)


def write_dicom(path, pixels, position, orientation, instance, uid, rows=ROWS, cols=COLS):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, uid, "MR"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.ImagePositionPatient = [round(float(v), 4) for v in position]
    ds.ImageOrientationPatient = [round(float(v), 6) for v in np.ravel(orientation)]
    ds.PixelSpacing = list(PIXEL_SPACING)
    ds.SliceThickness = STEP
    ds.InstanceNumber = instance
    ds.PixelData = np.ascontiguousarray(pixels, "<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def geometry(kind):
    """(orientation, normal, [position of geometric slice k]) and h of each k."""
    row_dir, col_dir = (np.asarray(v, float) for v in ORIENTATIONS[kind])
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-15.0, -15.0, -40.0])
    positions = [origin + STEP * k * normal for k in range(N)]
    head_ward = normal[2] > 0
    return (row_dir, col_dir), positions, [k if head_ward else N - 1 - k for k in range(N)]


def write_patient(root, patient, kind="axial", pairing="name", t1=True, seed=0):
    """One CHAOS patient folder under root/MR; returns {geometric k: h}."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "MR", patient)
    orientation, positions, h_of = geometry(kind)
    base = 300 + 10 * int(seed)
    names = rng.permutation(N) + 1  # file number of geometric slice k: shuffled
    instances = rng.permutation(N) + 1
    series = [("T2SPIR", ("DICOM_anon",), 2, lambda n: n, 1.0)]
    if t1:
        series += [("T1DUAL", ("DICOM_anon", "InPhase"), 4, lambda n: 2 * n, 1.0),
                   ("T1DUAL", ("DICOM_anon", "OutPhase"), 4, lambda n: 2 * n - 1, 0.5)]
    for sequence, sub, number, name_of, gain in series:
        dicom_dir = os.path.join(folder, sequence, *sub)
        os.makedirs(dicom_dir, exist_ok=True)
        ground = os.path.join(folder, sequence, "Ground")
        os.makedirs(ground, exist_ok=True)
        stems = [f"IMG-{number:04d}-{name_of(int(names[k])):05d}" for k in range(N)]
        for k in range(N):
            uid = generate_uid(entropy_srcs=[patient, sequence, *sub, str(k)])
            write_dicom(os.path.join(dicom_dir, stems[k] + ".dcm"), slice_pixels(h_of[k], base, gain), positions[k],
                        orientation, int(instances[k]), uid)
        if sub[-1] == "OutPhase":
            continue  # the T1DUAL ground truth is named after the in-phase files
        name_rank = {s: i for i, s in enumerate(sorted(stems, key=chaos.natural_key))}
        for k in range(N):
            png = stems[k] if pairing == "name" else f"liver_GT_{name_rank[stems[k]]:03d}"
            Image.fromarray(grey_png(h_of[k])).save(os.path.join(ground, png + ".png"))
    return dict(enumerate(h_of))


@pytest.fixture(scope="module")
def chaos_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("chaos") / "Train_Sets")
    for i, (patient, (kind, pairing)) in enumerate(PATIENTS.items()):
        write_patient(root, patient, kind, pairing, seed=i)
    return root


def convert(chaos_dir, out_dir, *extra):
    prepare_chaos.main(["--input_dir", chaos_dir, "--out_dir", str(out_dir), "--image_size", str(COLS),
                        "--val_fraction", "0.34", *extra])
    with open(os.path.join(out_dir, "dataset.json")) as f:
        return volumes.read_manifest(str(out_dir)), json.load(f)


@pytest.fixture(scope="module")
def t2(chaos_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("t2") / "out"
    rows, settings = convert(chaos_dir, out)
    return out, rows, settings


def test_slices_follow_the_geometry_not_the_file_names(t2, chaos_dir):
    out, rows, settings = t2
    assert {r["subject"] for r in rows} == set(PATIENTS)
    for patient, (kind, _) in PATIENTS.items():
        mine = sorted((r for r in rows if r["subject"] == patient), key=lambda r: r["slice_index"])
        assert [r["slice_index"] for r in mine] == list(range(N))  # every acquired slice written
        # the tissue level rises from feet to head: the written order is feet to head
        levels = [np.median(read_png(out / r["file"])) for r in mine]
        assert all(b > a for a, b in zip(levels, levels[1:])), (patient, levels)
        assert [r["label"] for r in mine] == ["tumor" if h in KIDNEY else "normal" for h in range(N)]
        # dataset.json: voxel order k is the geometric order; slice_index runs feet to head
        info = settings["cases"][patient]
        dicom_dir = os.path.join(chaos_dir, "MR", patient, "T2SPIR", "DICOM_anon")
        _, normal_positions, h_of = geometry(kind)
        superior = []
        for k, entry in enumerate(info["slices"]):
            ds = pydicom.dcmread(os.path.join(dicom_dir, entry["file"]))
            assert np.allclose([float(v) for v in ds.ImagePositionPatient], normal_positions[k], atol=1e-3)
            assert entry["slice_index"] == h_of[k] and entry["sop_instance_uid"] == ds.SOPInstanceUID
            superior.append(float(ds.ImagePositionPatient[2]))
        by_index = [superior[k] for k in np.argsort([e["slice_index"] for e in info["slices"]])]
        assert by_index == sorted(by_index)
        assert info["pairing"] == PATIENTS[patient][1]
        # the names were shuffled: name order is not geometric order
        assert [e["file"] for e in info["slices"]] != sorted((e["file"] for e in info["slices"]), key=chaos.natural_key)


def test_masks_lie_on_the_bright_organ(t2):
    out, rows, _ = t2
    for row, image, mask in positive_slices(out, rows):
        assert image[mask].min() > 220  # the kidneys are the brightest voxels
        assert image[~mask].max() < 150
        h = row["slice_index"]
        assert mask.sum() == 25 * ((h in ANATOMY[2][0]) + (h in ANATOMY[3][0]))  # native size: no resizing


def test_grey_levels_select_each_organ(t2, chaos_dir, tmp_path):
    out, rows, settings = t2
    for patient, (kind, _) in PATIENTS.items():
        labels = nib.load(out / settings["cases"][patient]["labels"]).get_fdata()
        _, _, h_of = geometry(kind)
        for k in range(N):  # voxel (i, j, k) is column i, row j of geometric slice k
            np.testing.assert_array_equal(labels[:, :, k].T, organ_labels(h_of[k]))
    rows_spleen, _ = convert(chaos_dir, tmp_path / "spleen", "--class_index", "4")
    assert {r["slice_index"] for r in rows_spleen if r["label"] == "tumor"} == ANATOMY[4][0]
    levels = np.arange(256)
    expected = np.select([levels == 0, (levels >= 55) & (levels <= 70), (levels >= 110) & (levels <= 135),
                          (levels >= 175) & (levels <= 200), levels >= 240], [0, 1, 2, 3, 4], -1)
    for value, organ in zip(levels, expected):
        if organ >= 0:
            assert chaos.grey_to_labels(np.array([[value]]), "x.png")[0, 0] == organ
        else:
            with pytest.raises(UserError, match=f"x.png: grey level {value} is no organ"):
                chaos.grey_to_labels(np.array([[0, value]]), "x.png")


def test_no_patient_in_both_splits(t2):
    _, rows, settings = t2
    splits = {}
    for row in rows:
        splits.setdefault(row["subject"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits.values())
    assert sorted(settings["subjects"]["validation"]) == sorted(p for p, s in splits.items() if s == {"validation"})
    assert len(settings["subjects"]["validation"]) == 1


def test_paste_back_to_the_series(t2, chaos_dir):
    out, rows, settings = t2
    for patient in PATIENTS:
        mine = [r for r in rows if r["subject"] == patient]
        assert os.path.dirname(mine[0]["source"]) == str(out / "volumes")  # the final place, not the temporary one
        masks = {r["file"]: read_png(out / r["mask"]) > 0 for r in mine}
        pasted = volumes.paste_slices(mine, masks)
        labels = nib.load(mine[0]["seg_source"])
        assert np.allclose(pasted.affine, labels.affine)
        np.testing.assert_array_equal(pasted.get_fdata() > 0.5, np.isin(np.asarray(labels.dataobj), (2, 3)))
        # ... and on to the DICOM files, each against its ground-truth PNG
        info = settings["cases"][patient]
        ground = os.path.join(chaos_dir, "MR", patient, "T2SPIR", "Ground")
        per_file = chaos.series_masks(pasted, info)
        assert [f for f, _ in per_file] == [e["file"] for e in info["slices"]]
        for (_, mask), entry in zip(per_file, info["slices"]):
            grey = read_png(os.path.join(ground, entry["ground"]))
            np.testing.assert_array_equal(mask > 0.5, (grey >= 110) & (grey <= 200))


def test_affine_places_voxels_at_the_dicom_positions(t2, chaos_dir):
    out, _, settings = t2
    info = settings["cases"]["2"]  # tilted, feet-ward
    affine = nib.load(out / info["image"]).affine
    dicom_dir = os.path.join(chaos_dir, "MR", "2", "T2SPIR", "DICOM_anon")
    for k in (0, N - 1):
        ds = pydicom.dcmread(os.path.join(dicom_dir, info["slices"][k]["file"]))
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        row_dir, col_dir = np.array([float(v) for v in ds.ImageOrientationPatient]).reshape(2, 3)
        r, c = 7, 11
        lps = ipp + c * PIXEL_SPACING[1] * row_dir + r * PIXEL_SPACING[0] * col_dir
        np.testing.assert_allclose(affine @ [c, r, k, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-3)


def test_rerun_gives_identical_files(chaos_dir, tmp_path):
    convert(chaos_dir, tmp_path / "a")
    first = snapshot(tmp_path / "a")
    convert(chaos_dir, tmp_path / "a", "--workers", "2")  # replaces the earlier export
    assert snapshot(tmp_path / "a") == first
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_the_three_modalities(chaos_dir, t2, tmp_path):
    _, rows_t2, _ = t2
    results = {m: convert(chaos_dir, tmp_path / m, "--modality", m) for m in ("t1in", "t1out")}
    (rows_in, set_in), (rows_out, set_out) = results["t1in"], results["t1out"]
    assert set_in["cases"]["1"]["pairing"] == "name" and set_out["cases"]["1"]["pairing"] == "other phase"
    assert set_in["cases"]["3"]["pairing"] == set_out["cases"]["3"]["pairing"] == "order"
    assert os.path.basename(rows_out[0]["source"]).endswith("_t1out.nii.gz")
    key = [(r["subject"], r["slice_index"], r["label"]) for r in rows_t2]
    assert [(r["subject"], r["slice_index"], r["label"]) for r in rows_in] == key
    assert [(r["subject"], r["slice_index"], r["label"]) for r in rows_out] == key
    for a, b in zip(rows_in, rows_out):  # the same masks, different pictures
        np.testing.assert_array_equal(read_png(tmp_path / "t1in" / a["mask"]), read_png(tmp_path / "t1out" / b["mask"]))
    images_in = np.stack([read_png(tmp_path / "t1in" / r["file"]) for r in rows_in])
    images_out = np.stack([read_png(tmp_path / "t1out" / r["file"]) for r in rows_out])
    assert not np.array_equal(images_in, images_out)
    for patient in PATIENTS:
        files_in = [e["file"] for e in set_in["cases"][patient]["slices"]]
        files_out = [e["file"] for e in set_out["cases"][patient]["slices"]]
        assert all(int(a[-9:-4]) == int(b[-9:-4]) + 1 for a, b in zip(files_in, files_out))  # same positions


# ----------------------------------------------------------------------------- bad input


def small_set(tmp_path, patients=("1", "2")):
    root = str(tmp_path / "in")
    for i, patient in enumerate(patients):
        write_patient(root, patient, t1=False, seed=i)
    return root


def expect_user_error(tmp_path, root, match, *extra):
    with pytest.raises(UserError, match=match) as info:
        prepare_chaos.main(["--input_dir", root, "--out_dir", str(tmp_path / "out"), "--val_fraction", "0.5",
                            *extra])
    assert "\n" not in str(info.value)
    assert not os.path.exists(tmp_path / "out")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out")]
    return str(info.value)


def dicom_dir_of(root, patient):
    return os.path.join(root, "MR", patient, "T2SPIR", "DICOM_anon")


def ground_of(root, patient):
    return os.path.join(root, "MR", patient, "T2SPIR", "Ground")


def test_no_patients_or_no_series(tmp_path):
    os.makedirs(tmp_path / "empty" / "MR")
    expect_user_error(tmp_path, str(tmp_path / "nope"), "nope: no such directory")
    expect_user_error(tmp_path, str(tmp_path / "empty"), "empty: no patient folders")
    root = small_set(tmp_path)
    expect_user_error(tmp_path, root, r"MR/1: no T1DUAL/DICOM_anon/InPhase folder", "--modality", "t1in")
    for name in os.listdir(dicom_dir_of(root, "2")):
        os.remove(os.path.join(dicom_dir_of(root, "2"), name))
    expect_user_error(tmp_path, root, r"MR/2/T2SPIR/DICOM_anon: no \.dcm files")
    os.rmdir(dicom_dir_of(root, "2"))
    expect_user_error(tmp_path, root, r"MR/2: no T2SPIR/DICOM_anon folder")


def test_series_with_mixed_sizes_or_missing_slices(tmp_path):
    root = small_set(tmp_path)
    folder = dicom_dir_of(root, "1")
    names = sorted(os.listdir(folder))
    path = os.path.join(folder, names[3])
    ds = pydicom.dcmread(path)
    write_dicom(path, np.zeros((ROWS, COLS + 2)), ds.ImagePositionPatient, ds.ImageOrientationPatient, 1,
                ds.SOPInstanceUID, cols=COLS + 2)
    expect_user_error(tmp_path, root, f"{names[3]}: 20 x 26 pixels, but .* has 20 x 24")
    # a slice missing in the middle of the series (its ground truth too)
    root = small_set(tmp_path / "gap")
    folder = dicom_dir_of(root, "2")
    middle = next(n for n in os.listdir(folder)
                  if np.isclose(float(pydicom.dcmread(os.path.join(folder, n)).ImagePositionPatient[2]), -40 + 4 * STEP))
    os.remove(os.path.join(folder, middle))
    os.remove(os.path.join(ground_of(root, "2"), middle.replace(".dcm", ".png")))
    message = expect_user_error(tmp_path, root, "DICOM_anon: missing slices: a gap of 6.00 mm")
    assert "median spacing being 3.00 mm" in message
    # a file that is no DICOM
    with open(os.path.join(folder, names[0]), "wb") as f:
        f.write(b"not a dicom file")
    expect_user_error(tmp_path, root, f"{names[0]}: cannot read DICOM file")


def test_ground_truth_that_does_not_fit(tmp_path):
    root = small_set(tmp_path)
    ground = ground_of(root, "2")
    png = sorted(os.listdir(ground))[2]
    Image.fromarray(np.zeros((ROWS, COLS - 1), np.uint8)).save(os.path.join(ground, png))
    expect_user_error(tmp_path, root, f"{png}: 23 x 20 pixels \\(width x height\\), but its DICOM slice")
    grey = grey_png(2)
    grey[0, 0] = 100
    Image.fromarray(grey).save(os.path.join(ground, png))
    expect_user_error(tmp_path, root, f"{png}: grey level 100 is no organ")
    os.remove(os.path.join(ground, png))
    expect_user_error(tmp_path, root, "Ground: 7 ground-truth PNG files for 8 DICOM slices")
    Image.fromarray(grey_png(2)).save(os.path.join(ground, "other_name.png"))
    expect_user_error(tmp_path, root, "Ground: only some PNG names are DICOM names")


def test_a_coronal_series_is_refused(tmp_path):
    root = str(tmp_path / "in")
    write_patient(root, "1", t1=False)
    write_patient(root, "7", "coronal", t1=False, seed=1)
    expect_user_error(tmp_path, root, r"MR/7/T2SPIR/DICOM_anon: not an axial series .* anterior-posterior axis")


def test_flags(tmp_path):
    root = small_set(tmp_path)
    expect_user_error(tmp_path, root, "--class_index '5'", "--class_index", "5")
    expect_user_error(tmp_path, root, "--workers must be at least 1", "--workers", "0")


def test_failed_rerun_keeps_the_earlier_export(tmp_path):
    root = small_set(tmp_path)
    out = tmp_path / "done"
    prepare_chaos.main(["--input_dir", root, "--out_dir", str(out), "--val_fraction", "0.5"])
    before = snapshot(out)
    os.remove(os.path.join(ground_of(root, "1"), sorted(os.listdir(ground_of(root, "1")))[0]))
    with pytest.raises(UserError, match="7 ground-truth PNG files"):
        prepare_chaos.main(["--input_dir", root, "--out_dir", str(out), "--val_fraction", "0.5"])
    assert snapshot(out) == before


def test_script_reports_one_line_and_exit_status_2(tmp_path):
    root = small_set(tmp_path)
    png = os.path.join(ground_of(root, "1"), sorted(os.listdir(ground_of(root, "1")))[0])
    Image.fromarray(np.full((ROWS, COLS), 90, np.uint8)).save(png)
    command = [sys.executable, os.path.join(REPO, "scripts", "prepare_chaos.py"), "--input_dir", root,
               "--out_dir", str(tmp_path / "out"), "--val_fraction", "0.5"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip() and "subjects" not in line]
    assert lines == [f"error: {png}: grey level 90 is no organ (expected 0 background, {chaos.grey_help()})"]
    assert not os.path.exists(tmp_path / "out")
