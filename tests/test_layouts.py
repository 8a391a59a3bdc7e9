"""BraTS 2020/2021, BraTS 2023+ and Decathlon Task01 layouts, their label schemes and --region
(guided_diffusion.layouts, scripts/prepare_brats.py, the scan finder of segment_scans.py).

One synthetic subject (a brain ellipsoid, each modality a ramp along its own axis, a tumour of
nested boxes: edema around a core whose enhancing shell surrounds a necrotic centre) is written in
each layout with that layout's label values; every layout must give the same slices and the same
region masks.
"""

import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from guided_diffusion import layouts, volumes
from guided_diffusion.cli import UserError, run_main
from guided_diffusion.segment.scans import find_scans, with_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import prepare_brats  # noqa: E402

SHAPE = (30, 34, 20)
EDEMA = (slice(7, 21), slice(9, 25), slice(5, 15))
CORE = (slice(9, 19), slice(11, 23), slice(6, 14))
NECROSIS = (slice(11, 17), slice(13, 21), slice(8, 12))
# the three regions as boxes: wt = edema box, tc = core box, et = core box without the necrotic centre
REGION_BOXES = {"wt": [EDEMA], "tc": [CORE], "et": [CORE]}
# label values of the classes in each scheme: necrosis / non-enhancing, edema, enhancing
LABELS = {"brats2021": (1, 2, 4), "brats2023": (1, 2, 3), "msd": (2, 1, 3)}


def brain_mask():
    x, y, z = np.indices(SHAPE, dtype=float)
    return ((x - 14.5) / 12) ** 2 + ((y - 16.5) / 14) ** 2 + ((z - 9.5) / 8) ** 2 <= 1


def region_mask(region):
    mask = np.zeros(SHAPE, bool)
    mask[REGION_BOXES[region][0]] = True
    if region == "et":
        mask[NECROSIS] = False
    return mask


def modalities_of_subject(seed=0):
    """{canonical modality: volume}; each ramps along another axis, so channels cannot be mistaken."""
    brain = brain_mask()
    x, y, z = np.indices(SHAPE, dtype=float)
    rng = np.random.default_rng(seed)
    ramps = {"flair": x, "t1": y, "t1ce": z, "t2": 30 - x}
    out = {}
    for name, ramp in ramps.items():
        volume = 100 + 6 * ramp + rng.normal(0, 1, SHAPE)
        volume[region_mask("wt")] += 300
        volume[region_mask("et")] += 200 if name == "t1ce" else 0
        out[name] = np.where(brain, volume, 0).astype(np.float32)
    return out


def label_map(scheme):
    necrosis, edema, enhancing = LABELS[scheme]
    seg = np.zeros(SHAPE, np.uint8)
    seg[EDEMA] = edema
    seg[CORE] = enhancing
    seg[NECROSIS] = necrosis
    return seg


def save(volume, path):
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
    return str(path)


def write_2021(root, subject="BraTS2021_00001", seg=None):
    folder = root / subject
    folder.mkdir(parents=True)
    for name, volume in modalities_of_subject().items():
        save(volume, folder / f"{subject}_{name}.nii.gz")
    save(label_map("brats2021") if seg is None else seg, folder / f"{subject}_seg.nii.gz")
    return folder


def write_2023(root, subject="BraTS-GLI-00001-000", seg=None, skip=()):
    folder = root / subject
    folder.mkdir(parents=True)
    for name, volume in modalities_of_subject().items():
        if name not in skip:
            save(volume, folder / f"{subject}-{layouts.BRATS2023_NAMES[name]}.nii.gz")
    save(label_map("brats2023") if seg is None else seg, folder / f"{subject}-seg.nii.gz")
    return folder


def write_msd(root, order=("FLAIR", "T1w", "t1gd", "T2w")):
    """A Decathlon task whose 4-D images hold the channels in `order` (named so in its dataset.json)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    volumes_by_name = modalities_of_subject()
    stacked = np.stack([volumes_by_name[layouts.canonical_modality(n)] for n in order], axis=-1)
    save(stacked, root / "imagesTr" / "BRATS_001.nii.gz")
    save(label_map("msd"), root / "labelsTr" / "BRATS_001.nii.gz")
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"macOS metadata, not an image")
    (root / "dataset.json").write_text(json.dumps({
        "name": "BRATS", "modality": {str(i): n for i, n in enumerate(order)},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}))
    return root


def image_size():
    """The side of the brain's square box, so slices are written without resizing."""
    box = volumes.square_box(brain_mask().any(2), 4)
    return box[1] - box[0], box


