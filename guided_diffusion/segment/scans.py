"""Whole scans in, masks in the scan's own voxel grid out (`scripts/segment_scans.py`).

A scan is one NIfTI file (one channel, or a Decathlon 4-D file holding the models' channels), or a
BraTS subject folder in 2020/2021 or 2023+ naming (`*_<modality>.nii.gz` / `*-t2f.nii.gz`... per
channel, `*_seg` / `*-seg` as its reference when present; see `layouts`); a label map is never taken
for a scan. `prepare_scan` first checks the scan against what the models were trained on
(`scan_checks`), then re-applies exactly the
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

from .. import layouts
from ..cli import UserError
from ..lesion_metrics import lesion_wise_scores, summarise_lesion_rows
from ..metrics import dice_3d, evaluate_masks, hd95_3d, summarize
from ..volumes import (SliceOptions, cut_box, cut_image, label_values, lesion_mask, load_canonical, normalise_volume,
                       paste_slices, resize2d, save_like, slice_geometry)
from .pipeline import ArrayBatches
from .postprocess import normalize_map
from .scan_decision import decide
from .scan_checks import check_scan

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class Scan:
    """One scan: a name, one NIfTI path per channel (the dataset's order), an optional reference.

    channel_index: per channel, its index on the file's 4th axis (a Decathlon image); () for 3-D files.
    scheme: the label scheme of the reference (`layouts.SCHEMES`), "" when its layout is unknown."""

    name: str
    channels: tuple
    reference: str = None
    channel_index: tuple = ()
    scheme: str = ""


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


def _subject_scan(folder, modalities):
    subject = layouts.read_subject_folder(folder)
    why = f"(the models take {', '.join(modalities)})"
    files = tuple(subject.path(m, why) for m in modalities)
    seg = subject.path("seg") if "seg" in subject.files else None
    return Scan(os.path.basename(os.path.normpath(folder)), files, seg, scheme=subject.naming)


def _is_subject_folder(folder, modalities=()):
    """A BraTS subject folder: NIfTI files of one subject (<subject>_<modality or seg> or <subject>-<t2f, ...
    or seg>), at least one a scan (a flat folder of several patients' scans is a folder of scans)."""
    if not os.path.isdir(folder):
        return False
    subject = layouts.read_subject_folder(folder)
    return subject is not None and subject.has_modality()


def _file_scan(path, modalities, listed=False):
    """The scan of one NIfTI file, or None for a file of a folder listing that is another modality's.

    A 3-D file is one channel; a file named as another modality than the (one-channel) models take, or as a
    label map, is a UserError when named by --input. A 4-D file gives the models' channels (see
    `layouts.scan_channels`), with labelsTr/<name> beside a Decathlon imagesTr/ as its reference."""
    parsed = layouts.parse_name(path)
    if parsed is not None and parsed.role == "seg":
        if listed:
            return None
        raise UserError(f"--input {path}: a label map (named *{'-' if parsed.naming == 'brats2023' else '_'}seg), "
                        f"not a scan")
    channel_index, _ = layouts.scan_channels(path, modalities)
    if channel_index:
        return Scan(_stem(path), (path,) * len(modalities), layouts.msd_label_path(path), channel_index, "msd")
    if len(modalities) > 1:
        raise UserError(f"--input {path}: one NIfTI file is one channel, but the models take "
                        f"{len(modalities)} ({', '.join(modalities)}); give BraTS-style subject folders")
    if parsed is not None and parsed.role != modalities[0]:
        if listed:
            return None
        raise UserError(f"--input {path}: named as a {parsed.role} scan, but the models take {modalities[0]}")
    return Scan(_stem(path), (path,), scheme=parsed.naming if parsed else "")


def find_scans(inputs, modalities):
    """Scans named by `inputs` (NIfTI files, subject folders, or folders of either), in a stable order.

    A NIfTI file is a one-channel scan (a Decathlon 4-D file: its channels); more channels need subject
    folders. Label maps (*_seg, *-seg) are references, never scans; in a folder of scans, files named as
    another modality than the models take are left out.
    """
    scans = []
    for path in inputs:
        if _is_nifti(path):
            found = [_file_scan(path, modalities)]
        elif _is_subject_folder(path, modalities):
            found = [_subject_scan(path, modalities)]
        elif os.path.isdir(path):
            entries = [os.path.join(path, n) for n in sorted(os.listdir(path)) if not n.startswith(".")]
            found = [_subject_scan(e, modalities) if _is_subject_folder(e) else _file_scan(e, modalities, listed=True)
                     for e in entries if _is_nifti(e) or _is_subject_folder(e)]
            found = [scan for scan in found if scan is not None]
            if not found:
                raise UserError(f"--input {path}: no NIfTI scan (.nii, .nii.gz) of {modalities[0]} or subject "
                                f"folder with *_{modalities[0]}.nii.gz in it")
        elif os.path.exists(path):
            raise UserError(f"--input {path}: not a NIfTI file (.nii or .nii.gz) or a folder")
        else:
            raise UserError(f"--input {path}: no such file or folder")
        scans.extend(found)
    names = [s.name for s in scans]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UserError(f"--input: two scans are named {duplicate}; their outputs would overwrite each other")
    return scans


def _attach_reference(scan, path):
    scan.reference = path
    scan.scheme = layouts.label_scheme_of(path) or scan.scheme  # the reference's own name says most


def with_reference(scans, reference):
    """Attach `--reference`: a file, for one scan, or a folder holding `<name>_seg.nii.gz`, `<name>.nii.gz`
    (e.g. a Decathlon labelsTr/) or a BraTS subject folder `<subject>/<subject>_seg.nii.gz` (for a scan named
    `<subject>_<modality>`; BraTS 2023 names, `-seg`, likewise)."""
    if not reference:
        return scans
    if os.path.isfile(reference):
        if len(scans) != 1:
            raise UserError(f"--reference {reference}: one file is the reference of one scan, but there are "
                            f"{len(scans)}; give a folder of <name>_seg.nii.gz files")
        _attach_reference(scans[0], reference)
        return scans
    if not os.path.isdir(reference):
        raise UserError(f"--reference {reference}: no such file or folder")
    for scan in scans:
        parsed = layouts.parse_name(scan.name + ".nii")
        subject = parsed.subject if parsed is not None else scan.name
        candidates = [f"{scan.name}_seg", f"{scan.name}-seg", scan.name, f"{subject}_seg", f"{subject}-seg",
                      os.path.join(subject, f"{subject}_seg"), os.path.join(subject, f"{subject}-seg")]
        found = [os.path.join(reference, c + ext) for c in candidates for ext in NIFTI_SUFFIXES]
        own = {os.path.abspath(c) for c in scan.channels}  # a folder of scans is no folder of references
        hit = next((p for p in found if os.path.isfile(p) and os.path.abspath(p) not in own), None)
        if hit is not None:
            _attach_reference(scan, hit)
    return scans


def _check_same_grid(path, image, other_path, other):
    if image.shape[:3] != other.shape[:3] or not np.allclose(image.affine, other.affine, atol=1e-3):
        raise UserError(f"{path}: shape {image.shape[:3]} and affine differ from {other_path} "
                        f"{other.shape[:3]}; they must share the voxel grid")


def reference_labels(scan, lesion_labels, expected):
    """The label values of a scan's reference that make its lesion: the region the models were trained on
    (`expected.region`, from --region or dataset.json) in the reference's label scheme (the training data's
    when its own is unknown), else the raw `lesion_labels` of datasets that record no region."""
    if expected is None or not expected.region:
        return lesion_labels
    return layouts.region_labels(scan.scheme or expected.scheme, expected.region)


def prepare_scan(scan, options, lesion_labels=(), expected=None):
    """The scan's slices exactly as the training data were prepared (see the module docstring), after the
    checks of `scan_checks` against `expected` (the training data's `Expectations`; None: only what the scan
    itself shows). A failed check is a UserError or a warning in the result's `warnings`."""
    warnings = []
    loaded = []
    channel_index = scan.channel_index or (None,) * len(scan.channels)
    for path, channel in zip(scan.channels, channel_index):
        data, affine = load_canonical(path, warn=warnings.append, channel=channel)
        loaded.append(data)
    headers = [nib.load(p) for p in scan.channels]
    for path, header in zip(scan.channels[1:], headers[1:]):
        _check_same_grid(path, header, scan.channels[0], headers[0])
    channels, foreground = normalise_volume(np.stack(loaded), options)
    box, kept = slice_geometry(foreground, options)
    if not kept:
        warnings.append(f"{scan.channels[0]}: no voxel above the background (an empty scan); its mask is empty")
    else:  # an empty scan gets an empty mask whatever its geometry
        warnings += check_scan(scan.channels[0], affine, foreground, options, expected)
    size = options.image_size
    images = np.stack([cut_image(channels, box, z, size) for z in kept]) if kept else np.zeros((0, len(loaded), size, size), np.uint8)
    prepared = PreparedScan(scan=scan, images=torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0), z=kept,
                            names=[f"{slice_stem(scan)}_z{z:03d}" for z in kept], box=box, warnings=warnings)
    if scan.reference:
        reference = nib.load(scan.reference)
        _check_same_grid(scan.reference, reference, scan.channels[0], headers[0])
        labels = np.asarray(reference.dataobj).reshape(reference.shape[:3])
        if expected is not None and expected.region and scan.scheme:
            layouts.check_label_values(label_values(labels), scan.scheme, scan.reference)
        prepared.reference = lesion_mask(labels, reference_labels(scan, lesion_labels, expected))
        lesion = nib.orientations.apply_orientation(prepared.reference, nib.orientations.io_orientation(reference.affine))
        prepared.masks = np.stack([resize2d(cut_box(lesion[:, :, z].astype(np.float32), box), (size, size),
                                            nearest=True) > 0.5 for z in kept]) if kept else np.zeros((0, size, size), bool)
        prepared.labels = np.array([int(lesion[:, :, z].any()) for z in kept])
    return prepared


def scan_batches(prepared, batch_size):
    """The pipeline's batches of one prepared scan."""
    return ArrayBatches(prepared.images, prepared.names, batch_size, labels=prepared.labels, masks=prepared.masks)


class ScanWriter:
    """Decides one scan's lesion voxels from its evidence (`scan_decision.decide`), pastes the masks and maps
    back into the scan's grid and writes its files into `folder`."""

    def __init__(self, folder, options, decision, overview_slices=6):
        self.folder, self.options, self.decision = folder, options, decision  # options: how a map becomes a mask
        self.overview_slices = overview_slices

    def write(self, prepared, evidence):
        """Files of one scan from its `evidence` (`scan_study.scan_evidence`); returns its metrics row (the
        caller adds its seconds) and its slice records (for the summary; None without a reference)."""
        scan, n = prepared.scan, len(prepared.names)
        masks, segmented = decide(evidence, self.decision, self.options)
        maps, probability = evidence.maps, evidence.probability
        # the map of a slice the decision leaves empty is shown as 0, as an undetected slice always was
        normalised = np.where(segmented[:, None, None], normalize_map(maps), 0.0).astype(np.float32) if n else maps
        source = scan.channels[0]
        reference_image = nib.load(source)
        prediction = paste_masks(prepared, masks)
        map_volume = paste_slices(slice_rows(prepared), dict(zip(prepared.names, normalised)), nearest=False,
                                  source=source)
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
            row.update({f"lesion_{k}": v for k, v in lesion_wise_scores(prediction, reference, spacing).items()
                        if k != "lesions"})  # BraTS 2023 lesion-wise scores and detection (lesion_metrics)
            records = {"records": evaluate_masks(masks, prepared.masks), "labels": prepared.labels,
                       "probability": probability, "segmented": segmented}
        return row, records



def slice_stem(scan):
    """The subject a scan's slices are named after (`<subject>_z<zzz>`, as the converters name them): the
    BraTS subject of a file named <subject>_<modality> or <subject>-<modality>, else the scan's name. A slice's
    noise follows its name, so a scan gets the same noise whether given as a file or as its subject folder."""
    parsed = layouts.parse_name(scan.channels[0]) if scan.channels else None
    return parsed.subject if parsed is not None else scan.name


def slice_rows(prepared):
    """The manifest-like rows (`volumes.paste_slices`) of a prepared scan's slices."""
    return [{"file": name, "slice_index": z, "x0": prepared.box[0], "x1": prepared.box[1], "y0": prepared.box[2],
             "y1": prepared.box[3]} for name, z in zip(prepared.names, prepared.z)]


def paste_masks(prepared, masks):
    """A prepared scan's slice masks (N, S, S) pasted back: a boolean volume in the scan file's own grid."""
    rows = slice_rows(prepared)
    volume = paste_slices(rows, {r["file"]: m.astype(np.float32) for r, m in zip(rows, masks)}, nearest=True,
                          source=prepared.scan.channels[0])
    return np.asarray(volume.dataobj) > 0.5


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
    summary.update(summarise_lesion_rows(scored))  # lesion_dice_mean, lesion_scans_tumour_missed, ...
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
    return SliceOptions(**known), tuple(layouts.canonical_modality(m) or m for m in modalities)
