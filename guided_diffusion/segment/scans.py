"""Whole scans in, masks in the scan's own voxel grid out (`scripts/segment_scans.py`).

A scan is one NIfTI file (one channel) or a BraTS-style subject folder (`*_<modality>.nii.gz` per
channel, `*_seg.nii.gz` as its reference when present). `prepare_scan` re-applies exactly the
preprocessing of the training data, read from the prepared dataset's dataset.json (`volumes`:
canonical orientation, intensity normalisation, the square crop box, the slices with enough
foreground, the image size, the channel order, 8-bit quantisation), so slice z of a scan is the
very image `prepare_brats.py` wrote as `<name>_z<zzz>`, with the same noise. The slices go through
the one segmentation pipeline; `ScanWriter` pastes masks and maps back (`volumes.paste_slices`) and
writes per scan `<name>_pred.nii.gz` (uint8), `<name>_map.nii.gz` (float32: the per-slice min-max
map that Otsu thresholds, 0 where no slice was segmented), `<name>_overview.png`, and the rows of
metrics.csv (whole-volume Dice and HD95 in mm where a reference exists).
"""

import os
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import torch

from ..cli import UserError
from ..metrics import dice_3d, evaluate_masks, hd95_3d, summarize
from ..volumes import (BRATS_MODALITIES, SliceOptions, cut_box, cut_image, lesion_mask, load_canonical, normalise_volume,
                       paste_slices, resize2d, save_like, slice_geometry)
from .pipeline import ArrayBatches
from .postprocess import normalize_map, saliency_to_mask

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class Scan:
    """One scan: a name, one NIfTI path per channel (the dataset's order), an optional reference."""

    name: str
    channels: tuple
    reference: str = None


@dataclass
class PreparedScan:
    """A scan's model inputs: images (N, C, S, S) in [-1, 1] of the kept axial slices `z`, their names,
    the crop box, reference slice masks (N, S, S) and the reference lesion volume (the scan file's own grid)
    when known."""

    scan: Scan
    images: torch.Tensor
    z: list
    names: list
    box: tuple
    masks: np.ndarray = None
    labels: np.ndarray = None
    reference: np.ndarray = None
    warnings: list = field(default_factory=list)


def _stem(path):
    base = os.path.basename(os.path.normpath(path))
    for suffix in NIFTI_SUFFIXES:
        if base.endswith(suffix):
            return base[:-len(suffix)]
    return base


def _is_nifti(path):
    return os.path.isfile(path) and path.endswith(NIFTI_SUFFIXES)


def _subject_files(folder, suffix):
    return sorted(n for n in os.listdir(folder) if n.endswith((f"_{suffix}.nii.gz", f"_{suffix}.nii")))


def _subject_scan(folder, modalities):
    files = []
    for modality in modalities:
        hits = _subject_files(folder, modality)
        if not hits:
            raise UserError(f"{folder}: no *_{modality}.nii.gz (the models take {', '.join(modalities)})")
        if len(hits) > 1:
            raise UserError(f"{folder}: several *_{modality}.nii.gz files ({', '.join(hits)})")
        files.append(os.path.join(folder, hits[0]))
    seg = _subject_files(folder, "seg")
    return Scan(os.path.basename(os.path.normpath(folder)), tuple(files), os.path.join(folder, seg[0]) if seg else None)


def _is_subject_folder(folder, modalities):
    """A BraTS-style subject folder: NIfTI files named <subject>_<modality or seg>, one subject prefix (a flat
    folder of several patients' *_flair.nii.gz files is a folder of scans)."""
    if not os.path.isdir(folder):
        return False
    suffixes = tuple(f"_{m}{ext}" for m in (*BRATS_MODALITIES, *modalities, "seg") for ext in NIFTI_SUFFIXES)
    prefixes = {name[:name.rindex("_")] for name in os.listdir(folder) if name.endswith(suffixes)}
    return len(prefixes) == 1


