"""Loaders for the 2-D slice layout (see data/README.md) and the seed's abdominal `.npy` volumes.

    ROOT/training/{normal,tumor,seg}/   ROOT/validation/{normal,tumor,seg}/   (`validate` accepted)

An image's label comes from its folder (normal = 0, tumor = 1); its mask, when there is
one, is the file of the same stem in the split's `seg/` folder. Items are dicts:
image float32 (C, H, W) in [-1, 1], label int64 scalar, mask float32 (1, H, W) in {0, 1}
(all zeros when the image has none), has_mask bool, name (file name) and path.
Everything is in sorted order. Batches for training come from `train.stream.ShuffledBatches`,
which also gives each process its share. Masks are only read for evaluation: training uses the
image-level labels alone.
"""

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .cli import UserError
from .volumes import CLASSES

SPLIT_DIRS = {"training": ("training",), "validation": ("validation", "validate")}
PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGE_EXTENSIONS = PIL_EXTENSIONS + (".npy",)
MASK_EXTENSIONS = (".png", ".npy", ".bmp", ".tif", ".tiff")  # lossless only


def resolve_split_dir(root, split):
    """Path of ROOT/training or ROOT/validation (ROOT/validate is accepted, as in the original code)."""
    if split not in SPLIT_DIRS:
        raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_DIRS)}")
    if not os.path.isdir(root):
        raise UserError(f"--src_dir {root}: no such directory")
    for name in SPLIT_DIRS[split]:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    raise UserError(f"{os.path.join(root, split)}: no such directory (expected {split}/normal and {split}/tumor)")


