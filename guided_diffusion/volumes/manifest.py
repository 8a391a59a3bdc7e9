"""Back to 3-D: the dataset's settings and manifest, and masks pasted back into the source voxel grids."""

import csv
import json
import os

import nibabel as nib
import numpy as np

from ..cli import UserError
from .options import MANIFEST_NAME, SETTINGS_NAME, MANIFEST_FIELDS, MANIFEST_INT_FIELDS
from .pixels import paste_box, resize2d
from .reading import _one_line, _canonical_ornt, lesion_mask

def read_settings(root):
    """ROOT/dataset.json as a dict ({} when there is none, as in hand-made layouts)."""
    path = os.path.join(root, SETTINGS_NAME)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read the dataset settings ({_one_line(err)})") from None


def resolve_source(root, stored, settings=None, raw_dir=None):
    """The path of a volume the manifest stores as `stored`.

    An absolute path (manifests written before paths were relative) is taken as it is. A relative one
    is looked up, first hit wins: under `raw_dir` (the raw data's new place, given by the user), under
    the dataset root (volumes written inside the dataset), under the input folder recorded in
    dataset.json, relative to the root (so a dataset moved together with its raw data still resolves),
    then as recorded. Without a hit it is the recorded input folder's path, for the error message.
    """
    if os.path.isabs(stored):
        return stored
    settings = read_settings(root) if settings is None else settings
    candidates = [os.path.join(raw_dir, stored)] if raw_dir else []
    candidates.append(os.path.join(root, stored))
    if settings.get("input_dir_relative"):
        candidates.append(os.path.normpath(os.path.join(root, settings["input_dir_relative"], stored)))
    if settings.get("input_dir"):
        candidates.append(os.path.join(settings["input_dir"], stored))
    return next((c for c in candidates if os.path.exists(c)), candidates[-1])


def read_manifest(root, raw_dir=None):
    """Rows of ROOT/manifest.csv as dicts, integer columns converted and `source` / `seg_source` resolved
    to paths (see `resolve_source`; `raw_dir` is where the raw data are now, if they moved)."""
    path = os.path.join(root, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file (the prepare scripts write it beside training/ and validation/)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MANIFEST_FIELDS if c not in (reader.fieldnames or ())]
        if missing:
            raise UserError(f"{path}: not a slice manifest (missing columns {', '.join(missing)})")
        rows = list(reader)
    settings = read_settings(root)
    for row in rows:
        for key in MANIFEST_INT_FIELDS:
            row[key] = int(row[key])
        for key in ("source", "seg_source"):
            if row[key]:
                row[key] = resolve_source(root, row[key], settings, raw_dir)
    return rows


def paste_subject_masks(src_dir, split, names, kinds, folder, raw_dir=None):
    """Slice masks back into each subject's source grid, written as `<subject>_pred<kind>.nii.gz` (uint8)
    in `folder`; returns one row per subject with 3-D Dice per kind where its label map is found.

    names: the segmented slice files of `split`; kinds: {suffix: name -> (H, W) bool mask}.
    """
    from ..metrics import dice_3d

    rows = [r for r in read_manifest(src_dir, raw_dir) if r["split"] == split]
    lesion_labels = tuple(read_settings(src_dir).get("options", {}).get("lesion_labels", ()) or ())
    by_name = {os.path.basename(r["file"]): r for r in rows}
    segmented = {os.path.basename(n) for n in names}
    os.makedirs(folder, exist_ok=True)
    results = []
    for source in sorted({by_name[n]["source"] for n in segmented}):
        if not os.path.isfile(source):
            raise UserError(f"{src_dir}: the source volume {source} is not there (moved? pass --raw_dir, the "
                            f"raw data's new folder)")
        subject_rows = [r for r in rows if r["source"] == source]
        mine = [r for r in subject_rows if os.path.basename(r["file"]) in segmented]
        seg_path = subject_rows[0]["seg_source"]
        gt = None
        if seg_path and os.path.isfile(seg_path):
            gt = lesion_mask(nib.load(seg_path).dataobj, lesion_labels)
        result = {"subject": subject_rows[0]["subject"], "slices_evaluated": len(mine)}
        for suffix, mask_of in kinds.items():
            pasted = paste_slices(mine, {r["file"]: mask_of(r["file"]).astype(np.float32) for r in mine},
                                  nearest=True, source=source)
            prediction = np.asarray(pasted.dataobj) > 0.5
            if gt is not None and prediction.shape != gt.shape:
                raise UserError(f"{seg_path}: shape {gt.shape} differs from {source} {prediction.shape}")
            result[f"dice_3d{suffix}"] = dice_3d(prediction, gt) if gt is not None else None
            save_like(prediction.astype(np.uint8), nib.load(source),
                      os.path.join(folder, f"{result['subject']}_pred{suffix}.nii.gz"))
        results.append(result)
    return results


def save_like(data, reference, path):
    """Write `data` (the reference's voxel grid) as NIfTI with the reference's affine, qform and sform,
    so a viewer overlays it on the reference."""
    header = reference.header.copy()
    header.set_data_dtype(data.dtype)
    # a 4-D reference (a Decathlon image, every channel on one grid) gives its 3-D grid
    shape = reference.shape if data.size == np.prod(reference.shape) else reference.shape[:3]
    image = nib.Nifti1Image(data.reshape(shape), reference.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    for form in ("qform", "sform"):
        matrix, code = getattr(reference, f"get_{form}")(coded=True)
        getattr(image, f"set_{form}")(matrix, int(code))  # code 0 (unset) stays unset
    nib.save(image, path)


def paste_slices(rows, images, nearest=True, source=None):
    """Put 2-D per-slice arrays back into the voxel grid of their source volume.

    rows: manifest rows of one source volume; images: {row["file"]: 2-D array (H, W)}
    (e.g. predicted masks at the written image size); slices without an entry stay zero.
    Returns a float32 Nifti1Image on the source's own grid and affine.
    """
    if source is None:
        sources = {r["source"] for r in rows}
        if len(sources) != 1:
            raise ValueError(f"rows come from {len(sources)} source volumes; pass one volume's rows")
        source = sources.pop()
    header_img = nib.load(source)
    shape = header_img.shape[:3]
    ornt = _canonical_ornt(header_img.affine)
    canonical_shape = [0, 0, 0]
    for axis, (new_axis, _) in enumerate(ornt):
        canonical_shape[int(new_axis)] = shape[axis]
    volume = np.zeros(canonical_shape, np.float32)
    for row in rows:
        if row["file"] not in images:
            continue
        box = (row["x0"], row["x1"], row["y0"], row["y1"])
        image = resize2d(np.asarray(images[row["file"]], np.float32), (box[3] - box[2], box[1] - box[0]), nearest)
        paste_box(volume[:, :, row["slice_index"]], image, box)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    original = nib.orientations.apply_orientation(volume, back)
    return nib.Nifti1Image(np.ascontiguousarray(original), header_img.affine)