def find_scans(inputs, modalities):
    """Scans named by `inputs` (NIfTI files, subject folders, or folders of either), in a stable order.

    A NIfTI file is a one-channel scan; more channels need subject folders. Files ending in _seg
    are references, never scans.
    """
    scans = []
    for path in inputs:
        if _is_nifti(path):
            found = [path]
        elif _is_subject_folder(path, modalities):
            found = [path]
        elif os.path.isdir(path):
            entries = [os.path.join(path, n) for n in sorted(os.listdir(path)) if not n.startswith(".")]
            found = [e for e in entries if (_is_nifti(e) and not _stem(e).endswith("_seg"))
                     or _is_subject_folder(e, modalities)]
            if not found:
                raise UserError(f"--input {path}: no NIfTI scan (.nii, .nii.gz) or subject folder with "
                                f"*_{modalities[0]}.nii.gz in it")
        elif os.path.exists(path):
            raise UserError(f"--input {path}: not a NIfTI file (.nii or .nii.gz) or a folder")
        else:
            raise UserError(f"--input {path}: no such file or folder")
        for item in found:
            if os.path.isdir(item):
                scans.append(_subject_scan(item, modalities))
            elif len(modalities) > 1:
                raise UserError(f"--input {item}: one NIfTI file is one channel, but the models take "
                                f"{len(modalities)} ({', '.join(modalities)}); give BraTS-style subject folders")
            else:
                scans.append(Scan(_stem(item), (item,)))
    names = [s.name for s in scans]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UserError(f"--input: two scans are named {duplicate}; their outputs would overwrite each other")
    return scans


def with_reference(scans, reference):
    """Attach `--reference`: a file, for one scan, or a folder holding `<name>_seg.nii.gz`, `<name>.nii.gz`
    or a BraTS subject folder `<subject>/<subject>_seg.nii.gz` (for a scan named `<subject>_<modality>`)."""
    if not reference:
        return scans
    if os.path.isfile(reference):
        if len(scans) != 1:
            raise UserError(f"--reference {reference}: one file is the reference of one scan, but there are "
                            f"{len(scans)}; give a folder of <name>_seg.nii.gz files")
        scans[0].reference = reference
        return scans
    if not os.path.isdir(reference):
        raise UserError(f"--reference {reference}: no such file or folder")
    for scan in scans:
        subject = next((scan.name[:-len(m) - 1] for m in BRATS_MODALITIES if scan.name.endswith(f"_{m}")), scan.name)
        candidates = [f"{scan.name}_seg", scan.name, f"{subject}_seg", os.path.join(subject, f"{subject}_seg")]
        found = [os.path.join(reference, c + ext) for c in candidates for ext in NIFTI_SUFFIXES]
        own = {os.path.abspath(c) for c in scan.channels}  # a folder of scans is no folder of references
        scan.reference = next((p for p in found if os.path.isfile(p) and os.path.abspath(p) not in own), scan.reference)
    return scans


def _check_same_grid(path, image, other_path, other):
    if image.shape[:3] != other.shape[:3] or not np.allclose(image.affine, other.affine, atol=1e-3):
        raise UserError(f"{path}: shape {image.shape[:3]} and affine differ from {other_path} "
                        f"{other.shape[:3]}; they must share the voxel grid")


