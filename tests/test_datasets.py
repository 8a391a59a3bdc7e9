"""Tests for guided_diffusion.datasets: the slice layout loaders and folds, and training batches over them.

Images are written with known pixel values, so every number the loader returns can be
predicted exactly (PIL is the independent reference for resizing).
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import datasets, volumes
from guided_diffusion.cli import UserError
from guided_diffusion.train.stream import ShuffledBatches


def save_png(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)


def make_layout(root, split="training", normal=4, tumor=3, size=8, masks=True):
    """Images whose constant value identifies them: normal k -> 10 + k, tumor k -> 200 + k."""
    values = {}
    for label, count, base in (("normal", normal, 10), ("tumor", tumor, 200)):
        for k in range(count):
            name = f"{label[0]}{k:02d}"
            save_png(os.path.join(root, split, label, name + ".png"), np.full((size, size), base + k))
            values[name] = base + k
            if masks and label == "tumor":
                mask = np.zeros((size, size))
                mask[2:5, 3:6] = 255
                save_png(os.path.join(root, split, "seg", name + ".png"), mask)
    return values


def test_items_have_exact_values_labels_and_masks(tmp_path):
    make_layout(str(tmp_path))
    data = datasets.SliceDataset(str(tmp_path), "training")
    assert len(data) == 7
    assert [item["name"] for item in data] == [f"n{k:02d}.png" for k in range(4)] + [f"t{k:02d}.png" for k in range(3)]
    item = data[5]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 8, 8)
    assert torch.equal(item["image"], torch.full((1, 8, 8), 201 / 127.5 - 1))
    assert item["label"].dtype == torch.int64 and item["label"].item() == 1 and item["has_mask"]
    expected = torch.zeros(1, 8, 8)
    expected[0, 2:5, 3:6] = 1
    assert torch.equal(item["mask"], expected)
    normal = data[0]
    assert normal["label"].item() == 0 and not normal["has_mask"] and normal["mask"].sum() == 0
    assert torch.equal(normal["image"], torch.full((1, 8, 8), 10 / 127.5 - 1))
    # the extremes of the 8-bit range are exactly -1 and 1
    save_png(str(tmp_path / "x" / "training" / "normal" / "a.png"), [[0, 255]])
    assert datasets.SliceDataset(str(tmp_path / "x"))[0]["image"].tolist() == [[[-1.0, 1.0]]]


def test_split_folders_and_validate_alias(tmp_path):
    make_layout(str(tmp_path), split="validate")
    assert datasets.resolve_split_dir(str(tmp_path), "validation") == str(tmp_path / "validate")
    assert len(datasets.list_slices(str(tmp_path), "validation")) == 7
    with pytest.raises(UserError, match=f"{tmp_path / 'training'}: no such directory"):
        datasets.resolve_split_dir(str(tmp_path), "training")
    with pytest.raises(UserError, match="no such directory"):
        datasets.list_slices(str(tmp_path / "missing"), "training")
    os.makedirs(tmp_path / "empty" / "training" / "normal")
    with pytest.raises(UserError, match="no images"):
        datasets.list_slices(str(tmp_path / "empty"), "training")


def test_channels(tmp_path):
    gray = np.arange(30, dtype=np.uint8).reshape(5, 6) * 8
    colour = np.stack([gray, 255 - gray, np.full((5, 6), 7, np.uint8)], -1)
    save_png(str(tmp_path / "training" / "normal" / "a_gray.png"), gray)
    save_png(str(tmp_path / "training" / "normal" / "b_gray_as_rgb.png"), np.stack([gray] * 3, -1))
    save_png(str(tmp_path / "training" / "normal" / "c_colour.png"), colour)
    np.save(tmp_path / "training" / "normal" / "d_chw.npy", np.moveaxis(colour, -1, 0))
    np.save(tmp_path / "training" / "normal" / "e_hwc.npy", colour)
    np.save(tmp_path / "training" / "normal" / "f_float.npy", gray.astype(np.float32) / 255)
    expected_gray = torch.from_numpy(gray / 127.5 - 1).float()[None]
    expected_colour = torch.from_numpy(np.moveaxis(colour, -1, 0) / 127.5 - 1).float()

    one = datasets.SliceDataset(str(tmp_path), in_channels=1)
    for index in (0, 1, 5):
        assert torch.allclose(one[index]["image"], expected_gray, atol=1e-6)
    three = datasets.SliceDataset(str(tmp_path), in_channels=3)
    assert torch.allclose(three[0]["image"], expected_gray.repeat(3, 1, 1), atol=1e-6)
    for index in (2, 3, 4):
        assert torch.allclose(three[index]["image"], expected_colour, atol=1e-6)
    two = datasets.SliceDataset(str(tmp_path), in_channels=2)
    assert torch.allclose(two[3]["image"], expected_colour[:2], atol=1e-6)

    np.save(tmp_path / "training" / "normal" / "g_bad.npy", np.full((5, 6), 2.0, np.float32))
    with pytest.raises(UserError, match=r"g_bad.npy: float pixel values must lie in \[0, 1\]"):
        datasets.SliceDataset(str(tmp_path))[6]
    with pytest.raises(UserError, match="d_chw.npy: has 3 channels but --in_channels is 4"):
        datasets.SliceDataset(str(tmp_path), in_channels=4)[3]


def test_resize_matches_pil(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 24)).astype(np.uint8)
    mask = (rng.random((24, 24)) > 0.6).astype(np.uint8) * 255
    save_png(str(tmp_path / "training" / "tumor" / "a.png"), image)
    save_png(str(tmp_path / "training" / "seg" / "a.png"), mask)
    for size in (8, 40):
        item = datasets.SliceDataset(str(tmp_path), image_size=size)[0]
        reference = np.asarray(Image.fromarray(image.astype(np.float32)).resize((size, size), Image.BILINEAR))
        np.testing.assert_allclose((item["image"][0].numpy() + 1) * 127.5, reference, atol=0.05)
        reference_mask = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST)) > 0
        np.testing.assert_array_equal(item["mask"][0].numpy(), reference_mask)


def test_require_masks_and_mask_problems(tmp_path):
    make_layout(str(tmp_path), masks=False)
    data = datasets.SliceDataset(str(tmp_path), require_masks=False)
    assert not any(item["has_mask"] for item in data)
    with pytest.raises(UserError, match=f"{tmp_path / 'training' / 'tumor' / 't00.png'}: tumor image without a mask"):
        datasets.SliceDataset(str(tmp_path), require_masks=True)
    # normal images may go without masks even for evaluation
    for k in range(3):
        save_png(str(tmp_path / "training" / "seg" / f"t{k:02d}.png"), np.zeros((8, 8)))
    assert len(datasets.SliceDataset(str(tmp_path), require_masks=True)) == 7
    save_png(str(tmp_path / "training" / "seg" / "t01.png"), np.zeros((8, 9)))
    with pytest.raises(UserError, match=r"t01.png: mask is \(8, 9\) but image .*t01.png is \(8, 8\)"):
        datasets.SliceDataset(str(tmp_path))[5]
    # a palette mask is read by index, not by colour
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 0, 0, 0] + [0] * 762)  # index 1 is black too
    save_png(str(tmp_path / "p" / "training" / "tumor" / "a.png"), np.zeros((2, 2)))
    os.makedirs(tmp_path / "p" / "training" / "seg")
    palette.save(tmp_path / "p" / "training" / "seg" / "a.png")
    assert datasets.SliceDataset(str(tmp_path / "p"))[0]["mask"].tolist() == [[[0.0, 1.0], [1.0, 0.0]]]


def test_corrupt_image(tmp_path):
    make_layout(str(tmp_path))
    path = tmp_path / "training" / "tumor" / "t01.png"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(UserError, match="t01.png: cannot read image"):
        datasets.SliceDataset(str(tmp_path))[5]


def test_processes_share_each_epoch_of_the_sorted_list(tmp_path):
    make_layout(str(tmp_path), normal=6, tumor=6)
    data = datasets.SliceDataset(str(tmp_path))
    everything = [item["name"] for item in data]
    assert everything == sorted(everything)
    ranks = [ShuffledBatches(data, 2, seed=3, rank=k, world_size=3) for k in range(3)]
    shards = [[everything[i] for b in range(2) for i in r.indices(b)] for r in ranks]  # one epoch: 2 global batches
    assert sorted(sum(shards, [])) == sorted(everything)


def test_select_fold():
    items = [f"x{i:02d}" for i in range(10)]
    folds = [datasets.select_fold(list(reversed(items)), k, 3) for k in range(3)]
    assert sum(folds, []) == items  # contiguous, in sorted order, covering everything once
    assert [len(f) for f in folds] == [3, 3, 4]
    assert datasets.select_fold(items, 0, 1) == items
    with pytest.raises(UserError, match="--fold 3 is out of range 0..2"):
        datasets.select_fold(items, 3, 3)
    with pytest.raises(UserError, match="--fold -1"):
        datasets.select_fold(items, -1, 3)
    with pytest.raises(UserError, match="--num_folds must be at least 1"):
        datasets.select_fold(items, 0, 0)
    with pytest.raises(UserError, match="is empty"):
        datasets.select_fold(items[:2], 0, 4)


def slice_batches(root, batch_size, image_size, seed=0, class_cond=True):
    data = datasets.SliceDataset(root, image_size=image_size)
    return ShuffledBatches(data, batch_size, seed=seed, rank=0, world_size=1, class_cond=class_cond)


def test_training_batches(tmp_path):
    values = make_layout(str(tmp_path), normal=6, tumor=4)
    stream = slice_batches(str(tmp_path), batch_size=4, image_size=4, seed=1)
    epochs = []
    for _ in range(3):
        seen = []
        for _ in range(2):  # 10 images, batch 4: two batches per epoch, the rest dropped
            images, cond = next(stream)
            assert images.shape == (4, 1, 4, 4) and cond["y"].shape == (4,)
            pixel = ((images[:, 0, 0, 0] + 1) * 127.5).round().long()
            assert torch.equal(cond["y"], (pixel >= 200).long())  # labels belong to their images
            seen += pixel.tolist()
        assert len(set(seen)) == 8 and set(seen) <= set(values.values())
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    again = slice_batches(str(tmp_path), batch_size=4, image_size=4, seed=1)
    assert next(again)[0].equal(next(slice_batches(str(tmp_path), batch_size=4, image_size=4, seed=1))[0])
    ordered = slice_batches(str(tmp_path), batch_size=5, image_size=4, class_cond=False)
    images, cond = next(ordered)
    in_order = [values[name] for name in sorted(values)]  # the dataset's sorted order
    assert cond == {} and ((images[:, 0, 0, 0] + 1) * 127.5).round().tolist() == [in_order[i] for i in ordered.indices(0)]


def test_training_data_needs_both_classes_and_enough_images(tmp_path):
    from argparse import Namespace

    from guided_diffusion.train_cli import build_data

    make_layout(str(tmp_path), tumor=0)
    args = Namespace(src_dir=str(tmp_path), batch_size=2, seed=0, workers=0)
    config = dict(image_size=8, in_channels=1, num_classes=2)
    with pytest.raises(UserError, match=f"{tmp_path / 'training' / 'tumor'} holds no images, but a class-conditional"):
        build_data(args, config, "training", class_cond=True)
    next(build_data(args, config, "training", class_cond=False))
    with pytest.raises(UserError, match="no images"):
        datasets.SliceDataset(str(tmp_path), files=datasets.list_slices(str(tmp_path), "training", classes=("tumor",)))
    with pytest.raises(UserError, match="--batch_size 5"):
        next(slice_batches(str(tmp_path), batch_size=5, image_size=8, class_cond=False))


def test_fold_of_tumor_slices_feeds_the_dataset(tmp_path):
    make_layout(str(tmp_path), split="validation", tumor=5)
    files = datasets.select_fold(datasets.list_slices(str(tmp_path), "validation", classes=("tumor",)), 1, 2)
    data = datasets.SliceDataset(str(tmp_path), "validation", files=files, require_masks=True)
    assert [item["name"] for item in data] == ["t02.png", "t03.png", "t04.png"]
    assert all(item["label"].item() == 1 and item["has_mask"] for item in data)


def test_read_volume_manifest(tmp_path):
    with pytest.raises(UserError, match="manifest.csv: no such file"):
        volumes.read_manifest(str(tmp_path))
    row = dict(file="training/tumor/s_z003.png", split="training", label="tumor", subject="s", slice_index=3,
               lesion_pixels=12, mask="training/seg/s_z003.png", source="/v.nii.gz", seg_source="/s.nii.gz",
               x0=-2, x1=30, y0=0, y1=32)
    (tmp_path / "manifest.csv").write_text(",".join(volumes.MANIFEST_FIELDS) + "\n" +
                                           ",".join(str(row[k]) for k in volumes.MANIFEST_FIELDS) + "\n")
    assert volumes.read_manifest(str(tmp_path)) == [row]
    (tmp_path / "manifest.csv").write_text("file,split\nx,y\n")
    with pytest.raises(UserError, match="not a slice manifest"):
        volumes.read_manifest(str(tmp_path))


def test_abdominal_volume_slices(tmp_path):
    volume = np.zeros((5, 2, 16, 16), np.float32)
    volume[:, 0] = np.linspace(0, 1, 16)[None, None, :]
    volume[1, 1, 2:6, 2:6] = 2  # right kidney
    volume[3, 1, 8:12, 8:12] = 3  # left kidney
    volume[4, 1, 0:3, 0:3] = 1  # spleen
    np.save(tmp_path / "case1.npy", volume)
    data = datasets.VolumeSliceDataset(str(tmp_path), image_size=8, class_indices=(2, 3))
    assert data.labels() == [0, 1, 0, 1, 0]
    item = data[3]
    assert item["name"] == "case1_z003" and item["image"].shape == (1, 8, 8)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["mask"].sum() == 4 and item["mask"][0, 4:6, 4:6].sum() == 4
    stream = ShuffledBatches(data, 5, rank=0, world_size=1)
    batch = next(stream)
    assert batch[1]["y"].tolist() == [[0, 1, 0, 1, 0][i] for i in stream.indices(0)]