def prepare(input_dir, out_dir, *extra):
    size, _ = image_size()
    prepare_brats.main(["--input_dir", str(input_dir), "--out_dir", str(out_dir), "--image_size", str(size),
                        "--val_fraction", "0", "--min_tumor_pixels", "4", *extra])
    rows = volumes.read_manifest(str(out_dir))
    slices = {}
    for row in rows:
        image = (np.load(out_dir / row["file"]) if row["file"].endswith(".npy")
                 else np.asarray(Image.open(out_dir / row["file"])))
        slices[row["slice_index"]] = (row["label"], image, np.asarray(Image.open(out_dir / row["mask"])) > 0)
    return slices, json.loads((out_dir / "dataset.json").read_text())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    write_2021(root / "brats2021")
    write_2023(root / "brats2023")
    write_msd(root / "Task01_BrainTumour")
    write_msd(root / "Task01_reordered", order=("T2w", "FLAIR", "t1gd", "T1w"))
    return root


@pytest.mark.parametrize("region", [None, "wt", "tc", "et"])
def test_every_layout_gives_the_same_slices_and_region_masks(inputs, tmp_path, region):
    extra = ["--modality", "all"] + (["--region", region] if region else [])
    results = {name: prepare(inputs / name, tmp_path / name, *extra)
               for name in ("brats2021", "brats2023", "Task01_BrainTumour", "Task01_reordered")}
    reference, settings = results["brats2021"]
    expected = region_mask(region or "wt")
    _, box = image_size()
    area = brain_mask().sum((0, 1))
    assert reference.keys() == {int(z) for z in np.flatnonzero(area >= 0.3 * area.max())}
    for z, (label, image, mask) in reference.items():
        np.testing.assert_array_equal(mask, volumes.cut_box(expected[:, :, z], box))  # the region, unresized
        assert label == ("tumor" if expected[:, :, z].any() else "normal")
        assert image.shape[0] == 4
    for name, (slices, layout_settings) in results.items():
        assert slices.keys() == reference.keys(), name
        for z, (label, image, mask) in slices.items():
            assert label == reference[z][0], (name, z)
            np.testing.assert_array_equal(image, reference[z][1], err_msg=f"{name} z={z}")
            np.testing.assert_array_equal(mask, reference[z][2], err_msg=f"{name} z={z}")
        scheme = {"brats2021": "brats2021", "brats2023": "brats2023"}.get(name, "msd")
        assert layout_settings["label_scheme"] == scheme and layout_settings["region"] == (region or "wt")
        assert layout_settings["label_values"] == [0, *sorted(LABELS[scheme])]
        assert layout_settings["options"]["lesion_labels"] == (list(layouts.SCHEMES[scheme].regions[region])
                                                               if region else [])
        assert layout_settings["geometry"] == {"voxel_mm": {"min": [1, 1, 1], "max": [1, 1, 1]},
                                               "fov_mm": {"min": list(SHAPE), "max": list(SHAPE)}}
    assert settings["modalities"] == ["flair", "t1", "t1ce", "t2"]


def test_region_label_sets_of_every_scheme():
    expected = {"brats2021": {"wt": (1, 2, 4), "tc": (1, 4), "et": (4,)},
                "brats2023": {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)},
                "msd": {"wt": (1, 2, 3), "tc": (2, 3), "et": (3,)}}
    for scheme, regions in expected.items():
        for region, labels in regions.items():
            assert layouts.region_labels(scheme, region) == labels
            # the synthetic subject's label map in that scheme gives exactly the region's voxels
            np.testing.assert_array_equal(volumes.lesion_mask(label_map(scheme), labels), region_mask(region))
    assert layouts.region_labels("", "wt") == ()  # unknown scheme: every nonzero label
    with pytest.raises(UserError, match="--region et: the labels follow no known scheme"):
        layouts.region_labels("", "et")


def test_modality_names_of_every_layout_are_one_vocabulary():
    assert volumes.parse_modalities("t2f") == ("flair",)
    assert volumes.parse_modalities("T1C, t2w,t1n") == ("t1ce", "t2", "t1")
    assert volumes.parse_modalities("all") == ("flair", "t1", "t1ce", "t2")
    for text in ("flair,t2f", "pd", ""):
        with pytest.raises(UserError, match="--modality"):
            volumes.parse_modalities(text)