def prepare_scan(scan, options, lesion_labels=()):
    """The scan's slices exactly as the training data were prepared (see the module docstring)."""
    warnings = []
    loaded = []
    for path in scan.channels:
        data, _ = load_canonical(path, warn=warnings.append)
        loaded.append(data)
    headers = [nib.load(p) for p in scan.channels]
    for path, header in zip(scan.channels[1:], headers[1:]):
        _check_same_grid(path, header, scan.channels[0], headers[0])
    channels, foreground = normalise_volume(np.stack(loaded), options)
    box, kept = slice_geometry(foreground, options)
    if not kept:
        warnings.append(f"{scan.channels[0]}: no voxel above the background (an empty scan); its mask is empty")
    size = options.image_size
    images = np.stack([cut_image(channels, box, z, size) for z in kept]) if kept else np.zeros((0, len(loaded), size, size), np.uint8)
    prepared = PreparedScan(scan=scan, images=torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0), z=kept,
                            names=[f"{scan.name}_z{z:03d}" for z in kept], box=box, warnings=warnings)
    if scan.reference:
        reference = nib.load(scan.reference)
        _check_same_grid(scan.reference, reference, scan.channels[0], headers[0])
        prepared.reference = lesion_mask(np.asarray(reference.dataobj).reshape(reference.shape[:3]), lesion_labels)
        lesion = nib.orientations.apply_orientation(prepared.reference, nib.orientations.io_orientation(reference.affine))
        prepared.masks = np.stack([resize2d(cut_box(lesion[:, :, z].astype(np.float32), box), (size, size),
                                            nearest=True) > 0.5 for z in kept]) if kept else np.zeros((0, size, size), bool)
        prepared.labels = np.array([int(lesion[:, :, z].any()) for z in kept])
    return prepared


def scan_batches(prepared, batch_size):
    """The pipeline's batches of one prepared scan."""
    return ArrayBatches(prepared.images, prepared.names, batch_size, labels=prepared.labels, masks=prepared.masks)


class ScanWriter:
    """Pastes one scan's pipeline results back into its grid and writes its files into `folder`."""

    def __init__(self, folder, options, overview_slices=6):
        self.folder, self.options = folder, options  # options.keep_largest: the largest component only
        self.overview_slices = overview_slices

    def write(self, prepared, results):
        """Files of one scan; returns its metrics row (the caller adds its seconds) and its slice records
        (for the summary; None without a reference)."""
        scan, n = prepared.scan, len(prepared.names)
        size = prepared.images.shape[-1]
        maps = np.concatenate([r.maps[next(iter(r.maps))] for r in results]) if results else np.zeros((0, size, size))
        segmented = np.concatenate([r.segmented for r in results]) if results else np.zeros(0, bool)
        probability = (np.concatenate([r.tumour_probability for r in results])
                       if results and results[0].tumour_probability is not None else None)
        masks = saliency_to_mask(maps, options=self.options, images=prepared.images.numpy())
        normalised = normalize_map(maps).astype(np.float32) if n else maps
        rows = [{"file": name, "slice_index": z, "x0": prepared.box[0], "x1": prepared.box[1],
                 "y0": prepared.box[2], "y1": prepared.box[3]} for name, z in zip(prepared.names, prepared.z)]
        source = scan.channels[0]
        reference_image = nib.load(source)
        mask_volume = paste_slices(rows, {r["file"]: m.astype(np.float32) for r, m in zip(rows, masks)},
                                   nearest=True, source=source)
        prediction = np.asarray(mask_volume.dataobj) > 0.5
        map_volume = paste_slices(rows, dict(zip(prepared.names, normalised)), nearest=False, source=source)
        save_like(prediction.astype(np.uint8), reference_image, os.path.join(self.folder, f"{scan.name}_pred.nii.gz"))
        save_like(np.asarray(map_volume.dataobj, np.float32), reference_image,
                  os.path.join(self.folder, f"{scan.name}_map.nii.gz"))
        write_overview(os.path.join(self.folder, f"{scan.name}_overview.png"), prepared, normalised, masks,
                       self.overview_slices)
        row = {"scan": scan.name, "source": os.path.abspath(source), "slices": n,
               "segmented_slices": int(segmented.sum()), "predicted_voxels": int(prediction.sum())}
        records = None
        if prepared.reference is not None:
            reference = prepared.reference
            spacing = tuple(float(v) for v in reference_image.header.get_zooms()[:3])
            row.update(reference_voxels=int(reference.sum()), dice_3d=dice_3d(prediction, reference),
                       hd95_mm=hd95_3d(prediction, reference, spacing))
            records = {"records": evaluate_masks(masks, prepared.masks), "labels": prepared.labels,
                       "probability": probability, "segmented": segmented}
        return row, records



