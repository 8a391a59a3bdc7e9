"""Volumes to the slice layout: one case's slices (`export_case`) and a whole dataset, split by subject
(`export_slice_dataset`)."""

import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict

import numpy as np
from PIL import Image
from tqdm import tqdm

from .. import layouts
from ..cli import UserError
from ..files import atomic_directory
from .options import SPLITS, CLASSES, MANIFEST_NAME, SETTINGS_NAME, MANIFEST_FIELDS
from .pixels import normalize_percentiles, ct_window, square_box, cut_box, resize2d, to_uint8
from .reading import load_canonical, lesion_mask, label_values, voxel_geometry

def split_subjects(subjects, val_fraction, seed):
    """Map each subject to 'training' or 'validation'; depends only on the set of names and `seed`."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    names = sorted(subjects)
    if len(set(names)) != len(names):
        dup = next(a for a, b in zip(names, names[1:]) if a == b)
        raise UserError(f"subject {dup} appears twice in the input")
    n_val = int(round(len(names) * val_fraction))
    if val_fraction > 0 and len(names) >= 2:
        n_val = min(max(n_val, 1), len(names) - 1)
    order = np.random.default_rng(seed).permutation(len(names))
    validation = {names[i] for i in order[:n_val]}
    return {s: ("validation" if s in validation else "training") for s in names}


def normalise_volume(volume, options):
    """Channels (C, X, Y, Z) of raw intensities -> (channels in [0, 1], foreground (X, Y, Z) bool) by
    `options.intensity`: the converters and `segment_scans.py` share this, so a scan is normalised
    exactly as the training slices were."""
    if options.intensity == "brain":
        foreground = (volume != 0).any(0)  # skull-stripped data: background is exactly zero
        low, high = options.clip_percentiles
        channels = np.stack([normalize_percentiles(v, foreground, low, high) for v in volume])
    elif options.intensity == "ct":
        foreground = np.ones(volume.shape[1:], bool)
        channels = ct_window(volume, *options.ct_window)
    elif options.intensity == "percentile":
        foreground = np.ones(volume.shape[1:], bool)  # no background to leave out: every voxel counts
        low, high = options.clip_percentiles
        channels = np.stack([normalize_percentiles(v, foreground, low, high) for v in volume])
    else:
        raise ValueError(f"unknown intensity mode {options.intensity!r}")
    return channels, foreground


def slice_geometry(foreground, options):
    """(box, z indices) of a volume: the square crop box (see `square_box`) and the axial slices with
    enough foreground (`options.min_brain_fraction` of the largest)."""
    if options.crop == "brain":
        box = square_box(foreground.any(2), options.crop_margin)
    else:
        box = square_box(np.ones(foreground.shape[:2], bool))
    area = foreground.sum((0, 1))
    keep = (area > 0) & (area >= options.min_brain_fraction * area.max())
    return box, [int(z) for z in np.flatnonzero(keep)]


def cut_image(channels, box, z, size):
    """Slice z of normalised channels as the written uint8 image (C, size, size)."""
    return np.stack([to_uint8(resize2d(cut_box(c[:, :, z], box), (size, size))) for c in channels])


def _read_case(case, options, facts=None):
    """Load a case's channels (normalised to [0, 1]), lesion mask and brain footprint.

    The label values are checked against the case's layout (`case.scheme`, when set); `facts`, if given,
    gets the voxel size and field of view in mm (canonical axes) and the label values found."""
    channel_index = getattr(case, "channel_index", ()) or (None,) * len(case.images)
    loaded = [load_canonical(p, channel=c) for p, c in zip(case.images, channel_index)]
    seg, _ = load_canonical(case.seg)
    found = label_values(seg)
    if getattr(case, "scheme", ""):
        layouts.check_label_values(found, case.scheme, case.seg)
    if facts is not None:
        spacing, fov = voxel_geometry(loaded[0][1], loaded[0][0].shape)
        facts.update(voxel_mm=spacing.tolist(), fov_mm=fov.tolist(), label_values=found)
    shape = loaded[0][0].shape
    for path, (data, _) in zip(case.images[1:], loaded[1:]):
        if data.shape != shape:
            raise UserError(f"{path}: shape {data.shape} differs from {case.images[0]} {shape}")
    if seg.shape != shape:
        raise UserError(f"{case.seg}: mask shape {seg.shape} differs from image {case.images[0]} shape {shape}")
    lesion = lesion_mask(seg, options.lesion_labels)
    channels, foreground = normalise_volume(np.stack([data for data, _ in loaded]), options)
    return channels, lesion, foreground


def _write_slice(path_stem, image, image_format):
    """Write (C, H, W) uint8; returns the file name used."""
    if image.shape[0] > 1 or image_format == "npy":
        name = path_stem + ".npy"
        np.save(name, image)
    elif image_format == "png":
        name = path_stem + ".png"
        Image.fromarray(image[0]).save(name, format="PNG")
    elif image_format == "jpg":
        name = path_stem + ".jpg"
        Image.fromarray(image[0]).save(name, format="JPEG", quality=95)
    else:
        raise ValueError(f"unknown image format {image_format!r}")
    return os.path.basename(name)


def export_case(case, split, options, out_root, facts=None):
    """Write the usable slices of one case under out_root/split and return their manifest rows (`facts`: see
    `_read_case`)."""
    channels, lesion, foreground = _read_case(case, options, facts)
    size = options.image_size
    box, kept = slice_geometry(foreground, options)
    rows = []
    for z in kept:
        mask = resize2d(cut_box(lesion[:, :, z].astype(np.float32), box), (size, size), nearest=True) > 0.5
        lesion_pixels = int(mask.sum())
        if not lesion[:, :, z].any():
            label = "normal"
        elif lesion_pixels >= options.min_lesion_pixels:
            label = "tumor"
        else:
            continue  # a lesion too small to call the slice either way
        image = cut_image(channels, box, z, size)
        stem = f"{case.subject}_z{z:03d}"
        name = _write_slice(os.path.join(out_root, split, label, stem), image, options.image_format)
        Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(out_root, split, "seg", stem + ".png"))
        rows.append(dict(
            file=f"{split}/{label}/{name}", split=split, label=label, subject=case.subject,
            slice_index=z, lesion_pixels=lesion_pixels, mask=f"{split}/seg/{stem}.png",
            source=os.path.abspath(case.images[0]), seg_source=os.path.abspath(case.seg),
            x0=box[0], x1=box[1], y0=box[2], y1=box[3],
        ))
    return rows


def _export_job(job):
    case, split, options, root, stage = job
    info = None
    if stage is not None:
        case, info = stage(case, root)
    facts = {}
    return case.subject, export_case(case, split, options, root, facts), info, facts


def _geometry_range(facts):
    """dataset.json's "geometry": the smallest and largest voxel size and field of view (mm, canonical x, y, z)
    over the subjects, which `segment.scan_checks` compares scans with."""
    def extent(key):
        values = np.array([f[key] for f in facts], np.float64)
        return {"min": np.round(values.min(0), 4).tolist(), "max": np.round(values.max(0), 4).tolist()}

    return {"voxel_mm": extent("voxel_mm"), "fov_mm": extent("fov_mm")}


def _labels_found(facts):
    return sorted({v for f in facts for v in f["label_values"]})


def _final_path(path, tmp, final):
    """`path` as it will be once the temporary output folder `tmp` is renamed to `final`."""
    if os.path.commonpath([path, tmp]) == tmp:
        return os.path.join(final, os.path.relpath(path, tmp))
    return path


def _stored_path(path, out_root, input_dir):
    """How the manifest stores a volume's path: relative to the dataset root when inside it, else relative
    to the input folder when inside that, else absolute; see `resolve_source`."""
    for base in (out_root, input_dir):
        if os.path.commonpath([path, base]) == base:
            return os.path.relpath(path, base)
    return path


def _check_output_dir(out_root):
    if os.path.exists(out_root):
        if not os.path.isdir(out_root):
            raise UserError(f"--out_dir {out_root}: exists and is not a directory")
        if os.listdir(out_root) and not os.path.isfile(os.path.join(out_root, MANIFEST_NAME)):
            raise UserError(f"--out_dir {out_root}: exists, is not empty and holds no {MANIFEST_NAME}; "
                            f"refusing to replace it (choose a new or empty folder)")


def export_slice_dataset(cases, out_root, options, *, input_dir, val_fraction=0.1, seed=0, workers=1,
                         extra_settings=None, stage=None, split_of=None, labels_flag=None):
    """Write the whole slice layout for `cases` to `out_root`; return {split: {label: count}}.

    labels_flag: the flag that chose `options.lesion_labels` (e.g. "--region et"); given, it is a UserError
    naming it when none of those labels occurs in any label map. dataset.json records the label values
    found and the range of voxel sizes and fields of view ("geometry").

    split_of: {subject: split} where the caller splits the subjects itself (default: `split_subjects`).

    Subjects are split (never shared between splits), each split's slices written, and the
    manifest and settings saved. All of it goes to a temporary folder first, so on any error
    nothing is left behind and an earlier export at `out_root` stays untouched.

    `stage`, if given, is a picklable function (case, root) -> (VolumeCase, info) run in the
    worker before a case is sliced: it may write the case's NIfTI volumes anywhere under `root`
    (the temporary output folder, e.g. converted from DICOM); the manifest then records their
    paths at the final place under `out_root`, and each case's JSON-able `info` goes to
    dataset.json under "cases" (keyed by subject). `cases` are then whatever `stage` reads; each
    needs a `subject` attribute.
    """
    out_root = os.path.abspath(out_root)
    _check_output_dir(out_root)
    split_of = split_of or split_subjects([c.subject for c in cases], val_fraction, seed)
    with atomic_directory(out_root) as tmp:
        for split in SPLITS:
            for sub in CLASSES + ("seg",):
                os.makedirs(os.path.join(tmp, split, sub))
        jobs = [(case, split_of[case.subject], options, tmp, stage) for case in cases]
        rows, staged, facts = [], {}, []
        progress = dict(total=len(jobs), desc="subjects", unit="subject")

        def check_lesion_labels():
            found = _labels_found(facts)
            if labels_flag and options.lesion_labels and not set(options.lesion_labels) & set(found):
                raise UserError(f"{labels_flag}: label value(s) {', '.join(map(str, options.lesion_labels))} occur "
                                f"in no label map under {os.path.abspath(input_dir)} (found "
                                f"{', '.join(map(str, found))}); nothing written")

        def collect(results):
            bar = tqdm(**progress)  # updated by hand: a bar iterating `results` closes itself, kept, on an error
            try:
                for subject, case_rows, info, case_facts in results:
                    rows.extend(case_rows)
                    facts.append(case_facts)
                    if stage is not None:
                        staged[subject] = info
                    bar.update(1)
                check_lesion_labels()  # while the bar is up, so that it is erased on an error
            except BaseException:
                bar.leave = False  # erase the bar, so that an error is the one line the user sees
                raise
            finally:
                bar.close()

        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                collect(pool.map(_export_job, jobs))
        else:
            collect(map(_export_job, jobs))
        input_dir = os.path.abspath(input_dir)
        for row in rows:  # relative to the dataset (volumes staged inside it) or to the input folder
            for key in ("source", "seg_source"):
                row[key] = _stored_path(_final_path(row[key], tmp, out_root), out_root, input_dir)
        counts = {s: {c: sum(r["split"] == s and r["label"] == c for r in rows) for c in CLASSES} for s in SPLITS}
        for split in SPLITS:
            has_subjects = split in split_of.values()
            if has_subjects and counts[split]["tumor"] == 0:
                raise UserError(f"{input_dir}: no {split} slice has at least --min_tumor_pixels "
                                f"{options.min_lesion_pixels} lesion pixels, so {split}/tumor would be empty; "
                                f"nothing written")
        rows.sort(key=lambda r: r["file"])
        with open(os.path.join(tmp, MANIFEST_NAME), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        settings = dict(
            input_dir=input_dir, input_dir_relative=os.path.relpath(input_dir, out_root), options=asdict(options),
            val_fraction=val_fraction, seed=seed,
            counts=counts, label_values=_labels_found(facts),
            **({"geometry": _geometry_range(facts)} if facts else {}),
            subjects={s: sorted(k for k, v in split_of.items() if v == s) for s in SPLITS},
            **({"cases": staged} if stage is not None else {}),
            **(extra_settings or {}),
        )
        with open(os.path.join(tmp, SETTINGS_NAME), "w") as f:
            json.dump(settings, f, indent=1, sort_keys=True)
            f.write("\n")
    return counts


def format_counts(counts):
    """One line per split: 'training: 1200 normal, 800 tumor'."""
    return "\n".join(f"{s}: {counts[s]['normal']} normal, {counts[s]['tumor']} tumor" for s in SPLITS)