def test_a_2023_flair_only_dataset_prepares_from_its_t2f_files(tmp_path):
    write_2023(tmp_path / "in", skip=("t1", "t1ce", "t2"))
    slices, settings = prepare(tmp_path / "in", tmp_path / "out", "--modality", "t2f")
    assert settings["modalities"] == ["flair"] and settings["label_scheme"] == "brats2023"
    assert any(label == "tumor" for label, _, _ in slices.values())


def test_masks_paste_back_onto_a_decathlon_images_grid(inputs, tmp_path):
    out = tmp_path / "tc"
    prepare(inputs / "Task01_BrainTumour", out, "--region", "tc")
    rows = volumes.read_manifest(str(out))
    masks = {r["file"]: np.asarray(Image.open(out / r["mask"])) > 0 for r in rows}
    (result,) = volumes.paste_subject_masks(str(out), "training", list(masks), {"": masks.__getitem__},
                                            str(tmp_path / "pasted"))
    pasted = nib.load(tmp_path / "pasted" / "BRATS_001_pred.nii.gz")
    assert pasted.shape == SHAPE  # the 4-D image's 3-D grid
    np.testing.assert_array_equal(np.asarray(pasted.dataobj) > 0, region_mask("tc"))
    assert result["dice_3d"] == 1.0  # scored against the label map's tumour core (Decathlon labels 2 and 3)


# ----------------------------------------------------------------------------- scans


def test_a_2023_subject_folder_is_one_scan_with_its_seg_as_reference(inputs):
    folder = str(inputs / "brats2023" / "BraTS-GLI-00001-000")
    scans = find_scans([folder], ("flair",))
    assert len(scans) == 1
    assert scans[0].name == "BraTS-GLI-00001-000" and scans[0].scheme == "brats2023"
    assert scans[0].channels == (os.path.join(folder, "BraTS-GLI-00001-000-t2f.nii.gz"),)
    assert scans[0].reference == os.path.join(folder, "BraTS-GLI-00001-000-seg.nii.gz")
    four = find_scans([folder], ("flair", "t1", "t1ce", "t2"))[0]
    assert [os.path.basename(p) for p in four.channels] == [f"BraTS-GLI-00001-000-{n}.nii.gz"
                                                            for n in ("t2f", "t1n", "t1c", "t2w")]


def test_label_maps_are_never_scans(inputs, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for subject in ("BraTS-GLI-00001-000", "BraTS-GLI-00002-000"):  # two subjects: a folder of scans
        for name in ("t2f", "t1n", "seg"):
            (flat / f"{subject}-{name}.nii.gz").write_bytes(
                (inputs / "brats2023" / "BraTS-GLI-00001-000" / f"BraTS-GLI-00001-000-{name}.nii.gz").read_bytes())
    (flat / "other_seg.nii.gz").write_bytes((flat / "BraTS-GLI-00001-000-seg.nii.gz").read_bytes())
    scans = with_reference(find_scans([str(flat)], ("flair",)), str(flat))
    assert [s.name for s in scans] == ["BraTS-GLI-00001-000-t2f", "BraTS-GLI-00002-000-t2f"]  # no seg, no t1n
    assert [os.path.basename(s.reference) for s in scans] == ["BraTS-GLI-00001-000-seg.nii.gz",
                                                              "BraTS-GLI-00002-000-seg.nii.gz"]
    assert all(s.scheme == "brats2023" for s in scans)
    for seg in ("BraTS-GLI-00001-000-seg.nii.gz", "other_seg.nii.gz"):
        with pytest.raises(UserError, match=f"--input .*{seg}: a label map"):
            find_scans([str(flat / seg)], ("flair",))


def test_a_decathlon_image_is_a_scan_of_the_channels_the_models_take(inputs):
    path = str(inputs / "Task01_reordered" / "imagesTr" / "BRATS_001.nii.gz")
    scan = find_scans([path], ("flair", "t1ce"))[0]
    assert scan.channel_index == (1, 2) and scan.scheme == "msd"  # named by its dataset.json: T2w, FLAIR, t1gd, T1w
    assert scan.reference == str(inputs / "Task01_reordered" / "labelsTr" / "BRATS_001.nii.gz")
    flair, _ = volumes.load_canonical(path, channel=scan.channel_index[0])
    np.testing.assert_array_equal(flair, modalities_of_subject()["flair"])


# ----------------------------------------------------------------------------- bad input


def one_line_error(call, match):
    with pytest.raises(UserError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def prepare_error(argv, match, tmp_path, capsys):
    """prepare_brats.py fails with a one-line UserError, and through run_main with exit status 2 and nothing
    written."""
    out = tmp_path / "never"
    argv = [*argv, "--out_dir", str(out)]
    one_line_error(lambda: prepare_brats.main(argv), match)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_main(prepare_brats.main, argv)
    err = capsys.readouterr().err
    # a progress bar that was running is erased (carriage returns) before the error line
    assert info.value.code == 2 and err.split("\r")[-1].startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".never")]