def write_overview(path, prepared, maps, masks, count):
    """The slices with the most predicted lesion (the middle ones when none): image, map, outlines
    (red: prediction, green: reference)."""
    from matplotlib.figure import Figure

    n = len(prepared.names)
    if n == 0:
        order = []
    elif masks.any():
        area = masks.sum((1, 2))
        order = sorted(i for i in np.argsort(-area, kind="stable")[:count] if area[i] > 0)
    else:
        order = list(range(max(0, n // 2 - count // 2), min(n, n // 2 - count // 2 + count)))
    columns = max(len(order), 1)
    fig = Figure(figsize=(2.0 * columns, 4.3), dpi=100)
    fig.suptitle(f"{prepared.scan.name}: red prediction" + (", green reference" if prepared.masks is not None else "")
                 + ("" if order else " (no slice with foreground)"), fontsize=8)
    for col, i in enumerate(order):
        image = prepared.images[i, 0].numpy()
        for row, (panel, cmap, vmin) in enumerate(((image, "gray", -1), (maps[i], "magma", 0))):
            ax = fig.add_subplot(2, columns, row * columns + col + 1)
            ax.imshow(panel, cmap=cmap, vmin=vmin, vmax=1, interpolation="nearest")
            ax.axis("off")
            if row == 0:
                ax.set_title(f"z = {prepared.z[i]}", fontsize=7)
                if masks[i].any():
                    ax.contour(masks[i].astype(float), levels=[0.5], colors="red", linewidths=0.8)
                if prepared.masks is not None and prepared.masks[i].any():
                    ax.contour(prepared.masks[i].astype(float), levels=[0.5], colors="lime", linewidths=0.8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def summarise_scans(rows, slice_records, detection_threshold):
    """The scans' part of summary.json: whole-volume Dice / HD95, slice Dice (tumour slices and all slices)
    and slice-level detection, over the scans that have a reference."""
    from .detect import detection_scores

    summary = {"n_scans": len(rows), "n_with_reference": len(slice_records),
               "seconds_per_scan": float(np.mean([r["seconds"] for r in rows])) if rows else float("nan")}
    if not slice_records:
        return summary
    scored = [r for r in rows if "dice_3d" in r]
    for key in ("dice_3d", "hd95_mm"):
        values = np.array([r[key] for r in scored], np.float64)
        defined = values[np.isfinite(values)]
        summary[f"{key}_mean"] = float(defined.mean()) if defined.size else float("nan")
        summary[f"{key}_std"] = float(defined.std()) if defined.size else float("nan")
        summary[f"{key}_undefined"] = int(values.size - defined.size)
    records = [r for part in slice_records for r in part["records"]]
    labels = np.concatenate([part["labels"] for part in slice_records])
    summary["tumour_slices"] = summarize([r for r, label in zip(records, labels) if label == 1])
    summary["all_slices"] = summarize(records)
    if slice_records[0]["probability"] is not None:
        probability = np.concatenate([part["probability"] for part in slice_records])
        segmented = np.concatenate([part["segmented"] for part in slice_records])
        summary["detection"] = detection_scores(probability, labels, detection_threshold, segmented)
    return summary


def dataset_preprocessing(settings, path):
    """(SliceOptions, modalities) of a prepared dataset's dataset.json (`settings`, read from `path`)."""
    options = settings.get("options")
    if not isinstance(options, dict) or "intensity" not in options:
        raise UserError(f"--dataset_json {path}: not the dataset.json of a prepared slice dataset (no options)")
    known = {k: v for k, v in options.items() if k in SliceOptions.__dataclass_fields__}
    for key in ("clip_percentiles", "ct_window", "lesion_labels"):
        if key in known:
            known[key] = tuple(known[key])
    modalities = settings.get("modalities") or ([settings["modality"]] if settings.get("modality") else ["flair"])
    return SliceOptions(**known), tuple(modalities)