def list_slices(root, split, classes=CLASSES):
    """Sorted (path, label) pairs of a split's images; label 0 = normal, 1 = tumor."""
    split_dir = resolve_split_dir(root, split)
    items = []
    for name in classes:
        folder = os.path.join(split_dir, name)
        if os.path.isdir(folder):
            label = CLASSES.index(name)
            items += [(os.path.join(folder, f), label) for f in os.listdir(folder)
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    if not items:
        folders = " or ".join(os.path.join(split_dir, c) for c in classes)
        raise UserError(f"{folders}: no images (.png, .jpg or .npy)")
    return sorted(items)


def _read_array(path, palette_indices=False):
    """A file's pixels as a float32 array in [0, 1] ((H, W), (H, W, C) or, for .npy, as stored)."""
    try:
        if path.lower().endswith(".npy"):
            array = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as img:
                img.load()
                if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                    array = np.asarray(img).astype(np.uint16)
                elif img.mode in ("L", "F") or (img.mode == "P" and palette_indices):
                    array = np.asarray(img)
                elif img.mode in ("1", "LA"):
                    array = np.asarray(img.convert("L"))
                else:
                    array = np.asarray(img.convert("RGB"))
    except Exception as err:  # PIL and numpy raise many kinds for broken files
        text = str(err).strip().splitlines()
        raise UserError(f"{path}: cannot read image ({type(err).__name__}: {text[0] if text else ''})") from None
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    elif array.dtype == np.bool_:
        array = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all():  # NaN passes any range check
            raise UserError(f"{path}: holds NaN or infinite pixel values")
        if array.size and (array.min() < -1e-3 or array.max() > 1 + 1e-3):
            raise UserError(f"{path}: float pixel values must lie in [0, 1], "
                            f"found {array.min():.3g}..{array.max():.3g}")
    else:
        raise UserError(f"{path}: unsupported pixel type {array.dtype} (use uint8, uint16 or float in [0, 1])")
    return array


def _to_chw(array, path, in_channels):
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3 and path.lower().endswith(".npy"):
        if array.shape[0] == in_channels:
            return array
        if array.shape[-1] == in_channels:
            return np.moveaxis(array, -1, 0)
        # otherwise channels are the short axis; the count is checked by the caller
        return array if array.shape[0] < array.shape[-1] else np.moveaxis(array, -1, 0)
    if array.ndim == 3:
        return np.moveaxis(array, -1, 0)  # PIL gives (H, W, 3)
    raise UserError(f"{path}: array of shape {array.shape}; expected (H, W), (C, H, W) or (H, W, C) "
                    f"with C = --in_channels {in_channels}")


def read_image(path, in_channels=1):
    """An image file as float32 (in_channels, H, W) in [0, 1].

    One channel is repeated to fill in_channels; from more channels the first in_channels
    are taken, except that in_channels = 1 takes the mean of an RGB image's channels
    (the grey value of a grey image saved as RGB).
    """
    array = _to_chw(_read_array(path), path, in_channels)
    channels = array.shape[0]
    if channels == in_channels:
        return np.ascontiguousarray(array)
    if channels == 1:
        return np.repeat(array, in_channels, axis=0)
    if in_channels == 1 and channels == 3 and not path.lower().endswith(".npy"):
        return array.mean(0, keepdims=True)
    if channels > in_channels:
        return np.ascontiguousarray(array[:in_channels])
    raise UserError(f"{path}: has {channels} channels but --in_channels is {in_channels}")


def image_shape(path):
    """(channels, height, width) of an image file, read from its header (the pixels are not decoded).

    An RGB file counts as 3 channels; `read_image` averages them for --in_channels 1.
    """
    try:
        if path.lower().endswith(".npy"):
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
            if len(shape) == 2:
                return (1, *shape)
            return shape if shape[0] < shape[-1] else (shape[-1], *shape[:2])
        with Image.open(path) as img:
            return (len(img.getbands()), img.height, img.width)
    except Exception as err:  # as in _read_array: PIL and numpy raise many kinds for broken files
        text = str(err).strip().splitlines()
        raise UserError(f"{path}: cannot read image ({type(err).__name__}: {text[0] if text else ''})") from None


def read_mask(path):
    """A mask file as float32 (H, W) with 1 where any channel is nonzero."""
    array = _read_array(path, palette_indices=True)  # a palette mask's indices are its labels
    if array.ndim == 3:
        array = array.max(axis=0 if path.lower().endswith(".npy") and array.shape[0] <= 4 else -1)
    if array.ndim != 2:
        raise UserError(f"{path}: mask of shape {array.shape}; expected (H, W)")
    return (array > 0).astype(np.float32)


def _resize(tensor, size, nearest):
    if tensor.shape[-2:] == (size, size):
        return tensor
    if nearest:
        return F.interpolate(tensor[None], size=(size, size), mode="nearest-exact")[0]
    return F.interpolate(tensor[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def _label_of(path):
    parent = os.path.basename(os.path.dirname(path))
    return CLASSES.index(parent) if parent in CLASSES else 0


class SliceDataset(torch.utils.data.Dataset):
    """2-D slices of one split of the layout, in sorted order (see the module docstring for items).

    files: optional list of paths or (path, label) pairs (e.g. from `select_fold`) instead of the
    whole split. require_masks: every tumor image must have a mask (evaluation); normal images
    without one are taken as lesion-free.
    """

    def __init__(self, root, split="training", image_size=None, in_channels=1, require_masks=False, files=None):
        if files is None:
            files = list_slices(root, split)
        items = [(f, _label_of(f)) if isinstance(f, (str, os.PathLike)) else (f[0], int(f[1])) for f in files]
        self.items = [(os.fspath(p), label) for p, label in items]
        self.image_size = image_size
        self.in_channels = in_channels
        self._seg_cache = {}
        self.mask_paths = [self._find_mask(p) for p, _ in self.items]
        if require_masks:
            for (path, label), mask in zip(self.items, self.mask_paths):
                if label == 1 and mask is None:
                    seg = os.path.join(os.path.dirname(os.path.dirname(path)), "seg")
                    raise UserError(f"{path}: tumor image without a mask in {seg} (needed for evaluation)")

    def _find_mask(self, path):
        seg_dir = os.path.join(os.path.dirname(os.path.dirname(path)), "seg")
        if seg_dir not in self._seg_cache:
            self._seg_cache[seg_dir] = set(os.listdir(seg_dir)) if os.path.isdir(seg_dir) else set()
        names = self._seg_cache[seg_dir]
        stem = os.path.splitext(os.path.basename(path))[0]
        for ext in MASK_EXTENSIONS:
            if stem + ext in names:
                return os.path.join(seg_dir, stem + ext)
        return None

    def __len__(self):
        return len(self.items)

    def labels(self):
        """The label of every item, without reading images."""
        return [label for _, label in self.items]

    @property
    def names(self):
        """The file name of every item, as items give it."""
        return [os.path.basename(path) for path, _ in self.items]

    def __getitem__(self, index):
        path, label = self.items[index]
        image = torch.from_numpy(read_image(path, self.in_channels))
        mask_path = self.mask_paths[index]
        if mask_path is not None:
            mask = torch.from_numpy(read_mask(mask_path))[None]
            if mask.shape[-2:] != image.shape[-2:]:
                raise UserError(f"{mask_path}: mask is {tuple(mask.shape[-2:])} but image {path} is "
                                f"{tuple(image.shape[-2:])}")
        else:
            mask = torch.zeros((1,) + tuple(image.shape[-2:]))
        if self.image_size:
            image = _resize(image, self.image_size, nearest=False)
            mask = _resize(mask, self.image_size, nearest=True)
        return dict(image=image * 2.0 - 1.0, label=torch.tensor(label, dtype=torch.int64), mask=mask,
                    has_mask=mask_path is not None, name=os.path.basename(path), path=path)


def check_fold_size(fold_size, num_folds):
    """--fold_size is 0 (off) or positive, and is not combined with --num_folds."""
    if fold_size < 0:
        raise UserError(f"--fold_size {fold_size}: must be 0 (off) or positive")
    if fold_size and num_folds != 1:
        raise UserError(f"--fold_size {fold_size} and --num_folds {num_folds} are two ways to define folds; "
                        f"pass only one")


def select_fold(items, fold, num_folds, fold_size=0):
    """Fold `fold` of the sorted items: one of `num_folds` contiguous, near-equal parts, or, with
    `fold_size` > 0, the fixed block items[fold * fold_size : (fold + 1) * fold_size] (the original
    code's folds: blocks of 500 tumour slices)."""
    items = sorted(items)
    check_fold_size(fold_size, num_folds)
    if fold_size:
        blocks = -(-len(items) // fold_size)
        if not 0 <= fold < blocks:
            raise UserError(f"--fold {fold} is out of range 0..{blocks - 1}: {len(items)} items make {blocks} "
                            f"block(s) of --fold_size {fold_size}")
        return items[fold * fold_size:(fold + 1) * fold_size]
    if num_folds < 1:
        raise UserError(f"--num_folds must be at least 1, got {num_folds}")
    if not 0 <= fold < num_folds:
        raise UserError(f"--fold {fold} is out of range 0..{num_folds - 1} (--num_folds {num_folds})")
    start, stop = fold * len(items) // num_folds, (fold + 1) * len(items) // num_folds
    if start == stop:
        raise UserError(f"--fold {fold} of --num_folds {num_folds} is empty: only {len(items)} items")
    return items[start:stop]


class VolumeSliceDataset(torch.utils.data.Dataset):
    """Axial slices of the original code's abdominal volumes: `.npy` arrays (Z, 2, H, W).

    Channel 0 is the image in [0, 1], channel 1 the organ label map. The image-level label
    is 1 when any of `class_indices` is present in the slice (the seed's class 2 meant both
    kidneys, i.e. class_indices=(2, 3)). Items as in `SliceDataset`.
    """

    def __init__(self, volume_dir, files=None, image_size=128, class_indices=(1,)):
        if not os.path.isdir(volume_dir):
            raise UserError(f"--src_dir {volume_dir}: no such directory")
        files = sorted(files if files is not None else (f for f in os.listdir(volume_dir) if f.endswith(".npy")))
        if not files:
            raise UserError(f"{volume_dir}: no .npy volumes")
        self.volumes, self.paths, self.items = {}, {}, []
        for name in files:
            path = os.path.join(volume_dir, name)
            try:
                volume = np.load(path, mmap_mode="r", allow_pickle=False)
            except Exception as err:
                raise UserError(f"{path}: cannot read volume ({type(err).__name__})") from None
            if volume.ndim != 4 or volume.shape[1] != 2:
                raise UserError(f"{path}: shape {volume.shape}; expected (Z, 2, H, W)")
            self.volumes[name], self.paths[name] = volume, path
            present = np.isin(np.asarray(volume[:, 1]).astype(np.int64), class_indices).any(axis=(1, 2))
            self.items += [(name, z, int(present[z])) for z in range(volume.shape[0])]
        self.image_size = image_size
        self.class_indices = tuple(class_indices)

    def __len__(self):
        return len(self.items)

    def labels(self):
        return [label for _, _, label in self.items]

    def __getitem__(self, index):
        name, z, label = self.items[index]
        pair = np.asarray(self.volumes[name][z], dtype=np.float32)
        if not np.isfinite(pair).all():
            raise UserError(f"{self.paths[name]}: slice {z} holds NaN or infinite values")
        image = torch.from_numpy(np.clip(pair[0], 0.0, 1.0))[None]
        mask = torch.from_numpy(np.isin(pair[1].astype(np.int64), self.class_indices).astype(np.float32))[None]
        if self.image_size:
            image = _resize(image, self.image_size, nearest=False)
            mask = _resize(mask, self.image_size, nearest=True)
        return dict(image=image * 2.0 - 1.0, label=torch.tensor(label, dtype=torch.int64), mask=mask,
                    has_mask=True, name=f"{os.path.splitext(name)[0]}_z{z:03d}", path=self.paths[name])