def test_a_subject_folder_mixing_2021_and_2023_names(tmp_path, capsys):
    folder = write_2023(tmp_path / "in")
    os.rename(folder / "BraTS-GLI-00001-000-seg.nii.gz", folder / "BraTS-GLI-00001-000_seg.nii.gz")
    expected = "BraTS-GLI-00001-000: mixes BraTS 2020/2021 file names"
    prepare_error(["--input_dir", str(tmp_path / "in")], expected, tmp_path, capsys)
    one_line_error(lambda: find_scans([str(folder)], ("flair",)), expected)


def test_an_input_mixing_2021_and_2023_subjects(tmp_path, capsys):
    write_2021(tmp_path / "in")
    write_2023(tmp_path / "in")
    prepare_error(["--input_dir", str(tmp_path / "in")], "mixes BraTS 2020/2021 subjects .* and BraTS 2023 subjects",
                  tmp_path, capsys)


def test_a_2023_subject_folder_without_the_requested_modality(tmp_path, capsys):
    folder = write_2023(tmp_path / "in", skip=("t1",))
    expected = r"BraTS-GLI-00001-000: no \*-t1n.nii.gz \(t1\)"
    prepare_error(["--input_dir", str(tmp_path / "in"), "--modality", "flair,t1"], expected, tmp_path, capsys)
    one_line_error(lambda: find_scans([str(folder)], ("t1",)), expected + r" \(the models take t1\)")


@pytest.mark.parametrize("values, match", [
    ((1, 2, 3), r"label values 1, 2, 3 are not BraTS 2020/2021 labels .*; they look like BraTS 2023\+ labels"),
    ((1, 2, 3, 4), "label values 1, 2, 3, 4 fit no known label scheme"),
    ((1, 7), "label values 1, 7 fit no known label scheme"),
])
def test_label_values_outside_the_layouts_scheme(tmp_path, capsys, values, match):
    seg = np.zeros(SHAPE, np.uint8)
    for i, value in enumerate(values):
        seg[EDEMA[0], EDEMA[1], 5 + 2 * i:7 + 2 * i] = value
    write_2021(tmp_path / "in", seg=seg)
    prepare_error(["--input_dir", str(tmp_path / "in")], "BraTS2021_00001_seg.nii.gz: " + match, tmp_path, capsys)
    # raw --tumor_labels: other data, values not checked
    prepare_brats.main(["--input_dir", str(tmp_path / "in"), "--out_dir", str(tmp_path / "raw"), "--val_fraction", "0",
                        "--tumor_labels", ",".join(map(str, values)), "--image_size", "16", "--min_tumor_pixels", "2"])
    assert json.loads((tmp_path / "raw" / "dataset.json").read_text())["region"] is None


def test_region_et_on_labels_without_an_enhancing_class(tmp_path, capsys):
    seg = label_map("brats2021")
    seg[seg == 4] = 1  # necrosis and edema only
    write_2021(tmp_path / "in", seg=seg)
    prepare_error(["--input_dir", str(tmp_path / "in"), "--region", "et", "--val_fraction", "0"],
                  r"--region et: label value\(s\) 4 occur in no label map .*found 0, 1, 2", tmp_path, capsys)


def test_region_and_tumor_labels_exclude_each_other(inputs, tmp_path, capsys):
    prepare_error(["--input_dir", str(inputs / "brats2021"), "--region", "tc", "--tumor_labels", "1,4"],
                  "--region tc and --tumor_labels 1,4: give one", tmp_path, capsys)


def test_bad_decathlon_tasks(tmp_path, capsys):
    task = write_msd(tmp_path / "task")
    (task / "dataset.json").write_text(json.dumps({"modality": {"0": "FLAIR", "1": "PD", "2": "t1gd", "3": "T2w"}}))
    prepare_error(["--input_dir", str(task)], "dataset.json: \"modality\" .* are not distinct FLAIR", tmp_path, capsys)
    (task / "dataset.json").unlink()
    os.remove(task / "labelsTr" / "BRATS_001.nii.gz")
    prepare_error(["--input_dir", str(task)], r"imagesTr/BRATS_001.nii.gz: no label file", tmp_path, capsys)
