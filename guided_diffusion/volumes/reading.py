"""Reading NIfTI volumes: canonical (RAS+) orientation, label maps and the cases of a dataset folder."""

import os

import nibabel as nib
import numpy as np

from .. import layouts
from ..cli import UserError
from ..layouts import VolumeCase  # the converters' case, defined with the layouts that find them

def _one_line(err):
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _load_nifti(path, warn=None, channel=None):
    try:
        img = nib.load(os.fspath(path))
        if channel is None:
            data = img.get_fdata(dtype=np.float32)
        elif len(img.shape) == 4 and channel < img.shape[3]:
            data = np.array(img.dataobj[..., channel], dtype=np.float32)  # one channel read, as a writable copy
        else:
            raise UserError(f"{path}: expected a 4-D volume with channel {channel} on its 4th axis (a Decathlon "
                            f"image), got shape {img.shape}")
    except UserError:
        raise
    except Exception as err:  # nibabel and gzip raise many kinds for broken files
        raise UserError(f"{path}: cannot read NIfTI volume ({_one_line(err)})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UserError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad and warn is not None:
        warn(f"{path}: {bad} NaN or infinite voxels, read as 0")
    return img, np.nan_to_num(data, copy=False, nan=0.0, posinf=0.0, neginf=0.0)


def _canonical_ornt(affine):
    return nib.orientations.io_orientation(affine)


def load_canonical(path, warn=None, channel=None):
    """Read a 3-D NIfTI volume (or `channel` of a 4-D one) as float32 in closest canonical (RAS+) orientation.

    Returns (array, affine); UserError naming `path` if it cannot be read. NaN and infinite voxels
    read as 0, said through `warn(message)` when given.
    """
    img, data = _load_nifti(path, warn, channel)
    ornt = _canonical_ornt(img.affine)
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)  # shape before reorienting
    data = nib.orientations.apply_orientation(data, ornt)
    return np.ascontiguousarray(data, dtype=np.float32), affine


def lesion_mask(labels, lesion_labels=()):
    """A label map (any numeric array) as a lesion mask: the `lesion_labels` values, or every nonzero label."""
    labels = np.rint(np.asarray(labels)).astype(np.int64)
    return np.isin(labels, lesion_labels) if lesion_labels else labels != 0


def label_values(labels):
    """The distinct values of a label map (rounded to integers), sorted."""
    labels = np.rint(np.asarray(labels)).astype(np.int64).ravel()
    if labels.size and 0 <= labels.min() and labels.max() < 1 << 16:
        return [int(v) for v in np.flatnonzero(np.bincount(labels))]  # far faster than np.unique on a volume
    return [int(v) for v in np.unique(labels)]


def voxel_geometry(affine, shape):
    """(voxel size, field of view) in mm along each array axis of a volume with this affine and shape."""
    spacing = np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(0))
    return spacing, spacing * np.asarray(shape[:3], np.float64)


def find_brats_cases(root, modalities):
    """List the subjects of a BraTS 2020/2021, BraTS 2023+ or Decathlon Task01 folder (see `layouts`); each
    case's `scheme` names its layout, whose label values `export_slice_dataset` checks."""
    return layouts.find_cases(root, tuple(modalities))


def find_btcv_cases(root):
    """List BTCV / Synapse cases: `img/imgXXXX.nii.gz` with `label/labelXXXX.nii.gz`."""
    if not os.path.isdir(root):
        raise UserError(f"--input_dir {root}: no such directory")
    img_dir, label_dir = os.path.join(root, "img"), os.path.join(root, "label")
    for folder in (img_dir, label_dir):
        if not os.path.isdir(folder):
            raise UserError(f"{folder}: no such directory (expected img/imgXXXX.nii.gz and label/labelXXXX.nii.gz)")
    images = sorted(n for n in os.listdir(img_dir) if n.startswith("img") and n.endswith((".nii.gz", ".nii")))
    if not images:
        raise UserError(f"{img_dir}: no imgXXXX.nii.gz files")
    cases = []
    for name in images:
        ext = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
        case_id = name[len("img"):-len(ext)]
        candidates = [os.path.join(label_dir, f"label{case_id}{e}") for e in (".nii.gz", ".nii")]
        seg = next((c for c in candidates if os.path.isfile(c)), None)
        if seg is None:
            raise UserError(f"{os.path.join(img_dir, name)}: no label file {candidates[0]}")
        cases.append(VolumeCase(f"img{case_id}", (os.path.join(img_dir, name),), seg))
    return cases
